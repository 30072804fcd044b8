"""What the Flower driver is told (:class:`DriverSettings`) and what it reports (:class:`RunSummary`, with its trace
of aggregations and assignments)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fedhet import codec
from fedhet.runtime.driver import EvalCadence, StopRules
from fedhet.types import ClientInfo
from fedhet.updates import NormBound

__all__ = ["Aggregation", "Assigned", "DriverSettings", "RunSummary"]


@dataclass(frozen=True)
class DriverSettings:
    """Stopping, evaluation and messaging of a :class:`GridDriver`.

    Attributes:
        max_versions: stop once the global model reaches this version.
        max_seconds: stop after this many seconds (0 = no limit).
        eval_every: evaluate every this many versions (and always the first and last).
        min_nodes: wait for at least this many nodes before the run starts.
        node_wait: seconds to wait for ``min_nodes`` nodes; fewer then is an error.
        discover_every: seconds between looks for nodes that joined later.
        task_ttl: seconds a task message (and its reply) stays valid at the SuperLink.
        poll_interval: seconds between pulls when nothing arrived.
        retry_after: seconds before a node whose message failed is asked again.
        encoding: how tasks for fp32 clients travel (``fp32``, ``fp16``, ``bf16``); a client of bitwidth b < 32
            gets ``int<b>``.
        state_dir: where the run's checkpoint goes after every new version and at the end ("" = none): the run
            core's state (strategy, last evaluation), the run time and the counters.
        resume: continue the run checkpointed in ``state_dir`` (a fresh run refuses a directory that holds one).
        norm_bound: largest L2 norm of an update (trained minus start weights) the run takes, as
            ``server.norm_bound``: 0 = the default, 100 x max(norm of the start weights, 1).
        norm_action: ``reject`` (refused, the node asked again) or ``clip`` (scaled onto the bound, counted in the
            summary's ``clipped``) an update over ``norm_bound``.
    """

    max_versions: int = 20
    max_seconds: float = 0.0
    eval_every: int = 1
    min_nodes: int = 2
    node_wait: float = 120.0
    discover_every: float = 2.0
    task_ttl: float = 3600.0
    poll_interval: float = 0.02
    retry_after: float = 1.0
    encoding: str = "fp32"
    state_dir: str = ""
    resume: bool = False
    norm_bound: float = 0.0
    norm_action: str = "reject"

    def __post_init__(self) -> None:
        if self.resume and not self.state_dir:
            raise ValueError("resume needs the state_dir the run was checkpointed in")
        _ = (self.stop, self.cadence, self.norm)  # the run core checks its stop rules, cadence and norm bound
        if self.min_nodes < 1:
            raise ValueError(f"min_nodes must be >= 1, got {self.min_nodes}")
        if not self.node_wait > 0 or not self.task_ttl > 0 or not self.poll_interval > 0:
            raise ValueError("node_wait, task_ttl and poll_interval must be > 0 seconds")
        if self.encoding not in codec.ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(codec.ENCODINGS)}, got {self.encoding!r}")

    @property
    def stop(self) -> StopRules:
        """The run core's stop rules of these settings."""
        return StopRules(self.max_versions, self.max_seconds)

    @property
    def cadence(self) -> EvalCadence:
        """The run core's evaluation cadence of these settings."""
        return EvalCadence(self.eval_every)

    @property
    def norm(self) -> NormBound:
        """The run's norm bound of these settings."""
        return NormBound(self.norm_bound, self.norm_action)


@dataclass(frozen=True)
class Aggregation:
    """One new global version: when (run seconds), how many updates it folded in, and the clients whose updates
    those were, in (start version, bitwidth) order (a FedCompass group with any late updates, a FedAvg round)."""

    version: int
    time: float
    updates: int
    clients: tuple[int, ...]


@dataclass(frozen=True)
class Assigned:
    """A task handed out: when (run seconds), to whom, and how much local work."""

    time: float
    client_id: int
    task_id: int
    version: int
    local_steps: int
    local_epochs: int


@dataclass
class RunSummary:
    """How a run went: why it stopped, its final version and accuracy, and its trace (``epsilon``: per DP client,
    the epsilon each of its accepted results reported, in order; ``uploads``: per client, the payload bytes of each
    result it sent). ``refused`` counts the results not applied (invalid, over the norm bound when rejecting, or
    failed by the strategy), ``clipped`` those clipped onto the norm bound."""

    reason: str = ""
    version: int = 0
    seconds: float = 0.0
    accuracy: float | None = None
    results: int = 0
    refused: int = 0
    failed: int = 0
    clipped: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    clients: dict[int, ClientInfo] = field(default_factory=dict)
    aggregations: list[Aggregation] = field(default_factory=list)
    assignments: list[Assigned] = field(default_factory=list)
    epsilon: dict[int, list[float]] = field(default_factory=dict)
    uploads: dict[int, list[int]] = field(default_factory=dict)

    #: the counters a checkpoint keeps (the trace lists start anew in a resumed run)
    COUNTERS: ClassVar[tuple[str, ...]] = ("results", "refused", "failed", "clipped", "bytes_up", "bytes_down")
