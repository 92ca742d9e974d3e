"""`lepton-agent run` as a process: results and status as DESIGN §5, commands through
`lepton-fleet cmd`, live reconfiguration, SIGTERM, SIGKILL while the broker is down, hostile
payloads through the broker, and the supervisor."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.publish as publish
import pytest
from broker import Broker, Watcher
from conftest import ROOT, RegisterSource, run_cli

from agent.config import PipelineSettings, SupervisorSection
from agent.manifest import load_spec
from agent.pipeline import Pipeline
from agent.profiles import load_profile
from agent.sources.source import Item, Source


def write_config(tmp: Path, port: int, fixtures: Path, extra_pipeline: str = "", device: str = "dev1",
                 fps: float = 20, hold: int = 4) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
device_id = "{device}"
groups = ["lab"]
state_dir = "{tmp / 'state'}"
[mqtt]
broker = "mqtt://127.0.0.1:{port}"
keepalive_s = 5
[[pipelines]]
name = "colors"
source = "test:colors"
model = "{fixtures / 'colors_int8.json'}"
threshold = 0.5
[pipelines.source_options]
fps = {fps}
hold = {hold}
width = 64
height = 48
[pipelines.policy]
on_change = true
max_rate = 100
{extra_pipeline}
""")
    return path


class Daemon:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.parent / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "-v", "run", "--config", str(self.config)],
                                         cwd=ROOT, env=env, stdout=log, stderr=log)
        return self

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def fleet(port: int, *args: str) -> tuple[int, list[dict[str, Any]]]:
    r = run_cli(*args, "--broker", f"mqtt://127.0.0.1:{port}", "--format", "json", "--timeout", "20", prog="fleet")
    return r.rc, [json.loads(line) for line in r.out.splitlines() if line.strip()]


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker", persistence=True) as b:
        yield b


def test_results_status_commands_and_sigterm(tmp_path: Path, broker: Broker, fixtures: Path) -> None:
    config = write_config(tmp_path, broker.port, fixtures, device="d-main")
    with Watcher(broker.port, ["lepton/d-main/#"]) as w, Daemon(config) as daemon:
        results = w.wait_json("/results/colors", lambda m: len(m) >= 4, timeout=60)
        first = results[0]
        assert set(first) == {"seq", "pipeline", "model", "task", "latency_ms", "classes", "ts", "v"}
        assert first["model"] == {"name": "colors", "version": 1} and first["task"] == "classify"
        assert set(first["latency_ms"]) == {"pre", "invoke", "post"}
        assert all(isinstance(v, float) for v in first["latency_ms"].values())
        assert [r["seq"] for r in results[:4]] == [1, 2, 3, 4]
        labels = [r["classes"][0]["label"] for r in results[:4]]
        assert all(a != b for a, b in itertools.pairwise(labels))  # on_change: each one a change
        assert all(len(r["classes"]) == 1 for r in results)  # threshold 0.5 leaves the top class
        online = w.json("/status")[0]
        assert online["state"] == "online" and online["agent"] and online["profile"] and online["backend"]
        assert online["pipelines"][0]["name"] == "colors" and online["models"]["colors"]["version"] == 1
        assert isinstance(online["bdseq"], int)

        rc, (pong,) = fleet(broker.port, "cmd", "d-main", "ping")
        assert rc == 0 and pong["ok"] and pong["result"]["pong"] is True
        rc, replies = fleet(broker.port, "cmd", "group:lab", "ping", "--timeout", "3")
        assert [r["device"] for r in replies] == ["d-main"]

        rc, (conf,) = fleet(broker.port, "cmd", "d-main", "configure",
                            '{"pipeline": "colors", "threshold": 0.0, "policy": {"max_results": 2}}')
        assert rc == 0 and conf["result"]["pipeline"]["threshold"] == 0.0
        w.wait_json("/results/colors", lambda m: any(len(r["classes"]) == 2 for r in m), timeout=30)

        rc, (stopped,) = fleet(broker.port, "cmd", "d-main", "stop", '{"pipeline": "colors"}')
        assert rc == 0 and stopped["result"]["pipelines"][0]["state"] == "stopped"
        rc, (status,) = fleet(broker.port, "cmd", "d-main", "status")
        assert status["result"]["pipeline_stats"]["colors"]["state"] == "stopped"
        assert status["result"]["spool"]["dropped"] == 0 and status["result"]["link"]["connects"] == 1
        seq_when_stopped = max(r["seq"] for r in w.json("/results/colors"))
        rc, (_started,) = fleet(broker.port, "cmd", "d-main", "start")
        assert rc == 0
        after = w.wait_json("/results/colors", lambda m: max(r["seq"] for r in m) > seq_when_stopped, timeout=30)
        assert [r["seq"] for r in after] == list(range(1, len(after) + 1))  # no gap, no repeat

        rc, (bench,) = fleet(broker.port, "cmd", "d-main", "bench", '{"pipeline": "colors", "runs": 5}')
        assert rc == 0 and bench["result"]["items"] == 5 and bench["result"]["invoke_ms"]["p50"] > 0

        rc, (bad,) = fleet(broker.port, "cmd", "d-main", "configure", '{"pipeline": "nope", "fps": 2}')
        assert rc == 1 and bad["error"]["code"] == "not_found"

        config.write_text(config.read_text() + f"""
[[pipelines]]
name = "pattern"
source = "test:pattern"
model = "{fixtures / 'colors_int8.json'}"
[pipelines.source_options]
fps = 5
""")
        rc, (reload,) = fleet(broker.port, "cmd", "d-main", "reload")
        assert rc == 0 and reload["result"]["added"] == ["pattern"] and reload["result"]["unchanged"] == ["colors"]
        w.wait_json("/results/pattern", lambda m: len(m) >= 1, timeout=30)

        assert daemon.terminate(signal.SIGTERM) == 0
        final = w.wait_json("/status", lambda m: m[-1]["state"] == "stopped", timeout=10)[-1]
        assert final["bdseq"] == online["bdseq"]
    err = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in err


