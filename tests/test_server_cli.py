"""`fedhet server` and `fedhet client`: bad config or flags cost one clear line on stderr and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedhet.clients.network import client_main
from fedhet.server import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["server.port=-1"], "server.port must be in 0..65535"),
        (["server.encoding=int8"], "server.encoding must be fp32, fp16 or bf16"),
        (["strategy=nope"], "strategy=nope: unknown strategy; choose one of: "),
        (["server.nope=1"], "server.nope'"),
        (["server.client_timeout=1"], "server.client_timeout (1.0 s) must exceed"),
        (["server.norm_action=ignore"], "server.norm_action must be reject or clip"),
        (["server.tls.client_ca=ca.pem"], "needs server.tls.cert"),
        (["server.tokens_file=/nonexistent"], "server.tokens_file: no such file"),
        (["--bogus"], "unknown option --bogus"),
    ],
)
def test_server_config_errors_are_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args, f"server.state_dir={tmp_path / 'state'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedhet server: error: ") and message in err[0], err
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["network.server=nohostport"], "network.server must be host:port"),
        (["partition_id=30"], "partition_id must be in 0..29"),
        (["network.server=192.0.2.1:50051"], "refusing a plaintext connection to non-loopback server"),
        (["profile.slowdown=0.5"], "profile.slowdown must be >= 1"),
        (["network.tls.cert=c.pem"], "must be given together"),
        (["model=nope"], "nope"),
    ],
)
def test_client_config_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert client_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedhet client: error: ") and message in err[0], err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0 and "fedhet server" in capsys.readouterr().out
    assert client_main(["--help"]) == 0 and "fedhet client" in capsys.readouterr().out
