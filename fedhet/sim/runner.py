"""Build a simulation from a :class:`RunConfig` and run it: data, partition, fleet, model, strategy, executor."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from fedhet.clients.quantized import QuantizedTrainer
from fedhet.clients.trainer import (
    ClientState,
    ClientStates,
    LocalTrainer,
    PrivacyConfig,
    TrainConfig,
    check_max_layer_params,
)
from fedhet.codec import ENCODINGS
from fedhet.config import RunConfig, plain
from fedhet.errors import ConfigError
from fedhet.metrics import MetricsRecord, MetricsWriter
from fedhet.quant import FULL_PRECISION
from fedhet.runtime import EvalCadence, StopRules, assemble, check_spec, describe, run_spec
from fedhet.runtime.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fedhet.sim.executor import Executor, SequentialExecutor
from fedhet.sim.fleet import sample_profiles
from fedhet.sim.personal import PersonalEvaluator
from fedhet.sim.simulator import RunSummary, SimConfig, Simulator
from fedhet.sim.vectorized import PRECISIONS, VectorizedExecutor
from fedhet.threads import use_threads
from fedhet.tracking import check_tracking, flat_config, open_sinks
from fedhet.types import ClientInfo, Weights
from fedhet.updates import NormBound

__all__ = ["EXECUTORS", "make_executor", "simulate", "validate"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"  # the final global model, in the run directory

EXECUTORS = ("sequential", "vectorized", "ray")


def validate(cfg: RunConfig) -> None:
    """Every check that needs no data; raises :class:`ConfigError` naming the key."""
    try:
        TrainConfig(**asdict(cfg.client))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    cfg.fleet.validate()
    check_tracking(cfg.tracking)
    part = cfg.dataset.partition
    if not 0.0 <= part.test_fraction < 1.0:
        raise ConfigError(f"dataset.partition.test_fraction must be in [0, 1), got {part.test_fraction}")
    if cfg.sim.max_versions < 1:
        raise ConfigError(f"sim.max_versions must be >= 1, got {cfg.sim.max_versions}")
    if cfg.sim.eval_every < 1:
        raise ConfigError(f"sim.eval_every must be >= 1, got {cfg.sim.eval_every}")
    if cfg.sim.eval_interval < 0:
        raise ConfigError(f"sim.eval_interval must be >= 0 seconds, got {cfg.sim.eval_interval}")
    if cfg.sim.max_virtual_seconds < 0:
        raise ConfigError(f"sim.max_virtual_seconds must be >= 0 (0 = no limit), got {cfg.sim.max_virtual_seconds}")
    if cfg.sim.device not in ("cpu", "cuda") and not cfg.sim.device.startswith("cuda:"):
        raise ConfigError(f"sim.device must be cpu, cuda or cuda:N, got {cfg.sim.device!r}")
    if cfg.sim.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"sim.device is {cfg.sim.device} but torch sees no CUDA device; use sim.device=cpu")
    if cfg.sim.encoding not in ENCODINGS:
        raise ConfigError(f"sim.encoding must be one of {', '.join(ENCODINGS)}, got {cfg.sim.encoding!r}")
    if cfg.sim.executor not in EXECUTORS:
        raise ConfigError(f"sim.executor must be one of {', '.join(EXECUTORS)}, got {cfg.sim.executor!r}")
    if cfg.sim.precision not in PRECISIONS:
        raise ConfigError(f"sim.precision must be one of {', '.join(PRECISIONS)}, got {cfg.sim.precision!r}")
    if cfg.sim.precision != "fp32" and cfg.sim.executor == "sequential":
        raise ConfigError(f"sim.precision={cfg.sim.precision} needs sim.executor=vectorized (or ray)")
    if cfg.sim.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("sim.executor=ray needs Ray: pip install 'fedhet[ray]' (or choose another sim.executor)")
    if cfg.sim.executor == "ray" and (cfg.privacy.enabled or cfg.strategy.planner.get("name") == "fedp3"):
        raise ConfigError("sim.executor=ray keeps no per-client state: FedP3 and DP runs need sequential or vectorized")
    if cfg.sim.checkpoint_every < 0:
        raise ConfigError(
            f"sim.checkpoint_every must be >= 0 versions (0 = at the end only), got {cfg.sim.checkpoint_every}"
        )
    if cfg.sim.resume and not _checkpoint_file(cfg.sim.resume).is_file():
        raise ConfigError(f"sim.resume: no checkpoint at {_checkpoint_file(cfg.sim.resume)}")
    try:
        NormBound(cfg.sim.norm_bound, cfg.sim.norm_action)
    except ValueError as error:
        raise ConfigError(f"sim.{error}") from None
    if cfg.sim.finetune_epochs < 0:
        raise ConfigError(f"sim.finetune_epochs must be >= 0, got {cfg.sim.finetune_epochs}")
    if cfg.sim.personal_eval and part.test_fraction == 0:
        raise ConfigError("sim.personal_eval needs held-out client data: set dataset.partition.test_fraction > 0")
    privacy_config(cfg)
    _check_combinations(cfg)
    check_spec(
        run_spec(cfg, cfg.privacy.enabled)
    )  # names, strategy keys and values, what the strategy needs of the data


def _check_combinations(cfg: RunConfig) -> None:
    """Combinations that would fail (or silently mislead) mid-run are refused before any work."""
    planner, scheduler = cfg.strategy.planner, cfg.strategy.scheduler
    aggregator = cfg.strategy.aggregator.get("name")
    low_bit = [b for b in (cfg.fleet.bitwidths or [cfg.fleet.bitwidth]) if b < FULL_PRECISION]
    if cfg.privacy.enabled and low_bit:
        raise ConfigError(
            f"privacy.enabled: clients at {sorted(set(low_bit))} bits train quantization-aware without DP-SGD; "
            "use a fleet of 32-bit clients with privacy"
        )
    # under FedBuff a fast client gets several tasks per version before a flush: max_versions does not bound them
    target = cfg.privacy.enabled and cfg.privacy.target_epsilon > 0
    if target and not cfg.privacy.planned_tasks and scheduler.get("name") == "fedbuff":
        raise ConfigError("privacy.target_epsilon with the fedbuff scheduler needs privacy.planned_tasks")
    if planner.get("name") == "fedp3":
        if aggregator in ("prowd", "grouped_mean"):
            raise ConfigError(
                f"strategy.planner=fedp3 sends partial updates, which aggregator {aggregator} cannot fold"
            )
        if cfg.sim.personal_eval and int(planner.get("head_layers", 1)) != 1:
            raise ConfigError("sim.personal_eval fine-tunes one head layer: use strategy.planner.head_layers=1")


def privacy_config(cfg: RunConfig) -> PrivacyConfig | None:
    """The DP-SGD settings of ``cfg`` (None when ``privacy.enabled`` is false); a bad value is a ConfigError."""
    p = cfg.privacy
    if not p.enabled:
        return None
    try:
        return PrivacyConfig(
            max_grad_norm=p.max_grad_norm,
            noise_multiplier=p.noise_multiplier,
            target_epsilon=p.target_epsilon,
            delta=p.delta,
            planned_tasks=p.planned_tasks or cfg.sim.max_versions,
            max_layer_params=p.max_layer_params,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


def make_executor(
    cfg: RunConfig,
    trainer: LocalTrainer,
    x: torch.Tensor,
    y: torch.Tensor,
    shards: Mapping[int, np.ndarray],
    clients: Sequence[ClientInfo],
    states: ClientStates | None = None,
) -> Executor:
    """The executor ``cfg.sim.executor`` names, computing tasks with ``trainer`` on ``(x, y)`` split by ``shards``;
    clients below 32 bits train quantization-aware at their bitwidth; ``states`` keeps what clients keep between
    tasks (FedP3 heads, DP accountants)."""
    bitwidths = {c.client_id: c.profile.bitwidth for c in clients}
    quantized = None
    if any(b < FULL_PRECISION for b in bitwidths.values()):
        if cfg.sim.executor == "ray":
            raise ConfigError("sim.executor=ray does not train low-bitwidth clients; use sequential or vectorized")
        quantized = QuantizedTrainer(trainer.model, trainer.config, trainer.device)
    if cfg.sim.executor == "vectorized":
        return VectorizedExecutor(
            trainer,
            x,
            y,
            shards,
            cfg.seed,
            precision=cfg.sim.precision,
            quantized=quantized,
            bitwidths=bitwidths,
            states=states,
        )
    if cfg.sim.executor == "ray":
        from fedhet.sim.ray_executor import RayExecutor

        return RayExecutor(trainer, x, y, shards, cfg.seed, address=cfg.sim.ray_address, precision=cfg.sim.precision)
    return SequentialExecutor(trainer, x, y, shards, cfg.seed, quantized=quantized, bitwidths=bitwidths, states=states)


def simulate(cfg: RunConfig, run_dir: Path) -> RunSummary:
    """Run the simulation ``cfg`` describes, writing ``metrics.jsonl`` into ``run_dir``."""
    validate(cfg)
    use_threads(cfg.sim.threads, "sim.threads")
    parts = assemble(run_spec(cfg, cfg.privacy.enabled), cfg.sim.device)
    data, splits, strategy = parts.data, parts.splits, parts.strategy
    profiles = sample_profiles(cfg.fleet, cfg.num_clients, cfg.seed)
    clients = [ClientInfo(i, p, len(train)) for i, (p, (train, _)) in enumerate(zip(profiles, splits, strict=True))]

    model = parts.new_model()
    device = parts.device
    privacy = privacy_config(cfg)
    if privacy is not None:
        try:
            check_max_layer_params(model, privacy.max_layer_params, cfg.strategy.planner.get("name") == "fedp3")
        except ValueError as error:
            raise ConfigError(str(error)) from None
    states = ClientStates(model.state_dict())  # FedP3's heads start from the initial model's
    trainer = LocalTrainer(model, TrainConfig(**asdict(cfg.client)), device, privacy)
    executor = make_executor(
        cfg,
        trainer,
        data.x_train.to(device),
        data.y_train.to(device),
        {c.client_id: s[0] for c, s in zip(clients, splits, strict=True)},
        clients,
        states,
    )

    personal = None
    if cfg.sim.personal_eval:
        try:
            personal = PersonalEvaluator(
                parts.new_model().to(device),
                data.x_train.to(device),
                data.y_train.to(device),
                dict(enumerate(splits)),
                states,
                epochs=cfg.sim.finetune_epochs,
                lr=cfg.client.lr,
                batch_size=cfg.client.batch_size,
                seed=cfg.seed,
            )
        except ValueError as error:
            raise ConfigError(f"sim.personal_eval: {error}") from None

    def extra_metrics(weights: Weights) -> dict[str, Any]:
        out: dict[str, Any] = dict(personal(weights)) if personal is not None else {}
        if privacy is not None:
            out["epsilon"] = {str(c): s.epsilon(privacy.delta) for c, s in sorted(states.states.items())}
        return out

    log.info(
        "%s: %d clients (%s partition), %s model (%d parameters), %s strategy, %s fleet, run dir %s",
        data.name,
        cfg.num_clients,
        cfg.dataset.partition.name,
        cfg.model.label,
        sum(p.numel() for p in model.parameters()),
        cfg.strategy.name,
        cfg.fleet.speed,
        run_dir,
    )
    sim_config = SimConfig(
        stop=StopRules(cfg.sim.max_versions, cfg.sim.max_virtual_seconds),
        cadence=EvalCadence(cfg.sim.eval_every, cfg.sim.eval_interval),
        batch_size=cfg.client.batch_size,
        encoding=cfg.sim.encoding,
        checkpoint_every=cfg.sim.checkpoint_every,
        norm=NormBound(cfg.sim.norm_bound, cfg.sim.norm_action),
    )
    resume = _resume(cfg, run_dir, states) if cfg.sim.resume else None

    def checkpoint(state: Mapping[str, Any]) -> None:
        saved = {str(c): torch.frombuffer(bytearray(s.to_bytes()), dtype=torch.uint8) for c, s in states.states.items()}
        save_checkpoint(run_dir / CHECKPOINT, {"run": _fingerprint(cfg), "sim": dict(state), "clients": saved})

    limits = (cfg.sim.max_versions, cfg.sim.max_virtual_seconds)
    bar = tqdm(total=100, desc="fedhet", unit="%", disable=not cfg.sim.progress)  # toward the first stop rule

    def progress(record: MetricsRecord) -> None:
        bar.update(progress_position(record, *limits) - bar.n)
        bar.set_postfix(v=record.version, t=f"{record.virtual_time:.0f}s", acc=f"{record.accuracy:.4f}")
        log.debug("%s", describe(record))

    sinks = open_sinks(cfg.tracking, run_dir, run_dir.name, flat_config(cfg))
    with MetricsWriter(run_dir / "metrics.jsonl", sinks) as metrics:
        simulator = Simulator(
            strategy,
            clients,
            executor,
            parts.evaluator,
            metrics,
            sim_config,
            cfg.seed,
            progress,
            extra_metrics,
            checkpoint,
        )
        try:
            summary = simulator.run(parts.initial, resume)
        finally:
            close = getattr(executor, "close", None)  # the Ray executor stops its workers
            if close is not None:
                close()
    bar.close()
    save_file({k: v.detach().contiguous().cpu() for k, v in strategy.global_weights.items()}, run_dir / MODEL_FILE)
    final = summary.final
    log.info(
        "stopped (%s) at version %d, virtual time %.1f s, wall %.1f s: accuracy %.4f, %d updates applied, "
        "%d dropped, %d clipped onto the norm bound, %.1f MB up, %.1f MB down",
        summary.reason,
        final.version,
        final.virtual_time,
        final.wall_time,
        final.accuracy,
        final.updates_applied,
        final.updates_dropped,
        summary.clipped,
        final.bytes_up / 1e6,
        final.bytes_down / 1e6,
    )
    return summary


def progress_position(record: MetricsRecord, max_versions: int, max_virtual_seconds: float) -> float:
    """How far (percent) the run is toward its end: the further of its versions toward ``max_versions`` and its
    virtual time toward ``max_virtual_seconds`` (0: no limit), so the bar's ETA is right whichever rule stops it."""
    done = record.version / max_versions
    if max_virtual_seconds > 0:
        done = max(done, record.virtual_time / max_virtual_seconds)
    return round(min(1.0, done) * 100, 2)


