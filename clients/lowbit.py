"""Local training that holds a client's weights at its bitwidth throughout: no fp32 master copy, no weight gradient.

Quantization-aware training (:class:`~fedhet.clients.quantized.QuantizedTrainer`) keeps an fp32 master copy of the
weights and their fp32 gradients during a task: more memory than fp32 training itself. With
``TrainConfig.low_bit_weights`` a client of ``b`` bits instead keeps every Linear and Conv2d weight as ``b``-bit
integers with one fp32 scale per output channel, fixed at the task's start (:func:`fedhet.quant.quantize`: the
task's weights rounded exactly as QAT rounds them), and applies each SGD step inside the backward pass, layer by
layer, with **stochastic rounding** (Gupta et al., 2015):

    q <- clamp(floor(q - lr * g / s + u), -qmax, qmax),   u ~ U[0, 1)

which is unbiased (``E[s * q_new] = w - lr * g`` inside the range), so steps far smaller than a quantization step
still move the weights on average, where round-to-nearest would drop them. Weight decay and FedProx's pull are
added to ``g`` (FedProx keeps the start's integers, ``b`` bits more per weight). Momentum needs an fp32 state per
weight, which is what this mode removes, so it is refused. The random numbers come from the task's seed, so a
result depends only on (start weights, data, task, seed, bitwidth), as every trainer's does.

A Linear weight is dequantized and updated in :data:`BLOCKS` blocks of output rows: no fp32 copy of a whole weight
or of its gradient ever exists, and a block's update holds two fp32 temporaries of its size (its gradient, then
the stepped values, and the random numbers), so the temporaries are at most a quarter of the fp32 weight. A
Conv2d weight (small next to its activations) is dequantized whole for its forward and backward and updated at
once. ReLU and max pooling save one byte per value for backward (:func:`low_bit_model`): with the weights at ``b``
bits, the activations saved for backward are what remains of a step's memory. Biases and other tensors (a few per
layer) train in fp32 with ``torch.optim.SGD``. Integers live in int8 (int16 above 8 bits) containers: a 4-bit
client holds one byte per weight while it trains, and packs to half a byte between tasks
(:attr:`QuantizedTrainer.stored`).
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedhet import quant
from fedhet.clients.trainer import ClientState, TrainConfig, add_proximal_term, minibatches, run_minibatches, task_seed
from fedhet.seeding import mix_seed
from fedhet.types import Result, Task

__all__ = ["BLOCKS", "LeanMaxPool2d", "LeanReLU", "LowBitConv2d", "LowBitLinear", "LowBitTrainer", "low_bit_model"]

BLOCKS = 8  # blocks of output rows a Linear weight is dequantized and updated in (the CNN's fc1: 64 x 3136 each)


@dataclass
class _Step:
    """A task's update rule for one weight: learning rate, weight decay, FedProx's mu and start integers."""

    lr: float
    weight_decay: float
    mu: float
    start: torch.Tensor | None  # the start's integers when mu > 0
    generator: torch.Generator


class _LowBitWeight(nn.Module):
    """A weight as integers (buffer ``codes``) and per-output-channel scales (buffer ``scales``), with the update
    of :mod:`fedhet.clients.lowbit`'s docstring."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape = shape
        self.bits = quant.FULL_PRECISION
        self.register_buffer("codes", torch.empty(0, dtype=torch.int8), persistent=False)
        self.register_buffer("scales", torch.empty(0), persistent=False)
        self.step: _Step | None = None  # None: frozen in this task
        # an input that requires grad, so that autograd runs the backward (the update) even when neither the
        # layer's input nor its bias needs a gradient
        self.token = torch.zeros((), requires_grad=True)

    def load(self, weight: torch.Tensor, bits: int) -> None:
        self.bits = bits
        codes, scales = quant.quantize(weight, bits)
        self.codes, self.scales = codes.to(weight.device), scales.to(weight.device)

    def release(self) -> None:
        self.codes = self.codes.new_empty(0)
        self.scales = self.scales.new_empty(0)
        self.step = None

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Output rows ``start:stop`` in fp32."""
        scales = self.scales[start:stop].view(-1, *[1] * (self.codes.dim() - 1))
        return self.codes[start:stop].float() * scales

    def dense(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])

    def blocks(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of the :data:`BLOCKS` blocks of output rows (fewer when there are fewer rows)."""
        rows = self.shape[0]
        size = -(-rows // BLOCKS)
        return [(start, min(start + size, rows)) for start in range(0, rows, size)]

    def update(self, start: int, stop: int, grad: torch.Tensor) -> None:
        """One SGD step of rows ``start:stop`` with their gradient ``grad`` (a temporary: overwritten),
        stochastically rounded."""
        step = self.step
        if step is None:
            return
        codes = self.codes[start:stop]
        scales = self.scales[start:stop].view(-1, *[1] * (codes.dim() - 1))
        if step.weight_decay:
            grad.add_(codes * scales, alpha=step.weight_decay)
        if step.start is not None:
            grad.add_((codes - step.start[start:stop]) * scales, alpha=step.mu)
        moved = grad.div_(scales).mul_(-step.lr).add_(codes)  # in the gradient's block: codes - lr * g / s
        noise = torch.rand(moved.shape, generator=step.generator, device=moved.device)
        top = quant.qmax(self.bits)
        codes.copy_(moved.add_(noise).floor_().clamp_(-top, top))


class _LowBitLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, token: torch.Tensor, weight: _LowBitWeight
    ) -> torch.Tensor:
        out = x.new_empty(x.shape[0], weight.shape[0])
        for start, stop in weight.blocks():
            torch.mm(x, weight.rows(start, stop).t(), out=out[:, start:stop])
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(x)
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        weight: _LowBitWeight = ctx.weight
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        for start, stop in weight.blocks():
            g = grad[:, start:stop]
            if grad_x is not None:  # with the rows as they were in the forward pass, before their update
                grad_x.addmm_(g, weight.rows(start, stop))
            weight.update(start, stop, g.t().mm(x))
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x, grad_b, None, None


