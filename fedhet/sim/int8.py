"""The quantized trainer's int8 path (:mod:`fedhet.clients.quantized`) for a chunk of the vectorized executor.

A client of at most 8 bits whose layer is large enough (:func:`~fedhet.clients.quantized.choose_path`, decided per
step by its own minibatch's multiply-accumulates, as the quantized trainer decides it) runs that Linear or Conv2d
layer on integer GEMMs: its weights as int8 integers with per-output-channel scales, its activations quantized to
int8 on the fly (a scale per row for Linear, per client and step for Conv2d, over the client's real samples only,
not the chunk's padding), ``torch._int_mm`` with int32 sums, and the backward pass of the quantized trainer
(SwitchBack: int8 input gradients and bf16 weight gradients for Linear, one bf16 convolution backward for Conv2d).
The kernels are the quantized trainer's own; what is batched over the chunk is everything around them (activation
and gradient quantization, rescaling, im2col), and each client's integer GEMM is one ``torch._int_mm`` call on its
rows (there is no batched integer matrix product). A client whose minibatch is too small for the int8 path at a step
takes the fake-quantized path there, as it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedhet import quant
from fedhet.clients.quantized import (
    activation_scale,
    choose_path,
    conv_backward_bf16,
    gemm_shape,
    grad_dtype,
    im2col_int8,
    quantize_rows,
    weight_columns,
)

__all__ = ["Int8Weight", "conv_backward", "conv_forward", "int8_rows", "linear_backward", "linear_forward"]


@dataclass(frozen=True)
class Int8Weight:
    """A Linear or Conv2d weight of a step's clients at ``b <= 8`` bits: integers and per-output-channel scales,
    shared by every client (the first step of a synchronous round) or stacked per client, and which clients take
    the int8 path at this step (the others take the fake-quantized one)."""

    q: torch.Tensor  # int8: the weight's shape, or (clients, *shape)
    scales: torch.Tensor  # fp32: (out,) or (clients, out)
    shared: bool
    int8: tuple[bool, ...]  # per client
    rows: tuple[int, ...]  # per client: its real samples at this step (the minibatch's padding follows them)

    @classmethod
    def of(cls, weight: torch.Tensor, bits: int, shared: bool, int8: Sequence[bool], rows: Sequence[int]) -> Int8Weight:
        """``weight`` (shared, or stacked per client) rounded to ``bits`` bits, without a finiteness check (a
        training step's results are checked when they are rounded for upload)."""
        if shared:
            q, scales = quant.quantize(weight, bits, check_finite=False)
        else:
            q, scales = quant.quantize_stacked(weight, bits, check_finite=False)
        return cls(q, scales, shared, tuple(int8), tuple(rows))

    @property
    def all_int8(self) -> bool:
        return all(self.int8)

    def integers(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``client``'s integers and scales."""
        return (self.q, self.scales) if self.shared else (self.q[client], self.scales[client])

    def dequantized(self, client: int) -> torch.Tensor:
        """Client ``client``'s weights on the grid in fp32: the fake-quantized path's weights."""
        return quant.dequantize(*self.integers(client))

    def stacked_scales(self, clients: int) -> torch.Tensor:
        """``(clients, out)`` scales."""
        return self.scales.expand(clients, -1) if self.shared else self.scales


def int8_rows(
    model: nn.Module, sample: torch.Tensor, bits: int, int8_min_macs: int, batch: int
) -> dict[str, list[bool]]:
    """For each Linear and Conv2d weight of ``model`` (an ``nn.Sequential``) that takes the int8 path at ``bits``
    bits on some minibatch of at most ``batch`` samples like ``sample`` (one input, batch dimension included):
    whether a minibatch of ``n`` samples takes it, for ``n`` in ``0..batch`` (the quantized trainer's choice)."""
    out: dict[str, list[bool]] = {}
    h = sample
    with torch.no_grad():
        for name, module in model.named_children():
            if isinstance(module, nn.Linear | nn.Conv2d):
                paths = []
                for n in range(batch + 1):
                    rows, reduction, columns = gemm_shape(module, (n, *h.shape[1:]))
                    paths.append(choose_path(module, bits, rows * reduction * columns, int8_min_macs))
                if "int8" in paths[1:]:
                    out[f"{name}.weight"] = [n > 0 and path == "int8" for n, path in enumerate(paths)]
            h = module(h)
    return out


def _bias_add(y: torch.Tensor, bias: torch.Tensor | None, clients: int) -> None:
    """Adds a shared ``(out,)`` or stacked ``(clients, out)`` bias to ``y`` (rows grouped by client, out last)."""
    if bias is None:
        return
    yb = y.view(clients, -1, y.shape[-1])
    yb.add_(bias if bias.dim() == 1 else bias.unsqueeze(1))


def _bias(bias: torch.Tensor | None, client: int) -> torch.Tensor | None:
    return bias if bias is None or bias.dim() == 1 else bias[client]


# ---------------------------------------------------------------------------------------------- Linear


def linear_forward(
    x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None, clients: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``y = x W_c^T + b_c`` for each client's rows of ``x`` ``(clients * batch, in)``; the saved tensors are the
    int8 rows and their scales (and ``x`` where a client takes the fake path)."""
    dtype, x = x.dtype, x.float()
    batch = x.shape[0] // clients
    xq, xs = quantize_rows(x)
    if w.all_int8 and w.shared:
        y = torch._int_mm(xq, w.q.t()).float().mul_(xs[:, None]).mul_(w.scales)
    else:
        y = x.new_empty((x.shape[0], w.q.shape[-2]))
        for c in range(clients):
            rows = slice(c * batch, (c + 1) * batch)
            if w.int8[c]:
                q, scales = w.integers(c)
                y[rows] = torch._int_mm(xq[rows], q.t())
                y[rows].mul_(xs[rows, None]).mul_(scales)
            else:
                torch.mm(x[rows], w.dequantized(c).t(), out=y[rows])
    _bias_add(y, bias, clients)
    return y.to(dtype), ((xq, xs) if w.all_int8 else (xq, xs, x))


def linear_backward(
    dy: torch.Tensor, w: Int8Weight, saved: tuple[torch.Tensor, ...], clients: int, need_dx: bool, has_bias: bool
) -> tuple[torch.Tensor | None, torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """``(input gradient or None, weight gradient, bias gradient or None)``; the weight gradient of an all-int8
    step as its factors ``(dy', x')`` (``dW_c = dy'_c^T x'_c``, bf16 as the quantized trainer computes it), else
    dense ``(clients, out, in)``."""
    dtype, dy = dy.dtype, dy.float()
    xq, xs = saved[0], saved[1]
    batch = dy.shape[0] // clients
    low = grad_dtype(dy.device)
    grad_w: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    if w.all_int8:  # dW = (dy * s_x)^T xq: reduces over the batch, bf16 with fp32 sums
        grad_w = ((dy * xs[:, None]).to(low).view(clients, batch, -1), xq.to(low).view(clients, batch, -1))
    else:
        x = saved[2]
        dense = []
        for c in range(clients):
            rows = slice(c * batch, (c + 1) * batch)
            if w.int8[c]:
                dense.append((dy[rows] * xs[rows, None]).t().to(low).mm(xq[rows].to(low)).float())
            else:
                dense.append(dy[rows].t().mm(x[rows]))
        grad_w = torch.stack(dense)
    grad_b = dy.view(clients, batch, -1).sum(1) if has_bias else None
    if not need_dx:
        return None, grad_w, grad_b
    scaled = dy.view(clients, batch, -1) * w.stacked_scales(clients).unsqueeze(1)  # dL/dx = (dy * s_w) @ Wq
    gq, gs = quantize_rows(scaled.view(dy.shape))
    if w.all_int8 and w.shared:
        dx = torch._int_mm(gq, w.q).float().mul_(gs[:, None])
    else:
        dx = dy.new_empty((dy.shape[0], w.q.shape[-1]))
        for c in range(clients):
            rows = slice(c * batch, (c + 1) * batch)
            if w.int8[c]:
                dx[rows] = torch._int_mm(gq[rows], w.integers(c)[0])
                dx[rows].mul_(gs[rows, None])
            else:
                torch.mm(dy[rows], w.dequantized(c), out=dx[rows])
    return dx.to(dtype), grad_w, grad_b


# ---------------------------------------------------------------------------------------------- Conv2d


def conv_forward(
    x: torch.Tensor,
    w: Int8Weight,
    bias: torch.Tensor | None,
    clients: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Each client's convolution of its samples of ``x`` ``(clients * batch, C, H, W)``, channels-last; the
    padding after a client's real samples (``w.rows``) does not enter its activation scale. The saved
    tensors are the padded int8 input and each client's scale (and ``x`` where a client takes the fake path)."""
    dtype, x = x.dtype, x.float()
    n = x.shape[0]
    batch = n // clients
    out_channels, _, kh, kw = w.q.shape[-4:]
    per_sample = x.abs().amax(dim=(1, 2, 3)).view(clients, batch)
    padded_batch = any(r < batch for r in w.rows)
    for c, r in enumerate(w.rows):
        if r < batch:
            per_sample[c, r:] = 0
    xs = activation_scale(per_sample.amax(1))  # (clients,)
    xq = x.mul(xs.reciprocal().repeat_interleave(batch).view(n, 1, 1, 1)).round_()
    if padded_batch:  # padding samples may lie outside their client's range
        xq.clamp_(-127, 127)
    padded, cols, out_h, out_w = im2col_int8(xq.to(torch.int8), (kh, kw), stride, padding)
    per_client = batch * out_h * out_w
    ws = w.stacked_scales(clients)
    if w.all_int8 and w.shared:
        y = torch._int_mm(cols, weight_columns(w.q)).float()
        y.view(clients, per_client, -1).mul_((ws * xs[:, None]).unsqueeze(1))
    else:
        y = x.new_empty((n * out_h * out_w, out_channels))
        for c in range(clients):
            if w.int8[c]:
                part = y[c * per_client : (c + 1) * per_client]
                part.copy_(torch._int_mm(cols[c * per_client : (c + 1) * per_client], weight_columns(w.integers(c)[0])))
                part.mul_(ws[c] * xs[c])
    _bias_add(y, bias, clients)
    out = y.view(n, out_h, out_w, out_channels).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
    if not w.all_int8:
        for c in range(clients):
            if not w.int8[c]:
                samples = slice(c * batch, (c + 1) * batch)
                weight = w.dequantized(c).contiguous(memory_format=torch.channels_last)
                out[samples] = F.conv2d(x[samples], weight, _bias(bias, c), stride, padding)
    saved = (padded, xs) if w.all_int8 else (padded, xs, x)
    return out.to(dtype), saved


def conv_backward(
    dy: torch.Tensor,
    w: Int8Weight,
    saved: tuple[torch.Tensor, ...],
    clients: int,
    need_dx: bool,
    has_bias: bool,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(input gradient or None, weight gradients (clients, *shape), bias gradients or None)``: per client one
    convolution backward, in bf16 on the int8 path as the quantized trainer's."""
    dtype, dy = dy.dtype, dy.float()
    padded, xs = saved[0], saved[1]
    n = dy.shape[0]
    batch = n // clients
    (ph, pw) = padding
    height, width = padded.shape[1] - 2 * ph, padded.shape[2] - 2 * pw
    dx = (
        torch.empty((n, padded.shape[3], height, width), device=dy.device, memory_format=torch.channels_last)
        if need_dx
        else None
    )
    grads = []
    for c in range(clients):
        samples = slice(c * batch, (c + 1) * batch)
        if w.int8[c]:
            q, scales = w.integers(c)
            gx, gw = conv_backward_bf16(
                dy[samples], padded[samples], xs[c], q, scales, (stride, padding, height, width), (need_dx, True)
            )
        else:
            weight = w.dequantized(c).contiguous(memory_format=torch.channels_last)
            x = saved[2][samples].contiguous(memory_format=torch.channels_last)
            g = dy[samples].contiguous(memory_format=torch.channels_last)
            gx, gw, _ = torch.ops.aten.convolution_backward(
                g, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1, [need_dx, True, False]
            )
        assert gw is not None
        grads.append(gw)
        if dx is not None:
            assert gx is not None
            dx[samples] = gx
    grad_b = dy.view(clients, batch, *dy.shape[1:]).sum((1, 3, 4)) if has_bias else None
    return (dx.to(dtype) if dx is not None else None), torch.stack(grads), grad_b