#: keys a resumed run may change: when it stops, how often it evaluates and checkpoints, how it runs
_RESUMABLE = (
    "max_versions",
    "max_virtual_seconds",
    "eval_every",
    "eval_interval",
    "progress",
    "threads",
    "checkpoint_every",
    "resume",
    "device",
)


#: the norm bound's keys at their defaults, under which a run behaves as runs checkpointed before they existed
_NORM_DEFAULTS = {"norm_bound": 0.0, "norm_action": "reject"}


def _fingerprint(cfg: RunConfig) -> str:
    """What a checkpoint's run must share with the run that resumes it, as JSON."""
    config = plain(cfg)
    config["sim"] = {k: v for k, v in config["sim"].items() if k not in _RESUMABLE}
    for key, default in _NORM_DEFAULTS.items():  # at its default, as a checkpoint written before the key had it
        if config["sim"].get(key) == default:
            del config["sim"][key]
    return json.dumps(config, sort_keys=True)


def _checkpoint_file(path: str) -> Path:
    return Path(path) / CHECKPOINT if Path(path).is_dir() else Path(path)


def _resume(cfg: RunConfig, run_dir: Path, states: ClientStates) -> Mapping[str, Any]:
    """The simulator's state in ``sim.resume``'s checkpoint; the clients' kept state goes into ``states`` and the
    earlier run's metrics lines before the checkpoint into ``run_dir``'s (the resumed run goes on from there)."""
    path = _checkpoint_file(cfg.sim.resume)
    saved = load_checkpoint(path)
    if saved is None:
        raise ConfigError(f"sim.resume: no checkpoint at {path}")
    if saved.get("run") != _fingerprint(cfg):
        earlier, now = json.loads(saved.get("run", "{}")), json.loads(_fingerprint(cfg))
        differ = sorted(k for k in set(earlier) | set(now) if earlier.get(k) != now.get(k))
        raise ConfigError(f"sim.resume: {path} was written by a run whose {', '.join(differ)} differ from this one's")
    try:
        states.states = {int(c): ClientState.from_bytes(bytes(t.numpy())) for c, t in saved["clients"].items()}
    except (KeyError, ValueError) as error:
        raise ConfigError(f"sim.resume: {path} holds unreadable client states: {error}") from None
    version = int(saved["sim"]["driver"]["strategy"]["version"])
    earlier = path.parent / "metrics.jsonl"
    if earlier.is_file() and earlier.resolve() != (run_dir / "metrics.jsonl").resolve():
        run_dir.mkdir(parents=True, exist_ok=True)
        with earlier.open() as lines, (run_dir / "metrics.jsonl").open("w") as out:
            out.writelines(line for line in lines if line.strip() and json.loads(line)["version"] < version)
    log.info("resuming %s at version %d", path, version)
    return dict(saved["sim"])
