"""Local SGD steps replayed from a captured CUDA graph.

On a GPU one client step at minibatch 32 is bound by kernel launches and Python, not arithmetic: an fp32 eager step
of the FedAvg CNN takes about 2 ms on an H200 for microseconds of arithmetic (issue 17), and a quantization-aware
step launches more kernels still (each weight rounded per step). :class:`GraphedSteps` captures one whole step
(forward, loss, backward and ``torch.optim.SGD``'s update) of a full minibatch once and replays it for every later
full minibatch: one graph launch instead of hundreds of kernels, and no Python per layer.

What a graph holds fixed is its **key**: the trained parameters (their storage), the optimiser's settings (the
learning rate included, so a task at another step of ``lr_decay`` recaptures), the minibatch's shape and dtype, and
``extra`` (the quantized trainer's bitwidth, which picks each layer's kernels). The rest of a task changes without a
recapture: weights are loaded into the parameters in place, momentum buffers are zeroed in place (with dampening 0,
a zero buffer gives exactly torch's first step, which copies the gradient), and each minibatch is copied into the
graph's static input.

A minibatch of another shape (an epoch's last, smaller one) runs eagerly on the same parameters, gradients and
optimiser. After a new key the first ``warmup`` steps run eagerly on a side stream, as capture needs (cuBLAS,
autograd and the optimiser's state initialise lazily, outside the graph). A step that cannot be captured (a model
whose forward reads a value back to the host, such as ``.item()``) fails its capture: the trainer logs why once and
runs every step eagerly from then on. Off CUDA (and for tests) every step runs eagerly through the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch
from torch import nn

__all__ = ["GraphedSteps"]

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GraphedSteps:
    """SGD steps of one model, full minibatches replayed from a CUDA graph (see the module docstring).

    Args:
        model: the model; its parameters keep their storage across tasks (weights are loaded in place).
        loss_fn: ``loss_fn(model(x), y)``, a scalar.
        warmup: eager steps after a new key before the capture (at least 1: the optimiser's state must exist).
        capture: capture graphs (needs the model on CUDA); False runs every step eagerly through the same path.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, warmup: int = 3, capture: bool = True) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager step before a capture, got {warmup}")
        self.model = model
        self.loss_fn = loss_fn
        self.warmup = warmup
        self.capture = capture
        self.optimizer: torch.optim.SGD | None = None
        self.captures = 0  # graphs captured so far (for tests and reports)
        self.replays = 0  # steps replayed from a graph
        self._key: Hashable = None
        self._eager_steps = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # x, y, loss
        self._side_stream: torch.cuda.Stream | None = None
        self._batch_size = 0

    def begin(
        self,
        params: list[nn.Parameter],
        lr: float,
        momentum: float,
        weight_decay: float,
        batch_size: int,
        extra: Hashable = None,
    ) -> torch.optim.SGD:
        """Start a task that trains ``params`` with these SGD settings on minibatches of ``batch_size`` samples (the
        shape captured; a smaller last minibatch runs eagerly); ``extra`` is anything else the step's kernels depend
        on. Returns the task's optimiser: the graph's own, momentum zeroed, when nothing in the key changed; a fresh
        one (and a recapture to come) otherwise."""
        key = (tuple((p.data_ptr(), p.shape) for p in params), lr, momentum, weight_decay, batch_size, extra)
        self._batch_size = batch_size
        if key != self._key or self.optimizer is None:
            self._key = key
            self._graph = self._static = None  # frees the old graph's memory pool
            self._eager_steps = 0
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        else:
            for state in self.optimizer.state.values():
                buffer = state.get("momentum_buffer")
                if buffer is not None:
                    buffer.zero_()
        return self.optimizer

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One SGD step on minibatch ``(x, y)`` (on the model's device); returns its loss, detached. A replayed
        step's loss is the graph's static output: read or copy it before the next step."""
        if self.optimizer is None:
            raise RuntimeError("GraphedSteps.step before begin()")
        static = self._static
        if static is not None and self._graph is not None and _same_shape(static, x, y):
            static[0].copy_(x, non_blocking=True)
            static[1].copy_(y, non_blocking=True)
            self._graph.replay()
            self.replays += 1
            return static[2]
        if self._static is None and self._eager_steps >= self.warmup and self._can_capture(x):
            loss = self._capture(x, y)
            if loss is not None:
                return loss
        return self._eager(x, y)

    def _can_capture(self, x: torch.Tensor) -> bool:
        return self.capture and x.is_cuda and len(x) == self._batch_size

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One eager step; before the first capture on a side stream (capture's warm-up), after it on the current
        stream, accumulating into the graph's gradient tensors (zeroed in place, never replaced)."""
        assert self.optimizer is not None
        warming = self.capture and x.is_cuda and self._static is None
        stream = self._warmup_stream() if warming else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                loss = self._forward_backward_update(x, y, keep_grads=False)
            torch.cuda.current_stream().wait_stream(stream)
        else:
            loss = self._forward_backward_update(x, y, keep_grads=self._graph is not None)
        self._eager_steps += 1
        return loss

    def _forward_backward_update(self, x: torch.Tensor, y: torch.Tensor, keep_grads: bool) -> torch.Tensor:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=not keep_grads)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        return loss.detach()

    def _warmup_stream(self) -> torch.cuda.Stream:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        return self._side_stream

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Capture the step for ``x``'s shape and replay it on ``(x, y)``; None (and eager steps from then on)
        when the step cannot be captured."""
        assert self.optimizer is not None
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated from the graph's own pool
        try:
            with torch.cuda.graph(graph):
                static_loss = self.loss_fn(self.model(static_x), static_y)
                static_loss.backward()  # type: ignore[no-untyped-call]
                self.optimizer.step()
        except RuntimeError as error:  # e.g. a host synchronisation in the model's forward
            log.warning("CUDA graph capture of the training step failed (%s); every step runs eagerly", error)
            self.capture = False
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            return None
        self._graph, self._static = graph, (static_x, static_y, static_loss.detach())
        self.captures += 1
        graph.replay()  # the capture recorded the step without running it
        self.replays += 1
        return self._static[2]


def _same_shape(static: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> bool:
    return static[0].shape == x.shape and static[0].dtype == x.dtype and static[1].shape == y.shape
