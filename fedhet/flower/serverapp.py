"""A Flower ServerApp that drives any fedhet strategy through Flower's Grid, on the real clock.

Flower's own strategies run a fixed round loop (``configure_train`` -> ``send_and_receive`` -> ``aggregate_train``)
that cannot host an asynchronous or semi-asynchronous scheduler. :class:`GridDriver` instead feeds a fedhet
:class:`~fedhet.strategies.Strategy` the events of a live Flower run, exactly as ``fedhet server``'s coordinator
does over gRPC: a node that answers the profile query is a client that became available (``on_available``), each
train reply is a result (``on_result``), and a passed ``next_deadline()`` is a tick (``on_tick``). Messages go out
with ``Grid.push_messages`` the moment the strategy hands out a task, and replies are collected with
``Grid.pull_messages`` as they arrive, so FedCompass, FedAsync, FedBuff and FedAvg (with any planner and aggregator)
run unchanged on a SuperLink or in Flower's simulation engine. Evaluations go to the same ``metrics.jsonl`` as
``fedhet server`` writes (``virtual_time`` is the run's real clock, in seconds).

The driver is a loop in the ServerApp's thread; evaluation runs in a worker thread so it never delays a reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedhet import codec
from fedhet.config import DatasetConfig, ModelConfig
from fedhet.flower.records import (
    RecordError,
    array_record_nbytes,
    parse_epsilon,
    parse_personal_accuracy,
    parse_profile,
    parse_result,
    task_content,
)
from fedhet.flower.settings import Aggregation, Assigned, DriverSettings, RunSummary
from fedhet.metrics import MetricsRecord, MetricsWriter
from fedhet.runtime import (
    MAX_VERSIONS,
    Evaluate,
    Outcome,
    PersonalReports,
    Recorder,
    ResultFailed,
    RunDriver,
    RunSpec,
    assemble,
)
from fedhet.runtime.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint
from fedhet.strategies import Strategy, UnknownTaskError
from fedhet.tracking import TrackingConfig, flat_config, open_sinks
from fedhet.types import ClientInfo, Task, Weights
from fedhet.updates import NormBoundExceeded, UpdateError, check_update, meta_of

__all__ = ["GridDriver", "ServerAppSettings", "make_server_app", "run_on_grid"]

log = logging.getLogger("fedhet.flower")


@dataclass
class _Pending:
    kind: str  # "query" or "train"
    node: int
    client_id: int = -1  # -1: a node not numbered yet
    task: Task | None = None


class GridDriver:
    """Drives ``strategy`` over ``grid`` until ``settings.max_versions`` (or ``max_seconds``).

    Each Flower node is one fedhet client. Its client id is the partition id it reports (``partition-id`` of its
    node config) when no other node holds it, else the next number above every id in use.
    """

    def __init__(
        self,
        grid: Grid,
        strategy: Strategy,
        initial_weights: Weights,
        settings: DriverSettings,
        metrics: MetricsWriter | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        self.grid = grid
        self.strategy = strategy
        self.initial_weights = initial_weights
        self.settings = settings
        self.summary = RunSummary()
        self.personal = PersonalReports()  # the personalised accuracy each client last reported
        self.driver = RunDriver(strategy, settings.stop, settings.cadence, settings.norm)
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.client_of: dict[int, int] = {}  # node id -> client id
        self._pending: dict[str, _Pending] = {}
        self._retry: dict[int, float] = {}  # node id -> time (s) to ask again
        self._asked: set[int] = set()  # nodes asked for their profile
        self._task_client: dict[int, int] = {}  # task id -> client id
        self._version = 0
        self._applied = 0
        self._start = 0.0
        self._time_base = 0.0  # run seconds reached before a resume
        self._checkpoint_path = Path(settings.state_dir) / CHECKPOINT if settings.state_dir else None
        self.recorder = Recorder(evaluate, metrics, self._noted) if evaluate is not None else None

    def now(self) -> float:
        """Run seconds on the real clock (continuing the time reached before a resume)."""
        return self._time_base + time.monotonic() - self._start

    # ------------------------------------------------------------------ the loop
    def run(self) -> RunSummary:
        """Run to the end; returns the summary (also at :attr:`summary`)."""
        self._start = time.monotonic()
        self.strategy.start(self.initial_weights, 0.0)
        if not self._resume():
            self._queue_eval()
        try:
            if not self.summary.reason:
                self._wait_for_nodes()
            last_look = self.now()
            while not self.summary.reason:
                busy = self._pull()
                now = self.now()
                over = self.driver.time_up(now)
                if not self.summary.reason and over is not None:
                    self._end(over)
                if self.summary.reason:
                    break
                deadline = self.strategy.next_deadline()
                if deadline is not None and now >= deadline:
                    self._after(self.driver.tick(now), now)
                    busy = True
                for node, at in sorted(self._retry.items()):
                    if now >= at:
                        del self._retry[node]
                        self._query([node])
                if now - last_look >= self.settings.discover_every:
                    last_look = now
                    self._discover()
                if not busy:
                    time.sleep(self.settings.poll_interval)
            if self.driver.evaluation_pending():
                self._queue_eval()
            self._checkpoint()
        finally:
            if self.recorder is not None:
                self.recorder.close()
        self.summary.version = self.strategy.version
        self.summary.seconds = self.now()
        self.summary.clients = dict(self.strategy.clients)
        return self.summary

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        if self._checkpoint_path is None:
            return
        counters = {k: getattr(self.summary, k) for k in RunSummary.COUNTERS}
        state = {"driver": self.driver.state_dict(), "seconds": self.now()}
        save_checkpoint(self._checkpoint_path, {**state, "counters": counters})

    def _resume(self) -> bool:
        """Load the checkpoint when resuming; True when a run was resumed. Nodes are asked for their profiles
        again: a task a node held when the run stopped is lost, as when a client asks past its task."""
        if self._checkpoint_path is None:
            return False
        if not self.settings.resume:
            if self._checkpoint_path.exists():
                raise CheckpointError(
                    f"{self._checkpoint_path} holds a run: resume it (resume=True) or choose another state_dir"
                )
            return False
        state = load_checkpoint(self._checkpoint_path)
        if state is None:
            raise CheckpointError(f"nothing to resume: {self._checkpoint_path} does not exist")
        try:
            self.driver.load_state_dict(state["driver"])
            self._time_base = float(state["seconds"])
            counters = {"clipped": 0, **state["counters"]}  # checkpoints written before the norm bound lack it
            for key in RunSummary.COUNTERS:
                setattr(self.summary, key, int(counters[key]))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{self._checkpoint_path} does not fit this run: {error}") from None
        self._version, self._applied = self.strategy.version, self.strategy.updates_applied
        log.info("resumed at version %d, run time %.1f s", self.strategy.version, self._time_base)
        if self.strategy.version >= self.settings.max_versions:  # a resumed run goes on only below its limits
            self._end(MAX_VERSIONS)
        return True

    def _end(self, reason: str) -> None:
        self.summary.reason = reason
        log.info("run over (%s) at version %d after %.1f s", reason, self.strategy.version, self.now())

    def _wait_for_nodes(self) -> None:
        deadline = time.monotonic() + self.settings.node_wait
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.settings.min_nodes:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} Flower nodes joined within {self.settings.node_wait} s; "
                    f"the run needs min_nodes = {self.settings.min_nodes}"
                )
            time.sleep(self.settings.poll_interval)
        self._discover()

    def _discover(self) -> None:
        """Ask every node not seen before for its profile."""
        new = [n for n in sorted(self.grid.get_node_ids()) if n not in self._asked]
        self._asked.update(new)
        self._query(new)

    def _query(self, nodes: Iterable[int]) -> None:
        messages = [Message(RecordDict(), node, MessageType.QUERY, ttl=self.settings.task_ttl) for node in nodes]
        pending = [_Pending("query", n, self.client_of.get(n, -1)) for n in nodes]
        self._push(messages, pending)

    def _push(self, messages: list[Message], pending: list[_Pending]) -> None:
        if not messages:
            return
        ids = list(self.grid.push_messages(messages))
        if len(ids) != len(messages):
            raise RuntimeError(f"the grid accepted {len(ids)} of {len(messages)} messages")
        self._pending.update(zip(ids, pending, strict=True))

    def _pull(self) -> bool:
        """Handle every reply that arrived; True when there was one."""
        if not self._pending:
            return False
        replies = list(self.grid.pull_messages(list(self._pending)))
        for reply in replies:
            pending = self._pending.pop(reply.metadata.reply_to_message_id, None)
            if pending is None or self.summary.reason:
                continue
            now = self.now()
            if reply.has_error():
                self._failed(pending, f"error {reply.error.code}: {reply.error.reason}", now)
            elif pending.kind == "query":
                self._registered(pending, reply, now)
            else:
                self._result(pending, reply, now)
        return bool(replies)

    def _failed(self, pending: _Pending, why: str, now: float) -> None:
        self.summary.failed += 1
        what = "profile query" if pending.task is None else f"task {pending.task.task_id}"
        log.warning(
            "node %d: %s failed (%s); asking again in %.1f s", pending.node, what, why, self.settings.retry_after
        )
        self._retry[pending.node] = now + self.settings.retry_after

    def _registered(self, pending: _Pending, reply: Message, now: float) -> None:
        try:
            profile, samples, partition = parse_profile(reply.content)
        except RecordError as error:
            self._failed(pending, str(error), now)
            return
        cid = pending.client_id
        if cid < 0:
            taken = partition < 0 or partition in self.node_of
            cid = max(self.node_of, default=-1) + 1 if taken else partition
            self.node_of[cid] = pending.node
            self.client_of[pending.node] = cid
        info = ClientInfo(cid, profile, samples)
        known = self.strategy.clients.get(cid)
        if known is not None and known != info:  # the node restarted with another profile: keep the first
            info = known
        self._after(self.driver.available(info, now), now)

    def _result(self, pending: _Pending, reply: Message, now: float) -> None:
        task = pending.task
        assert task is not None
        try:
            result = parse_result(reply.content, pending.client_id)
            if result.task_id != task.task_id or result.version != task.version:
                raise RecordError(f"reply names task {result.task_id}@{result.version}")
            _check_update(result.weights, task)
            checked = self.driver.norm.check(result.weights, task.weights)
            epsilon = parse_epsilon(reply.content)
            personal = parse_personal_accuracy(reply.content)
        except (RecordError, NormBoundExceeded) as error:
            self.summary.refused += 1
            self._failed(pending, f"refused: {error}", now)
            return
        if checked.clipped:
            self.summary.clipped += 1
            log.info("client %d: update norm %.6g clipped onto the bound", pending.client_id, checked.norm)
            result = replace(result, weights=checked.weights)
        nbytes = array_record_nbytes(reply.content["arrays"])  # type: ignore[arg-type]
        self.summary.bytes_up += nbytes
        self.summary.uploads.setdefault(pending.client_id, []).append(nbytes)
        try:
            outcome = self.driver.result(result, now)
        except UnknownTaskError as error:  # lost meanwhile (the node was asked again): nothing is applied
            self.summary.refused += 1
            log.info("client %d: %s", pending.client_id, error)
            return
        except ResultFailed as error:  # the strategy failed on it and took it back: refused, the node asked again
            self.summary.refused += 1
            self._failed(pending, f"refused: {error}", now)
            return
        self.summary.results += 1
        if epsilon is not None:
            self.summary.epsilon.setdefault(pending.client_id, []).append(epsilon)
        if personal is not None:
            self.personal.report(pending.client_id, personal)
        self._after(outcome, now)

    def _after(self, outcome: Outcome, now: float) -> None:
        """Carry out ``outcome``: note a new version, evaluate and stop as the driver decided, send its tasks."""
        version = self.strategy.version
        if outcome.new_version:
            applied = self.strategy.updates_applied - self._applied
            self._version, self._applied = version, self.strategy.updates_applied
            clients = tuple(self._task_client.pop(t, -1) for t in self.strategy.folded)
            self.summary.aggregations.append(Aggregation(version, now, applied, clients))
            self._checkpoint()
        if outcome.evaluate:
            self._queue_eval()
        if outcome.stop is not None:
            self._end(outcome.stop)
        if self.summary.reason:
            return
        messages, pending = [], []
        for task in outcome.tasks:
            if task.client_id not in self.node_of:  # a resumed run's client whose node has not answered yet: the
                continue  # task is lost when the node registers again, as when a client asks past its task
            info = self.strategy.clients[task.client_id]
            encoding = codec.encoding_for_bitwidth(info.profile.bitwidth, self.settings.encoding)
            content = task_content(task, encoding)  # with its train and sparse names; pruned tensors sparse
            self.summary.bytes_down += array_record_nbytes(content["arrays"])  # type: ignore[arg-type]
            node = self.node_of[task.client_id]
            messages.append(
                Message(content, node, MessageType.TRAIN, ttl=self.settings.task_ttl, group_id=str(task.version))
            )
            pending.append(_Pending("train", node, task.client_id, task))
            self._task_client[task.task_id] = task.client_id
            self.summary.assignments.append(
                Assigned(now, task.client_id, task.task_id, task.version, task.local_steps, task.local_epochs)
            )
        self._push(messages, pending)

    # ------------------------------------------------------------------ metrics
    def _queue_eval(self) -> None:
        now = self.now()
        self.driver.mark_evaluated(now)
        if self.recorder is None:
            return
        point = self.driver.point(now, now, self.summary.bytes_up, self.summary.bytes_down)
        bitwidths = sorted({c.profile.bitwidth for c in self.strategy.clients.values()})
        personal = self.personal.mean()
        extras = {} if personal is None else {"personal_accuracy": personal}
        self.recorder.submit(point, self.strategy.global_weights, bitwidths, lambda: extras)

    def _noted(self, record: MetricsRecord) -> None:
        self.summary.accuracy = record.accuracy


def _check_update(weights: Weights, task: Task) -> None:
    """The update carries tensors the task trains, with the task's shapes and dtypes and finite values (before any
    arithmetic). A task with ``train`` names (FedP3) takes any nonempty subset of them (the aggregator averages each
    tensor over the updates that carry it); a whole-model task takes every tensor, in order, as aggregators that
    are not per-tensor expect."""
    reference = task.weights
    if task.train:
        extra = sorted(set(weights) - task.train)
        if extra or not weights:
            raise RecordError(
                f"update tensors must be a nonempty subset of the task's trained ones; unexpected {extra}"
            )
    elif list(weights) != list(reference):
        missing, extra = sorted(set(reference) - set(weights)), sorted(set(weights) - set(reference))
        raise RecordError(f"update tensors differ from the task's: missing {missing}, unexpected {extra}")
    try:  # names, shapes, dtypes and finite values: the gRPC server's check, against the tensors sent back
        check_update(weights, meta_of({name: reference[name] for name in weights}))
    except UpdateError as error:
        raise RecordError(str(error)) from None


@dataclass(frozen=True)
class ServerAppSettings:
    """A fedhet run as a Flower ServerApp: what ``fedhet server`` configures, minus the network.

    Attributes:
        strategy: ``{scheduler: {name: ...}, planner: {...}, aggregator: {...}}`` (a ``configs/strategy`` file).
        dataset, model, num_clients, seed: as for ``fedhet simulate`` / ``fedhet server``; the server evaluates
            the global model on the dataset's test set.
        driver: stopping, evaluation, messaging.
        metrics_path: where ``metrics.jsonl`` goes ("" = no file).
        tracking: TensorBoard / MLflow for the metrics too, as ``tracking.*`` of ``fedhet simulate`` and ``fedhet
            server`` (TensorBoard files beside ``metrics_path``, which it needs).
        dp_compatible: the model's layers DP-SGD cannot train are replaced (``model.dp_compatible``); set it as the
            ClientApps do.
    """

    strategy: Mapping[str, Any]
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: str | ModelConfig = "cnn"
    num_clients: int = 10
    seed: int = 0
    driver: DriverSettings = field(default_factory=DriverSettings)
    metrics_path: str = ""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    dp_compatible: bool = False

    def __post_init__(self) -> None:
        if (self.tracking.tensorboard or self.tracking.mlflow) and not self.metrics_path:
            raise ValueError("tracking needs metrics_path (the run's directory is where metrics.jsonl goes)")


def make_server_app(settings: ServerAppSettings, on_end: Callable[[RunSummary], None] | None = None) -> ServerApp:
    """A Flower ServerApp that runs ``settings.strategy`` through a :class:`GridDriver`; ``on_end`` receives the
    run's summary."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = run_on_grid(grid, settings)
        if on_end is not None:
            on_end(summary)

    return app


def run_on_grid(grid: Grid, settings: ServerAppSettings) -> RunSummary:
    """Build the strategy, the initial model and the test-set evaluation of ``settings``; drive them on ``grid``."""
    s = settings
    model = s.model if isinstance(s.model, ModelConfig) else ModelConfig(name=s.model)
    spec = RunSpec(s.dataset, model, s.strategy, s.num_clients, s.seed, s.dp_compatible)
    parts = assemble(spec)
    metrics = None
    if settings.metrics_path:
        path = Path(settings.metrics_path)
        run = {"dataset": s.dataset, "model": model, "strategy": dict(s.strategy), "num_clients": s.num_clients}
        params = flat_config({**run, "seed": s.seed})
        metrics = MetricsWriter(path, open_sinks(s.tracking, path.parent, path.parent.name, params))
    try:
        return GridDriver(grid, parts.strategy, parts.initial, settings.driver, metrics, parts.evaluator).run()
    finally:
        if metrics is not None:
            metrics.close()