class _LowBitConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        token: torch.Tensor,
        weight: _LowBitWeight,
        geometry: tuple[list[int], list[int], list[int]],
    ) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.weight, ctx.geometry = weight, geometry
        ctx.has_bias = bias is not None
        stride, padding, dilation = geometry
        return F.conv2d(x, weight.dense(), bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        weight: _LowBitWeight = ctx.weight
        stride, padding, dilation = ctx.geometry
        need_x, need_b = bool(ctx.needs_input_grad[0]), ctx.has_bias and bool(ctx.needs_input_grad[1])
        w = weight.dense()
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, w, [w.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False, [0, 0], 1,
            [need_x, True, need_b],
        )  # fmt: skip
        del w
        weight.update(0, weight.shape[0], grad_w)
        return (grad_x if need_x else None), (grad_b if need_b else None), None, None, None


class LowBitLinear(nn.Module):
    """nn.Linear whose weight is held at a bitwidth and updated in its backward pass."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = _LowBitWeight(layer.weight.shape)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = _LowBitLinearFn.apply(rows, self.bias, self.weight.token, self.weight)  # type: ignore[no-untyped-call]
        assert isinstance(out, torch.Tensor)
        return out.reshape(*x.shape[:-1], self.out_features)


class LowBitConv2d(nn.Module):
    """nn.Conv2d (groups 1, zero padding) whose weight is held at a bitwidth and updated in its backward pass."""

    def __init__(self, layer: nn.Conv2d) -> None:
        super().__init__()
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"low-bit weights support Conv2d with groups 1 and numeric zero padding, not {layer}")
        self.geometry = (list(layer.stride), list(layer.padding), list(layer.dilation))
        self.weight = _LowBitWeight(layer.weight.shape)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.bias, self.weight.token, self.weight, self.geometry)
        out = _LowBitConv2dFn.apply(*args)  # type: ignore[no-untyped-call]
        assert isinstance(out, torch.Tensor)
        return out


class _LeanReLUFn(torch.autograd.Function):
    """ReLU that keeps for backward which outputs are positive (one byte each), not the fp32 outputs: its
    gradient is exactly ReLU's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out > 0)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (positive,) = ctx.saved_tensors
        return grad.masked_fill(positive.logical_not(), 0)


class LeanReLU(nn.Module):
    """nn.ReLU saving a one-byte mask for its backward instead of its fp32 output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _LeanReLUFn.apply(x)  # type: ignore[no-untyped-call]
        assert isinstance(out, torch.Tensor)
        return out


class _LeanMaxPool2dFn(torch.autograd.Function):
    """Max pooling over non-overlapping ``kh x kw`` windows that keeps for backward, per output, where in its
    window the maximum was (one byte), not torch's int64 indices: the same gradient (torch's choice among tied
    maxima, the first) at an eighth of the bytes, with no temporary larger than the output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
        kh, kw = kernel
        out = F.max_pool2d(x, kernel, kernel)
        out_h, out_w = out.shape[-2:]
        where = torch.full(out.shape, kh * kw - 1, dtype=torch.int8, device=x.device)
        for p in reversed(range(kh * kw - 1)):  # the first position holding the maximum, as torch picks among ties
            i, j = divmod(p, kw)
            where.masked_fill_(x[:, :, i : out_h * kh : kh, j : out_w * kw : kw] == out, p)
        ctx.save_for_backward(where)
        ctx.geometry = (x.shape, kernel)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (where,) = ctx.saved_tensors
        shape, (kh, kw) = ctx.geometry
        out_h, out_w = grad.shape[-2:]
        grad_x = grad.new_zeros(shape)  # rows and columns past the last whole window get no gradient
        for p in range(kh * kw):
            i, j = divmod(p, kw)
            grad_x[:, :, i : out_h * kh : kh, j : out_w * kw : kw] = grad.masked_fill(where != p, 0)
        return grad_x, None


