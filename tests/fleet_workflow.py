"""The operator workflow of issue 13, run the same way on every broker topology: devices on the agent's broker,
`lepton-fleet` on the operator's. Deploy and rollback to a group, `cmd` to a group, status with a live and a
stale device, results replayed in order after the agent's broker restarts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from broker import Partition, Watcher, wait_until
from conftest import Run, run_cli
from delivery_kit import FIXTURES, CommandDevice, Keys, connect, service
from test_link import Agentlet

from agent.agent_state import AgentState
from agent.config import MqttSection
from agent.delivery.signing import load_private_key
from agent.fleet.watch import STALE_GRACE_S, is_stale
from agent.mqtt.client import PahoLink
from agent.mqtt.link import Link
from agent.mqtt.spool import Spool
from agent.mqtt.topics import FleetTopics, Topics

FLEET = [sys.executable, "-c", "import sys; from agent.cli import fleet_main; sys.exit(fleet_main())"]


def fleet(*args: str) -> Run:
    return run_cli(*args, prog="fleet")


def device_link(tmp: Path, url: str | tuple[str, ...], device: str, groups: tuple[str, ...] = (),
                prefix: str = "lepton", **settings: Any) -> Agentlet:
    """The daemon's real link for `device`, answering every command on its reply topic like the daemon."""
    topics = Topics(prefix, device)
    tmp.mkdir(parents=True, exist_ok=True)
    spool = Spool(tmp / "spool.sqlite3", 1 << 22)
    state = AgentState(tmp / "agent.sqlite3")
    stop = threading.Event()
    box: list[Link] = []

    def on_command(topic: str, payload: bytes) -> None:
        box[0].send(topics.reply, {"id": json.loads(payload)["id"], "ok": True, "result": {"pong": True}})

    urls = (url,) if isinstance(url, str) else url
    link = Link(MqttSection(broker=urls, prefix=prefix, **{"keepalive_s": 5, **settings}), topics=topics,
                groups=groups, client_id=f"lepton-{device}", spool=spool, next_bdseq=state.next_bdseq,
                birth=lambda: {"agent": "test", "pipelines": []}, on_command=on_command, stop=stop)
    box.append(link)
    return Agentlet(link, spool, state, stop, [])


def close_link(a: Agentlet, timeout: float = 3.0) -> None:
    a.stop.set()
    a.link.close({"state": "stopped"}, timeout)
    a.spool.close()
    a.state.close()


