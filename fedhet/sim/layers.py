"""The layers of the vectorized executor: each module of a supported ``nn.Sequential`` as batched operations over
the clients of a chunk, with its backward pass written out (see :mod:`fedhet.sim.vectorized`).

Linear weights under plain SGD are kept as the shared start weights minus a low-rank per-client change
(:class:`LowRank`); convolutions run as one oneDNN call per client on CPU and as unfold + ``bmm`` on CUDA. A
Linear or Conv2d weight given as an :class:`~fedhet.sim.int8.Int8Weight` (clients on the quantized trainer's int8
path) runs through :mod:`fedhet.sim.int8`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedhet.sim import int8
from fedhet.sim.int8 import Int8Weight

__all__ = ["BatchedLinear", "Grad", "LayerParam", "LowRank", "OuterGrad", "Param", "compile_model"]

_DENSE_BLOCK_BYTES = 2 << 20  # reduced-precision low-rank products made dense at a time (cache-sized)


@dataclass(frozen=True)
class OuterGrad:
    """A linear layer's weight gradient per client, kept as its factors: ``sum_b dy[c, b] x[c, b]^T``."""

    dy: torch.Tensor  # (clients, batch, out)
    x: torch.Tensor  # (clients, batch, in)

    def dense(self) -> torch.Tensor:
        """``(clients, out, in)``."""
        return torch.bmm(self.dy.transpose(1, 2), self.x)


@dataclass
class LowRank:
    """Linear weights of clients that all started from ``base`` and took plain SGD steps since:
    ``base - lr * u[c]^T v[c]``, whose rank is at most the samples seen. The first layer of the FedAvg CNN holds
    1.6 M weights against 32 x 3,136 inputs a step, so a client of 60 samples is 7 times smaller this way, and the
    forward and backward passes use the shared ``base`` with one large matrix product."""

    base: torch.Tensor  # (out, in), fp32
    u: torch.Tensor  # (clients, rank, out), compute dtype
    v: torch.Tensor  # (clients, rank, in)
    lr: float
    compute_base: torch.Tensor  # ``base`` in the compute dtype

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def prefix(self, clients: int) -> LowRank:
        return LowRank(self.base, self.u[:clients], self.v[:clients], self.lr, self.compute_base)

    def extend(self, grad: OuterGrad) -> None:
        """Take one SGD step: append the gradient's factors (zero for clients no longer training)."""
        active, batch = grad.dy.shape[:2]
        clients = self.u.shape[0]
        if active == clients:
            u, v = grad.dy, grad.x
        else:
            u = self.u.new_zeros(clients, batch, self.u.shape[2])
            v = self.v.new_zeros(clients, batch, self.v.shape[2])
            u[:active], v[:active] = grad.dy, grad.x
        if self.rank:
            u, v = torch.cat([self.u, u], 1), torch.cat([self.v, v], 1)
        self.u, self.v = u.contiguous(), v.contiguous()

    def update_squares(self) -> torch.Tensor:
        """Each client's squared L2 norm of its change ``lr * u[c]^T v[c]``, ``(clients,)`` float64, from the
        factors' Gram matrices (``||U^T V||^2 = sum(U U^T * V V^T)``): rank x rank products instead of a pass over
        the dense weights. In float64: the sum has terms of both signs (a step undone by the next cancels), which
        in float32 could come out negative, and float32 Grams overflow long before the update does."""
        u, v = self.u.double(), self.v.double()
        grams = torch.bmm(u, u.transpose(1, 2)) * torch.bmm(v, v.transpose(1, 2))
        return grams.sum((1, 2)).clamp_min(0) * self.lr**2

    def dense(self) -> torch.Tensor:
        """The fp32 weights ``(clients, out, in)``."""
        clients = self.u.shape[0]
        if self.u.dtype == torch.float32:
            base = self.base.expand(clients, *self.base.shape)
            return torch.baddbmm(base, self.u.transpose(1, 2), self.v, alpha=-self.lr)
        # on a CPU a few clients at a time, so that the reduced-precision products stay in cache until they are
        # added to the fp32 base (one pass over the result instead of three); on a GPU all at once (launches count)
        out = self.base.new_empty((clients, *self.base.shape))
        block = (
            clients if self.base.is_cuda else max(1, _DENSE_BLOCK_BYTES // (self.base.numel() * self.u.element_size()))
        )
        update = self.u.new_empty((min(block, clients), *self.base.shape))
        for start in range(0, clients, block):
            end = min(clients, start + block)
            products = torch.bmm(self.u[start:end].transpose(1, 2), self.v[start:end], out=update[: end - start])
            torch.add(self.base, products, alpha=-self.lr, out=out[start:end])
        return out


Param = torch.Tensor | LowRank
LayerParam = Param | Int8Weight  # a parameter as a step's forward and backward passes take it
Grad = torch.Tensor | OuterGrad


class _Layer(Protocol):
    """One layer of a client-batched network. Activations are ``(clients * batch, ...)``. A parameter is shared
    by every client (a tensor of its own shape), stacked per client (``(clients, *shape)``) or, for a linear
    layer's weight, a :class:`LowRank`; the layer tells them apart by their shape."""

    @property
    def keys(self) -> tuple[str, ...]:
        """State-dict keys of its parameters, in order."""
        ...

    def prepare(self, params: Sequence[LayerParam], dtype: torch.dtype) -> list[LayerParam]:
        """The fp32 master parameters as the forward and backward passes take them (dtype, memory layout)."""
        ...

    def forward(
        self, x: torch.Tensor, params: Sequence[LayerParam], clients: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]: ...

    def backward(
        self,
        dy: torch.Tensor,
        params: Sequence[LayerParam],
        saved: tuple[torch.Tensor, ...],
        clients: int,
        need_dx: bool,
    ) -> tuple[torch.Tensor | None, list[Grad]]:
        """(input gradient or None, per-client parameter gradients ``(clients, *shape)``)."""
        ...


def _tensor(param: LayerParam) -> torch.Tensor:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"expected a tensor parameter, got {type(param).__name__}")
    return param


