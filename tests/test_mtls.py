"""The workflow over `mqtts://` with mutual TLS against a mosquitto that requires client certificates (CA,
server and client certificates made here with `cryptography`), and the lines an operator gets without a client
certificate or with the wrong CA."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import fleet_workflow as flow
import pytest
from broker import Broker, free_port, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import TlsSection


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_ca(folder: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / f"{cn}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def issue(folder: Path, name: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], server: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca[1].subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    if server:
        loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        builder = builder.add_extension(x509.SubjectAlternativeName([loopback]), critical=False)
    (folder / f"{name}.pem").write_bytes(builder.sign(ca[0], hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    _write_key(key, folder / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "fleet-ca")
    make_ca(folder, "other-ca")
    issue(folder, "server", ca, server=True)
    issue(folder, "device", ca, server=False)
    issue(folder, "operator", ca, server=False)
    return folder


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[tuple[Broker, str]]:
    port = free_port()
    extra = "\n".join([f"listener {port} 127.0.0.1", f"cafile {pki / 'fleet-ca.pem'}",
                       f"certfile {pki / 'server.pem'}", f"keyfile {pki / 'server.key'}",
                       "require_certificate true"])
    with Broker(tmp_path_factory.mktemp("tls-broker"), extra=extra) as b:
        yield b, f"mqtts://127.0.0.1:{port}"


def test_mutual_tls_cmd_and_status(tmp_path: Path, pki: Path, tls_broker: tuple[Broker, str]) -> None:
    _, url = tls_broker
    tls = TlsSection(ca_file=pki / "fleet-ca.pem", cert_file=pki / "device.pem", key_file=pki / "device.key")
    a = flow.device_link(tmp_path, url, "dev-tls", groups=("secure",), tls=tls)
    a.link.start()
    try:
        assert a.link.subscribed.wait(20)
        operator = ["--broker", url, "--ca-file", str(pki / "fleet-ca.pem"), "--cert-file", str(pki / "operator.pem"),
                    "--key-file", str(pki / "operator.key")]
        r = flow.fleet("cmd", "dev-tls", "ping", "--format", "json", *operator)
        assert r.rc == 0 and json.loads(r.out)["result"] == {"pong": True}, r.err
        r = flow.fleet("status", "--format", "json", "--settle", "1", *operator)
        assert r.rc == 0, r.err
        rows = {row["device"]: row for row in map(json.loads, r.out.splitlines())}
        assert rows["dev-tls"]["presence"] == "yes"
    finally:
        flow.close_link(a)


def test_no_client_certificate_says_so(pki: Path, tls_broker: tuple[Broker, str]) -> None:
    r = flow.fleet("status", "--broker", tls_broker[1], "--ca-file", str(pki / "fleet-ca.pem"), "--timeout", "10")
    assert r.rc == 1 and len(r.err_lines) == 1, r.err
    assert "closed the TLS" in r.err_lines[0] and "client certificate" in r.err_lines[0], r.err


def test_wrong_ca_gets_the_verification_error(pki: Path, tls_broker: tuple[Broker, str]) -> None:
    r = flow.fleet("status", "--broker", tls_broker[1], "--ca-file", str(pki / "other-ca.pem"),
                   "--cert-file", str(pki / "operator.pem"), "--key-file", str(pki / "operator.key"))
    assert r.rc == 1 and len(r.err_lines) == 1, r.err
    assert "certificate verify failed" in r.err_lines[0], r.err


def test_agent_without_a_client_certificate_says_so(tmp_path: Path, pki: Path, tls_broker: tuple[Broker, str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The agent's log names the likely cause at WARNING (not only the MQTT version)."""
    caplog.set_level(logging.INFO, logger="agent.mqtt.link")
    a = flow.device_link(tmp_path, tls_broker[1], "dev-nocert", tls=TlsSection(ca_file=pki / "fleet-ca.pem"))
    a.link.start()
    try:
        assert wait_until(lambda: any("client certificate" in r.getMessage() for r in caplog.records
                                      if r.levelno == logging.WARNING), 20)
    finally:
        flow.close_link(a, 0.5)
    assert a.link.stats.connects == 0