@contextlib.contextmanager
def seeder(seeds: Path, broker: list[str]) -> Iterator[dict[str, Any]]:
    """`lepton-fleet serve-models` as a process; yields a dict that holds its final stats once it has ended."""
    proc = subprocess.Popen([*FLEET, "serve-models", "--dir", str(seeds), *broker], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stats: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("serving "), proc.stderr
        yield stats
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        stats.update(json.loads(out.splitlines()[-1]))


def deploy_and_rollback(tmp: Path, agent_port: int, operator: list[str], key_file: Path, backend: str,
                        prefix: str, seeds: Path | None = None) -> dict[str, Any]:
    """Publish v1 and v2 on the operator's broker, deploy both to group:porch on the agent's, roll one back.
    With `seeds`, publish keeps copies there and `serve-models` runs meanwhile; its final stats are returned."""
    keys = Keys(load_private_key(key_file))
    seed = ["--seed-dir", str(seeds)] if seeds is not None else []
    for version, manifest in (("1", "colors_float.json"), ("2", "colors_int8.json")):
        r = fleet("publish", str(FIXTURES / manifest), "--name", "colors", "--version", version,
                  "--chunk-size", "8192", "--key", str(key_file), *seed, *operator)
        assert r.rc == 0, r.err
    topics = FleetTopics(prefix)
    links: list[PahoLink] = []
    stats: dict[str, Any] = {}
    with seeder(seeds, operator) if seeds is not None else contextlib.nullcontext(stats) as stats:
        try:
            for device in ("cam-1", "cam-2"):
                link = connect(agent_port)
                links.append(link)
                svc = service(link, tmp / device, keys, topics, backend, device=device).start()
                CommandDevice(link, svc, topics, device, groups=("porch",))
            for version in ("1", "2"):
                r = fleet("deploy", f"colors@{version}", "--to", "group:porch", "--settle", "1", "--format", "json",
                          *operator)
                assert r.rc == 0, (r.out, r.err)
                rows = {row["device"]: row for row in map(json.loads, r.out.splitlines())}
                assert set(rows) == {"cam-1", "cam-2"}, rows
                assert all(row["state"] == "active" and row["version"] == int(version)
                           for row in rows.values()), rows
            r = fleet("rollback", "colors", "--to", "cam-1", "--format", "json", *operator)
            assert r.rc == 0, (r.out, r.err)
            row = json.loads(r.out.splitlines()[-1])
            assert row["device"] == "cam-1" and row["state"] == "rolled_back" and row["active"] == 1, row
        finally:
            for link in links:
                link.close()
    return stats


def cmd_to_a_group(agent_url: str, operator: list[str], tmp: Path, prefix: str) -> None:
    agents = [device_link(tmp / d, agent_url, d, groups=(g,), prefix=prefix)
              for d, g in (("dev-a", "hall"), ("dev-b", "hall"), ("dev-c", "yard"))]
    try:
        for a in agents:
            a.link.start()
        assert all(a.link.subscribed.wait(30) for a in agents)
        # A group's replies are collected until the timeout: long enough for a loaded CI machine.
        r = fleet("cmd", "group:hall", "ping", "--timeout", "8", "--format", "json", *operator)
        assert r.rc == 0, (r.out, r.err)
        replies = [json.loads(line) for line in r.out.splitlines()]
        assert sorted(x["device"] for x in replies) == ["dev-a", "dev-b"], (replies, r.err)
    finally:
        for a in agents:
            close_link(a)


def live_and_stale(agent_port: int, operator: list[str], tmp: Path, prefix: str, watch: bool = False) -> None:
    """dev-live answers; dev-gone's network is cut with no will sent (its broker stays up, as a halted node's
    peer would see it): `status` says yes for one and stale for the other (or `watch --status` prints a stale
    line, where the operator's broker never gets the retained status)."""
    part = Partition(agent_port)
    live = device_link(tmp / "live", f"mqtt://127.0.0.1:{agent_port}", "dev-live", prefix=prefix)
    gone = device_link(tmp / "gone", part.url, "dev-gone", prefix=prefix, heartbeat_s=1, keepalive_s=3600)
    watcher: subprocess.Popen[str] | None = None
    try:
        live.link.start()
        gone.link.start()
        assert live.link.subscribed.wait(30) and gone.link.subscribed.wait(30)
        if watch:
            watcher = subprocess.Popen(
                [*FLEET, "watch", "--status", "--seconds", str(20 + STALE_GRACE_S), "--format", "jsonl", *operator],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert watcher.stdout is not None
            for line in watcher.stdout:
                seen = json.loads(line)
                if seen["device"] == "dev-gone" and seen["payload"].get("state") == "online":
                    break
            part.cut()
            for line in watcher.stdout:
                seen = json.loads(line)
                if seen["device"] == "dev-gone" and seen.get("stale"):
                    break
            else:
                raise AssertionError(f"no stale line for dev-gone: {watcher.stderr.read() if watcher.stderr else ''}")
            return
        with Watcher(agent_port, [Topics(prefix, "dev-gone").status]) as w:
            w.wait_json("/status", lambda m: any(x.get("state") == "online" for x in m))
            part.cut()
            last = w.json("/status")[-1]
        assert wait_until(lambda: is_stale(last), timeout=2 + STALE_GRACE_S + 5, step=0.2)
        r = fleet("status", "--format", "json", "--settle", "1", *operator)
        assert r.rc == 0, r.err
        rows = {row["device"]: row for row in map(json.loads, r.out.splitlines())}
        assert rows["dev-live"]["presence"] == "yes" and rows["dev-gone"]["presence"] == "stale", rows
    finally:
        if watcher is not None:
            watcher.kill()
            watcher.communicate()
        close_link(live)
        close_link(gone, 0.5)
        part.close()


def replay_after_restart(agent_url: str | tuple[str, ...], operator_port: int, restart: Callable[[], None],
                         stop: Callable[[], None], tmp: Path, prefix: str) -> None:
    """Results made while the agent's broker is down reach the operator's broker afterwards, in order, marked
    historical."""
    a = device_link(tmp / "replay", agent_url, "dev-r", prefix=prefix)
    topic = Topics(prefix, "dev-r").results("p")
    with Watcher(operator_port, [topic], protocol=mqtt.MQTTv311) as w:
        a.link.start()
        try:
            assert a.link.connected.wait(30)
            for i in range(5):
                a.spool.append("p", topic, {"pipeline": "p", "i": i})
            w.wait_json("/results/p", lambda m: len(m) >= 5, timeout=30)
            stop()
            for i in range(5, 10):
                a.spool.append("p", topic, {"pipeline": "p", "i": i})
            restart()
            got = w.wait_json("/results/p", lambda m: any(x["i"] == 9 for x in m), timeout=90)
        finally:
            close_link(a)
    assert [x["i"] for x in got] == list(range(10)), got
    assert all(x.get("historical") for x in got[5:]) and not any(x.get("historical") for x in got[:5])



def samples_pull(tmp: Path, agent_url: str, agent_port: int, operator: list[str], models_dir: Path, prefix: str,
                 protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5) -> dict[str, Any]:
    """A real `lepton-agent run` on the agent's broker keeps every frame of the photo video (band [0, 1], each
    JPEG over one 64 KiB chunk); the operator lists and pulls them through its own broker, and the device deletes
    what was acknowledged. The pull's summary line."""
    from test_capture import face_model
    from test_daemon import Daemon
    from test_samples_pull import photo_video

    video = tmp / "photos.mkv"
    frames = 2 * len(photo_video(video))
    config = tmp / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "cap1"
state_dir = "{tmp / 'state'}"
[mqtt]
broker = "{agent_url}"
prefix = "{prefix}"
protocol = "{'3.1.1' if protocol == mqtt.MQTTv311 else '5'}"
keepalive_s = 5
[[pipelines]]
name = "faces"
source = "{video}"
model = "{face_model(tmp / 'model', models_dir)}"
[pipelines.source_options]
realtime = true
[pipelines.capture]
enabled = true
band = [0.0, 1.0]
max_per_minute = 6000
""")
    out = tmp / "dataset"

    def finished(status: list[dict[str, Any]]) -> bool:
        return bool(status) and [p["state"] for p in status[-1].get("pipelines", [])] == ["finished"]

    with Watcher(agent_port, [f"{prefix}/cap1/status"], protocol=protocol) as w, Daemon(config):
        w.wait_json("/status", finished, timeout=120)
        r = fleet("samples", "list", "cap1", "--format", "json", *operator)
        assert r.rc == 0, r.err
        listed = json.loads(r.out)["samples"]
        assert len(listed) == frames and max(s["bytes"] for s in listed) > 64 * 1024, listed
        r = fleet("samples", "pull", "cap1", "--out", str(out), "--format", "json", *operator)
        assert r.rc == 0, r.err
        summary = json.loads(r.out.splitlines()[0])
        assert summary == {"device": "cap1", "pulled": frames, "deleted": frames, "resumed_chunks": 0}, summary
        r = fleet("samples", "list", "cap1", "--format", "json", *operator)
        assert r.rc == 0 and json.loads(r.out)["samples"] == [], r.out
    for s in listed:  # every file whole: the pull checked each chunk and the file against the device's hashes
        (path,) = (out / "images").glob(f"{s['id']}.jpg")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
    return summary
