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
        (["server.nope=1"], "server.nope: no such key"),
        (["server.client_timeout=1"], "server.client_timeout (1.0 s) must exceed"),
        (["server.norm_action=ignore"], "server.norm_action must be one of reject, clip, got 'ignore'"),
        (["server.norm_bound=-1"], "server.norm_bound must be finite and >= 0"),
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
        (["train.lr=-1"], "train.lr must be > 0, got -1"),  # the key the user typed
    ],
)
def test_client_config_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert client_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedhet client: error: ") and message in err[0], err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0 and "fedhet server" in capsys.readouterr().out
    assert client_main(["--help"]) == 0 and "fedhet client" in capsys.readouterr().out


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_state_dir_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state").write_text("not a directory")
    assert main(["num_clients=4", "server.port=0", f"server.state_dir={tmp_path / 'state'}"]) == 2
    assert "is a file, not a directory" in one_line_error(capsys)


def test_resume_never_starts_over_silently(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["num_clients=4", "server.port=0", f"server.state_dir={tmp_path / 'state'}", "--resume"]
    assert main(args) == 2
    assert "cannot resume" in (line := one_line_error(capsys)) and "no run to resume" in line
    (tmp_path / "state" / "wal").mkdir(parents=True, exist_ok=True)
    (tmp_path / "state" / "wal" / "000000000000.jsonl").write_text('{"seq":0,"kind":"tick","now":1.0}\n')
    assert main(args) == 2
    assert "checkpoint.safetensors is missing while the write-ahead log holds events" in one_line_error(capsys)


def test_interrupted_atomic_writes_are_removed_at_start(tmp_path: Path) -> None:
    from fedhet.server.persistence import StateStore

    (tmp_path / "results").mkdir(parents=True)
    stale = [tmp_path / ".checkpoint.safetensors.0a1b.tmp", tmp_path / "results" / ".r1.safetensors.2c3d.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    StateStore(tmp_path)
    assert not any(p.exists() for p in stale)


def test_a_second_server_on_the_same_port_fails_to_bind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedhet.server.testing import spawn, wait_for_file

    first_args = ["num_clients=4", "server.port=0", f"server.port_file={tmp_path / 'port'}", "server.threads=1"]
    first = spawn("fedhet.server", [*first_args, f"server.state_dir={tmp_path / 'a'}"], tmp_path / "a.log", tmp_path)
    try:
        port = wait_for_file(tmp_path / "port", 60, first)
        second = ["num_clients=4", f"server.port={port}", f"server.state_dir={tmp_path / 'b'}", "server.threads=1"]
        assert main(second) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(capsys)
    finally:
        first.kill()


def test_unreadable_tokens_and_pem_files_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tokens.bin").write_bytes(bytes(range(256)))
    (tmp_path / "bad.pem").write_text("this is not a certificate")
    base = ["num_clients=4", "server.port=0", f"server.state_dir={tmp_path / 'state'}"]
    assert main([*base, f"server.tokens_file={tmp_path / 'tokens.bin'}"]) == 2
    assert "cannot read the tokens file" in one_line_error(capsys)
    pem = [f"server.tls.cert={tmp_path / 'bad.pem'}", f"server.tls.key={tmp_path / 'bad.pem'}"]
    assert main([*base, *pem]) == 2
    assert "server.tls.cert" in (line := one_line_error(capsys)) and "holds no PEM certificate" in line
