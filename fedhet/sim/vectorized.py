"""The vectorized executor: the local SGD of many clients as a few large tensor operations.

Tasks whose weights fit the trainer's model train together, up to ``batch_size`` clients at a time (a *chunk*, of
consecutive tasks in the order :meth:`VectorizedExecutor.run` receives them: the simulator's, soonest arrival first,
so a chunk's results arrive together and the update buffer folds the chunk whole):

* while every client of the chunk still holds the same start weights (the first step of a synchronous round) a
  layer runs as one ordinary operation over all the clients' samples, and only weight gradients are per client;
* linear layers run as batched matrix products over clients; under plain SGD a linear weight stays the shared
  start ``W0`` minus a low-rank per-client change (:class:`LowRank`) until the end of the chunk;
* convolutions run as one oneDNN call per client on CPU (a batch-32 channels-last bf16 convolution is as fast per
  sample there as a batch of 512, while a vmapped convolution becomes a slow grouped one), and as unfold + ``bmm``
  on CUDA, where kernel launches count; other parameters are stacked per client, ``(clients, *shape)``, in fp32;
* minibatches are padded to the step's longest with zero loss weight, so padding adds no gradient; tasks are
  sorted by local steps, so the clients still training at a step are a prefix of the chunk and clients with fewer
  steps (FedCompass) simply stop early; clients with different start versions are stacked from the first step;
* each client steps at its own task's learning rate (``lr * lr_decay ** version``,
  :meth:`~fedhet.clients.trainer.TrainConfig.lr_at`): one number when the chunk's tasks share it, else a
  per-client column multiplied into the update (the low-rank path needs the shared one);
* the minibatch order is the sequential trainer's (same seed, same task id), and the backward pass is written out
  layer by layer, so in fp32 the results equal :class:`~fedhet.sim.executor.SequentialExecutor`'s up to float
  rounding. ``precision="bf16"`` computes products in bfloat16 (fp32 master weights, loss and updates).

Clients below 32 bits train quantization-aware as :class:`~fedhet.clients.quantized.QuantizedTrainer` does on its
``fake`` path: a chunk holds clients of one bitwidth ``b``; they start from the task's weights rounded to ``b`` bits,
every step's forward pass uses each client's Linear and Conv2d weights rounded to ``b`` bits (per client and output
channel, once per step), the gradient updates the fp32 weights straight through, and the results are rounded to
``b`` bits. Where the quantized trainer takes its integer-GEMM path (a CPU with VNNI or AMX, a client of <= 8
bits, layers large enough for the minibatch at hand) the chunk does too, with the quantized trainer's kernels
(:mod:`fedhet.sim.int8`), so that both executors give one result; on a GPU such clients train sequentially.

Supported models are ``nn.Sequential`` stacks of ``Conv2d`` (groups 1, zero padding), ``Linear``, ``ReLU``,
``MaxPool2d`` and ``Flatten`` without buffers: the FedAvg CNN, the 2NN and logistic regression. Anything else, and
any task whose weights do not fit the model (a pruned plan), falls back to the sequential trainer; the fallback is
logged once per reason and counted in ``fallback_tasks``.

Results' weights stay on the executor's device, as rows of their chunk's stacked weights
(:class:`~fedhet.types.StackedRow`): the update buffer folds a whole chunk's rows with one matrix-vector product
per tensor (:class:`~fedhet.strategies.base.UpdateBuffer`), and a chunk is freed once its results are folded or
dropped. See docs/scale.md.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedhet import quant
from fedhet.clients.quantized import INT8_NEVER, QuantizedTrainer, bf16_is_native
from fedhet.clients.trainer import ClientStates, LocalTrainer, result_seed
from fedhet.seeding import mix_seeds
from fedhet.sim.executor import SequentialExecutor
from fedhet.sim.int8 import Int8Weight, int8_rows
from fedhet.sim.layers import BatchedLinear, Grad, LayerParam, LowRank, OuterGrad, Param, compile_model
from fedhet.types import DIVERGED, Result, StackedRow, Task

__all__ = ["PRECISIONS", "VectorizedExecutor", "reuse_freed_memory"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_MAX_CHUNK = 2048  # clients per chunk at most, whatever the memory budget allows
# On a CPU a chunk of ~100 clients already makes the batched products thousands of rows long; a larger one only
# writes its results to more fresh memory (page faults) and out of cache, while the results of a finished chunk
# are freed and reused (2NN at N = 1,000 on 2 cores: 0.63 s a round at 125 clients a chunk, 0.83 s at 935).
_MAX_CPU_CHUNK = 128
_NORM_BLOCK_BYTES = 64 << 20  # the temporary differences of a chunk's update norms, at most


def reuse_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    Every large tensor is otherwise a fresh ``mmap`` whose pages fault in on first touch; in a VM a fault costs
    microseconds, which makes allocating a 6 MB update (the FedAvg CNN) 20 times slower than copying it. The
    setting is process-wide and leaves peak RSS as it was. Returns False where malloc is not glibc's.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1
    except (OSError, AttributeError):
        return False
    return bool(ok)


@dataclass
class _Plan:
    """One task's samples in the order it visits them, and where its result goes."""

    position: int
    task: Task
    num_samples: int
    steps: int  # minibatches
    order: npt.NDArray[np.int64]  # global sample indices: a permutation of the shard per epoch, epoch after epoch
    bits: int  # the client's bitwidth (32: fp32 training)


