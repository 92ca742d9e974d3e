"""`lepton-fleet keygen/publish/deploy/rollback/status` as an operator runs them, against real devices' services."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Broker
from conftest import Run, run_cli
from delivery_kit import FIXTURES, CommandDevice, Keys, connect, service, unique_prefix

from agent.delivery.signing import TrustedKeys, load_private_key
from agent.mqtt.client import PahoLink
from agent.mqtt.topics import FleetTopics


def fleet(*args: str) -> Run:
    return run_cli(*args, prog="fleet")


def _one_line(r: Run, *fragments: str) -> None:
    assert r.rc == 2, (r.rc, r.out, r.err)
    assert len(r.err_lines) == 1, r.err
    assert r.err_lines[0].startswith("lepton-fleet: ") and "Traceback" not in r.err
    for fragment in fragments:
        assert fragment in r.err_lines[0], r.err_lines[0]


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "release.key"
    r = fleet("keygen", "--out", str(path), "--format", "json")
    assert r.rc == 0, r.err
    return path


def test_keygen_writes_a_private_key_only_we_can_read(key_file: Path) -> None:
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert Path(f"{key_file}.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    private = load_private_key(key_file)
    from delivery_kit import Keys as K

    keys = K(private)
    assert TrustedKeys.from_config(keys.table).get(keys.kid) is not None
    # Never overwrites a key.
    _one_line(fleet("keygen", "--out", str(key_file)), str(key_file), "already exists")
    text = fleet("keygen", "--out", str(key_file.with_name("other.key")))
    assert text.rc == 0 and "[trusted_keys]" in text.out and "ed25519:" in text.out


def test_publish_deploy_rollback_status(fleet_broker: Broker, key_file: Path, tmp_path: Path, backend: str) -> None:
    keys = Keys(load_private_key(key_file))
    prefix = unique_prefix()
    broker = ["--broker", fleet_broker.url, "--prefix", prefix, "--timeout", "60"]
    for version, manifest in (("1", "colors_float.json"), ("2", "colors_int8.json")):
        r = fleet("publish", str(FIXTURES / manifest), "--name", "colors", "--version", version,
                  "--key", str(key_file), "--format", "json", *broker)
        assert r.rc == 0, r.err
        summary = json.loads(r.out)
        assert summary["version"] == int(version) and summary["key_id"] == keys.kid
        assert summary["chunk_size"] == 64 * 1024 and summary["chunks"] == 1
    topics = FleetTopics(prefix)
    links: list[PahoLink] = []
    try:
        for device, group in (("cam-1", "porch"), ("cam-2", "porch"), ("cam-3", "yard")):
            link = connect(fleet_broker.port)
            links.append(link)
            svc = service(link, tmp_path / device, keys, topics, backend, device=device).start()
            CommandDevice(link, svc, topics, device, groups=(group,))
        r = fleet("deploy", "colors@1", "--to", "cam-1", *broker)
        assert r.rc == 0, (r.out, r.err)
        assert "cam-1" in r.out and "active" in r.out and "cam-2" not in r.out
        r = fleet("deploy", "colors@2", "--to", "group:porch", "--settle", "1", "--format", "json", *broker)
        assert r.rc == 0, (r.out, r.err)
        rows = {row["device"]: row for row in map(json.loads, r.out.splitlines())}
        assert set(rows) == {"cam-1", "cam-2"}
        assert all(row["state"] == "active" and row["version"] == 2 for row in rows.values())
        # cam-2 never had v1: nothing to go back to, and the fleet tool says so.
        r = fleet("rollback", "colors", "--to", "group:porch", "--settle", "1", "--format", "json", *broker)
        rows = {row["device"]: row for row in map(json.loads, r.out.splitlines())}
        assert rows["cam-1"]["state"] == "rolled_back" and rows["cam-1"]["active"] == 1
        assert rows["cam-2"]["state"] == "refused" and rows["cam-2"]["reason"] == "not_kept"
        assert r.rc == 1
        r = fleet("status", "--format", "json", *broker)
        assert r.rc == 0, r.err
        status = {row["device"]: row for row in map(json.loads, r.out.splitlines())}
        assert status["cam-1"]["state"] == "rolled_back" and status["cam-2"]["version"] == 2
        assert "cam-3" not in status
        # A replayed downgrade is refused by the device, and deploy exits 1 with the reason in the table.
        r = fleet("deploy", "colors@1", "--to", "cam-2", *broker)
        assert r.rc == 1 and "not_newer" in r.out
    finally:
        for link in links:
            link.close()


COLORS_MANIFEST = str(FIXTURES / "colors_int8.json")


# Each case on its own: one refused argument must not hide whether the next is refused too.
# "{key}" is the real signing key, "{tmp}" the test's own directory.
@pytest.mark.parametrize(("args", "fragments"), [
    (("deploy", "colors", "--to", "cam-1"), ("NAME@VERSION",)),
    (("deploy", "colors@1.x", "--to", "cam-1"), ("colors@1.x",)),
    (("deploy", "colors@1", "--to", "cam/1", "--broker", "mqtt://127.0.0.1:1"), ("--to",)),
    (("status", "--broker", "http://example.org"), ("--broker", "mqtt://")),
    (("publish", COLORS_MANIFEST, "--name", "c", "--version", "1", "--key", "{tmp}/none.key"),
     ("none.key", "no such key file")),
    (("publish", COLORS_MANIFEST, "--name", "c", "--version", "v1", "--key", "{key}"), ("--version",)),
    (("publish", COLORS_MANIFEST, "--name", "c", "--version", "1", "--key", "{tmp}/bad.key"), ("bad.key", "PEM")),
], ids=["deploy-no-version", "deploy-bad-version", "deploy-bad-device", "status-bad-broker", "publish-missing-key",
        "publish-bad-version", "publish-key-not-pem"])
def test_fleet_bad_input(key_file: Path, tmp_path: Path, args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    (tmp_path / "bad.key").write_text("hello")
    _one_line(fleet(*(a.format(key=key_file, tmp=tmp_path) for a in args)), *fragments)


def test_retire_bad_input(fleet_broker: Broker) -> None:
    broker = f"mqtt://127.0.0.1:{fleet_broker.port}"
    _one_line(fleet("retire", "cam/1", "--broker", broker), "DEVICE", "cam/1")
    _one_line(fleet("retire", "cam-1", "--pipeline", "a+b", "--broker", broker), "--pipeline", "a+b")
    _one_line(fleet("retire", "cam-1", "--discovery-prefix", "home/assistant", "--broker", broker),
              "--discovery-prefix")
    # A device this broker never saw: nothing to retire, said so (not a silent success).
    _one_line(fleet("retire", "never-seen", "--broker", broker), "never-seen", "no retained status", "--pipeline")
