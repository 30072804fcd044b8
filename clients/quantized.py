"""Quantization-aware training (QAT) at a client's bitwidth, with integer GEMMs where they pay.

A client of bitwidth ``b`` trains its model with weights rounded to ``b`` bits (:mod:`fedhet.quant`: symmetric,
one scale per output channel) in every forward pass; the gradient passes the rounding unchanged (straight-through
estimator) to an fp32 **master copy** of the weights, which the optimizer updates.

Paths, chosen per layer (:func:`choose_path`):

- ``int8`` (b <= 8, Linear and Conv2d, where integer GEMMs pay: :func:`int8_gemms_pay`): weights as int8 integers
  at ``b`` bits, activations quantized to int8 on the fly (one scale per row for Linear, per tensor for Conv2d), and
  ``torch._int_mm`` with int32 accumulation (oneDNN's AMX/VNNI kernels); Conv2d through a channels-last im2col.
  Backward follows SwitchBack (Wortsman et al., 2023): the input gradient of a Linear layer is an int8 GEMM of the
  row-quantized output gradient with the int8 weights; weight gradients, which reduce over the batch, are bf16 GEMMs
  with fp32 accumulation (a Conv2d layer's whole backward is one oneDNN bf16 convolution backward); fp32 where the
  CPU has no bf16 instructions.
- ``fake`` (b > 8, a layer too small for the int8 path to win, or hardware where integer GEMMs do not pay): fp32
  GEMM with the weights rounded to ``b`` bits (activations stay fp32). Integers of more than 8 bits do not fit an
  int8 GEMM; for tiny layers (the classifier 512 -> 10) the dozen quantization kernels of the int8 path cost more
  than the whole fp32 GEMM they replace, so layers with fewer than ``int8_min_macs`` multiply-accumulates per
  forward take this path (see ``benchmarks/quantized_step.py`` for the per-layer timings behind the default).
- ``fp32`` (b = 32): the plain layer.

Memory. Between tasks the client holds its weights packed at ``b`` bits (:attr:`QuantizedTrainer.stored`: b/32 of
fp32 plus one fp32 scale per output channel) and no fp32 weights. During a task the fp32 master copy is
materialised from the task's weights: 4 bytes per parameter, plus 4 for its gradient (SGD with momentum: 4 more),
plus, on the int8 path, a transient int8 copy of each layer's weights (1 byte per parameter, rebuilt every step).
A master copy at lower precision would lose SGD updates smaller than half a quantization step, which at 4 bits is
most of them. Activations saved for backward on the int8 path are int8 (1 byte instead of 4). On a GPU with
``cuda_graphs`` (the default) the master copy stays allocated between tasks: the captured training step
(:mod:`fedhet.clients.graphed`) holds its storage. A GPU client that must hold only ``b`` bits between tasks trains
with ``low_bit_weights``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedhet import quant
from fedhet.clients.lowbit import LowBitTrainer
from fedhet.clients.trainer import ClientState, LocalTrainer, TrainConfig, result_seed
from fedhet.types import DIVERGED, Result, Task

__all__ = [
    "INT8_NEVER",
    "PATHS",
    "QuantConv2d",
    "QuantLinear",
    "QuantizedTrainer",
    "activation_scale",
    "bf16_is_native",
    "choose_path",
    "conv_backward_bf16",
    "default_int8_min_macs",
    "gemm_shape",
    "grad_dtype",
    "im2col_int8",
    "int8_gemms_pay",
    "layer_paths",
    "quantize_model",
    "quantize_rows",
    "set_bitwidth",
    "weight_columns",
]

PATHS = ("int8", "fake", "fp32")
_ACT_QMAX = 127  # activations and gradients on the int8 path: 8-bit symmetric
_MIN_SCALE = 2.0**-126
DEFAULT_INT8_MIN_MACS = 1 << 21
INT8_NEVER = 1 << 62  # an ``int8_min_macs`` no layer reaches: every layer below 32 bits takes the fake path
# a GEMM reducing over fewer values (the first convolution: 1 channel x 5 x 5 = 25) is bound by memory, not
# arithmetic: int8 gains nothing there and its im2col of single-byte channels costs more than the fp32 convolution
_INT8_MIN_REDUCTION = 64


@functools.cache
def int8_gemms_pay(device: torch.device) -> bool:
    """Whether integer GEMMs beat fp32 ones on ``device`` at client-training shapes (minibatch 32 to 256).

    On a CPU only with VNNI or AMX int8 instructions: without them oneDNN has no fast int8 kernel and
    ``torch._int_mm`` of 512x3136 by 3136x512 took 6.9 s against 70 ms in fp32 (AVX2-only AMD EPYC, one thread,
    torch 2.13). Not on CUDA: there ``torch._int_mm`` is 0.23-0.82x an fp32 GEMM at these shapes on an H200, and a
    step is bound by kernel launches, not arithmetic (issue 17)."""
    if device.type != "cpu":
        return False
    return _cpu_has("_is_vnni_supported") or _cpu_has("_is_amx_tile_supported")


def _cpu_has(feature: str) -> bool:
    probe = getattr(torch.cpu, feature, None)  # private probes of torch's cpuinfo; absent means unknown: no
    return bool(probe()) if callable(probe) else False


@functools.cache
def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware: CUDA, or a CPU with AVX-512 BF16 or AMX. Elsewhere oneDNN
    emulates it: a bf16 CNN step took 0.07x fp32's speed on an AVX2-only CPU."""
    if device.type != "cpu":
        return True
    return _cpu_has("_is_avx512_bf16_supported") or _cpu_has("_is_amx_tile_supported")