def test_sigkill_while_broker_down_loses_nothing(tmp_path: Path, own_broker: Broker, fixtures: Path) -> None:
    config = write_config(tmp_path, own_broker.port, fixtures, fps=50, hold=1)
    # A durable subscriber: the broker keeps what arrives while it is away.
    sub = Watcher(own_broker.port, ["lepton/dev1/results/#"], client_id="durable", clean=False).start()
    with Daemon(config) as daemon:
        sub.wait_json("/results/colors", lambda m: len(m) >= 20, timeout=60)
        own_broker.stop()
        spool = tmp_path / "state" / "spool.sqlite3"

        def queued() -> int:
            import sqlite3

            with sqlite3.connect(spool) as db:
                return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

        waited = threading.Event()
        while queued() < 30 and not waited.wait(0.1):
            pass
        daemon.terminate(signal.SIGKILL)
    sub.stop()
    own_broker.start()
    sub = Watcher(own_broker.port, ["lepton/dev1/results/#"], client_id="durable", clean=False).start()
    with Daemon(config) as daemon:
        got = sub.wait_json("/results/colors", lambda m: sum(1 for r in m if not r.get("historical")) >= 5,
                            timeout=60)
        daemon.terminate()
    sub.stop()
    seqs = [r["seq"] for r in got]
    before = sub.messages  # noqa: F841 - kept for debugging a failure
    historical = [r for r in got if r.get("historical")]
    assert len(historical) >= 30
    # Over both runs, every seq from 1 on arrived (duplicates allowed: at least once), in order.
    seen = sorted(set(seqs))
    assert seen == list(range(seen[0], seen[-1] + 1))
    assert [s for s in seqs if s in {r["seq"] for r in historical}] == sorted(r["seq"] for r in historical)


