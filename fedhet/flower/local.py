"""An in-process Flower Grid: ClientApps run in threads of this process, on the real clock.

:class:`LocalGrid` implements Flower's ``Grid`` (``push_messages`` / ``pull_messages``) by calling a
:class:`~flwr.clientapp.ClientApp` directly, one node per partition, each in a worker thread. It is what a unit test
or a notebook needs to run a ServerApp's logic (a fedhet :class:`~fedhet.flower.serverapp.GridDriver` or one of
Flower's own strategies) against real ClientApps and real Flower messages in seconds: Flower's simulation engine
starts a Ray cluster and one process per worker first, which costs tens of seconds on a small machine. Use the
simulation engine (``flwr.simulation``) or a SuperLink for anything but tests.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["LocalGrid"]

_CLIENT_APP_EXCEPTION = 0  # Flower's error code for an exception raised in a ClientApp


class LocalGrid(Grid):
    """``num_nodes`` nodes running ``client_app`` in threads; node ``i`` has ``partition-id = i`` of
    ``num-partitions = num_nodes`` in its node config.

    Args:
        client_app: the ClientApp every node runs.
        num_nodes: nodes (and partitions).
        workers: threads executing messages (default: one per node, so every node can be busy at once).
        run_config: the run config each node's Context carries.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        workers: int = 0,
        run_config: dict[str, bool | int | float | str] | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.client_app = client_app
        self.node_ids = [1001 + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, node in enumerate(self.node_ids)
        }
        self._run = Run.create_empty(run_id=1)
        try:  # Flower's messages take their run and sender from the process's task identity
            TaskIdentity.run_id  # noqa: B018
        except RuntimeError:
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self._pool = ThreadPoolExecutor(max_workers=workers or num_nodes, thread_name_prefix="flower-node")
        self._lock = threading.Lock()
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            if message.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {message.metadata.dst_node_id}")
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id  # what a SuperLink assigns on arrival
            ids.append(message_id)
            self._pool.submit(self._execute, message)
        return ids

    def _execute(self, message: Message) -> None:
        context = self.contexts[message.metadata.dst_node_id]
        try:
            reply = self.client_app(message, context)
        except Exception as error:  # a failing ClientApp answers an error, as on a SuperNode
            reason = "".join(traceback.format_exception_only(type(error), error)).strip()
            reply = Message(Error(_CLIENT_APP_EXCEPTION, reason), reply_to=message)
        with self._lock:
            self._replies[message.metadata.message_id] = reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else float("inf"))
        replies: list[Message] = []
        while pending and time.monotonic() < end:
            got = list(self.pull_messages(pending))
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            replies.extend(got)
            if pending:
                time.sleep(0.005)
        return replies

    def close(self) -> None:
        """Wait for running messages and stop the worker threads."""
        self._pool.shutdown(wait=True)
