"""FedCompass (Li et al., ICLR 2024): a computing-power-aware, semi-asynchronous scheduler.

The server estimates each client's speed (seconds per local step) and gives it a number of local steps ``Q`` in
``[q_min, q_max]`` so that the clients of a *group* finish at about the same time. A group's updates are aggregated
together; groups of different speeds run independently. See ``shared/algorithms/fedcompass.md``; the reference
code's defects are fixed here:

- deadlines are handled inside the events the runtime delivers: every event first closes the groups whose latest
  arrival time has passed, so a late arrival seen before its group's deadline tick never strands the waiting
  members, and a group is removed only once nobody is training or waiting in it;
- late updates are held in an :class:`~fedhet.strategies.base.UpdateBuffer` (folded per start version, listed by
  task), merged bucket by bucket with the group's, so a client appearing in both loses nothing;
- client weights are ``1/N`` (or sample shares) over the clients known, never 1;
- speed is the client's reported training time per step, never the elapsed time (which counts downloads,
  queueing and, on a first task, the wait for the run to start). The rest of the round trip (download, upload,
  queueing: elapsed minus training time) is tracked as a per-client ``overhead`` moving average and added to the
  expected and latest arrival times, so a client whose transfers take a sizeable part of a task is not counted
  late every time (with 2 MB/s links, a 6.6 MB CNN costs 6.6 s of transfers against 16 s of training).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedhet.strategies.base import Assignment, Decision, undoable
from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.errors import StateError
from fedhet.strategies.journal import Journal
from fedhet.strategies.staleness import ClientWeights, StalenessBuffer
from fedhet.types import ClientInfo, Result

__all__ = ["CompassClient", "CompassGroup", "FedCompassScheduler"]

# floor((E - now) / speed) must not lose a whole step to floating-point rounding (e.g. 32.99999999999999)
_STEP_TOLERANCE = 1e-9
# a reported training time of 0 must not make a client infinitely fast
_MIN_SPEED = 1e-12


@dataclass
class CompassClient:
    """What the scheduler knows of one client.

    Attributes:
        speed: seconds per local step (moving average); None until its first result.
        local_steps: Q of its current (or last) task.
        start: time (s) its current task was handed out.
        version: global version its current task started from.
        group: the group it belongs to; None during its first task, which is aggregated alone.
        busy: a task is out; False while it waits for its group's aggregation.
        overhead: seconds of a round trip that are not training (transfers, queueing), moving average.
        samples: training samples it holds (sizes its bounds on Q when they are in epochs).
    """

    speed: float | None = None
    local_steps: int = 0
    start: float = 0.0
    version: int = 0
    group: int | None = None
    busy: bool = False
    overhead: float = 0.0
    samples: int = 0


@dataclass
class CompassGroup:
    """Clients set up to finish together.

    Attributes:
        expected: E, the time (s) its members are expected to arrive.
        latest: L, the deadline (s): an arrival after it is late; at it the group aggregates what has arrived.
        training: members with a task out.
        arrived: members whose update is buffered, waiting for the aggregation, in order of arrival.
        buffer: the arrived members' updates.
        closed: aggregated or past its deadline; nobody joins it, its members still training will be late.
    """

    expected: float
    latest: float
    training: set[int] = field(default_factory=set)
    arrived: list[int] = field(default_factory=list)
    buffer: UpdateBuffer = field(default_factory=UpdateBuffer)
    closed: bool = False

    @property
    def members(self) -> set[int]:
        return self.training | set(self.arrived)


class FedCompassScheduler:
    """FedCompass's scheduler; pair it with the ``staleness_weighted`` aggregator.

    Choices the paper leaves open: groups whose deadlines pass at the same event aggregate together, in one
    version; a deadline at which none of the group's members has arrived still applies the late buffer (when it
    holds anything), so a fleet whose every arrival is late keeps making progress; a client's first task (speed
    unknown) belongs to no group and its update is aggregated alone, without the late buffer.

    Where two open groups offer a client the same number of steps, it joins the later one (the one formed last), as
    APPFL's reference scheduler does.

    Args:
        q_min: fewest local steps a task gets (in ``unit``).
        q_max: most local steps; every client's first task uses it (in ``unit``).
        speed_momentum: m, weight of the newest speed sample in the moving average, in (0, 1].
        latest_time_factor: lambda >= 1, deadline slack: a group's latest arrival is ``now + lambda * Q * speed``.
        weighting: ``uniform`` (``w_i = 1/N``) or ``samples`` (the client's share of all samples).
        unit: ``steps`` (the paper's: q_min and q_max are minibatch steps, whole numbers) or ``epochs`` (passes
            over the client's own data, so that local work means the same at any client count: client i's bounds
            are ``round(q * ceil(n_i / batch_size))`` steps, at least 1).
        batch_size: the clients' minibatch size, which turns epochs into steps (``unit=epochs`` only).
    """

    def __init__(
        self,
        q_min: float = 20,
        q_max: float = 100,
        speed_momentum: float = 0.9,
        latest_time_factor: float = 1.2,
        weighting: str = "uniform",
        unit: str = "steps",
        batch_size: int = 32,
    ) -> None:
        if unit not in ("steps", "epochs"):
            raise ValueError(f"unit must be steps or epochs, got {unit!r}")
        if not (math.isfinite(q_min) and math.isfinite(q_max) and 0 < q_min <= q_max):
            raise ValueError(f"need 0 < q_min <= q_max, got q_min = {q_min}, q_max = {q_max}")
        if unit == "steps" and not (q_min >= 1 and float(q_min).is_integer() and float(q_max).is_integer()):
            raise ValueError(f"steps are whole numbers >= 1: got q_min = {q_min}, q_max = {q_max}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < speed_momentum <= 1.0:
            raise ValueError(f"speed_momentum must be in (0, 1], got {speed_momentum}")
        if not (math.isfinite(latest_time_factor) and latest_time_factor >= 1.0):
            raise ValueError(f"latest_time_factor must be >= 1, got {latest_time_factor}")
        if weighting not in ("uniform", "samples"):
            raise ValueError(f"weighting must be uniform or samples, got {weighting!r}")
        self.q_min = q_min
        self.q_max = q_max
        self.unit = unit
        self.batch_size = batch_size
        self.speed_momentum = speed_momentum
        self.latest_time_factor = latest_time_factor
        self.version = 0
        self.clients: dict[int, CompassClient] = {}
        self.groups: dict[int, CompassGroup] = {}
        self.late = UpdateBuffer()
        self._weights = ClientWeights(weighting)
        self._next_group = 0

    # ------------------------------------------------------------------ events
    def on_available(self, client: ClientInfo, now: float) -> Decision:
        return undoable(self._available, client, now)

    def on_result(self, result: Result, client: ClientInfo, now: float) -> Decision:
        return undoable(self._result, result, client, now)

    def on_tick(self, now: float) -> Decision:
        return undoable(self._tick, now)

    # every change below is recorded in the event's journal: a client's record and a group before their fields
    # change (``_client``, ``_group``), a buffer before it folds or empties; members join and leave through it
    def _available(self, journal: Journal, client: ClientInfo, now: float) -> Decision:
        journal.keep(self)
        self._weights.keep(journal, client.client_id)
        self._weights.observe(client)
        ready, expired = self._close_due(journal, now, inclusive=False)
        record = self._client(journal, client.client_id)
        record.samples = client.num_samples
        assign = []
        if record.busy:  # it lost its task: its group no longer waits for it
            record.busy = False
            if record.group is not None:
                gid, record.group = record.group, None
                group = self._group(journal, gid)
                journal.discard(group.training, client.client_id)
                if not group.closed and not group.training and group.arrived:
                    group.closed = True
                    ready.append(gid)
                self._drop_if_empty(journal, gid)
            assign.append(client.client_id)
        elif record.group is None:  # a new client
            assign.append(client.client_id)
        # otherwise it waits in its group and gets its task at the group's aggregation
        return self._decide(journal, now, StalenessBuffer(), ready, expired, assign)

    def _result(self, journal: Journal, result: Result, client: ClientInfo, now: float) -> Decision:
        cid = client.client_id
        journal.keep(self)
        self._weights.keep(journal, cid)
        weight = self._weights.weight(client)
        ready, expired = self._close_due(journal, now, inclusive=False)
        record = self._client(journal, cid)
        record.samples = client.num_samples
        self._update_speed(record, result, now)
        record.busy = False
        stage = StalenessBuffer()
        assign = []
        gid = record.group
        if gid is None:  # its first task: aggregated alone, at once
            stage.add(result, weight)
            assign.append(cid)
        else:
            group = self._group(journal, gid)
            journal.discard(group.training, cid)
            if group.closed:  # late: buffered for the next group aggregation, reassigned at once
                journal.record(self.late.restore_point())
                self.late.add(result, weight)
                record.group = None
                self._drop_if_empty(journal, gid)
                assign.append(cid)
            else:
                journal.record(group.buffer.restore_point())
                group.buffer.add(result, weight)
                journal.keep_length(group.arrived)
                group.arrived.append(cid)
                if not group.training:
                    group.closed = True
                    ready.append(gid)
        return self._decide(journal, now, stage, ready, expired, assign)

    def _tick(self, journal: Journal, now: float) -> Decision:
        journal.keep(self)
        ready, expired = self._close_due(journal, now, inclusive=True)
        return self._decide(journal, now, StalenessBuffer(), ready, expired, [])

    def _client(self, journal: Journal, cid: int) -> CompassClient:
        """Client ``cid``'s record (a new one for a client not seen before), its fields recorded in ``journal``."""
        journal.keep_item(self.clients, cid)
        record = self.clients.setdefault(cid, CompassClient())
        journal.keep(record)
        return record

    def _group(self, journal: Journal, gid: int) -> CompassGroup:
        """Group ``gid``, its fields recorded in ``journal`` (its member set and arrival list need their own)."""
        group = self.groups[gid]
        journal.keep(group)
        return group

    def next_deadline(self) -> float | None:
        deadlines = [g.latest for g in self.groups.values() if not g.closed]
        return min(deadlines) if deadlines else None

    def buffered_task_ids(self) -> list[int]:
        """Tasks whose updates were accepted and are not yet aggregated (late or waiting in a group)."""
        return self.late.task_ids() + [t for g in self.groups.values() for t in g.buffer.task_ids()]

    # ------------------------------------------------------------------ internals

    def _update_speed(self, record: CompassClient, result: Result, now: float) -> None:
        """Seconds per step from the client's own training time; elapsed time only if it reported none."""
        steps = result.local_steps if result.local_steps > 0 else (record.local_steps or self._bounds(record)[1])
        seconds = result.train_seconds
        if not (math.isfinite(seconds) and seconds > 0):
            seconds = now - record.start
        sample = max(seconds / steps, _MIN_SPEED)
        overhead = max(now - record.start - seconds, 0.0)
        if record.speed is None:
            record.speed = sample
            record.overhead = overhead
        else:
            m = self.speed_momentum
            record.speed = (1.0 - m) * record.speed + m * sample
            record.overhead = (1.0 - m) * record.overhead + m * overhead

    def _close_due(self, journal: Journal, now: float, inclusive: bool) -> tuple[list[int], bool]:
        """Close the open groups whose deadline has passed (``L <= now`` on a tick, ``L < now`` on an arrival,
        which is on time at ``L``). Returns the closed groups that have arrivals to aggregate, and whether any
        group closed."""
        ready: list[int] = []
        expired = False
        for gid in sorted(self.groups):
            group = self.groups[gid]
            if group.closed or not (group.latest <= now if inclusive else group.latest < now):
                continue
            self._group(journal, gid).closed = True
            expired = True
            if group.arrived:
                ready.append(gid)
            else:
                self._drop_if_empty(journal, gid)
        return ready, expired

    def _decide(
        self,
        journal: Journal,
        now: float,
        stage: StalenessBuffer,
        ready: list[int],
        expired: bool,
        assign: list[int],
    ) -> Decision:
        """Aggregate ``stage`` (a first update), plus the late buffer and the ``ready`` groups' updates when a group
        aggregates or a deadline passed; then assign ``assign`` and the ready groups' members, fastest first."""
        if ready or expired:
            journal.record(self.late.restore_point())
            stage.absorb(self.late)
        for gid in ready:
            group = self._group(journal, gid)
            journal.record(group.buffer.restore_point())
            stage.absorb(group.buffer)
            for cid in group.arrived:
                self._client(journal, cid).group = None
            assign.extend(group.arrived)
            group.arrived = []
            self._drop_if_empty(journal, gid)
        if len(stage):
            self.version += 1
        inf = math.inf
        order = sorted(assign, key=lambda c: (self.clients[c].speed or inf, c))
        assignments = [self._assign(journal, cid, now) for cid in order]
        if not len(stage):
            return Decision(assign=assignments)
        stage.live_versions = self._live_versions()
        return Decision(aggregate=stage, assign=assignments)

    def _assign(self, journal: Journal, cid: int, now: float) -> Assignment:
        record = self._client(journal, cid)
        record.busy = True
        record.start = now
        record.version = self.version
        if record.speed is None:
            record.group = None
            record.local_steps = self._bounds(record)[1]
            return Assignment(cid, local_steps=record.local_steps)
        joined = self._join(record, now)
        if joined is None:
            steps = self._new_group_steps(record, now)
            gid = self._next_group
            self._next_group += 1
            duration = steps * record.speed
            start = now + record.overhead
            journal.keep_item(self.groups, gid)
            self.groups[gid] = CompassGroup(start + duration, start + self.latest_time_factor * duration)
        else:
            gid, steps = joined
        journal.add(self.groups[gid].training, cid)
        record.group = gid
        record.local_steps = steps
        return Assignment(cid, local_steps=steps)

    def _bounds(self, record: CompassClient) -> tuple[int, int]:
        """A client's [q_min, q_max] in steps."""
        if self.unit == "steps":
            return int(self.q_min), int(self.q_max)
        per_epoch = math.ceil(record.samples / self.batch_size)
        low = max(1, round(self.q_min * per_epoch))
        return low, max(low, round(self.q_max * per_epoch))

    def _join(self, record: CompassClient, now: float) -> tuple[int, int] | None:
        """The open group this client can finish with in the most steps within its [q_min, q_max], and those
        steps; of groups that offer as many, the later."""
        assert record.speed is not None
        low, high = self._bounds(record)
        best: tuple[int, int] | None = None
        for gid in sorted(self.groups):
            group = self.groups[gid]
            if group.closed:
                continue
            steps = math.floor((group.expected - now - record.overhead) / record.speed + _STEP_TOLERANCE)
            if low <= steps <= high and (best is None or steps >= best[1]):
                best = (gid, steps)
        return best

    def _new_group_steps(self, record: CompassClient, now: float) -> int:
        """Q of a new group: line it up with the next arrival of an open group's fastest member (who will be
        reassigned at that group's deadline with at most its q_max steps); q_max when no group qualifies."""
        assert record.speed is not None
        low, high = self._bounds(record)
        best: int | None = None
        for group in self.groups.values():
            if group.closed or not now < group.latest:
                continue
            fastest = min(group.members, key=self._speed)
            fastest_high = self._bounds(self.clients[fastest])[1]
            next_arrival = group.latest + self.clients[fastest].overhead + self._speed(fastest) * fastest_high
            steps = math.floor((next_arrival - now - record.overhead) / record.speed + _STEP_TOLERANCE)
            if steps <= high and (best is None or steps > best):
                best = steps
        return high if best is None else max(best, low)

    def _speed(self, cid: int) -> float:
        speed = self.clients[cid].speed
        if speed is None:
            raise StateError(f"client {cid} is in a group but has no speed estimate")
        return speed

    def _drop_if_empty(self, journal: Journal, gid: int) -> None:
        group = self.groups[gid]
        if not group.training and not group.arrived:
            journal.keep_item(self.groups, gid)
            del self.groups[gid]

    def _live_versions(self) -> frozenset[int]:
        """Start versions of updates that may still be aggregated later: tasks out and updates held."""
        live = {r.version for r in self.clients.values() if r.busy}
        live.update(v for v, _ in self.late.items())
        live.update(v for g in self.groups.values() for v, _ in g.buffer.items())
        return frozenset(live)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "next_group": self._next_group,
            "weights": self._weights.state_dict(),
            "clients": {
                str(cid): {
                    "speed": r.speed,
                    "local_steps": r.local_steps,
                    "start": r.start,
                    "version": r.version,
                    "group": r.group,
                    "busy": r.busy,
                    "overhead": r.overhead,
                    "samples": r.samples,
                }
                for cid, r in self.clients.items()
            },
            "groups": {
                str(gid): {
                    "expected": g.expected,
                    "latest": g.latest,
                    "training": sorted(g.training),
                    "arrived": list(g.arrived),
                    "closed": g.closed,
                    "buffer": g.buffer.state_dict(),
                }
                for gid, g in self.groups.items()
            },
            "late": self.late.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"version", "next_group", "weights", "clients", "groups", "late"}
        if set(state) != expected:
            raise StateError(f"fedcompass scheduler state keys {sorted(state)} differ from {sorted(expected)}")
        try:
            version = int(state["version"])
            next_group = int(state["next_group"])
            clients = {int(cid): _load_client(row) for cid, row in state["clients"].items()}
            groups = {int(gid): _load_group(row) for gid, row in state["groups"].items()}
            late = UpdateBuffer()
            late.load_state_dict(state["late"])
            weights = ClientWeights(self._weights.weighting)
            weights.load_state_dict(state["weights"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            if isinstance(error, StateError):
                raise
            raise StateError(f"fedcompass scheduler state is malformed: {error!r}") from None
        _check_consistent(version, next_group, clients, groups)
        self.version, self._next_group = version, next_group
        self.clients, self.groups, self.late, self._weights = clients, groups, late, weights


def _load_client(row: Mapping[str, Any]) -> CompassClient:
    keys = {"speed", "local_steps", "start", "version", "group", "busy", "overhead", "samples"}
    if set(row) == keys - {"samples"}:  # written before the bounds could be in epochs
        row = {**row, "samples": 0}
    if set(row) != keys:
        raise StateError(f"fedcompass client state keys {sorted(row)} differ from {sorted(keys)}")
    speed = None if row["speed"] is None else float(row["speed"])
    if speed is not None and not (math.isfinite(speed) and speed > 0):
        raise StateError(f"fedcompass client speed must be finite and > 0 s/step, got {speed}")
    group = None if row["group"] is None else int(row["group"])
    overhead = float(row["overhead"])
    if not (math.isfinite(overhead) and overhead >= 0):
        raise StateError(f"fedcompass client overhead must be finite and >= 0 s, got {overhead}")
    samples = int(row["samples"])
    if samples < 0:
        raise StateError(f"fedcompass client samples must be >= 0, got {samples}")
    return CompassClient(
        speed,
        int(row["local_steps"]),
        float(row["start"]),
        int(row["version"]),
        group,
        bool(row["busy"]),
        overhead,
        samples,
    )


def _load_group(row: Mapping[str, Any]) -> CompassGroup:
    keys = {"expected", "latest", "training", "arrived", "closed", "buffer"}
    if set(row) != keys:
        raise StateError(f"fedcompass group state keys {sorted(row)} differ from {sorted(keys)}")
    buffer = UpdateBuffer()
    buffer.load_state_dict(row["buffer"])
    group = CompassGroup(
        float(row["expected"]),
        float(row["latest"]),
        {int(c) for c in row["training"]},
        [int(c) for c in row["arrived"]],
        buffer,
        bool(row["closed"]),
    )
    if len(buffer) != len(group.arrived):
        raise StateError(f"fedcompass group holds {len(buffer)} updates for {len(group.arrived)} arrived members")
    return group


def _check_consistent(
    version: int, next_group: int, clients: Mapping[int, CompassClient], groups: Mapping[int, CompassGroup]
) -> None:
    """Every member listed once, by a known client that names the group back, busy exactly when training."""
    if groups and next_group <= max(groups):
        raise StateError(f"fedcompass next group id {next_group} is not above the groups' ids {sorted(groups)}")
    listed: set[int] = set()
    for gid, group in groups.items():
        if group.training & set(group.arrived) or len(set(group.arrived)) != len(group.arrived):
            raise StateError(f"fedcompass group {gid} lists a member twice")
        for cid in group.members:
            record = clients.get(cid)
            if record is None or record.group != gid or record.busy != (cid in group.training):
                raise StateError(f"fedcompass group {gid} lists client {cid}, whose own state disagrees")
            if record.speed is None:
                raise StateError(f"fedcompass group {gid} lists client {cid}, which has no speed estimate")
        listed |= group.members
    for cid, record in clients.items():
        if record.group is not None and cid not in listed:
            raise StateError(f"fedcompass client {cid} names group {record.group}, which does not list it")
        if record.version > version:
            raise StateError(f"fedcompass client {cid} started from version {record.version}, after {version}")
