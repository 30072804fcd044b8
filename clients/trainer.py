"""Local training: what one client does with a task.

A task may carry only part of the model (FedP3: the shared layers, some of them pruned). The tensors of the client's
model that the task does not carry are the client's **own** (FedP3's personal head): they live in its
:class:`ClientState` across all its tasks, train alongside the task's ``train`` tensors, and never leave the client.
The tensors the task carries but does not list in ``train`` stay frozen. The result carries the ``train`` tensors.

With a :class:`PrivacyConfig` the trainer runs DP-SGD through Opacus: minibatches drawn by Poisson sampling (rate
``q = batch_size / samples``), each sample's gradient clipped to ``max_grad_norm`` and Gaussian noise of standard
deviation ``noise_multiplier * max_grad_norm`` added to their sum, on the trained tensors only. The model is wrapped
in Opacus's ``GradSampleModule`` once (Opacus computes per-sample gradients only for the layers trainable when
its hooks are added; a FedP3 client's layers never change, and in simulation, where one model serves every
client, the hooks move when the next task trains other layers). Each client's RDP accountant lives in its
:class:`ClientState` and is stepped once per DP-SGD step, so its epsilon covers every task the client ever ran (a
deployed client keeps its state in a file across restarts, and reports each task's steps to the server, whose
ledger keeps every client's epsilon in its checkpoint). Uploaded weights come from the unwrapped model (no
``_module.`` prefixes, no hooks).

The noise's norm grows with the square root of the number of trained parameters ``d`` (per step about
``noise_multiplier * max_grad_norm * sqrt(d) / batch_size`` against a clipped mean gradient of norm at most
``max_grad_norm``), so ``PrivacyConfig.max_layer_params`` can keep DP-SGD to the small layers: a layer (the
parameters of one module) larger than it does not train, and stays at the value it came with (a task's tensor, which
the server sent, or the client's own tensor as it was). Everything a DP client uploads is then the DP-SGD output of
its small layers or a tensor the server sent; its own tensors (FedP3's head) train inside the same DP-SGD steps
(clipped and noised with the shared ones), or not at all, never beside them without noise.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedhet import quant
from fedhet.clients.graphed import GraphedSteps
from fedhet.seeding import mix_seed
from fedhet.types import Result, Task, Weights

if TYPE_CHECKING:  # Opacus is imported when DP is used: it adds seconds to every client's start-up
    from opacus.accountants import RDPAccountant

    from fedhet.clients.quantized import QuantizedTrainer  # which imports this module

__all__ = [
    "ClientState",
    "ClientStates",
    "ClientTrainer",
    "LocalTrainer",
    "PrivacyConfig",
    "TrainConfig",
    "check_max_layer_params",
    "layer_sizes",
    "private_names",
    "result_seed",
]


@dataclass(frozen=True)
class TrainConfig:
    """Local optimiser settings.

    Attributes:
        lr: SGD learning rate (> 0) of a task that starts from global version 0.
        lr_decay: per-version decay in (0, 1]: a task that starts from global version ``v`` trains at
            ``lr * lr_decay ** v`` (:meth:`lr_at`), on every training path (SGD, DP-SGD, quantization-aware, the
            vectorized executor). FedP3's released code decays 0.997 per round from 0.01; 1 keeps ``lr`` fixed.
            The head fine-tuning of the personalised accuracy measures, it does not train a round, and uses ``lr``.
        batch_size: samples per minibatch.
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 penalty (>= 0).
        low_bit_weights: a client below 32 bits holds its weights at its bitwidth while it trains, with stochastic
            rounding and no fp32 master copy (:mod:`fedhet.clients.lowbit`; needs momentum 0), instead of
            quantization-aware training on an fp32 master copy.
        result_rounding: how a quantization-aware client below 32 bits rounds its result to its grid: ``nearest``
            or ``stochastic`` (unbiased, drawn from the run seed and the task id, :func:`result_seed`), so that a
            task's movement smaller than half a quantization step survives on average over the clients instead of
            being rounded away (at 4 bits most of a task's movement is). Low-bit weights are on the grid already.
        cuda_graphs: on a CUDA device, each full minibatch's SGD step (fp32 or quantization-aware) replays a
            captured CUDA graph (:mod:`fedhet.clients.graphed`): one launch instead of hundreds of kernels. False
            runs every step eagerly. No effect on a CPU, under DP-SGD or with FedProx, which always run eagerly.
    """

    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    low_bit_weights: bool = False
    result_rounding: str = "nearest"
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"client.lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.lr_decay) and 0.0 < self.lr_decay <= 1.0):
            raise ValueError(f"client.lr_decay must be in (0, 1] (1 = no decay), got {self.lr_decay}")
        if self.batch_size < 1:
            raise ValueError(f"client.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"client.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"client.weight_decay must be >= 0, got {self.weight_decay}")
        quant.check_rounding(self.result_rounding, "client.result_rounding")
        if self.low_bit_weights and self.momentum:
            raise ValueError(
                f"client.low_bit_weights=true keeps no fp32 state per weight, which momentum needs (got momentum "
                f"{self.momentum}): set momentum to 0 or low_bit_weights to false"
            )

    def lr_at(self, version: int) -> float:
        """The learning rate of a task that starts from global version ``version``: ``lr * lr_decay ** version``."""
        return self.lr * self.lr_decay**version


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD settings (Abadi et al., 2016), the same for every client.

    Attributes:
        max_grad_norm: C, the per-sample gradient clipping norm (> 0).
        noise_multiplier: sigma; the noise standard deviation is ``sigma * C``. 0 means: derive it per client from
            ``target_epsilon`` (one of the two must be > 0).
        target_epsilon: the epsilon a client may reach after ``planned_tasks`` tasks (used when sigma is 0).
        delta: the delta of every client's (epsilon, delta) guarantee, in (0, 1).
        planned_tasks: tasks per client the target epsilon is spread over (with full participation: the rounds).
        max_layer_params: a layer (the parameters of one module) with more parameters than this does not train under
            DP-SGD: it keeps the value it came with, so the noise has at most the small layers' dimension
            (:func:`private_names`). 0: every layer a task trains does.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    planned_tasks: int = 0
    max_layer_params: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if self.noise_multiplier < 0 or self.target_epsilon < 0:
            raise ValueError("privacy.noise_multiplier and privacy.target_epsilon must be >= 0")
        if (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise ValueError(
                f"set exactly one of privacy.noise_multiplier ({self.noise_multiplier}) and privacy.target_epsilon "
                f"({self.target_epsilon})"
            )
        if self.target_epsilon > 0 and self.planned_tasks < 1:
            raise ValueError("privacy.target_epsilon needs privacy.planned_tasks >= 1 (tasks per client)")
        if isinstance(self.max_layer_params, bool) or not isinstance(self.max_layer_params, int):
            raise ValueError(f"privacy.max_layer_params must be an integer, got {self.max_layer_params!r}")
        if self.max_layer_params < 0:
            raise ValueError(
                f"privacy.max_layer_params must be >= 0 parameters (0 = no limit), got {self.max_layer_params}"
            )

    @staticmethod
    def sample_rate(batch_size: int, num_samples: int) -> float:
        """q, the Poisson sampling rate of a client with ``num_samples`` samples at ``batch_size``."""
        return min(1.0, batch_size / num_samples)

    def noise_for(self, sample_rate: float, steps_per_task: int) -> float:
        """sigma for a client sampling at ``sample_rate`` for ``steps_per_task`` steps per task."""
        if self.noise_multiplier > 0:
            return self.noise_multiplier
        from opacus.accountants.utils import get_noise_multiplier

        return float(
            get_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                sample_rate=sample_rate,
                steps=self.planned_tasks * steps_per_task,
                accountant="rdp",
            )
        )


@dataclass
class ClientState:
    """What one client keeps between its tasks.

    Attributes:
        tensors: its own tensors (FedP3's personal head), never sent to the server.
        accountant: its RDP accountant under DP (every DP-SGD step it ever took), else None.
        noise_multiplier: the sigma it trains with under DP, fixed at its first task.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    accountant: RDPAccountant | None = None
    noise_multiplier: float = 0.0

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta`` (0 before any DP step)."""
        if self.accountant is None or not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta))

    def to_bytes(self) -> bytes:
        """The state as one :mod:`fedhet.codec` payload (no pickle): own tensors under ``own/``, the accountant's
        history as a float64 ``[steps entries, 3]`` tensor (noise multiplier, sample rate, steps)."""
        from fedhet.codec import encode

        history = self.accountant.history if self.accountant is not None else []
        tensors = {f"own/{k}": v for k, v in self.tensors.items()}
        tensors["dp/history"] = torch.tensor([list(map(float, h)) for h in history], dtype=torch.float64).reshape(-1, 3)
        tensors["dp/noise"] = torch.tensor([self.noise_multiplier], dtype=torch.float64)
        return encode(tensors)

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientState:
        """A state written by :meth:`to_bytes`; raises ValueError (``CodecError``) for anything else."""
        from fedhet.codec import CodecError, decode

        tensors = decode(data)
        history, noise = tensors.pop("dp/history", None), tensors.pop("dp/noise", None)
        if history is None or noise is None or history.dim() != 2 or history.shape[1] != 3 or noise.numel() != 1:
            raise CodecError("not a client state: dp/history [n, 3] and dp/noise [1] are missing or malformed")
        if any(not k.startswith("own/") for k in tensors):
            raise CodecError(f"not a client state: unexpected tensors {sorted(k for k in tensors if '/' not in k)}")
        state = cls({k.removeprefix("own/"): v for k, v in tensors.items()}, noise_multiplier=float(noise[0]))
        if len(history):
            from opacus.accountants import RDPAccountant

            state.accountant = RDPAccountant()
            state.accountant.history = [(float(n), float(q), int(c)) for n, q, c in history.tolist()]
        return state


class ClientStates:
    """Every simulated client's :class:`ClientState`, created on first use with its own tensors taken from
    ``initial`` (the initial global model). Memory: the own tensors of the clients that trained (FedP3: one head
    each, fp32) and one accountant history each under DP."""

    def __init__(self, initial: Weights) -> None:
        self.initial = {k: v.detach().to("cpu", copy=True) for k, v in initial.items()}
        self.states: dict[int, ClientState] = {}

    def get(self, client_id: int, task: Task) -> ClientState:
        """``client_id``'s state, its own tensors being those of the model that ``task`` does not carry."""
        state = self.states.get(client_id)
        if state is None:
            own = {k: v.clone() for k, v in self.initial.items() if k not in task.weights}
            state = self.states[client_id] = ClientState(own)
        return state

    def own_tensors(self, client_id: int) -> dict[str, torch.Tensor]:
        """The client's own tensors (the initial ones if it has not trained yet)."""
        state = self.states.get(client_id)
        return state.tensors if state is not None else {}


def add_proximal_term(optimizer: torch.optim.Optimizer, model: nn.Module, task: Task) -> None:
    """FedProx: before each step of ``optimizer``, add ``mu * (w - w_start)``, the gradient of
    ``mu/2 * ||w - w_start||^2``, to the gradient of every parameter ``task`` carries and trains. A step pre-hook, so
    under DP-SGD it comes after Opacus has clipped and noised the data's gradient (the term touches no data)."""
    mu = task.proximal_mu
    pairs = [
        (param, task.weights[name].to(param.device, param.dtype))
        for name, param in model.named_parameters()
        if name in task.trained and name in task.weights
    ]

    def proximal(*_: object) -> None:
        for param, start in pairs:
            if param.grad is not None:
                param.grad.add_(param.detach() - start, alpha=mu)

    optimizer.register_step_pre_hook(proximal)


class LocalTrainer:
    """Local SGD (or DP-SGD) from a task's weights on one client's samples.

    One trainer (and one model instance) serves any number of clients in turn; what a client keeps between tasks
    is passed in as its :class:`ClientState`, so memory does not grow with the number of clients. Plain SGD steps
    go through :class:`~fedhet.clients.graphed.GraphedSteps` (one optimiser reused across tasks; captured CUDA
    graphs on a GPU); :attr:`kernel_key` names whatever else picks the model's kernels (a quantized trainer's
    bitwidth), so that a change recaptures.
    """

    kernel_key: object = None

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        device: str | torch.device = "cpu",
        privacy: PrivacyConfig | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.config = config
        self.privacy = privacy
        self.loss_fn = nn.CrossEntropyLoss()
        self._per_sample: Any = None  # DP: Opacus's GradSampleModule, attached at the first DP task
        self.graphed = GraphedSteps(self.model, self.loss_fn, capture=config.cuda_graphs)
        self._hooked_for: frozenset[str] = frozenset()  # the trained names its hooks were added for

    def train(
        self, task: Task, x: torch.Tensor, y: torch.Tensor, seed: int, state: ClientState | None = None
    ) -> Result:
        """Run ``task`` on samples ``(x, y)``; minibatch order (or Poisson sampling) is drawn from ``seed`` and the
        task id, so the result depends only on (start weights, client state, data, task, seed). ``state`` holds the
        client's own tensors (needed when the task does not carry the whole model) and, under DP, its accountant;
        both are updated."""
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"task {task.task_id}: client {task.client_id} has {len(x)} inputs and {len(y)} labels")
        start = time.perf_counter()
        own = {k: v for k, v in (state.tensors if state is not None else {}).items() if k not in task.weights}
        missing = set(self.model.state_dict()) - set(task.weights) - set(own)
        if missing:
            raise ValueError(f"task {task.task_id}: client {task.client_id} has no values for {sorted(missing)}")
        self.model.load_state_dict({**task.weights, **own})
        self.model.train()
        trained = task.optimized | set(own)
        if self.privacy is not None and self.privacy.max_layer_params:
            trained = private_names(self.model, trained, self.privacy.max_layer_params)
            if not trained:
                raise ValueError(
                    f"task {task.task_id}: privacy.max_layer_params={self.privacy.max_layer_params} leaves client "
                    f"{task.client_id} no layer to train (the model's layers have parameters "
                    f"{layer_sizes(self.model)}): raise it to at least the size of the personal head"
                )
        params = []
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trained)
            if name in trained:
                params.append(param)
        cfg = self.config
        generator = torch.Generator().manual_seed(task_seed(seed, task.task_id))
        steps = task.steps_for(len(x), cfg.batch_size)
        lr = cfg.lr_at(task.version)
        try:
            if self.privacy is None and task.proximal_mu == 0:
                self.graphed.begin(params, lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, self.kernel_key)
                batches = minibatches(len(x), cfg.batch_size, steps, generator)
                total_loss = run_minibatches(self.graphed.step, batches, x, y, self.device)
            else:  # FedProx's step pre-hook reads this task's start weights, and DP-SGD wraps the optimiser: eager
                optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
                if task.proximal_mu > 0:
                    add_proximal_term(optimizer, self.model, task)
                if self.privacy is None:
                    batches = minibatches(len(x), cfg.batch_size, steps, generator)
                    total_loss = self._sgd(self.model, optimizer, batches, x, y)
                elif state is None:
                    raise ValueError(f"task {task.task_id}: DP training needs the client's state (its accountant)")
                else:
                    total_loss = self._dp_sgd(optimizer, state, frozenset(trained), steps, x, y, generator)
        finally:
            for param in self.model.parameters():
                param.requires_grad_(True)
        model_state = self.model.state_dict()
        if state is not None:
            state.tensors = {k: model_state[k].detach().to("cpu", copy=True) for k in own}
        weights = {k: model_state[k].detach().to("cpu", copy=True) for k in task.weights if k in task.trained}
        return Result(
            task_id=task.task_id,
            client_id=task.client_id,
            version=task.version,
            weights=weights,
            num_samples=len(x),
            local_steps=steps,
            train_seconds=time.perf_counter() - start,
            loss=total_loss / steps,
        )

    def _sgd(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: list[torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> float:
        """Eager steps over ``batches``; the summed minibatch loss."""

        def step(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            detached: torch.Tensor = loss.detach()
            return detached

        return run_minibatches(step, batches, x, y, self.device)

    def per_sample_module(self, trained: frozenset[str]) -> Any:
        """Opacus's ``GradSampleModule`` around the model, hooked on the layers that train now (the model's
        trainable flags must be set for ``trained``). It is attached once; Opacus hooks only the layers trainable
        at hooking time, so when the trained set changes (another FedP3 layer assignment in simulation, where one
        model serves every client) its hooks are moved: removed and added again, never a second wrapper."""
        from opacus import GradSampleModule

        if self._per_sample is None:
            # attached with every parameter trainable, so Opacus prepares all of them; then hooked for ``trained``
            flags = [(p, p.requires_grad) for p in self.model.parameters()]
            for param, _ in flags:
                param.requires_grad_(True)
            self._per_sample = GradSampleModule(self.model)
            for param, flag in flags:
                param.requires_grad_(flag)
            self._hooked_for = frozenset(n for n, _ in self.model.named_parameters())
        if trained != self._hooked_for:
            self._per_sample.remove_hooks()
            self._per_sample.add_hooks()
        self._hooked_for = trained
        return self._per_sample

    def _dp_sgd(
        self,
        optimizer: torch.optim.Optimizer,
        state: ClientState,
        trained: frozenset[str],
        steps: int,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> float:
        """DP-SGD steps with Poisson sampling; steps the client's accountant once per step."""
        from opacus.accountants import RDPAccountant
        from opacus.optimizers import DPOptimizer

        assert self.privacy is not None
        wrapper = self.per_sample_module(trained)
        batch = self.config.batch_size
        sample_rate = PrivacyConfig.sample_rate(batch, len(x))
        if state.accountant is None:
            state.accountant = RDPAccountant()
            state.noise_multiplier = self.privacy.noise_for(sample_rate, steps)
        private = DPOptimizer(
            optimizer,
            noise_multiplier=state.noise_multiplier,
            max_grad_norm=self.privacy.max_grad_norm,
            expected_batch_size=min(batch, len(x)),  # q * n: the expected Poisson batch
            generator=torch.Generator(self.device).manual_seed(int(torch.randint(2**62, (), generator=generator))),
        )
        batches = [
            torch.nonzero(torch.rand(len(x), generator=generator) < sample_rate).reshape(-1) for _ in range(steps)
        ]
        with warnings.catch_warnings():  # Opacus's hooks on the first layer, whose input needs no gradient: harmless
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            total = self._sgd(wrapper, private, batches, x, y)
        for _ in range(steps):
            state.accountant.step(noise_multiplier=state.noise_multiplier, sample_rate=sample_rate)
        private.zero_grad(set_to_none=True)  # drops the per-sample gradients
        return total


class ClientTrainer:
    """What a client of a given bitwidth trains with, in simulation and in ``fedhet client`` alike: at 32 bits the
    :class:`LocalTrainer` (SGD, or DP-SGD under its privacy settings), below 32 bits the
    :class:`~fedhet.clients.quantized.QuantizedTrainer` (quantization-aware training at ``b`` bits, without DP). The
    result carries the bitwidth it was computed at.

    Args:
        local: trains at 32 bits; its config and privacy settings are the client's.
        quantized: trains below 32 bits; needed for any such bitwidth (a model instance of its own).
    """

    def __init__(self, local: LocalTrainer, quantized: QuantizedTrainer | None = None) -> None:
        self.local = local
        self.quantized = quantized

    @property
    def config(self) -> TrainConfig:
        return self.local.config

    @property
    def privacy(self) -> PrivacyConfig | None:
        return self.local.privacy

    def check(self, bitwidths: Iterable[int]) -> None:
        """Raise ValueError unless every one of ``bitwidths`` (32, or one of :data:`fedhet.quant.BITWIDTHS`) can be
        trained here: a bitwidth below 32 needs the quantized trainer and no DP."""
        low = sorted({b for b in bitwidths if b != quant.FULL_PRECISION})
        for bits in low:
            quant.check_bits(bits)
        if low and self.quantized is None:
            raise ValueError(f"clients at {low} bits need a QuantizedTrainer: pass quantized=")
        if low and self.privacy is not None:
            raise ValueError(f"DP-SGD trains at 32 bits only; clients at {low} bits cannot train with privacy")

    def train(
        self,
        task: Task,
        x: torch.Tensor,
        y: torch.Tensor,
        seed: int,
        bitwidth: int = quant.FULL_PRECISION,
        state: ClientState | None = None,
    ) -> Result:
        """Run ``task`` at ``bitwidth`` bits on samples ``(x, y)`` (see :meth:`LocalTrainer.train`); a result below
        32 bits holds weights on its ``b``-bit grid, which the ``int<b>`` codec carries exactly."""
        if bitwidth == quant.FULL_PRECISION:
            return self.local.train(task, x, y, seed, state)
        self.check([bitwidth])
        assert self.quantized is not None  # checked
        result: Result = self.quantized.train(task, x, y, seed, bitwidth, state)
        return replace(result, bitwidth=bitwidth)


def layer_sizes(model: nn.Module) -> dict[str, int]:
    """The parameters (count) of each layer of ``model``: a module's own parameters, by module path."""
    return {
        path: sum(p.numel() for p in module.parameters(recurse=False))
        for path, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    }


def check_max_layer_params(model: nn.Module, max_layer_params: int, head_trains: bool = False) -> None:
    """Raise ValueError when ``max_layer_params`` (0: no limit) leaves ``model`` no layer to train under DP-SGD, or,
    with ``head_trains`` (FedP3, where a client may be given only large layers besides its head), freezes the head
    (the last layer)."""
    if not max_layer_params:
        return
    sizes = layer_sizes(model)
    head, head_size = list(sizes.items())[-1]
    if min(sizes.values()) > max_layer_params or (head_trains and head_size > max_layer_params):
        raise ValueError(
            f"privacy.max_layer_params={max_layer_params} freezes layers a client must train (parameters per "
            f"layer: {sizes}); set it to at least {head_size}, the head {head!r}'s size, or 0 for no limit"
        )


def private_names(model: nn.Module, trained: Iterable[str], max_layer_params: int) -> frozenset[str]:
    """The parameters of ``model`` among ``trained`` that DP-SGD trains when a layer of more than
    ``max_layer_params`` parameters may not train (0: every one of ``trained``)."""
    if max_layer_params == 0:
        return frozenset(trained)
    sizes, wanted = layer_sizes(model), set(trained)
    return frozenset(
        n for n, _ in model.named_parameters() if n in wanted and sizes[n.rpartition(".")[0]] <= max_layer_params
    )


def task_seed(seed: int, task_id: int) -> int:
    """The seed of a task's minibatch order: the run seed and the task id mixed (:func:`fedhet.seeding.mix_seed`)."""
    return mix_seed(seed, task_id)


def result_seed(seed: int, task_id: int) -> int:
    """The seed of a task's stochastically rounded result (``TrainConfig.result_rounding``): the run seed and the
    task id mixed, apart from the minibatch order's (:func:`task_seed`)."""
    return mix_seed(seed, task_id, 2)


def run_minibatches(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: list[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
) -> float:
    """``step`` (one minibatch's update, returning its loss) over ``batches`` of ``(x, y)``, each moved to
    ``device``; the summed minibatch loss, read back once at the end. Each loss is added before the next step (a
    replayed CUDA graph's loss is overwritten by the next replay); an empty (Poisson) minibatch's NaN mean loss is
    left out: it contributes noise only."""
    total = torch.zeros((), device=device)
    for idx in batches:
        loss = step(x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True))
        if len(idx):
            total += loss
    return float(total)


def minibatches(num_samples: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` minibatch index tensors, walking through fresh permutations epoch after epoch."""
    out: list[torch.Tensor] = []
    while len(out) < steps:
        order = torch.randperm(num_samples, generator=generator)
        out.extend(order[i : i + batch_size] for i in range(0, num_samples, batch_size))
    return out[:steps]