def test_hostile_payloads_through_the_broker(tmp_path: Path, broker: Broker, fixtures: Path) -> None:
    config = write_config(tmp_path, broker.port, fixtures, device="d-hostile")
    with Watcher(broker.port, ["lepton/d-hostile/#"]) as w, Daemon(config):
        w.wait_json("/status", lambda m: bool(m), timeout=60)
        host: dict[str, Any] = {"hostname": "127.0.0.1", "port": broker.port}
        hostile = [b"", b"\xff\xfe\xfd", b"x" * (10 * 1024 * 1024), b"[" * 100000,
                   b'{"id": "n", "action": "ping", "ts": NaN}', b'{"id": "h", "action": "ping", "ts": 1e999999}',
                   b'{"id": "d", "id": "e", "action": "ping"}', b'{"id": "t", "action": 5}',
                   b'{"id": "u", "action": "format_disk"}', b'{"action": "ping"}']
        for payload in hostile:
            publish.single("lepton/d-hostile/cmd", payload, qos=1, **host)
        publish.multiple([{"topic": "lepton/all/cmd", "payload": json.dumps({"id": f"f{i}", "action": "ping"}),
                           "qos": 0} for i in range(1000)], **host)
        # The flood may fill the command queue (dropped and counted); once it drains, a valid
        # command is answered. Each try has its own id: one reply per id.
        answered = None
        for attempt in range(30):
            cid = f"after-{attempt}"
            publish.single("lepton/d-hostile/cmd", json.dumps({"id": cid, "action": "ping"}), qos=1, **host)
            needle = f'"{cid}"'.encode()
            if w.wait_for(lambda m: any(needle in p for t, p, _ in m if t.endswith("/reply")), timeout=3):  # noqa: B023
                answered = cid
                break
        assert answered is not None
        replies = w.json("/reply")
        by_id = {r["id"]: r for r in replies}
        assert by_id[answered]["ok"] is True
        assert by_id["n"]["error"]["code"] == "bad_json" and by_id["h"]["error"]["code"] == "bad_json"
        assert by_id["t"]["error"]["code"] == "bad_request" and by_id["u"]["error"]["code"] == "unknown_action"
        assert len([r for r in replies if r["id"] == answered]) == 1
        _rc, (status,) = fleet(broker.port, "cmd", "d-hostile", "status")
        commands = status["result"]["commands"]
        assert commands["dropped"] >= 4  # empty, invalid UTF-8, [[[…, no id, (10 MB if the broker passed it)
        assert status["result"]["link"]["callback_errors"] == 0
        assert status["result"]["pipeline_stats"]["colors"]["state"] == "running"


# -- the supervisor, in-process ---------------------------------------------------------------


class _Failing(Source):
    fails = 0

    def open(self) -> None:
        pass

    def read(self, timeout: float) -> Item | None:
        _Failing.fails += 1
        raise RuntimeError("camera fell off")

    def close(self) -> None:
        pass


def test_supervisor_restarts_with_backoff_then_parks(fixtures: Path, source_kind: RegisterSource) -> None:
    source_kind(lambda uri: uri == "failing:", _Failing)
    settings = PipelineSettings(name="p", source="failing:", model=fixtures / "colors_int8.json")
    stop = threading.Event()
    pipeline = Pipeline(settings, profile=load_profile("generic-x86_64"),
                        supervisor=SupervisorSection(backoff_min_s=0.01, backoff_max_s=0.02, max_restarts=3,
                                                     window_s=600),
                        backend=None, sink=lambda n, p: None, stop=stop)
    pipeline.start()
    assert pipeline.join(30)
    assert pipeline.stats.state == "failed" and pipeline.stats.restarts == 3
    assert pipeline.stats.errors == 4 and "camera fell off" in (pipeline.stats.last_error or "")
    pipeline.start()  # a start command tries again with a fresh budget
    assert pipeline.join(30) and pipeline.stats.restarts == 6