def grad_dtype(device: torch.device) -> torch.dtype:
    """bf16 for the int8 path's batch-reducing backward GEMMs where the hardware multiplies bf16 natively, else
    fp32."""
    return torch.bfloat16 if bf16_is_native(device) else torch.float32


def default_int8_min_macs(device: torch.device) -> int:
    """The default ``int8_min_macs`` on ``device``: :data:`DEFAULT_INT8_MIN_MACS` where integer GEMMs pay
    (:func:`int8_gemms_pay`), else :data:`INT8_NEVER` (0 forces the int8 path on any device, as tests do)."""
    return DEFAULT_INT8_MIN_MACS if int8_gemms_pay(device) else INT8_NEVER


def choose_path(layer: nn.Module, bits: int, macs: int, int8_min_macs: int | None = None) -> str:
    """The path (``int8``, ``fake`` or ``fp32``) a Linear or Conv2d ``layer`` takes at ``bits`` bits for a forward
    pass of ``macs`` multiply-accumulates (see the module docstring for why); ``int8_min_macs`` None is the default
    for the layer's device (:func:`default_int8_min_macs`)."""
    if bits == quant.FULL_PRECISION:
        return "fp32"
    quant.check_bits(bits)
    if int8_min_macs is None:
        weight = getattr(layer, "weight", None)
        device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
        int8_min_macs = default_int8_min_macs(device)
    if bits > 8 or macs < int8_min_macs:
        return "fake"
    if isinstance(layer, nn.Conv2d):
        plain = layer.groups == 1 and layer.dilation == (1, 1) and layer.padding_mode == "zeros"
        reduction = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        return "int8" if plain and isinstance(layer.padding, tuple) and reduction >= _INT8_MIN_REDUCTION else "fake"
    reduction = layer.in_features if isinstance(layer, nn.Linear) else 0
    return "int8" if reduction >= _INT8_MIN_REDUCTION else "fake"


