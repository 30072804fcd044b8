"""Transport security: TLS, mutual TLS with certificates these tests make, and the refusal to listen on a
non-loopback address without TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc import aio

from fedhet.clients.config import compose_client
from fedhet.clients.network import build_client
from fedhet.metrics import read_metrics
from fedhet.server.testing import ScriptedClient, free_port, running_server, test_config


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(common: str) -> tuple[Pem, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _pem(cert, key), key, cert


def issue(common: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, server: bool) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _pem(builder.sign(ca_key, hashes.SHA256()), key)


def _pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    return Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    other_ca: Pem
    other_client: Pem
    dir: Path

    def write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, ca_key, ca_cert = make_ca("fedhet test CA")
    other, other_key, other_cert = make_ca("another CA")
    return Pki(
        ca=ca,
        server=issue("fedhet server", ca_key, ca_cert, server=True),
        client=issue("client 0", ca_key, ca_cert, server=False),
        other_ca=other,
        other_client=issue("client 0", other_key, other_cert, server=False),
        dir=tmp_path_factory.mktemp("pki"),
    )


def tls_overrides(pki: Pki, mutual: bool) -> list[str]:
    out = [
        f"server.tls.cert={pki.write('server.pem', pki.server.cert)}",
        f"server.tls.key={pki.write('server.key', pki.server.key)}",
    ]
    if mutual:
        out.append(f"server.tls.client_ca={pki.write('ca.pem', pki.ca.cert)}")
    return out


async def reaches(port: int, credentials: grpc.ChannelCredentials | None) -> bool:
    client = ScriptedClient(f"127.0.0.1:{port}", 0, credentials=credentials)
    try:
        await asyncio.wait_for(client.register(), timeout=10)
        return True
    except (aio.AioRpcError, TimeoutError):
        return False
    finally:
        await client.close()


async def tls_scenario(tmp_path: Path, pki: Pki, mutual: bool) -> dict[str, bool]:
    cfg = test_config(str(tmp_path / "state"), *tls_overrides(pki, mutual))
    trusted = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    async with running_server(cfg) as app:
        return {
            "plaintext": await reaches(app.port, None),
            "untrusted server": await reaches(app.port, grpc.ssl_channel_credentials(pki.other_ca.cert)),
            "no client cert": await reaches(app.port, trusted),
            "client cert of another CA": await reaches(
                app.port, grpc.ssl_channel_credentials(pki.ca.cert, pki.other_client.key, pki.other_client.cert)
            ),
            "client cert of the CA": await reaches(
                app.port, grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert)
            ),
        }


def test_tls_admits_clients_that_trust_the_server(tmp_path: Path, pki: Pki) -> None:
    outcome = asyncio.run(tls_scenario(tmp_path, pki, mutual=False))
    assert outcome == {
        "plaintext": False,
        "untrusted server": False,
        "no client cert": True,
        "client cert of another CA": True,
        "client cert of the CA": True,
    }


def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_ca(tmp_path: Path, pki: Pki) -> None:
    outcome = asyncio.run(tls_scenario(tmp_path, pki, mutual=True))
    assert outcome == {
        "plaintext": False,
        "untrusted server": False,
        "no client cert": False,
        "client cert of another CA": False,
        "client cert of the CA": True,
    }


async def client_program_scenario(tmp_path: Path, pki: Pki) -> int:
    cfg = test_config(
        str(tmp_path / "state"),
        *tls_overrides(pki, mutual=True),
        "strategy.scheduler.min_clients=1",
        "server.max_versions=2",
        "server.shutdown_grace=5",
    )
    async with running_server(cfg) as app:
        client_cfg = compose_client(
            [
                "num_clients=4",
                "partition_id=1",
                "network.client_id=1",
                f"network.server=localhost:{app.port}",
                f"network.tls.ca={pki.write('ca.pem', pki.ca.cert)}",
                f"network.tls.cert={pki.write('client.pem', pki.client.cert)}",
                f"network.tls.key={pki.write('client.key', pki.client.key)}",
                "profile.seconds_per_sample=0.001",
                "network.max_seconds=60",
                "network.reconnect_timeout=10",
            ]
        )
        code = await asyncio.to_thread(lambda: build_client(client_cfg).run())
        await asyncio.wait_for(app.coordinator.ended_event.wait(), timeout=30)
    return code


def test_the_client_program_runs_to_the_end_over_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    assert asyncio.run(client_program_scenario(tmp_path, pki)) == 0
    assert read_metrics(tmp_path / "state" / "metrics.jsonl")[-1].version == 2


def test_non_loopback_without_tls_is_refused_and_binds_no_port(tmp_path: Path) -> None:
    port = free_port()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedhet.server",
            "server.address=0.0.0.0",
            f"server.port={port}",
            f"server.state_dir={tmp_path / 'state'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-loopback address 0.0.0.0" in lines[0] and "server.insecure=true" in lines[0]
    assert not (tmp_path / "state").exists()
    with socket.socket() as s:  # the port is still free: nothing was bound
        s.bind(("0.0.0.0", port))


def test_insecure_must_be_explicit_and_tls_files_must_exist(tmp_path: Path) -> None:
    from fedhet.errors import ConfigError

    assert test_config(str(tmp_path), "server.address=0.0.0.0", "server.insecure=true").server.insecure
    with pytest.raises(ConfigError, match=r"server.tls.cert: no such file"):
        test_config(str(tmp_path), "server.tls.cert=/nonexistent.pem", "server.tls.key=/nonexistent.key")
    with pytest.raises(ConfigError, match="given together"):
        test_config(str(tmp_path), "server.tls.cert=/nonexistent.pem")


async def untrusting_client_scenario(tmp_path: Path, pki: Pki) -> int:
    cfg = test_config(str(tmp_path / "state"), *tls_overrides(pki, mutual=False))
    async with running_server(cfg) as app:
        client_cfg = compose_client(
            [
                "num_clients=4",
                f"network.server=localhost:{app.port}",
                f"network.tls.ca={pki.write('other-ca.pem', pki.other_ca.cert)}",  # not the server's CA
                "profile.seconds_per_sample=0.001",
                "network.backoff_initial=0.1",
                "network.reconnect_timeout=600",  # a retrying client would hang here, not return
            ]
        )
        return await asyncio.wait_for(asyncio.to_thread(lambda: build_client(client_cfg).run()), timeout=120)


def test_a_client_that_does_not_trust_the_server_stops_at_once(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate the client does not trust is no outage to wait out: exit status 2 and one line, not two
    minutes of retries."""
    assert asyncio.run(untrusting_client_scenario(tmp_path, pki)) == 2
    assert "stops: TLS with localhost" in caplog.text and "check network.tls" in caplog.text


def test_the_certificate_recipe_of_the_deployment_guide_works_as_written(tmp_path: Path) -> None:
    """docs/deployment.md "Making certificates", run by bash in an empty directory; then a real server and the
    client program run to the end over mutual TLS with the files it made."""
    guide = (Path(__file__).parents[1] / "docs" / "deployment.md").read_text()
    section = guide[guide.index("### Making certificates") :]
    recipe = section[section.index("```bash\n") + 8 : section.index("```", section.index("```bash\n") + 8)]
    done = subprocess.run(["bash", "-e", "-c", recipe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    files = {name: (tmp_path / name).read_bytes() for name in ("ca.pem", "server.pem", "server.key")}
    files |= {name: (tmp_path / name).read_bytes() for name in ("client.pem", "client.key")}
    made = Pki(
        ca=Pem(files["ca.pem"], b""),
        server=Pem(files["server.pem"], files["server.key"]),
        client=Pem(files["client.pem"], files["client.key"]),
        other_ca=Pem(b"", b""),
        other_client=Pem(b"", b""),
        dir=tmp_path,
    )
    assert asyncio.run(client_program_scenario(tmp_path / "run", made)) == 0