def test_configuration_problems_are_not_retried(tmp_path: Path, fixtures: Path, models_dir: Path) -> None:
    # A wake word model fed frames: a configuration error, parked at once.
    settings = PipelineSettings(name="p", source="test:colors", model=models_dir / "wakeword" / "alexa.json")
    pipeline = Pipeline(settings, profile=load_profile("generic-x86_64"), supervisor=SupervisorSection(),
                        backend=None, sink=lambda n, p: None, stop=threading.Event())
    pipeline.start()
    assert pipeline.join(30)
    assert pipeline.stats.state == "failed" and pipeline.stats.restarts == 0
    # Parked on the first error, which is kept as the BadInput's own message (a crash would read "TypeError: …").
    assert pipeline.stats.errors == 1
    assert pipeline.stats.last_error == "pipeline p: source test:colors gives frames, the model's task takes audio"


class _LockChecked(dict[str, Pipeline]):
    """The daemon's pipelines, counting every walk over them made without the daemon's lock."""

    def __init__(self, lock: Any, items: dict[str, Pipeline]) -> None:
        super().__init__(items)
        self.lock = lock
        self.unlocked: list[str] = []

    def _check(self, how: str) -> None:
        if not self.lock.locked():
            self.unlocked.append(how)

    def values(self) -> Any:
        self._check("values")
        return super().values()

    def items(self) -> Any:
        self._check("items")
        return super().items()

    def __iter__(self) -> Any:
        self._check("iter")
        return super().__iter__()


def test_status_line_and_shutdown_walk_the_pipelines_under_the_lock(tmp_path: Path, fixtures: Path) -> None:
    # Fault 9: `reload` changes the pipelines in the command worker while these walk them.
    from agent.config_load import load
    from agent.daemon import Agent

    agent = Agent(load(str(write_config(tmp_path, 1, fixtures))))
    agent.pipelines[agent.eff.config.pipelines[0].name] = agent._pipeline(agent.eff.config.pipelines[0])
    checked = _LockChecked(agent._lock, agent.pipelines)
    agent.pipelines = checked
    assert "0/1 pipelines running" in agent.status_line()
    agent.shutdown()
    assert checked.unlocked == []


def test_bench_runs_the_running_model_off_the_command_worker_one_at_a_time(tmp_path: Path, fixtures: Path) -> None:
    # Fault 11: bench loaded the configured file (not what runs), with uncapped threads, in the command worker.
    from test_pipeline import Seen

    from agent.command_bus import Later
    from agent.commands import Bench, CommandError
    from agent.config_load import load
    from agent.daemon import Agent
    from agent.variants import cheaper_variants

    agent = Agent(load(str(write_config(tmp_path, 1, fixtures))))
    model = fixtures / "colors_bench_variants.json"
    p = agent._pipeline(PipelineSettings(name="cam", source="test:colors", model=model))
    p.sink = lambda name, payload: None  # no spool: the agent is not prepared
    agent.pipelines["cam"] = p
    (variant,) = cheaper_variants(load_spec(model))
    seen = Seen()
    p.slot.attach(seen)
    p.start()
    try:
        assert seen.more(1)
        p.slot.use_variant(variant)  # what the governor does under pressure
        assert seen.more(2) and p.variant == variant.file
        later = agent.actions.bench(Bench(id="b1", action="bench", pipeline="cam", runs=300))
        assert isinstance(later, Later)  # answered from its own thread, not the command worker's
        got: list[Any] = []
        later.then(lambda result, error: got.append((result, error)))
        if not later.finished.is_set():
            with pytest.raises(CommandError) as busy:
                agent.actions.bench(Bench(id="b2", action="bench", pipeline="cam", runs=5))
            assert busy.value.code == "busy"
        assert later.finished.wait(120)
        result, error = got[0]
        assert error is None, error
        assert result["running"] == {"name": "colors-bench", "version": 1, "variant": variant.file}
        assert Path(result["model"]).name == variant.file
        assert result["threads"] <= agent.eff.profile.threads
        assert result["items"] == 300
    finally:
        p.halt()
        p.join(10)
