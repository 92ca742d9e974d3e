"""SIGKILL while capturing and while a pull is in flight: no sample is lost or shown half-written, an
acknowledged sample is deleted exactly once, and the interrupted pull resumes from its partial file."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, wait_until
from test_daemon import Daemon
from test_samples_pull import fleet, near_miss_stream

from agent.errors import LeptonError
from agent.fleet.samples import Requests, pull_one
from agent.mqtt.client import BrokerAddress, PahoLink
from agent.mqtt.topics import FleetTopics
from agent.samples.offer import sample_topic


def write_config(tmp: Path, port: int, models_dir: Path, enabled: bool) -> Path:
    wav = near_miss_stream(tmp / "stream.wav")
    path = tmp / f"agent-{enabled}.toml"
    path.write_text(f"""
[agent]
device_id = "kill1"
state_dir = "{tmp / 'state'}"
[mqtt]
broker = "mqtt://127.0.0.1:{port}"
keepalive_s = 5
[profile]
capture_cap_bytes = 4194304
[[pipelines]]
name = "wake.mic"
source = "{wav}"
model = "{models_dir / 'wakeword' / 'hey_mycroft.json'}"
enabled = {str(enabled).lower()}
[pipelines.source_options]
loop = true
[pipelines.capture]
enabled = true
band = [0.0, 1.0]
max_per_minute = 6000
pre_roll_s = 3.0
post_roll_s = 1.0
""")
    return path


def _listing(port: int) -> dict[str, Any]:
    """The device's sample list, once it has connected (a command sent before that is not heard)."""
    got: list[dict[str, Any]] = []

    def answered() -> bool:
        rc, lines, _ = fleet(port, "samples", "list", "kill1", timeout="3")
        got[:] = lines
        return rc == 0

    assert wait_until(answered, timeout=90, step=0.2)
    return got[0]


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".json")


def test_kill_while_capturing_and_while_pulling(tmp_path: Path, broker: Broker, models_dir: Path) -> None:
    samples = tmp_path / "state" / "samples"
    capturing = write_config(tmp_path, broker.port, models_dir, enabled=True)
    idle = write_config(tmp_path, broker.port, models_dir, enabled=False)
    with Daemon(capturing) as daemon:
        assert wait_until(lambda: samples.is_dir() and len(_visible(samples)) >= 6, timeout=120)
        daemon.terminate(signal.SIGKILL)  # while the writer keeps writing clips

    out = tmp_path / "dataset"
    with Daemon(idle) as daemon:
        listed = _listing(broker.port)
        # What a crash left half done is gone before anything is listed: every sample whole, nothing else.
        names = {p.name for p in samples.iterdir()}
        assert not any(n.endswith(".partial") for n in names)
        ids = [s["id"] for s in listed["samples"]]
        assert len(ids) >= 6 and names == {f"{i}{e}" for i in ids for e in (".json", ".wav")}
        assert all("-wake.mic-" in i for i in ids)
        for s in listed["samples"]:
            assert hashlib.sha256((samples / s["file"]).read_bytes()).hexdigest() == s["sha256"]

        # A pull in flight when the device dies: it had offered a two-chunk clip, and its second chunk never
        # reached the broker (emptied here, which is what the broker holds then).
        link = PahoLink(BrokerAddress.parse(f"mqtt://127.0.0.1:{broker.port}")).start()
        try:
            requests = Requests(link, "lepton", 20.0)
            biggest = max(listed["samples"], key=lambda s: s["bytes"])["id"]  # a whole 4 s clip
            (offered,) = requests.one("kill1", {"op": "offer", "ids": [biggest]})["offered"]
            assert offered["size"] > 64 * 1024  # two chunks at least
            daemon.terminate(signal.SIGKILL)
            # The id holds the pipeline's name, "wake.mic": its topic level is `segment`-encoded.
            topic = sample_topic(FleetTopics("lepton").device("kill1").base, biggest)
            assert "." not in topic
            link.publish_wait(f"{topic}/chunk/1", b"", qos=1, retain=True)
            with pytest.raises(LeptonError, match=r"chunk 1 .* did not arrive"):
                pull_one(link, "lepton", "kill1", offered, out, threading.Event(), 0.5)
        finally:
            link.close()
        assert list((out / ".partial").iterdir()), "the interrupted pull kept its partial file"

    with Daemon(idle):
        _listing(broker.port)
        rc, lines, err = fleet(broker.port, "samples", "pull", "kill1", "--out", str(out))
        assert rc == 0, err
        assert lines[0]["pulled"] == len(ids) and lines[0]["deleted"] == len(ids)
        assert lines[0]["resumed_chunks"] >= 1  # the first chunk was not fetched again
        rc, (after,), _ = fleet(broker.port, "samples", "list", "kill1")
        assert after["total"] == 0
    pulled: dict[str, Any] = {json.loads(p.read_text())["id"]: json.loads(p.read_text())
                              for p in (out / "samples").glob("*.json")}
    assert sorted(pulled) == sorted(ids)  # every sample the device had, none lost, none twice
    for sid, meta in pulled.items():
        assert hashlib.sha256((out / "audio" / f"{sid}.wav").read_bytes()).hexdigest() == meta["sha256"]
    assert not list((out / ".partial").iterdir())
