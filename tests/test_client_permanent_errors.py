"""Errors no retry mends stop a deployed client at once with a non-zero status and one line saying why (an
untrusted TLS certificate: ``test_grpc_tls.py``; a wrong token: ``test_grpc_auth.py``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedhet.clients.config import compose_client
from fedhet.clients.network import build_client
from fedhet.server.testing import running_server, test_config


async def mismatched_model(tmp_path: Path) -> int:
    cfg = test_config(str(tmp_path / "state"), "strategy.scheduler.min_clients=1")  # logistic regression
    async with running_server(cfg) as app:
        client_cfg = compose_client(
            [
                "num_clients=4",
                "model=2nn",  # not the server's model
                f"network.server=127.0.0.1:{app.port}",
                "profile.seconds_per_sample=0.001",
                "network.max_seconds=120",
            ]
        )
        client = build_client(client_cfg)
        code = await asyncio.wait_for(asyncio.to_thread(client.run), timeout=120)
        assert client.tasks_done == 0
        return code


def test_a_client_whose_model_is_not_the_servers_stops_at_its_first_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert asyncio.run(mismatched_model(tmp_path)) == 2
    assert "the server's model has" in caplog.text and "same model.* " in caplog.text
