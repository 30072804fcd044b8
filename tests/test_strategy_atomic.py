"""An event is all-or-nothing: when the scheduler, the aggregator or the planner raises, the strategy (version, global
weights, counters, outstanding tasks, clients), its scheduler and its aggregator are exactly as before the event,
and the run goes on as if the failed attempt had never happened.

Every strategy family runs a small fleet of clients of different speeds through its events (clients asking for
work, results, deadlines). Before each event one component is made to fail; the event must raise and leave
``state_dict()`` bit-identical; the same event is then delivered again without the failure. At the end the run must
equal, bit for bit, the same run without any failure.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch

from fedhet.strategies import Aggregator, Planner, Strategy, UpdateBuffer, build_strategy
from fedhet.strategies.base import Plan
from fedhet.types import ClientInfo, ClientProfile, Result, Task, Weights

# two shared layers and a head: what FedP3 needs; ProWD quantizes the weights per output channel
INITIAL = {
    "0.weight": torch.linspace(-1.0, 1.0, 12).reshape(4, 3),
    "0.bias": torch.linspace(-0.5, 0.5, 4),
    "1.weight": torch.linspace(-0.7, 0.9, 12).reshape(3, 4),
    "1.bias": torch.linspace(0.1, 0.3, 3),
    "2.weight": torch.linspace(-0.2, 0.4, 6).reshape(2, 3),
    "2.bias": torch.zeros(2),
}
FEDAVG = {
    "name": "fedavg",
    "fraction": 1.0,
    "min_clients": 2,
    "round_timeout": 30.0,
    "local_steps": 2,
    "local_epochs": 0,
}
STALENESS = {"name": "staleness_weighted", "alpha": 0.6, "gradient_based": True}
PROWD = {
    "name": "prowd",
    "chain": [4, 8, 16, 32],
    "distill_weight": 0.0,
    "dequantizer_steps": 2,
    "mask_steps": 2,
}
FAMILIES: dict[str, dict[str, Any]] = {
    "fedavg": {"scheduler": FEDAVG, "planner": {"name": "identity"}, "aggregator": {"name": "weighted_mean"}},
    "fedbuff": {
        "scheduler": {"name": "fedbuff", "buffer_size": 2, "local_steps": 2},
        "planner": {"name": "identity"},
        "aggregator": STALENESS,
    },
    "fedasync": {
        "scheduler": {"name": "fedasync", "local_steps": 2, "weighting": "uniform"},
        "planner": {"name": "identity"},
        "aggregator": STALENESS,
    },
    "fedcompass": {
        "scheduler": {"name": "fedcompass", "q_min": 2, "q_max": 6},
        "planner": {"name": "identity"},
        "aggregator": STALENESS,
    },
    "fedadam": {"scheduler": FEDAVG, "planner": {"name": "identity"}, "aggregator": {"name": "fedadam"}},
    "krum": {"scheduler": FEDAVG, "planner": {"name": "identity"}, "aggregator": {"name": "krum", "keep": 2}},
    "prowd": {"scheduler": FEDAVG, "planner": {"name": "bitwidth"}, "aggregator": PROWD},
    "compass_prowd": {
        "scheduler": {"name": "fedcompass", "q_min": 2, "q_max": 6},
        "planner": {"name": "bitwidth"},
        "aggregator": {**PROWD, "per_upload": False},
    },
    "fedp3": {
        "scheduler": {**FEDAVG, "weighting": "layers"},
        "planner": {"name": "fedp3", "variant": "lowerb"},
        "aggregator": {"name": "weighted_mean"},
    },
}
SPEEDS = [1.0, 1.5, 2.5, 4.0, 20.0]  # seconds per local step; the last is a straggler of a FedAvg round
BITWIDTHS = [32, 32, 8, 4, 16]
VERSIONS = 6
MODES = ("none", "scheduler", "aggregator", "planner")


class Breaks:
    """The failure armed for the next event: ``mode`` names the component that raises."""

    def __init__(self) -> None:
        self.mode = "none"
        self.raised: dict[str, int] = dict.fromkeys(MODES, 0)

    def check(self, component: str) -> None:
        if self.mode == component:
            self.raised[component] += 1
            raise RuntimeError(f"{component} made to fail")


def break_aggregator(aggregator: Aggregator, breaks: Breaks) -> None:
    """Make a real aggregator raise, before it aggregates, while its failure is armed: it becomes an instance of a
    subclass of its own class that checks first (the strategy keeps an aggregator's own attribute bindings, which a
    wrapper around it would hide)."""
    real = type(aggregator)

    class Breaking(real):  # type: ignore[valid-type,misc]
        def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
            breaks.check("aggregator")
            out: dict[str, torch.Tensor] = real.aggregate(self, global_weights, updates, version)
            return out

    aggregator.__class__ = Breaking


class BreakingPlanner:
    """A real planner that raises while its failure is armed: after an aggregation the event has already changed
    the scheduler and the aggregator (ProWD trained its dequantizer, the staleness aggregator kept start weights)."""

    def __init__(self, inner: Planner, breaks: Breaks) -> None:
        self.inner = inner
        self.breaks = breaks

    def plan(self, client: ClientInfo, weights: Weights, version: int) -> Plan:
        self.breaks.check("planner")
        return self.inner.plan(client, weights, version)


class Unreadable(Mapping[str, torch.Tensor]):
    """A result's weights whose last tensor cannot be read the second time: the update buffer checks the shapes,
    then fails half-way through folding, after the scheduler has changed its own state for the event."""

    def __init__(self, weights: Mapping[str, torch.Tensor], breaks: Breaks) -> None:
        self.weights = dict(weights)
        self.breaks = breaks
        self.reads = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == list(self.weights)[-1]:
            self.reads += 1
            if self.reads > 1:
                self.breaks.check("scheduler")
        return self.weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


@dataclass(order=True)
class Event:
    time: float
    seq: int
    kind: str = field(compare=False)  # "available", "result" or "tick"
    payload: Any = field(compare=False, default=None)


def build(family: str, breaks: Breaks) -> Strategy:
    strategy = build_strategy(FAMILIES[family], seed=3)
    break_aggregator(strategy.aggregator, breaks)
    strategy.planner = BreakingPlanner(strategy.planner, breaks)
    return strategy


def clients(family: str) -> list[ClientInfo]:
    bits = BITWIDTHS if "prowd" in family else [32] * len(SPEEDS)
    return [
        ClientInfo(c, ClientProfile(s, 1e6, bitwidth=b), 10 + 5 * c)
        for c, (s, b) in enumerate(zip(SPEEDS, bits, strict=True))
    ]


def answer(task: Task) -> Result:
    """What a client sends back: the tensors it trains, moved by an amount of its own."""
    shift = 0.01 * (task.client_id + 1) * (task.task_id % 3 + 1)
    weights = {name: task.weights[name] + shift for name in task.trained}
    return Result(
        task.task_id, task.client_id, task.version, weights, 10 + 5 * task.client_id, task.local_steps, 0.0, 0.0
    )


def snapshot(strategy: Strategy) -> dict[str, Any]:
    """Everything an event may change, copied (tensors cloned), so that a later in-place change shows."""
    return copy.deepcopy(
        {
            "state": strategy.state_dict(),
            "deadline": strategy.next_deadline(),
            "folded": strategy.folded,
            "outstanding": strategy.outstanding,
        }
    )


def assert_identical(after: Any, before: Any, where: str = "") -> None:
    assert type(after) is type(before), where
    if isinstance(before, torch.Tensor):
        assert after.dtype == before.dtype and after.shape == before.shape, where
        assert torch.equal(after, before), where
    elif isinstance(before, Mapping):
        assert list(after) == list(before) or set(after) == set(before), where
        for key in before:
            assert_identical(after[key], before[key], f"{where}.{key}")
    elif isinstance(before, (list, tuple)):
        assert len(after) == len(before), where
        for i, (a, b) in enumerate(zip(after, before, strict=True)):
            assert_identical(a, b, f"{where}[{i}]")
    else:
        assert after == before, where


def broken_event(strategy: Strategy, breaks: Breaks, mode: str, event: Event, call: Any, args: list[Any]) -> Any:
    """Deliver ``event`` with the ``mode`` component failing: when it reaches that component, the event must raise
    and leave the strategy as it was (returns None: deliver it again); else the event is done (returns its tasks)."""
    before = snapshot(strategy)
    if mode == "scheduler" and event.kind == "result":
        args = [replace(args[0], weights=Unreadable(args[0].weights, breaks))]
    raised = breaks.raised[mode]
    breaks.mode = mode
    try:
        tasks = call(*args, event.time)
    except RuntimeError as error:
        assert str(error) == f"{mode} made to fail"
        assert_identical(snapshot(strategy), before, f"after the {event.kind} at {event.time}")
        return None
    finally:
        breaks.mode = "none"
    assert breaks.raised[mode] == raised
    return tasks


def run(family: str, mode: str) -> tuple[Strategy, Breaks]:
    """Run ``family`` to :data:`VERSIONS` versions; with a ``mode`` other than none, every event is first delivered
    with that component failing (it must raise and change nothing), then delivered again."""
    breaks = Breaks()
    torch.manual_seed(0)  # ProWD's dequantizer starts from random hidden layers
    strategy = build(family, breaks)
    strategy.start(INITIAL, 0.0)
    queue = [Event(0.0, c.client_id, "available", c) for c in clients(family)]
    seq = len(queue)
    ticks: set[float] = set()
    while queue and strategy.version < VERSIONS:
        event = heapq.heappop(queue)
        if event.kind == "result":
            delivered: Any = (strategy.on_result, event.payload)
        elif event.kind == "available":
            delivered = (strategy.on_available, event.payload)
        else:
            ticks.discard(event.time)
            delivered = (strategy.on_tick,)
        call, *args = delivered
        tasks = None
        if mode != "none":
            tasks = broken_event(strategy, breaks, mode, event, call, args)
        if tasks is None:
            tasks = call(*args, event.time)
        for task in tasks:
            steps = task.local_steps or 1
            at = event.time + steps * SPEEDS[task.client_id]
            heapq.heappush(queue, Event(at, seq, "result", answer(task)))
            seq += 1
        deadline = strategy.next_deadline()
        if deadline is not None and deadline not in ticks:
            ticks.add(deadline)
            heapq.heappush(queue, Event(max(deadline, event.time), seq, "tick"))
            seq += 1
    return strategy, breaks


@pytest.mark.parametrize("mode", MODES[1:])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_failing_component_leaves_the_strategy_as_it_was_and_the_run_goes_on(family: str, mode: str) -> None:
    reference, _ = run(family, "none")
    strategy, breaks = run(family, mode)
    assert reference.version == VERSIONS
    assert breaks.raised[mode] > 0, f"no event reached the {mode}"
    assert_identical(snapshot(strategy), snapshot(reference), family)
    for name, value in reference.global_weights.items():
        assert torch.equal(strategy.global_weights[name], value)