def gemm_shape(layer: nn.Module, shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
    """A Linear or Conv2d ``layer``'s forward pass on an input of ``shape`` as one (rows x reduction) @
    (reduction x columns) GEMM: ``(rows, reduction, columns)``; a convolution counts its output pixels as the input's
    over the stride."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        pixels = shape[0] * shape[2] * shape[3] // (layer.stride[0] * layer.stride[1])
        return pixels, kh * kw * layer.in_channels, layer.out_channels
    if isinstance(layer, nn.Linear):
        return math.prod(shape) // layer.in_features, layer.in_features, layer.out_features
    raise TypeError(f"expected a Linear or Conv2d layer, got {type(layer).__name__}")


# ---------------------------------------------------------------------------------------------- kernels


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows of a 2-D tensor and their fp32 scales (one per row): the int8 path's activations and output
    gradients of a Linear layer."""
    scale = activation_scale(x.abs().amax(dim=1))
    return x.mul(scale.reciprocal()[:, None]).round_().to(torch.int8), scale


def activation_scale(absmax: torch.Tensor) -> torch.Tensor:
    """The int8 scale of activations whose largest magnitude is ``absmax`` (elementwise, any shape)."""
    return absmax.div(_ACT_QMAX).clamp_min_(_MIN_SCALE)


def _quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values of a tensor and its one fp32 scale (a 0-d tensor)."""
    scale = activation_scale(x.abs().amax())
    return x.mul(scale.reciprocal()).round_().to(torch.int8), scale


def _int_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, scales = quant.quantize(weight, bits, check_finite=False)  # as _FakeQuantSTE: the result is checked
    return q, scales.to(weight.device)


def im2col_int8(
    xq: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The int8 path's channels-last im2col of int8 activations ``xq`` (N, C, H, W): ``(padded, columns, out_h,
    out_w)``, ``padded`` the zero-padded input (N, H + 2 ph, W + 2 pw, C) kept for the backward pass and
    ``columns`` (N * out_h * out_w, kh * kw * C), whose rows are sample-major."""
    batch, channels, height, width = xq.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    padded = xq.new_zeros(batch, height + 2 * ph, width + 2 * pw, channels)
    padded[:, ph : ph + height, pw : pw + width, :] = xq.permute(0, 2, 3, 1)
    b_, h_, w_, c_ = padded.stride()
    cols = padded.as_strided((batch, out_h, out_w, kh, kw, channels), (b_, h_ * sh, w_ * sw, h_, w_, c_)).reshape(
        batch * out_h * out_w, kh * kw * channels
    )
    return padded, cols, out_h, out_w


def weight_columns(wq: torch.Tensor) -> torch.Tensor:
    """A convolution's int8 weights (out, C, kh, kw) as the right operand of :func:`im2col_int8`'s GEMM,
    ``(kh * kw * C, out)``."""
    return wq.permute(0, 2, 3, 1).reshape(wq.shape[0], -1).t().contiguous()


def conv_backward_bf16(
    grad: torch.Tensor,
    padded: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scales: torch.Tensor,
    geometry: tuple[tuple[int, int], tuple[int, int], int, int],
    need: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The int8 path's convolution backward: one oneDNN convolution backward of the dequantized input and weights
    in bf16 (fp32 where the CPU has no bf16 instructions); ``(input gradient, weight gradient)`` in fp32, None
    where ``need`` says so. ``geometry`` is (stride, padding, height, width) of the forward pass."""
    stride, padding, height, width = geometry
    ph, pw = padding
    channels_last = torch.channels_last
    dtype = grad_dtype(grad.device)
    x = padded[:, ph : ph + height, pw : pw + width, :].permute(0, 3, 1, 2).to(dtype).mul_(x_scale)
    w = (wq.to(dtype) * w_scales.to(dtype).view(-1, 1, 1, 1)).contiguous(memory_format=channels_last)
    g = grad.to(dtype).contiguous(memory_format=channels_last)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        g, x.contiguous(memory_format=channels_last), w, None, list(stride), list(padding), [1, 1], False,
        [0, 0], 1, [need[0], need[1], False],
    )  # fmt: skip
    return (grad_x.float() if need[0] else None), (grad_w.float() if need[1] else None)


class _FakeQuantSTE(torch.autograd.Function):
    """Weights rounded to ``bits`` bits in the forward pass; the gradient passes unchanged (straight through)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, bits: int) -> torch.Tensor:
        # no finiteness check: it reads a value back to the host (no CUDA graph can hold that); the task's result
        # is checked when the trainer rounds it for upload
        return quant.fake_quantize(weight, bits, check_finite=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Int8Linear(torch.autograd.Function):
    """``y = x W^T + b`` with int8 x (per-row scales) and int8 W at ``bits`` bits (per-output-channel scales)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bits: int) -> torch.Tensor:
        wq, ws = _int_weight(weight, bits)
        xq, xs = quantize_rows(x)
        out = torch._int_mm(xq, wq.t()).float().mul_(xs[:, None]).mul_(ws)
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xq, xs, wq, ws = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dL/dx = (g * s_w) @ Wq: an int8 GEMM of the row-quantized gradient
            gq, gs = quantize_rows(grad * ws)
            grad_x = torch._int_mm(gq, wq).float().mul_(gs[:, None])
        if ctx.needs_input_grad[1]:  # dL/dW = (g * s_x)^T @ xq: reduces over the batch, so bf16 with fp32 sums
            dtype = grad_dtype(grad.device)
            grad_w = (grad * xs[:, None]).t().to(dtype).mm(xq.to(dtype)).float()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None


class _Int8Conv2d(torch.autograd.Function):
    """2-D convolution (groups 1, dilation 1, zero padding) as a channels-last im2col and an int8 GEMM."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> torch.Tensor:
        batch, _, height, width = x.shape
        out_channels, _, kh, kw = weight.shape
        wq, ws = _int_weight(weight, bits)
        xq, xs = _quantize_tensor(x)
        padded, cols, out_h, out_w = im2col_int8(xq, (kh, kw), stride, padding)
        out = torch._int_mm(cols, weight_columns(wq)).float().mul_(ws * xs)
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(padded, xs, wq, ws)
        ctx.geometry = (stride, padding, height, width)
        ctx.has_bias = bias is not None
        return out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        padded, xs, wq, ws = ctx.saved_tensors
        need_x, need_w = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        grad_x, grad_w = conv_backward_bf16(grad, padded, xs, wq, ws, ctx.geometry, (need_x, need_w))
        grad_b = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


def _apply(function: type[torch.autograd.Function], *args: Any) -> torch.Tensor:
    out = function.apply(*args)  # type: ignore[no-untyped-call]
    assert isinstance(out, torch.Tensor)
    return out


def _fake_quant_ste(weight: torch.Tensor, bits: int) -> torch.Tensor:
    return _apply(_FakeQuantSTE, weight, bits)


# ---------------------------------------------------------------------------------------------- layers


class _Quantized:
    """Bitwidth and path choice shared by :class:`QuantLinear` and :class:`QuantConv2d`."""

    bits: int = quant.FULL_PRECISION
    int8_min_macs: int | None = None  # None: the default for the layer's device
    last_path: str = ""

    def path_for(self, macs: int, rows: int, reduction: int, columns: int) -> str:
        """The path for a forward pass of ``macs`` multiply-accumulates, as a (rows x reduction) @ (reduction x
        columns) GEMM. On CUDA, int8 GEMMs need more than 16 rows and both other sizes a multiple of 8."""
        assert isinstance(self, nn.Module)
        path = choose_path(self, self.bits, macs, self.int8_min_macs)
        weight = self.weight
        assert isinstance(weight, torch.Tensor)
        if path == "int8" and weight.is_cuda and (rows <= 16 or reduction % 8 or columns % 8):
            path = "fake"
        self.last_path = path
        return path


class QuantLinear(_Quantized, nn.Linear):
    """nn.Linear trained at ``bits`` bits (same parameters and state-dict keys as nn.Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        m, k, n = gemm_shape(self, x.shape)
        path = self.path_for(m * k * n, m, k, n)
        if path == "fp32":
            return F.linear(x, self.weight, self.bias)
        if path == "fake":
            return F.linear(x, _fake_quant_ste(self.weight, self.bits), self.bias)
        out = _apply(_Int8Linear, rows, self.weight, self.bias, self.bits)
        return out.reshape(*x.shape[:-1], self.out_features)


class QuantConv2d(_Quantized, nn.Conv2d):
    """nn.Conv2d trained at ``bits`` bits (same parameters and state-dict keys as nn.Conv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_pixels, k, n = gemm_shape(self, x.shape)
        path = self.path_for(out_pixels * k * n, out_pixels, k, n)
        if path == "fp32":
            out: torch.Tensor = self._conv_forward(x, self.weight, self.bias)
            return out
        if path == "fake":  # channels-last output, like the int8 path's: pooling and the next im2col run faster on it
            # (oneDNN returns NCHW for an input of one channel, which is NCHW and channels-last at once: converted
            # here, since max pooling over NCHW is ~7x slower on a CPU)
            x = x.contiguous(memory_format=torch.channels_last)
            weight = _fake_quant_ste(self.weight, self.bits).contiguous(memory_format=torch.channels_last)
            out = self._conv_forward(x, weight, self.bias)
            return out.contiguous(memory_format=torch.channels_last)
        return _apply(_Int8Conv2d, x, self.weight, self.bias, self.bits, self.stride, self.padding)


def _replacement(module: nn.Module) -> nn.Module | None:
    """A quantizable copy of a plain Linear or Conv2d (same attributes, parameters copied), else None."""
    quantized = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}.get(type(module))
    if quantized is None:
        return None
    new = copy.deepcopy(module)
    new.__class__ = quantized  # the subclasses add behaviour only, no state of their own
    return new


def quantize_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear and Conv2d layers train at a settable bitwidth (:func:`set_bitwidth`);
    state-dict keys and shapes are unchanged, so weights move freely between the two."""
    top = _replacement(model)
    if top is not None:
        return top
    out = copy.deepcopy(model)
    _swap_layers(out)
    return out


def _swap_layers(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        new = _replacement(child)
        if new is None:
            _swap_layers(child)
        else:
            setattr(module, name, new)


def set_bitwidth(model: nn.Module, bits: int, int8_min_macs: int | None = None) -> None:
    """Train every quantizable layer of ``model`` (from :func:`quantize_model`) at ``bits`` bits (32 = fp32), with
    ``int8_min_macs`` (None: :func:`default_int8_min_macs` of the layer's device)."""
    if bits != quant.FULL_PRECISION:
        quant.check_bits(bits)
    for module in model.modules():
        if isinstance(module, _Quantized):
            module.bits = bits
            module.int8_min_macs = int8_min_macs


def layer_paths(model: nn.Module) -> dict[str, str]:
    """The path each quantizable layer took in its latest forward pass (for reports and tests)."""
    return {name: m.last_path for name, m in model.named_modules() if isinstance(m, _Quantized) and m.last_path}


# ---------------------------------------------------------------------------------------------- trainer


class QuantizedTrainer:
    """Local SGD at a client's bitwidth: receives weights rounded to ``b`` bits, trains with QAT, returns weights
    rounded to ``b`` bits (to nearest, or stochastically: ``TrainConfig.result_rounding``; so the ``int<b>`` codec
    encodes them exactly) and keeps them packed between tasks.

    One trainer serves clients of any bitwidth in turn (``train(..., bitwidth=b)``), like :class:`LocalTrainer`:
    the result depends only on (start weights, data, task, seed, bitwidth).

    Args:
        model: the float model; a quantizable copy is made (the argument is not modified).
        config: local optimiser settings.
        device: where training runs.
        int8_min_macs: layers with fewer multiply-accumulates per forward pass take the ``fake`` path; None is
            :func:`default_int8_min_macs` of ``device`` (:data:`INT8_NEVER` where integer GEMMs do not pay).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        device: str | torch.device = "cpu",
        int8_min_macs: int | None = None,
    ) -> None:
        if int8_min_macs is not None and int8_min_macs < 0:
            raise ValueError(f"int8_min_macs must be >= 0, got {int8_min_macs}")
        self.model = quantize_model(model)
        self._trainer = LocalTrainer(self.model, config, device)
        self._low_bit = LowBitTrainer(model, config, device) if config.low_bit_weights else None
        self.int8_min_macs = default_int8_min_macs(self._trainer.device) if int8_min_macs is None else int8_min_macs
        self._shapes = {k: (v.shape, v.dtype) for k, v in self.model.state_dict().items()}
        self.stored: dict[str, quant.PackedTensor | torch.Tensor] = {}
        self._release()

    def train(
        self, task: Task, x: torch.Tensor, y: torch.Tensor, seed: int, bitwidth: int, state: ClientState | None = None
    ) -> Result:
        """Run ``task`` at ``bitwidth`` bits (32 = plain fp32 training) on samples ``(x, y)``; ``state`` is the
        client's :class:`~fedhet.clients.trainer.ClientState` (its own tensors train in fp32, QAT-rounded in use)."""
        if self._low_bit is not None:
            result = self._low_bit.train(task, x, y, seed, bitwidth, state)
        else:
            set_bitwidth(self.model, bitwidth, self.int8_min_macs)
            self._trainer.kernel_key = (bitwidth, self.int8_min_macs)  # the layers' kernels: a change recaptures
            self._materialise()
            try:
                start = quant.quantize_weights(task.weights, bitwidth)
                result = self._trainer.train(replace(task, weights=start), x, y, seed, state)
            finally:
                self._release()
        try:
            if self._trainer.config.result_rounding == "stochastic" and self._low_bit is None:
                weights = quant.stochastic_round_weights(result.weights, bitwidth, result_seed(seed, task.task_id))
            else:
                weights = quant.quantize_weights(result.weights, bitwidth)
        except quant.QuantError:  # NaN or Inf weights: the task diverged, and its result says so (see DIVERGED)
            return replace(result, loss=DIVERGED)
        self.stored = dict(weights) if bitwidth == quant.FULL_PRECISION else quant.pack_weights(weights, bitwidth)
        return replace(result, weights=weights)

    @property
    def stored_bytes(self) -> int:
        """Bytes of weights the client holds between tasks (packed values and scales; fp32 at 32 bits)."""
        return sum(v.nbytes for v in self.stored.values())

    @property
    def _keeps_master(self) -> bool:
        """Whether the fp32 master copy stays allocated between tasks: where steps replay a CUDA graph, which holds
        the parameters' storage (freeing it would recapture every task)."""
        return self._trainer.device.type == "cuda" and self._trainer.config.cuda_graphs

    def _materialise(self) -> None:
        """Allocate the fp32 master copy (filled by the task's weights), unless it is kept."""
        for name, tensor in _tensors(self.model).items():
            shape, dtype = self._shapes[name]
            if tensor.shape != shape:
                tensor.data = torch.empty(shape, dtype=dtype, device=self._trainer.device)

    def _release(self) -> None:
        """Free the fp32 master copy between tasks, so that only :attr:`stored` remains (where it is not kept)."""
        if self._keeps_master:
            return
        for tensor in _tensors(self.model).values():
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            tensor.grad = None


def _tensors(model: nn.Module) -> Mapping[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}