class VectorizedExecutor:
    """Trains tasks that share the model's architecture together; see the module docstring.

    Args:
        trainer: the sequential trainer: its model (the architecture), optimiser settings and device; it also
            runs whatever cannot be vectorized.
        x, y: all training inputs and labels; ``shards`` maps a client id to its indices into them.
        seed: the run seed (with the task id it fixes a task's minibatch order, as in the sequential trainer).
        precision: ``fp32`` (results equal the sequential executor's up to rounding) or ``bf16`` (products in
            bfloat16; fp32 master weights).
        memory_bytes: working memory to aim at, in bytes (0: 2 GiB on CPU, 8 GiB on a GPU); sets ``batch_size``
            (clients per chunk) from the model size, the minibatch size and the activations, so memory does not
            grow with the number of clients.
        batch_size: clients per chunk; 0 derives it from ``memory_bytes`` (at most 128 on a CPU).
        quantized, bitwidths: clients below 32 bits (``bitwidths``) train quantization-aware (see the module
            docstring); ``quantized`` trains those that fall back, and its ``int8_min_macs`` says which would take
            integer GEMMs (:class:`~fedhet.sim.executor.SequentialExecutor`).
    """

    def __init__(
        self,
        trainer: LocalTrainer,
        x: torch.Tensor,
        y: torch.Tensor,
        shards: Mapping[int, np.ndarray],
        seed: int,
        precision: str = "fp32",
        memory_bytes: int = 0,
        batch_size: int = 0,
        quantized: QuantizedTrainer | None = None,
        bitwidths: Mapping[int, int] | None = None,
        states: ClientStates | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if batch_size < 0 or memory_bytes < 0:
            raise ValueError(f"batch_size and memory_bytes must be >= 0, got {batch_size} and {memory_bytes}")
        self.sequential = SequentialExecutor(
            trainer, x, y, shards, seed, quantized=quantized, bitwidths=bitwidths, states=states
        )
        self.low_bit = {c: b for c, b in (bitwidths or {}).items() if b < quant.FULL_PRECISION}
        self.int8_min_macs: int = quantized.int8_min_macs if quantized is not None else 0
        self.config = trainer.config
        self.device = trainer.device
        self.dtype = _DTYPES[precision]
        if precision == "bf16" and not bf16_is_native(trainer.device):
            log.warning(
                "vectorized executor: precision bf16 on a CPU without bf16 instructions (no AVX-512 BF16 or AMX) is "
                "emulated and slower than fp32; sim.precision=fp32 is faster here"
            )
        self.precision = precision
        self.shards = {c: np.asarray(s, dtype=np.int64) for c, s in shards.items()}
        self.seed = seed
        self.vectorized_tasks = 0
        self.fallback_tasks = 0
        self._warned: set[str] = set()
        model = self.model = trainer.model
        self.layers, self.unsupported = compile_model(model, x.dim(), unfold=self.device.type == "cuda")
        self.signature = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
        self._fits: Mapping[str, torch.Tensor] | None = None  # the latest task weights that fit the model
        self._generator = torch.Generator()  # reseeded per task (cheaper than a new one)
        self.low_rank_keys = {layer.keys[0] for layer in self.layers if isinstance(layer, BatchedLinear)}
        # what quantization-aware training rounds in the forward pass (quantize_model's layers)
        self.quantized_keys = {f"{n}.weight" for n, m in model.named_children() if isinstance(m, nn.Linear | nn.Conv2d)}
        self._rounded: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # start weights at a bitwidth, per run
        self._int8: dict[int, dict[str, list[bool]]] = {}  # per bitwidth: the int8 path's layers (int8_rows)
        if self.unsupported:
            log.warning("vectorized executor: every task falls back to the sequential trainer: %s", self.unsupported)
            self._warned.add(self.unsupported)  # said once, here
        self.x = x.to(self.device, self.dtype)
        if self.x.dim() == 4:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = y.to(self.device)
        memory_bytes = memory_bytes or (2 << 30 if self.device.type == "cpu" else 8 << 30)
        self.batch_size = batch_size or self._auto_batch_size(model, x, memory_bytes)
        if reuse_freed_memory():  # host memory: the results (copied from a GPU) and their aggregation
            log.debug("glibc malloc keeps freed memory for reuse (page faults dominate fresh allocations)")

    def _auto_batch_size(self, model: nn.Module, x: torch.Tensor, memory_bytes: int) -> int:
        """Clients per chunk that fit ``memory_bytes``: per client the fp32 weights (the results), a compute copy,
        a gradient and a momentum buffer, and twice the activations of one minibatch."""
        if self.unsupported:  # every task trains sequentially; and a model of any kind may not take a batch of one
            return 1
        params = sum(v.numel() for v in model.state_dict().values())
        with torch.no_grad():
            probe = x[:1].to(self.device)
            activations = 0
            for module in model.children() if isinstance(model, nn.Sequential) else [model]:
                probe = module(probe)
                activations += probe.numel()
        element = torch.finfo(self.dtype).bits // 8
        per_client = params * (4 + element + 4 + (4 if self.config.momentum else 0))
        per_client += 2 * self.config.batch_size * (activations + x[0].numel()) * element
        most = _MAX_CPU_CHUNK if self.device.type == "cpu" else _MAX_CHUNK
        return int(max(1, min(most, memory_bytes // per_client)))

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        """Results of ``tasks``, in their order; chunks are runs of consecutive tasks of one bitwidth."""
        results: list[Result | None] = [None] * len(tasks)
        vectorized: list[int] = []
        fallback: list[int] = []
        for i, task in enumerate(tasks):
            reason = self._reason_to_fall_back(task)
            if reason:
                fallback.append(i)
                if reason not in self._warned:
                    self._warned.add(reason)
                    log.warning("vectorized executor: task %d runs sequentially: %s", task.task_id, reason)
            else:
                vectorized.append(i)
        plans = self._plans(tasks, vectorized)
        for i, result in zip(fallback, self.sequential.run([tasks[i] for i in fallback]), strict=True):
            results[i] = replace(result, weights={k: v.to(self.device) for k, v in result.weights.items()})
        self.fallback_tasks += len(fallback)
        # a chunk holds one bitwidth and consecutive tasks of it in the order given (soonest arrival first from the
        # simulator), so its results arrive together
        by_bits: dict[int, list[_Plan]] = {}
        for plan in plans:
            by_bits.setdefault(plan.bits, []).append(plan)
        for same_bits in by_bits.values():
            chunks = -(-len(same_bits) // self.batch_size)
            size = -(-len(same_bits) // chunks)  # chunks of equal sizes: the same shapes, no small last one
            for start in range(0, len(same_bits), size):
                for plan, result in self._train_chunk(same_bits[start : start + size]):
                    results[plan.position] = result
        self._rounded.clear()
        self.vectorized_tasks += len(plans)
        return [r for r in results if r is not None]

    def _reason_to_fall_back(self, task: Task) -> str:
        if self.unsupported:
            return self.unsupported
        weights = task.weights
        if weights is not self._fits and (  # the tasks of a round share one weights mapping: checked once
            len(weights) != len(self.signature)
            or any(k not in weights or (weights[k].shape, weights[k].dtype) != s for k, s in self.signature.items())
        ):
            return "its weights do not match the model's names, shapes and dtypes (a planned sub-model?)"
        self._fits = weights
        if task.train:
            return "it trains only part of the model (a FedP3 plan)"
        if self.sequential.trainer.privacy is not None:
            return "its client trains with DP-SGD (per-sample gradients through Opacus)"
        if task.client_id not in self.shards or len(self.shards[task.client_id]) == 0:
            return f"client {task.client_id} has no training samples"
        if task.client_id in self.low_bit and self.config.low_bit_weights:
            return "its client holds its weights at its bitwidth while training (stochastic rounding)"
        if self.device.type != "cpu" and self._int8_rows(self.low_bit.get(task.client_id, quant.FULL_PRECISION)):
            return "its client's large layers train on integer GEMMs, which this executor runs on a CPU only"
        return ""

    def _int8_rows(self, bits: int) -> dict[str, list[bool]]:
        """The layers the quantized trainer runs on integer GEMMs at ``bits`` bits, and for which minibatch sizes
        (:func:`~fedhet.sim.int8.int8_rows`); none where ``int8_min_macs`` rules them out."""
        if bits > 8 or self.int8_min_macs >= INT8_NEVER or self.unsupported:
            return {}
        if bits not in self._int8:
            sample = self.x[:1].float()
            self._int8[bits] = int8_rows(self.model, sample, bits, self.int8_min_macs, self.config.batch_size)
        return self._int8[bits]

    def _plans(self, tasks: Sequence[Task], positions: Sequence[int]) -> list[_Plan]:
        """The plans of ``tasks[positions]``, their minibatch orders seeded as the sequential trainer's
        (:func:`~fedhet.clients.trainer.task_seed`, drawn for every task at once)."""
        if not positions:
            return []
        seeds = mix_seeds([(self.seed, tasks[i].task_id) for i in positions]).tolist()
        return [self._plan(i, tasks[i], seed) for i, seed in zip(positions, seeds, strict=True)]

    def _plan(self, position: int, task: Task, seed: int) -> _Plan:
        """The permutations of :func:`~fedhet.clients.trainer.minibatches` (a fresh one each epoch), drawn the same
        way from ``seed``."""
        shard = self.shards[task.client_id]
        generator = self._generator.manual_seed(seed)
        size, batch = len(shard), self.config.batch_size
        steps = task.steps_for(size, batch)
        epochs = -(-steps // -(-size // batch))  # steps over minibatches per epoch, rounded up
        # numpy from here: a task's few small operations cost less there
        orders = [shard[torch.randperm(size, generator=generator).numpy()] for _ in range(epochs)]
        order = orders[0] if epochs == 1 else np.concatenate(orders)
        return _Plan(position, task, size, steps, order, self.low_bit.get(task.client_id, quant.FULL_PRECISION))

    def _train_chunk(self, plans: list[_Plan]) -> list[tuple[_Plan, Result]]:
        begin = time.perf_counter()
        plans = sorted(plans, key=lambda p: -p.steps)  # the clients training at a step are a prefix
        bits = plans[0].bits
        lr = self._chunk_lr(plans)
        master = self._start_weights(plans, lr, bits)
        prox = _Proximal.of(plans, master, self.device)
        momentum: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros(len(plans), dtype=torch.float64, device=self.device)
        indices = self._chunk_indices(plans)
        # no input gradient below the first layer with parameters (the 2NN starts with Flatten)
        first = next((i for i, layer in enumerate(self.layers) if layer.keys), len(self.layers))
        int8_layers = self._int8_rows(bits)
        active = len(plans)
        for step in range(plans[0].steps):
            while plans[active - 1].steps <= step:  # the clients that have finished are a suffix
                active -= 1
            idx, weight = self._step_batch(indices[:active, step])
            h = torch.index_select(self.x, 0, idx.view(-1))  # faster than indexing; keeps channels-last
            rows = (indices[:active, step] >= 0).sum(1).tolist() if int8_layers else []
            params = [
                layer.prepare([self._view(k, master[k], active, bits, rows) for k in layer.keys], self.dtype)
                for layer in self.layers
            ]
            saved = []
            for layer, layer_params in zip(self.layers, params, strict=True):
                h, context = layer.forward(h, layer_params, active)
                saved.append(context)
            loss, dlogits = _cross_entropy(h.float().view(active, idx.shape[1], -1), self.y[idx], weight)
            loss_sum[:active] += loss
            grad: torch.Tensor | None = dlogits.view(h.shape).to(self.dtype)
            for i in reversed(range(first, len(self.layers))):
                layer = self.layers[i]
                assert grad is not None
                grad, grads = layer.backward(grad, params[i], saved[i], active, need_dx=i > first)
                saved[i] = ()
                for key, g in zip(layer.keys, grads, strict=True):
                    master[key] = self._step(key, master[key], g, active, lr, momentum, prox)
        weights = {k: v.dense() if isinstance(v, LowRank) else v for k, v in master.items()}
        losses = loss_sum.tolist()
        changed: Mapping[str, Param] = master  # a low-rank weight's change has its norm in its factors
        if bits < quant.FULL_PRECISION:  # the results on the grid, as the quantized trainer returns them
            weights, finite = self._on_grid(weights, plans, bits)
            losses = [loss if ok else DIVERGED for loss, ok in zip(losses, finite, strict=True)]
            changed = weights
        starts = [plan.task.weights for plan in plans]
        norms = self._update_norms(changed, starts)
        seconds = (time.perf_counter() - begin) / len(plans)
        return [
            (
                plan,
                Result(
                    task_id=plan.task.task_id,
                    client_id=plan.task.client_id,
                    version=plan.task.version,
                    weights=StackedRow(weights, c, norms, starts),
                    num_samples=plan.num_samples,
                    local_steps=plan.steps,
                    train_seconds=seconds,
                    loss=losses[c] / plan.steps,
                    bitwidth=bits,
                ),
            )
            for c, plan in enumerate(plans)
        ]

    def _update_norms(self, params: Mapping[str, Param], starts: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
        """Each client's update norm against its task's start weights ``starts``, for the run's norm bound: what
        :func:`~fedhet.updates.update_norm` computes of each result, up to float rounding, for the chunk at once: a
        :class:`LowRank` weight's from its factors (its base is the chunk's shared start), any other parameter's
        from its float32 differences to the starts, a block of clients at a time (a CNN chunk's differences would
        be hundreds of MB); squares summed per tensor, the tensors added in float64."""
        clients = len(starts)
        shared = all(start is starts[0] for start in starts)
        squares = torch.zeros(clients, dtype=torch.float64, device=self.device)
        for key, value in params.items():
            if isinstance(value, LowRank):
                squares += value.update_squares()
                continue
            if not value.is_floating_point():
                continue
            stacked = value.dim() > len(self.signature[key][0])  # else still every client's start
            rows = value.reshape(clients if stacked else 1, -1)
            block = max(1, _NORM_BLOCK_BYTES // (4 * rows.shape[1]))
            for lo in range(0, clients, block):
                hi = min(clients, lo + block)
                if shared:
                    start = starts[0][key].reshape(1, -1)
                else:
                    start = torch.stack([s[key].reshape(-1) for s in starts[lo:hi]])
                diff = (rows[lo:hi] if stacked else rows).float() - start.to(self.device, torch.float32)
                squares[lo:hi] += torch.linalg.vector_norm(diff, dim=1).double() ** 2
        norms: list[float] = squares.sqrt().tolist()
        return norms

    def _chunk_lr(self, plans: Sequence[_Plan]) -> float | torch.Tensor:
        """Each client's learning rate, that of its task's start version: one number when every task of the chunk
        has the same (always without ``lr_decay``), else a ``(clients,)`` fp32 tensor."""
        lrs: list[float] = [self.config.lr_at(p.task.version) for p in plans]
        if all(lr == lrs[0] for lr in lrs):
            return lrs[0]
        return torch.tensor(lrs, dtype=torch.float32, device=self.device)

    def _start_weights(self, plans: list[_Plan], lr: float | torch.Tensor, bits: int) -> dict[str, Param]:
        """The chunk's parameters before the first step, its tasks' weights rounded to ``bits`` bits: shared when
        every client starts from the same weights (linear weights as a rank-0 :class:`LowRank` under plain SGD at
        one learning rate ``lr`` and 32 bits), else stacked per client."""
        starts = [self._rounded_start(p.task, bits) for p in plans]
        first = starts[0]
        shared = all(start is first for start in starts)  # a round's tasks share one mapping: no look at its tensors
        if not (shared or all(start[k] is v for start in starts for k, v in first.items())):
            return {k: torch.stack([start[k] for start in starts]).to(self.device, torch.float32) for k in first}
        proximal = any(p.task.proximal_mu > 0 for p in plans)  # its pull makes every change full rank
        # rounding a client's weights every step needs them dense
        full_rank = self.config.momentum or self.config.weight_decay or proximal or bits < quant.FULL_PRECISION
        master: dict[str, Param] = {}
        for key, value in first.items():
            base = value.to(self.device, torch.float32)
            if key in self.low_rank_keys and not isinstance(lr, torch.Tensor) and not full_rank:
                out, inp = base.shape
                u = base.new_empty((len(plans), 0, out), dtype=self.dtype)
                v = base.new_empty((len(plans), 0, inp), dtype=self.dtype)
                master[key] = LowRank(base, u, v, lr, base.to(self.dtype))
            else:
                master[key] = base
        return master

    def _rounded_start(self, task: Task, bits: int) -> Mapping[str, torch.Tensor]:
        """``task``'s weights rounded to ``bits`` bits (as the quantized trainer starts), once per weights mapping
        and bitwidth in a :meth:`run`, so that tasks of one round still share their start."""
        if bits == quant.FULL_PRECISION:
            return task.weights
        key = (id(task.weights), bits)
        if key not in self._rounded:
            self._rounded[key] = quant.quantize_weights(task.weights, bits)
        return self._rounded[key]

    def _on_grid(
        self, weights: dict[str, torch.Tensor], plans: list[_Plan], bits: int
    ) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """A chunk's stacked results rounded to ``bits`` bits as :class:`~fedhet.clients.quantized.QuantizedTrainer`
        rounds each (to nearest in one pass, or stochastically client by client from its task's seed), and whether
        each client's weights are finite: one that diverged (NaN or Inf) cannot be rounded, and its result says so
        with a NaN loss, as the quantized trainer's does."""
        clients = len(plans)
        extremes = [torch.aminmax(v.reshape(clients, -1), dim=1) for v in weights.values()]  # NaN propagates
        finite = torch.stack([lo.isfinite() & hi.isfinite() for lo, hi in extremes]).all(0).tolist()
        if self.config.result_rounding == "nearest":  # a diverged client's row rounds to NaN, and is refused
            return {k: quant.fake_quantize_stacked(v, bits, check_finite=False) for k, v in weights.items()}, finite
        for c, plan in enumerate(plans):
            if not finite[c]:
                continue
            rows = quant.stochastic_round_weights(
                {k: v[c] for k, v in weights.items()}, bits, result_seed(self.seed, plan.task.task_id)
            )
            for key, row in rows.items():
                weights[key][c] = row
        return weights, finite

    def _view(self, key: str, param: Param, active: int, bits: int, rows: Sequence[int]) -> LayerParam:
        """``param`` for the first ``active`` clients, as the forward pass uses it: a Linear or Conv2d weight
        rounded to ``bits`` bits per client (quantization-aware training; the gradient passes straight through to
        the fp32 weights), as integers where the quantized trainer's int8 path takes a client's minibatch of
        ``rows[c]`` samples."""
        if isinstance(param, LowRank):
            return param.prefix(active)
        shared = param.dim() == len(self.signature[key][0])
        view = param if shared else param[:active]
        if bits == quant.FULL_PRECISION or key not in self.quantized_keys:
            return view
        int8_rows = self._int8_rows(bits).get(key)
        if int8_rows is not None and any(int8_rows[r] for r in rows):
            return Int8Weight.of(view, bits, shared, [int8_rows[r] for r in rows], rows)
        if shared:  # no finiteness check in a training forward (a host read per layer): the results are checked
            return quant.fake_quantize(view, bits, check_finite=False)
        return quant.fake_quantize_stacked(view, bits, check_finite=False)

    def _chunk_indices(self, plans: list[_Plan]) -> torch.Tensor:
        """Every plan's minibatches as global sample indices, ``(clients, steps, batch)``, -1 where there is no
        sample: each epoch's permutation cut into minibatches of the batch size, the last one short."""
        batch = self.config.batch_size
        out = np.full((len(plans), plans[0].steps, min(batch, max(p.num_samples for p in plans))), -1, dtype=np.int64)
        for c, plan in enumerate(plans):
            size, steps = plan.num_samples, plan.steps
            width = min(batch, size)
            if size % width:  # an epoch's last minibatch is short: pad every epoch to whole minibatches
                per_epoch = -(-size // width)
                padded = np.full((len(plan.order) // size, per_epoch * width), -1, dtype=np.int64)
                padded[:, :size] = plan.order.reshape(-1, size)
                out[c, :steps, :width] = padded.reshape(-1, width)[:steps]
            else:
                out[c, :steps, :width] = plan.order.reshape(-1, width)[:steps]
        return torch.from_numpy(out)

    def _step_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's sample indices ``(clients, longest minibatch)``, padding pointing at sample 0, and each
        sample's loss weight: 1 / (its minibatch size), 0 on padding."""
        real = idx >= 0
        sizes = real.sum(1, keepdim=True)
        width = int(sizes.max())
        weight = real[:, :width] / sizes
        return idx[:, :width].clamp_min(0).to(self.device), weight.to(self.device)

    def _step(
        self,
        key: str,
        param: Param,
        grad: Grad,
        active: int,
        lr: float | torch.Tensor,
        momentum: dict[str, torch.Tensor],
        prox: _Proximal | None,
    ) -> Param:
        """One optimiser step of parameter ``key`` for the first ``active`` clients at learning rate ``lr`` (one
        number, or one per client of the chunk)."""
        if isinstance(param, LowRank):
            if isinstance(grad, OuterGrad) and param.rank + grad.dy.shape[1] <= min(param.base.shape) // 2:
                param.extend(grad)
                return param
            param = param.dense()  # the factors would outgrow the weights
        dense = grad.dense() if isinstance(grad, OuterGrad) else grad
        return self._sgd(key, param, dense, active, lr, momentum, prox)

    def _sgd(
        self,
        key: str,
        param: torch.Tensor,
        grad: torch.Tensor,
        active: int,
        lr: float | torch.Tensor,
        momentum: dict[str, torch.Tensor],
        prox: _Proximal | None,
    ) -> torch.Tensor:
        """torch.optim.SGD's step (weight decay and FedProx's pull, then momentum without dampening) for the first
        ``active`` clients, at ``lr`` (one number, or one per client); a shared parameter becomes a stacked one."""
        cfg = self.config
        shared = param.dim() == len(self.signature[key][0])
        current = param if shared else param[:active]
        grad = grad.float()  # before mixing with fp32: torch's mixed-dtype elementwise kernels are slower than a cast
        if cfg.weight_decay:
            grad = grad.add(current, alpha=cfg.weight_decay)
        if prox is not None and not shared:  # a shared parameter is still every client's start: no pull
            grad = grad + prox.pull(key, current, active)
        if cfg.momentum:
            if key not in momentum:
                momentum[key] = grad.clone()
            else:
                momentum[key][:active].mul_(cfg.momentum).add_(grad)
            grad = momentum[key][:active]
        if isinstance(lr, torch.Tensor):  # per client: a fused multiply-subtract with the lr column
            column = lr[:active].view(-1, *[1] * (grad.dim() - 1))
            if shared:
                return torch.addcmul(param, grad, column, value=-1)
            current.addcmul_(grad, column, value=-1)
            return param
        if shared:
            return torch.sub(param, grad, alpha=lr)
        current.sub_(grad, alpha=lr)
        return param


@dataclass
class _Proximal:
    """FedProx's pull in a chunk: ``mu_c * (w - w_start)`` for client ``c``, added to each gradient."""

    mu: torch.Tensor  # (clients,)
    starts: dict[str, torch.Tensor]  # the start weights: shared (the parameter's shape) or stacked per client

    @classmethod
    def of(cls, plans: Sequence[_Plan], master: Mapping[str, Param], device: torch.device) -> _Proximal | None:
        """The chunk's pull (None when no task has one); stacked start weights are copied, as training changes
        them in place."""
        mu = [p.task.proximal_mu for p in plans]
        if not any(mu):
            return None
        starts: dict[str, torch.Tensor] = {}
        for key, value in master.items():
            assert isinstance(value, torch.Tensor)  # a pull keeps weights dense (see _start_weights)
            starts[key] = value.clone() if value.dim() > plans[0].task.weights[key].dim() else value
        return cls(torch.tensor(mu, dtype=torch.float32, device=device), starts)

    def pull(self, key: str, current: torch.Tensor, active: int) -> torch.Tensor:
        start = self.starts[key]
        start = start[:active] if start.dim() == current.dim() else start
        return self.mu[:active].view(-1, *[1] * (current.dim() - 1)) * (current - start)


def _cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-client weighted cross-entropy ``(clients,)`` of ``logits (clients, batch, classes)`` and its gradient."""
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    grad = logp.exp_()
    grad.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(nll, -1.0).unsqueeze(-1))
    return (nll * weight).sum(1), grad.mul_(weight.unsqueeze(-1))