class LeanMaxPool2d(nn.Module):
    """nn.MaxPool2d over non-overlapping windows (kernel = stride, no padding, dilation 1, floor mode) saving
    one byte per output for its backward."""

    def __init__(self, kernel: tuple[int, int]) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _LeanMaxPool2dFn.apply(x, self.kernel)  # type: ignore[no-untyped-call]
        assert isinstance(out, torch.Tensor)
        return out


def _lean_pool(pool: nn.MaxPool2d) -> LeanMaxPool2d | None:
    """The lean counterpart of ``pool`` where its windows do not overlap, else None."""
    kernel, stride = nn.modules.utils._pair(pool.kernel_size), nn.modules.utils._pair(pool.stride)
    plain = pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
    return LeanMaxPool2d(kernel) if plain and kernel == stride and not pool.return_indices else None


def low_bit_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Linear and Conv2d replaced by its low-bit counterpart; names are unchanged
    (``<layer>.weight`` is the low-bit weight, ``<layer>.bias`` a parameter). ReLU and max pooling over
    non-overlapping windows become their lean counterparts (:class:`LeanReLU`, :class:`LeanMaxPool2d`): the same
    values and gradients, with a byte per value saved for backward instead of fp32 activations and int64 indices;
    in a Sequential, ReLU then such pooling runs as pooling then ReLU (:func:`_pool_before_relu`)."""
    if type(model) is nn.Linear:
        return LowBitLinear(model)
    if type(model) is nn.Conv2d:
        return LowBitConv2d(model)
    if type(model) is nn.ReLU:
        return LeanReLU()
    if type(model) is nn.MaxPool2d:
        return _lean_pool(model) or copy.deepcopy(model)
    out = copy.deepcopy(model)
    for name, child in list(out.named_children()):
        setattr(out, name, low_bit_model(child))
    if isinstance(out, nn.Sequential):
        _pool_before_relu(out)
    return out


def _pool_before_relu(sequence: nn.Sequential) -> None:
    """Swap each lean ReLU that a lean max pooling follows: ``pool(relu(x)) = relu(pool(x))`` (ReLU is monotone),
    with the same gradient (a window whose maximum is not positive passes none either way), and the ReLU then sees
    a ``kh * kw``-th of the values: its mask and output are that much smaller."""
    names = list(sequence._modules)
    for first, second in itertools.pairwise(names):
        relu, pool = sequence._modules[first], sequence._modules[second]
        if isinstance(relu, LeanReLU) and isinstance(pool, LeanMaxPool2d):
            sequence._modules[first], sequence._modules[second] = pool, relu


class LowBitTrainer:
    """Local SGD at ``b`` bits holding the weights as ``b``-bit integers throughout (see the module docstring).

    Args:
        model: the float model; a low-bit copy is made (the argument is not modified).
        config: local optimiser settings (momentum must be 0).
        device: where training runs.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, device: str | torch.device = "cpu") -> None:
        if config.momentum:
            raise ValueError(f"low-bit weights train without momentum, got momentum {config.momentum}")
        self.config = config
        self.device = torch.device(device)
        self.model = low_bit_model(model).to(self.device)
        self.low_bit = {n: m for n, m in self.model.named_modules() if isinstance(m, _LowBitWeight)}
        self.loss_fn = nn.CrossEntropyLoss()

    def train(
        self, task: Task, x: torch.Tensor, y: torch.Tensor, seed: int, bitwidth: int, state: ClientState | None = None
    ) -> Result:
        """Run ``task`` at ``bitwidth`` bits on ``(x, y)``; ``state`` holds the client's own tensors. The result's
        weights are on the ``b``-bit grid of the task's scales."""
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"task {task.task_id}: client {task.client_id} has {len(x)} inputs and {len(y)} labels")
        began = time.perf_counter()
        quant.check_bits(bitwidth)
        own = {k: v for k, v in (state.tensors if state is not None else {}).items() if k not in task.weights}
        values = {**task.weights, **own}
        missing = set(self.low_bit) | {n for n, _ in self.model.named_parameters()}
        missing -= set(values)
        if missing:
            raise ValueError(f"task {task.task_id}: client {task.client_id} has no values for {sorted(missing)}")
        optimizer = self.begin(task, values, task.optimized | set(own), bitwidth, seed)
        steps = task.steps_for(len(x), self.config.batch_size)
        order = torch.Generator().manual_seed(task_seed(seed, task.task_id))
        try:
            batches = minibatches(len(x), self.config.batch_size, steps, order)
            total = run_minibatches(functools.partial(self.step, optimizer), batches, x, y, self.device)
            weights = self._weights()
        finally:
            for weight in self.low_bit.values():
                weight.release()
        if state is not None:
            state.tensors = {k: weights[k] for k in own}
        return Result(
            task_id=task.task_id,
            client_id=task.client_id,
            version=task.version,
            weights={k: weights[k] for k in task.weights if k in task.trained},
            num_samples=len(x),
            local_steps=steps,
            train_seconds=time.perf_counter() - began,
            loss=total / steps,
        )

    def begin(
        self, task: Task, values: Mapping[str, torch.Tensor], trained: Set[str], bitwidth: int, seed: int
    ) -> torch.optim.Optimizer:
        """Load ``values`` at ``bitwidth`` bits (the ``trained`` names train) and return the optimiser of the fp32
        tensors; the low-bit weights step with the task's learning rate and random stream."""
        cfg = self.config
        lr = cfg.lr_at(task.version)
        # a stream of its own, apart from the minibatch order's (task_seed)
        generator = torch.Generator(self.device).manual_seed(mix_seed(seed, task.task_id, 1))
        for name, weight in self.low_bit.items():
            weight.load(values[name].to(self.device), bitwidth)
            if name in trained:
                start = weight.codes.clone() if task.proximal_mu > 0 else None
                weight.step = _Step(lr, cfg.weight_decay, task.proximal_mu, start, generator)
        for name, buffer in self.model.named_buffers():
            if name in values:  # a float model's own buffers (the low-bit weights' integers are not named there)
                buffer.data = values[name].to(self.device, buffer.dtype)
        params = []
        for name, param in self.model.named_parameters():
            param.data = quant.fake_quantize(values[name], bitwidth).to(self.device, param.dtype)
            param.requires_grad_(name in trained)
            if name in trained:
                params.append(param)
        spare = [torch.zeros(0, requires_grad=True)]  # SGD refuses an empty list (a model without biases)
        optimizer = torch.optim.SGD(params or spare, lr=lr, weight_decay=cfg.weight_decay)
        if task.proximal_mu > 0:
            add_proximal_term(optimizer, self.model, task)
        self.model.train()
        return optimizer

    def step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One minibatch: the low-bit weights step in the backward pass, the fp32 tensors in ``optimizer``; the
        minibatch's loss."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x.to(self.device)), y.to(self.device))
        loss.backward()
        optimizer.step()
        detached: torch.Tensor = loss.detach()
        return detached

    def _weights(self) -> Mapping[str, torch.Tensor]:
        out = {name: weight.dense().to("cpu", copy=True) for name, weight in self.low_bit.items()}
        out.update({name: p.detach().to("cpu", copy=True) for name, p in self.model.named_parameters()})
        out.update({name: b.detach().to("cpu", copy=True) for name, b in self.model.named_buffers() if name not in out})
        return out