def _concat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along the batch, channels-last (torch.cat of channels-last tensors is slow on CPU)."""
    first = parts[0]
    out = torch.empty(
        (sum(p.shape[0] for p in parts), *first.shape[1:]),
        dtype=first.dtype,
        device=first.device,
        memory_format=torch.channels_last,
    )
    start = 0
    for part in parts:
        out[start : start + part.shape[0]].copy_(part)
        start += part.shape[0]
    return out


@dataclass(frozen=True)
class BatchedLinear:
    keys: tuple[str, ...]

    def prepare(self, params: Sequence[LayerParam], dtype: torch.dtype) -> list[LayerParam]:
        return [p if isinstance(p, LowRank | Int8Weight) else _tensor(p).to(dtype) for p in params]

    def forward(
        self, x: torch.Tensor, params: Sequence[LayerParam], clients: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        w, b = params[0], _tensor(params[1]) if len(params) > 1 else None
        if isinstance(w, Int8Weight):
            return int8.linear_forward(x, w, b, clients)
        shared_b = b if b is not None and b.dim() == 1 else None
        if isinstance(w, LowRank):
            y = F.linear(x, w.compute_base, shared_b)
            if w.rank:
                xv = torch.bmm(x.view(clients, -1, x.shape[-1]), w.v.transpose(1, 2))
                y.view(clients, -1, y.shape[-1]).baddbmm_(xv, w.u, alpha=-w.lr)
        elif w.dim() == 2:
            y = F.linear(x, w, shared_b)
        else:
            y = torch.bmm(x.view(clients, -1, x.shape[-1]), w.transpose(1, 2)).view(x.shape[0], -1)
        if b is not None and shared_b is None:
            y.view(clients, -1, y.shape[-1]).add_(b.unsqueeze(1))
        return y, (x,)

    def backward(
        self,
        dy: torch.Tensor,
        params: Sequence[LayerParam],
        saved: tuple[torch.Tensor, ...],
        clients: int,
        need_dx: bool,
    ) -> tuple[torch.Tensor | None, list[Grad]]:
        w = params[0]
        if isinstance(w, Int8Weight):
            dx, grad_w, grad_b = int8.linear_backward(dy, w, saved, clients, need_dx, len(params) > 1)
            grads: list[Grad] = [OuterGrad(*grad_w) if isinstance(grad_w, tuple) else grad_w]
            return dx, grads if grad_b is None else [*grads, grad_b]
        (x,) = saved
        dyb = dy.view(clients, -1, dy.shape[-1])
        grads = [OuterGrad(dyb, x.view(clients, -1, x.shape[-1]))]
        if len(params) > 1:
            grads.append(dyb.sum(1, dtype=torch.float32))
        if not need_dx:
            return None, grads
        if isinstance(w, LowRank):
            dx = dy @ w.compute_base
            if w.rank:
                dx.view(clients, -1, dx.shape[-1]).baddbmm_(torch.bmm(dyb, w.u.transpose(1, 2)), w.v, alpha=-w.lr)
        elif w.dim() == 2:
            dx = dy @ w
        else:
            dx = torch.bmm(dyb, w).view(dy.shape[0], -1)
        return dx, grads


@dataclass(frozen=True)
class _Conv2d:
    keys: tuple[str, ...]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    unfold: bool  # per-client convolutions as unfold + bmm (CUDA) instead of one call per client (CPU)

    def prepare(self, params: Sequence[LayerParam], dtype: torch.dtype) -> list[LayerParam]:
        """The weight channels-last like the activations (oneDNN takes a slow path on mixed formats)."""
        if isinstance(params[0], Int8Weight):
            return [params[0], *(_tensor(p).to(dtype) for p in params[1:])]
        w = _tensor(params[0])
        if self.unfold:
            weight = w.to(dtype)
        elif w.dim() == 4:
            weight = w.to(dtype, memory_format=torch.channels_last)
        else:  # stacked: (clients, cout, kh, kw, cin) in memory, so that every client's slice is channels-last
            weight = w.permute(0, 1, 3, 4, 2).to(dtype, memory_format=torch.contiguous_format).permute(0, 1, 4, 2, 3)
        return [weight, *(_tensor(p).to(dtype) for p in params[1:])]

    def forward(
        self, x: torch.Tensor, params: Sequence[LayerParam], clients: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        b = _tensor(params[1]) if len(params) > 1 else None
        if isinstance(params[0], Int8Weight):
            return int8.conv_forward(x, params[0], b, clients, self.stride, self.padding)
        w = _tensor(params[0])
        if w.dim() == 4:
            y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation)
        elif self.unfold:
            y = self._unfold_forward(x, w, b, clients)
        else:
            bs = [None] * clients if b is None else b.unbind()
            parts = [
                F.conv2d(xc, wc, bc, self.stride, self.padding, self.dilation)
                for xc, wc, bc in zip(x.chunk(clients), w, bs, strict=True)
            ]
            y = _concat(parts)
        return y, (x,)

    def backward(
        self,
        dy: torch.Tensor,
        params: Sequence[LayerParam],
        saved: tuple[torch.Tensor, ...],
        clients: int,
        need_dx: bool,
    ) -> tuple[torch.Tensor | None, list[Grad]]:
        bias = len(params) > 1
        if isinstance(params[0], Int8Weight):
            dx, grad_w, grad_b = int8.conv_backward(
                dy, params[0], saved, clients, need_dx, bias, self.stride, self.padding
            )
            return dx, [grad_w] if grad_b is None else [grad_w, grad_b]
        (x,) = saved
        w = _tensor(params[0])
        shared = w.dim() == 4
        if self.unfold:
            return self._unfold_backward(dy, x, w, clients, shared, need_dx, bias)
        dx = None
        if shared and need_dx:
            dx = self._conv_backward(dy, x, w, (True, False, False))[0]
        parts = [
            self._conv_backward(dyc, xc, w if shared else wc, (need_dx and not shared, True, bias))
            for dyc, xc, wc in zip(dy.chunk(clients), x.chunk(clients), w.expand(clients, *w.shape[-4:]), strict=True)
        ]
        if need_dx and not shared:
            dx = _concat([p[0] for p in parts])
        grads: list[Grad] = [torch.stack([p[1] for p in parts])]
        if bias:
            grads.append(torch.stack([p[2] for p in parts]).float())
        return dx, grads

    def _conv_backward(
        self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: tuple[bool, bool, bool]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = torch.ops.aten.convolution_backward(
            dy,
            x,
            w,
            [w.shape[0]] if mask[2] else None,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0, 0],
            1,
            list(mask),
        )
        return out

    def _cols(self, x: torch.Tensor, w: torch.Tensor, clients: int) -> tuple[torch.Tensor, int, int]:
        """Per-client unfolded input ``(clients, cin*kh*kw, batch*L)`` and the output height and width: the patches
        as a strided view of the padded input, laid out in one copy (CUDA's ``F.unfold`` launches a kernel per
        sample)."""
        (ph, pw), (dh, dw) = self.padding, self.dilation
        kh, kw = w.shape[-2], w.shape[-1]
        padded = F.pad(x, (pw, pw, ph, ph))
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        patches = padded.unfold(2, span_h, self.stride[0]).unfold(3, span_w, self.stride[1])[..., ::dh, ::dw]
        n, cin, height, width = patches.shape[:4]  # (N, cin, H', W', kh, kw)
        cols = patches.view(clients, n // clients, cin, height, width, kh, kw).permute(0, 2, 5, 6, 1, 3, 4)
        return cols.reshape(clients, cin * kh * kw, -1), height, width

    def _unfold_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, clients: int) -> torch.Tensor:
        cols, height, width = self._cols(x, w, clients)
        w2 = w.reshape(clients, w.shape[1], -1)
        y = torch.bmm(w2, cols) if b is None else torch.baddbmm(b.unsqueeze(2), w2, cols)
        y = y.view(clients, w.shape[1], -1, height, width).transpose(1, 2)
        return y.reshape(x.shape[0], w.shape[1], height, width)

    def _unfold_backward(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        w: torch.Tensor,
        clients: int,
        shared: bool,
        need_dx: bool,
        bias: bool,
    ) -> tuple[torch.Tensor | None, list[Grad]]:
        cols, _, _ = self._cols(x, w, clients)
        cout = w.shape[-4]
        dy2 = dy.reshape(clients, -1, cout, dy.shape[2] * dy.shape[3]).transpose(1, 2).reshape(clients, cout, -1)
        grads: list[Grad] = [torch.bmm(dy2, cols.transpose(1, 2)).view(clients, *w.shape[-4:])]
        if bias:
            grads.append(dy2.sum(2, dtype=torch.float32))
        dx = None
        if need_dx and shared:
            dx = self._conv_backward(dy, x, w, (True, False, False))[0]
        elif need_dx:
            dcols = torch.bmm(w.reshape(clients, cout, -1).transpose(1, 2), dy2)
            n = x.shape[0]
            dcols = dcols.view(clients, dcols.shape[1], n // clients, -1).transpose(1, 2).reshape(n, dcols.shape[1], -1)
            dx = F.fold(dcols, x.shape[2:], w.shape[-2:], self.dilation, self.padding, self.stride)
        return dx, grads


@dataclass(frozen=True)
class _ReLU:
    keys: tuple[str, ...] = ()

    def prepare(self, params: Sequence[LayerParam], dtype: torch.dtype) -> list[LayerParam]:
        return []

    def forward(
        self, x: torch.Tensor, params: Sequence[LayerParam], clients: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        y = x.clamp_min_(0)  # in place: no layer keeps its own output for its backward
        return y, (y,)

    def backward(
        self,
        dy: torch.Tensor,
        params: Sequence[LayerParam],
        saved: tuple[torch.Tensor, ...],
        clients: int,
        need_dx: bool,
    ) -> tuple[torch.Tensor | None, list[Grad]]:
        return (torch.ops.aten.threshold_backward(dy, saved[0], 0) if need_dx else None), []


@dataclass(frozen=True)
class _MaxPool2d:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool
    keys: tuple[str, ...] = ()

    def prepare(self, params: Sequence[LayerParam], dtype: torch.dtype) -> list[LayerParam]:
        return []

    def _args(self) -> tuple[list[int], list[int], list[int], list[int], bool]:
        return list(self.kernel), list(self.stride), list(self.padding), list(self.dilation), self.ceil_mode

    def forward(
        self, x: torch.Tensor, params: Sequence[LayerParam], clients: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        y, indices = torch.ops.aten.max_pool2d_with_indices(x, *self._args())
        return y, (x, indices)

    def backward(
        self,
        dy: torch.Tensor,
        params: Sequence[LayerParam],
        saved: tuple[torch.Tensor, ...],
        clients: int,
        need_dx: bool,
    ) -> tuple[torch.Tensor | None, list[Grad]]:
        if not need_dx:
            return None, []
        x, indices = saved
        dx: torch.Tensor = torch.ops.aten.max_pool2d_with_indices_backward(dy, x, *self._args(), indices)
        return dx, []


@dataclass(frozen=True)
class _Flatten:
    keys: tuple[str, ...] = ()

    def prepare(self, params: Sequence[LayerParam], dtype: torch.dtype) -> list[LayerParam]:
        return []

    def forward(
        self, x: torch.Tensor, params: Sequence[LayerParam], clients: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return x.reshape(x.shape[0], -1), (torch.empty(x.shape, device="meta"),)  # keeps the shape only

    def backward(
        self,
        dy: torch.Tensor,
        params: Sequence[LayerParam],
        saved: tuple[torch.Tensor, ...],
        clients: int,
        need_dx: bool,
    ) -> tuple[torch.Tensor | None, list[Grad]]:
        if not need_dx:
            return None, []
        dx = dy.reshape(saved[0].shape)
        return (dx.contiguous(memory_format=torch.channels_last) if dx.dim() == 4 else dx), []


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"expected an int or a pair, got {value!r}")
    return pair[0], pair[1]


def compile_model(model: nn.Module, input_rank: int, unfold: bool) -> tuple[list[_Layer], str]:
    """The client-batched layers of ``model`` (inputs of rank ``input_rank`` with the batch dimension), or an
    empty list and the reason it cannot be vectorized."""
    if not isinstance(model, nn.Sequential):
        return [], f"{type(model).__name__} is not an nn.Sequential"
    if any(True for _ in model.buffers()):
        return [], "the model has buffers (running statistics), which local training would update"
    layers: list[_Layer] = []
    rank = input_rank
    for name, module in model.named_children():
        keys = tuple(f"{name}.{p}" for p, _ in module.named_parameters())
        if isinstance(module, nn.Conv2d) and rank == 4:
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                return [], f"layer {name} ({module}) has groups, a padding mode or a padding string"
            layer: _Layer = _Conv2d(keys, _pair(module.stride), _pair(module.padding), _pair(module.dilation), unfold)
        elif isinstance(module, nn.Linear) and rank == 2:
            layer = BatchedLinear(keys)
        elif isinstance(module, nn.ReLU):
            layer = _ReLU()
        elif isinstance(module, nn.MaxPool2d) and rank == 4 and not module.return_indices:
            stride = module.stride if module.stride is not None else module.kernel_size
            layer = _MaxPool2d(
                _pair(module.kernel_size),
                _pair(stride),
                _pair(module.padding),
                _pair(module.dilation),
                module.ceil_mode,
            )
        elif isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            layer, rank = _Flatten(), 2
        else:
            return [], f"layer {name} ({module}) is not supported on inputs of rank {rank}"
        if isinstance(layer, _MaxPool2d) and layers and isinstance(layers[-1], _ReLU):
            # max pooling commutes with ReLU; pooling first runs ReLU and its backward on a quarter of the values
            layers.insert(len(layers) - 1, layer)
        else:
            layers.append(layer)
    return layers, ""
