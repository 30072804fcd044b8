"""Server algorithms: schedulers, planners and aggregators, found by name through registries."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from fedhet.errors import ConfigError
from fedhet.registry import Registry
from fedhet.strategies.aggregators import WeightedMean
from fedhet.strategies.base import Aggregator, Assignment, Decision, Plan, Planner, Scheduler, ServerTrained, Strategy
from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.errors import StateError, UnknownTaskError
from fedhet.strategies.fedasync import FedAsyncScheduler
from fedhet.strategies.fedavg import SyncScheduler
from fedhet.strategies.fedbuff import FedBuffScheduler
from fedhet.strategies.fedcompass import FedCompassScheduler
from fedhet.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from fedhet.strategies.fedp3 import FedP3Planner
from fedhet.strategies.planners import IdentityPlanner
from fedhet.strategies.prowd import BitwidthPlanner, GroupedMean, ProWD
from fedhet.strategies.robust import CoordinateMedian, Krum, TrimmedMean
from fedhet.strategies.staleness import StalenessWeighted

__all__ = [
    "AGGREGATORS",
    "PLANNERS",
    "SCHEDULERS",
    "Aggregator",
    "Assignment",
    "BitwidthPlanner",
    "Decision",
    "FedP3Planner",
    "GroupedMean",
    "Plan",
    "Planner",
    "ProWD",
    "Scheduler",
    "ServerTrained",
    "StateError",
    "Strategy",
    "UnknownTaskError",
    "UpdateBuffer",
    "build_strategy",
]

SCHEDULERS: Registry[Callable[..., Scheduler]] = Registry("scheduler")
PLANNERS: Registry[Callable[..., Planner]] = Registry("planner")
AGGREGATORS: Registry[Callable[..., Aggregator]] = Registry("aggregator")

SCHEDULERS.register("fedavg")(SyncScheduler)
SCHEDULERS.register("fedcompass")(FedCompassScheduler)
SCHEDULERS.register("fedasync")(FedAsyncScheduler)
SCHEDULERS.register("fedbuff")(FedBuffScheduler)
PLANNERS.register("identity")(IdentityPlanner)
PLANNERS.register("bitwidth")(BitwidthPlanner)
PLANNERS.register("fedp3")(FedP3Planner)
AGGREGATORS.register("prowd")(ProWD)
AGGREGATORS.register("grouped_mean")(GroupedMean)
AGGREGATORS.register("weighted_mean")(WeightedMean)
AGGREGATORS.register("staleness_weighted")(StalenessWeighted)
AGGREGATORS.register("fedadagrad")(FedAdagrad)
AGGREGATORS.register("fedadam")(FedAdam)
AGGREGATORS.register("fedyogi")(FedYogi)
AGGREGATORS.register("median")(CoordinateMedian)
AGGREGATORS.register("trimmed_mean")(TrimmedMean)
AGGREGATORS.register("krum")(Krum)


def _build(role: str, registry: Registry[Callable[..., Any]], spec: Mapping[str, Any], seed: int) -> Any:
    """Construct the component ``spec['name']`` with the other keys of ``spec`` as its arguments.

    An unknown name or argument, or a value the component refuses, becomes a :class:`ConfigError` naming the key.
    """
    params = dict(spec)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"strategy.{role}.name is missing; choose one of: {', '.join(registry.names())}")
    if name not in registry:
        raise ConfigError(
            f"strategy.{role}.name: unknown {role} {name!r}; choose one of: {', '.join(registry.names())}"
        )
    factory = registry.get(name)
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"strategy.{role}.{unknown[0]} is not a parameter of {role} {name!r}; "
            f"its parameters are: {', '.join(p for p in accepted if p != 'seed')}"
        )
    if "seed" in accepted:
        params.setdefault("seed", seed)
    try:
        return factory(**params)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"strategy.{role} ({name}): {error}") from None


def build_strategy(spec: Mapping[str, Any], seed: int) -> Strategy:
    """A :class:`Strategy` from a config mapping with ``scheduler``, ``planner`` and ``aggregator`` entries,
    each ``{name: <registered name>, <argument>: <value> ...}``.

    An aggregator that looks at every update apart (``needs_updates``: median, trimmed mean, Krum) gets a scheduler
    that keeps them (``keep_updates``); a scheduler that cannot is a :class:`ConfigError`."""
    aggregator = _build("aggregator", AGGREGATORS, spec["aggregator"], seed)
    scheduler_spec = dict(spec["scheduler"])
    if getattr(aggregator, "needs_updates", False):
        name = scheduler_spec.get("name")
        factory = SCHEDULERS.get(name) if isinstance(name, str) and name in SCHEDULERS else None
        if factory is not None and "keep_updates" not in inspect.signature(factory).parameters:
            fold = " or strategy.aggregator.per_upload=false" if hasattr(aggregator, "per_upload") else ""
            raise ConfigError(
                f"strategy.aggregator.name: {spec['aggregator']['name']} looks at every update of a round apart, "
                f"which scheduler {name!r} does not keep; use strategy.scheduler.name=fedavg{fold}"
            )
        scheduler_spec["keep_updates"] = True
    return Strategy(
        scheduler=_build("scheduler", SCHEDULERS, scheduler_spec, seed),
        planner=_build("planner", PLANNERS, spec["planner"], seed),
        aggregator=aggregator,
    )
