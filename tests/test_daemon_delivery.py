"""Model delivery into the real daemon: `lepton-fleet publish` + `deploy` to a running `lepton-agent run`
through a real mosquitto; the pipeline swaps models between two items (no gap in `seq`), bad models
roll back by themselves, `rollback` returns to a kept version, shadow deploys are promoted or refused
by the command's thresholds, and a restarted agent keeps running the delivered model."""

from __future__ import annotations

import json
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, Watcher, wait_until
from conftest import run_cli
from delivery_kit import Keys, connect, new_keys, publish
from test_daemon import Daemon

from agent.delivery.signing import generate_key_file, key_id, public_text
from agent.mqtt.topics import FleetTopics

DEVICE = "cam-1"


def _pipeline(name: str, fixtures: Path, hold: int = 4, fps: float = 20, options: str = "") -> str:
    return f"""
[[pipelines]]
name = "{name}"
source = "test:colors"
model = "{fixtures / 'colors_int8.json'}"
threshold = 0.5
[pipelines.source_options]
fps = {fps}
hold = {hold}
width = 64
height = 48
{options}
[pipelines.policy]
on_change = true
max_rate = 100
"""


def write_config(tmp: Path, port: int, prefix: str, keys: Keys, pipelines: str, probation_s: float = 2.0,
                 stall_s: float = 10.0) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
device_id = "{DEVICE}"
state_dir = "{tmp / 'state'}"
[mqtt]
broker = "mqtt://127.0.0.1:{port}"
prefix = "{prefix}"
keepalive_s = 5
[delivery]
probation_s = {probation_s}
stall_s = {stall_s}
[trusted_keys]
"{keys.kid}" = "{public_text(keys.private.public_key())}"
{pipelines}
""")
    return path


def fleet(broker: Broker, prefix: str, *args: str, timeout: float = 90) -> tuple[int, list[dict[str, Any]]]:
    r = run_cli(*args, "--broker", broker.url, "--prefix", prefix, "--format", "json", "--timeout", str(timeout),
                prog="fleet", timeout=timeout + 60)
    return r.rc, [json.loads(line) for line in r.out.splitlines() if line.strip().startswith("{")]


def variant(tmp: Path, fixtures: Path, model: str = "colors_int8.tflite", pad: int = 0, **fields: Any) -> Path:
    """A manifest like colors_int8's for another file or with other fields (labels, …). `pad` zero bytes
    after the flatbuffer make a file that runs the same and is another object in the content-addressed store."""
    manifest = json.loads((fixtures / "colors_int8.json").read_text())
    name = f"variant-{uuid.uuid4().hex[:6]}"
    manifest.update(file=f"{name}.tflite", **fields)
    manifest.pop("sha256"), manifest.pop("size")
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(manifest))
    (tmp / f"{name}.tflite").write_bytes((fixtures / model).read_bytes() + b"\0" * pad)
    return path


def states(w: Watcher, version: Any | None = None) -> list[dict[str, Any]]:
    return [s for s in w.json("/deploy") if version is None or s["version"] == version]


def wait_state(w: Watcher, version: Any, state: str, timeout: float = 90) -> dict[str, Any]:
    got = w.wait_json("/deploy", lambda m: any(s["version"] == version and s["state"] == state for s in m),
                      timeout=timeout)
    return next(s for s in reversed(got) if s["version"] == version and s["state"] == state)


def results(w: Watcher, pipeline: str = "colors") -> list[dict[str, Any]]:
    return w.json(f"/results/{pipeline}")


def no_gap(rs: list[dict[str, Any]]) -> list[Any]:
    """Every seq once, in order, from the first; the model versions in that order."""
    live = [r for r in rs if not r.get("historical")]
    seqs = [r["seq"] for r in live]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    return [r["model"]["version"] for r in live]


def switched_once(versions: list[Any], old: Any, new: Any) -> None:
    assert versions[0] == old and versions[-1] == new, versions
    first = versions.index(new)
    assert set(versions[:first]) == {old} and set(versions[first:]) == {new}, versions


@pytest.fixture
def keys() -> Keys:
    return new_keys()


@pytest.fixture
def prefix() -> str:
    # Each test its own topic tree on the shared broker: retained models and states never leak across tests.
    return f"t{uuid.uuid4().hex[:10]}"


def test_deploy_swaps_the_running_pipeline_and_survives_a_restart(tmp_path: Path, broker: Broker, fixtures: Path,
                                                                  keys: Keys, prefix: str) -> None:
    key_file = tmp_path / "release.key"
    generate_key_file(key_file)
    from agent.delivery.signing import load_private_key

    signing = Keys(load_private_key(key_file))
    config = write_config(tmp_path, broker.port, prefix, signing, _pipeline("colors", fixtures))
    v2 = variant(tmp_path, fixtures, version=2)
    # Small chunks: the model crosses the daemon's link in several retained messages and windows.
    r = run_cli("publish", str(v2), "--name", "colors", "--version", "2", "--key", str(key_file), "--chunk-size",
                "1024", "--broker", broker.url, "--prefix", prefix, "--format", "json", prog="fleet")
    assert r.rc == 0, r.err
    assert json.loads(r.out)["chunks"] == 6

    with Watcher(broker.port, [f"{prefix}/{DEVICE}/#"]) as w, Daemon(config) as daemon:
        w.wait_json("/results/colors", lambda m: len(m) >= 3, timeout=60)
        rc, rows = fleet(broker, prefix, "deploy", "colors@2", "--to", DEVICE)
        assert rc == 0, rows
        assert [(row["device"], row["state"], row["active"]) for row in rows] == [(DEVICE, "active", 2)]
        w.wait_json("/results/colors", lambda m: sum(r["model"]["version"] == 2 for r in m) >= 3, timeout=30)

        # Every state of the deployment, retained on the deploy topic, in order, with the command's id.
        seen = states(w, 2)
        order = [s["state"] for s in seen]
        assert order[0] == "queued" and order[-1] == "active", order
        assert [k for i, k in enumerate(order) if i == 0 or k != order[i - 1]] == [
            "queued", "downloading", "verifying", "activating", "active"], order
        assert len({s["id"] for s in seen}) == 1
        assert [s["progress"] for s in seen if s["state"] == "downloading"][-1] == 1.0
        assert {s.get("phase") for s in seen if s["state"] == "activating"} == {"probation"}
        assert seen[-1]["active"] == 2 and seen[-1]["selftest_ms"] > 0
        retained = Watcher(broker.port, [f"{prefix}/{DEVICE}/deploy"]).start()
        try:
            last = retained.wait_json("/deploy", lambda m: bool(m), timeout=10)[-1]
        finally:
            retained.stop()
        assert (last["state"], last["version"]) == ("active", 2)

        # One loop throughout: the swap happened between two items, seq never skipped or repeated.
        switched_once(no_gap(results(w)), 1, 2)
        rc, (status,) = fleet(broker, prefix, "cmd", DEVICE, "status", timeout=20)
        stats = status["result"]["pipeline_stats"]["colors"]
        assert (stats["restarts"], stats["swaps"], stats["state"]) == (0, 1, "running")
        assert status["result"]["models"]["colors"]["version"] == 2
        w.wait_json("/status", lambda m: m[-1]["models"].get("colors", {}).get("version") == 2, timeout=10)
        rc, (models,) = fleet(broker, prefix, "cmd", DEVICE, "models", timeout=20)
        assert models["result"]["models"]["colors"] == {"active": 2, "previous": None, "trial": None}

        # A malformed deploy command gets an error reply naming the field; nothing is queued.
        rc, (bad,) = fleet(broker, prefix, "cmd", DEVICE, "deploy", '{"model": "colors", "version": "2.x"}',
                           timeout=20)
        assert rc == 1 and bad["error"]["code"] == "bad_request" and "version" in bad["error"]["message"]
        assert daemon.terminate(signal.SIGTERM) == 0
    last_seq = max(r["seq"] for r in w.json("/results/colors"))

    # Restarted, the agent runs the delivered model from its first frame, and seq carries on.
    with Watcher(broker.port, [f"{prefix}/{DEVICE}/#"]) as w, Daemon(config) as daemon:
        got = w.wait_json("/results/colors", lambda m: sum(not r.get("historical") for r in m) >= 3, timeout=60)
        live = [r for r in got if not r.get("historical")]
        assert {r["model"]["version"] for r in live} == {2}
        assert live[0]["seq"] > last_seq
        online = w.wait_json("/status", lambda m: m[-1]["state"] == "online", timeout=10)[-1]
        assert online["models"]["colors"]["version"] == 2
        assert daemon.terminate(signal.SIGTERM) == 0
    log = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in log


def test_bad_models_roll_back_by_themselves_and_rollback_returns(tmp_path: Path, broker: Broker, fixtures: Path,
                                                                 keys: Keys, prefix: str) -> None:
    # Two pipelines run the colors model: one sees only red (the self-test's sample comes from it),
    # the other every colour in turn (where fails_on_dark crashes).
    pipelines = _pipeline("steady", fixtures, hold=1_000_000) + _pipeline("cycling", fixtures, hold=1)
    config = write_config(tmp_path, broker.port, prefix, keys, pipelines)  # 2 s probation: 40 frames of cycling
    topics = FleetTopics(prefix)
    with connect(broker.port) as link:
        publish(link, topics, variant(tmp_path, fixtures, version=2), "colors", 2, keys)
        publish(link, topics, variant(tmp_path, fixtures, "invoke_fails.tflite", version=3), "colors", 3, keys)
        publish(link, topics, variant(tmp_path, fixtures, "fails_on_dark.tflite", version=4), "colors", 4, keys)
        # Other bytes than v2's: the store keeps models by content, so v2 stays the previous one.
        publish(link, topics, variant(tmp_path, fixtures, pad=16, version=5), "colors", 5, keys)
        publish(link, topics, variant(tmp_path, fixtures, pad=8, version=0), "colors", 0, keys)

    with Watcher(broker.port, [f"{prefix}/{DEVICE}/#"]) as w, Daemon(config) as daemon:
        w.wait_json("/results/cycling", lambda m: len(m) >= 3, timeout=60)
        assert fleet(broker, prefix, "deploy", "colors@2", "--to", DEVICE)[0] == 0

        # Fails at every invoke: the self-test catches it before any pipeline sees it.
        rc, (row,) = fleet(broker, prefix, "deploy", "colors@3", "--to", DEVICE)
        assert rc == 1 and (row["state"], row["reason"], row["active"]) == ("rolled_back", "invoke_failed", 2)

        # Passes the self-test on a red frame, then crashes the cycling pipeline on green: probation undoes it.
        rc, (row,) = fleet(broker, prefix, "deploy", "colors@4", "--to", DEVICE)
        assert rc == 1 and (row["state"], row["reason"], row["active"]) == ("rolled_back", "pipeline_crashed", 2)
        assert "activating" in [s["state"] for s in states(w, 4)]
        seq_after = max(r["seq"] for r in results(w, "cycling"))
        w.wait_json("/results/cycling", lambda m: sum(r["seq"] > seq_after for r in m) >= 3, timeout=30)

        assert fleet(broker, prefix, "deploy", "colors@5", "--to", DEVICE)[0] == 0
        # After a swap the first result goes out even when the labels did not change (steady sees only red).
        w.wait_json("/results/steady", lambda m: m[-1]["model"]["version"] == 5, timeout=30)
        seq_before = max(r["seq"] for r in results(w, "steady"))
        rc, (row,) = fleet(broker, prefix, "rollback", "colors", "--to", DEVICE)
        assert rc == 0 and (row["state"], row["reason"], row["active"]) == ("rolled_back", None, 2)
        got = w.wait_json("/results/steady", lambda m: any(r["seq"] > seq_before for r in m), timeout=30)
        assert [r["model"]["version"] for r in got if r["seq"] > seq_before] == [2]

        # A version this device does not keep: refused, nothing changes.
        rc, (row,) = fleet(broker, prefix, "rollback", "colors", "--to", DEVICE, "--version", "3")
        assert rc == 1 and row["reason"] == "not_found" and "not_kept" in row["detail"]
        rc, (models,) = fleet(broker, prefix, "cmd", DEVICE, "models", timeout=20)
        assert models["result"]["models"]["colors"] == {"active": 2, "previous": 5, "trial": None}

        # Further back than the store keeps: the config's own model (v1) is the first known good.
        seq_before = max(r["seq"] for r in results(w, "steady"))
        rc, (row,) = fleet(broker, prefix, "rollback", "colors", "--to", DEVICE, "--version", "1")
        assert rc == 0 and (row["state"], row["active"]) == ("rolled_back", 1), row
        got = w.wait_json("/results/steady", lambda m: any(r["seq"] > seq_before for r in m), timeout=30)
        assert [r["model"]["version"] for r in got if r["seq"] > seq_before] == [1]
        rc, (models,) = fleet(broker, prefix, "cmd", DEVICE, "models", timeout=20)
        assert models["result"]["models"]["colors"] == {"active": None, "previous": 2, "trial": None}
        # The configured version counts as the active one: the same again is a no-op, an older one a replay.
        rc, (row,) = fleet(broker, prefix, "deploy", "colors@1", "--to", DEVICE)
        assert rc == 0 and row["state"] == "active" and row["detail"] == "already active"
        rc, (row,) = fleet(broker, prefix, "deploy", "colors@0", "--to", DEVICE)
        assert rc == 1 and (row["state"], row["reason"], row["active"]) == ("failed", "not_newer", 1)
        assert daemon.terminate(signal.SIGTERM) == 0

    # The steady pipeline never failed; it ran 2, then 4 for a moment, then 2, 5 and 2 again: one loop, no gap.
    steady = no_gap(results(w, "steady"))
    assert steady[0] == 1 and steady[-1] == 1 and 3 not in steady and 0 not in steady
    cycling = [r for r in results(w, "cycling") if not r.get("historical")]
    assert [r["seq"] for r in cycling] == list(range(1, len(cycling) + 1))
    assert "Traceback (most recent call last)" in (tmp_path / "agent.log").read_text()  # the crash, logged


def test_a_stall_in_probation_rolls_back(tmp_path: Path, broker: Broker, fixtures: Path, keys: Keys,
                                        prefix: str) -> None:
    # The camera wedges after ten frames (its read blocks until closed): the new model sees no item.
    pipeline = _pipeline("colors", fixtures, options="stall_after = 10")
    config = write_config(tmp_path, broker.port, prefix, keys, pipeline, probation_s=30, stall_s=1)
    with connect(broker.port) as link:
        publish(link, FleetTopics(prefix), variant(tmp_path, fixtures, version=2), "colors", 2, keys)
    with Watcher(broker.port, [f"{prefix}/{DEVICE}/#"]) as w, Daemon(config) as daemon:
        # Model 1 ran. Not "three results": a start slower than the source's 20 fps (a loaded machine) gets its
        # ten frames in a burst that the fps limit thins out, and the camera wedges before three changes show.
        w.wait_json("/results/colors", lambda m: len(m) >= 1, timeout=60)
        rc, (row,) = fleet(broker, prefix, "deploy", "colors@2", "--to", DEVICE)
        assert rc == 1 and (row["state"], row["reason"], row["active"]) == ("rolled_back", "pipeline_stalled", 1)
        rc, (models,) = fleet(broker, prefix, "cmd", DEVICE, "models", timeout=20)
        assert models["result"]["models"]["colors"] == {"active": None, "previous": None, "trial": None}
        assert daemon.terminate(signal.SIGTERM) == 0


def test_an_agent_killed_in_probation_comes_back_on_the_previous_model(tmp_path: Path, broker: Broker,
                                                                       fixtures: Path, keys: Keys,
                                                                       prefix: str) -> None:
    config = write_config(tmp_path, broker.port, prefix, keys, _pipeline("colors", fixtures), probation_s=120)
    with connect(broker.port) as link:
        publish(link, FleetTopics(prefix), variant(tmp_path, fixtures, version=2), "colors", 2, keys)
    with Watcher(broker.port, [f"{prefix}/{DEVICE}/#"]) as w:
        with Daemon(config) as daemon:
            w.wait_json("/results/colors", lambda m: len(m) >= 3, timeout=60)
            rc, _ = fleet(broker, prefix, "deploy", "colors@2", "--to", DEVICE, "--no-wait")
            assert rc == 0
            wait_state(w, 2, "activating")
            w.wait_json("/results/colors", lambda m: m[-1]["model"]["version"] == 2, timeout=30)
            # The deployment owns the model until it ends: a rollback now is refused, not half done.
            rc, (row,) = fleet(broker, prefix, "rollback", "colors", "--to", DEVICE)
            assert rc == 1 and row["state"] == "refused" and "is being deployed" in row["detail"], row
            daemon.terminate(signal.SIGKILL)  # whatever killed it, the model on trial is not trusted
        seq_killed = max(r["seq"] for r in results(w))
        with Daemon(config) as daemon:
            undone = wait_state(w, 2, "rolled_back")
            assert (undone["reason"], undone.get("active")) == ("restarted_in_probation", 1)
            got = w.wait_json("/results/colors", lambda m: sum(r["seq"] > seq_killed for r in m) >= 3, timeout=60)
            assert {r["model"]["version"] for r in got if r["seq"] > seq_killed and not r.get("historical")} == {1}
            # Not resumed either: a model that brought the agent down would do it again.
            rc, (models,) = fleet(broker, prefix, "cmd", DEVICE, "models", timeout=20)
            assert models["result"]["pending"] == {}
            assert models["result"]["models"]["colors"] == {"active": None, "previous": None, "trial": None}
            assert daemon.terminate(signal.SIGTERM) == 0


def test_shadow_deploys_are_refused_or_promoted_by_their_thresholds(tmp_path: Path, broker: Broker, fixtures: Path,
                                                                     keys: Keys, prefix: str) -> None:
    config = write_config(tmp_path, broker.port, prefix, keys, _pipeline("colors", fixtures, hold=2), probation_s=1)
    with connect(broker.port) as link:
        publish(link, FleetTopics(prefix), variant(tmp_path, fixtures, version=2), "colors", 2, keys)
        # The same network with its labels shifted: it runs fine and names another colour for every frame.
        publish(link, FleetTopics(prefix), variant(tmp_path, fixtures, version=3, labels=["green", "blue", "red"]),
                "colors", 3, keys)
    # A generous latency ratio: this test judges agreement, never the timing of a shared machine.
    shadow = ("--shadow", "20", "--min-agreement", "0.9", "--max-latency-ratio", "100")
    with Watcher(broker.port, [f"{prefix}/{DEVICE}/#"]) as w, Daemon(config) as daemon:
        w.wait_json("/results/colors", lambda m: len(m) >= 3, timeout=60)
        for version, state, reason, agreement, now in [(3, "rolled_back", "shadow_agreement", 0.0, 1),
                                                       (2, "active", None, 1.0, 2)]:
            rc, (row,) = fleet(broker, prefix, "deploy", f"colors@{version}", "--to", DEVICE, *shadow)
            assert (rc, row["state"], row["reason"], row["active"]) == (int(state != "active"), state, reason, now)
            final = states(w, version)[-1]
            assert final["shadow"]["items"] == 20 and final["shadow"]["agreement"] == agreement
            assert final["shadow"]["latency_ms"]["candidate_p95"] > 0
            phases = [(s["state"], s.get("phase")) for s in states(w, version)]
            assert ("activating", "shadow") in phases
            assert (("activating", "probation") in phases) == (state == "active")
            # The active model answered every frame of the trial: results kept coming from it alone.
            seq_after = max(r["seq"] for r in results(w))
            got = w.wait_json("/results/colors", lambda m: sum(r["seq"] > seq_after for r in m) >= 2,  # noqa: B023
                              timeout=30)
            assert {r["model"]["version"] for r in got if r["seq"] > seq_after} == {now}
        assert daemon.terminate(signal.SIGTERM) == 0
    versions = no_gap(results(w))
    switched_once(versions, 1, 2)


def test_trusted_keys_in_the_config(tmp_path: Path, fixtures: Path) -> None:
    key_file = tmp_path / "release.key"
    public = generate_key_file(key_file).public_key()
    kid = key_id(public)

    def check(entry: str) -> Any:
        path = tmp_path / "agent.toml"
        path.write_text(f'[agent]\ndevice_id = "d"\nstate_dir = "{tmp_path / "state"}"\n\n'
                        f'[trusted_keys]\n"{kid}" = {entry}\n')
        return run_cli("check-config", "--config", str(path))

    r = check(f'{{ file = "{key_file.name}.pub" }}')  # the PEM keygen writes, relative to the config
    assert r.rc == 0, r.err
    assert json.loads(r.out)["trusted_keys"] == {kid: {"file": str(tmp_path / "release.key.pub")}}
    assert check(f'"{public_text(public)}"').rc == 0
    for entry, problem in [('"not base64!"', "not a base64 Ed25519 public key"),
                           (f'"{public_text(new_keys().private.public_key())}"', "the id does not match the key"),
                           ('{ file = "gone.pub" }', "cannot read the key file")]:
        r = check(entry)
        assert r.rc == 2 and len(r.err_lines) == 1 and "Traceback" not in r.err, r.err
        assert f'trusted_keys."{kid}" (line 6): ' in r.err_lines[0] and problem in r.err_lines[0], r.err
    path = tmp_path / "agent.toml"
    path.write_text('[trusted_keys]\n"ed25519:xyz" = "abc"\n')
    r = run_cli("check-config", "--config", str(path))
    assert r.rc == 2 and "trusted_keys.ed25519:xyz (line 2)" in r.err_lines[0], r.err


def test_link_serves_other_subscribers_across_reconnects(tmp_path: Path) -> None:
    """The daemon's link as delivery's `Link`: retained messages on subscribe, again after the broker
    comes back, none after unsubscribe; a failing callback is counted and survived."""
    from test_link import _close, make_link

    with Broker(tmp_path / "broker", persistence=True) as b:
        with connect(b.port) as pub:
            pub.publish_wait("m/chunk/0", b"zero", retain=True)
            pub.publish_wait("m/chunk/1", b"one", retain=True)
            pub.publish_wait("x/bad", b"?", retain=True)
        a = make_link(tmp_path, b.url)
        got: list[tuple[str, bytes]] = []
        cond = threading.Condition()

        def on(topic: str, payload: bytes) -> None:
            with cond:
                got.append((topic, payload))
                cond.notify_all()

        def wait(n: int) -> bool:
            with cond:
                return cond.wait_for(lambda: len(got) >= n, 15)

        def boom(topic: str, payload: bytes) -> None:
            raise RuntimeError("handler bug")

        a.link.subscribe("m/chunk/0", on)  # before the first connect: subscribed on it
        a.link.start()
        assert wait(1) and got == [("m/chunk/0", b"zero")]
        a.link.subscribe("x/+", boom)
        a.link.subscribe("m/chunk/1", on)  # from another thread, while connected
        assert wait(2) and got[1] == ("m/chunk/1", b"one")
        a.link.unsubscribe("m/chunk/0")
        a.link.unsubscribe("x/+")
        b.stop()
        b.start()
        assert wait_until(lambda: a.link.stats.connects >= 2 and a.link.connected.is_set(), 15)
        assert wait(3) and got[2] == ("m/chunk/1", b"one")  # re-subscribed: the broker sent it again
        a.link.subscribe("m/echo", on)
        a.link.publish("m/echo", b"back", qos=1)
        assert wait(4) and got[-1] == ("m/echo", b"back")
        assert len(got) == 4 and ("m/chunk/0", b"zero") not in got[1:]
        assert a.link.stats.callback_errors >= 1  # boom, survived
        assert a.commands == []  # nothing of this reached the command handler
        _close(a)


def test_delivery_off_refuses_its_commands(tmp_path: Path, fixtures: Path) -> None:
    from agent.config_load import load
    from agent.daemon import Agent

    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\ndevice_id = "d"\nstate_dir = "{tmp_path / "state"}"\n[delivery]\nenabled = false\n'
                    f'[[pipelines]]\nname = "colors"\nsource = "test:colors"\n'
                    f'model = "{fixtures / "colors_int8.json"}"\n')
    agent = Agent(load(path))
    agent.prepare()  # nothing is started: no link, no pipeline thread
    try:
        assert agent.commands is not None and agent.store is None
        reply = agent.commands.handle("lepton/d/cmd", b'{"id": "1", "action": "deploy", "model": "colors", '
                                                      b'"version": 2}')
        assert reply is not None and reply["error"]["code"] == "unsupported", reply
        reply = agent.commands.handle("lepton/d/cmd", b'{"id": "2", "action": "rollback", "model": "a/b"}')
        assert reply is not None and reply["error"]["code"] == "bad_request" and "model" in reply["error"]["message"]
        assert not (tmp_path / "state" / "models").exists()
    finally:
        assert agent.spool is not None and agent.state is not None
        agent.spool.close()
        agent.state.close()


def test_reload_in_probation_keeps_the_pipeline_and_the_store_in_agreement(tmp_path: Path, broker: Broker,
                                                                         fixtures: Path, keys: Keys,
                                                                         prefix: str) -> None:
    # Fault 2: a reload that rebuilt the pipeline left the deployment watching the retired one; it stalled,
    # the store rolled back, and the new pipeline went on running the model on trial.
    config = write_config(tmp_path, broker.port, prefix, keys, _pipeline("colors", fixtures, hold=1),
                          probation_s=8, stall_s=3)
    with connect(broker.port) as link:
        publish(link, FleetTopics(prefix), variant(tmp_path, fixtures, version=2), "colors", 2, keys)
    with Watcher(broker.port, [f"{prefix}/{DEVICE}/#"]) as w, Daemon(config) as daemon:
        w.wait_json("/results/colors", lambda m: len(m) >= 3, timeout=60)
        assert fleet(broker, prefix, "deploy", "colors@2", "--to", DEVICE, "--no-wait")[0] == 0
        wait_state(w, 2, "activating")
        config.write_text(config.read_text().replace("threshold = 0.5", "threshold = 0.4"))
        rc, (reply,) = fleet(broker, prefix, "cmd", DEVICE, "reload", timeout=30)
        assert rc == 0 and reply["result"]["restarted"] == ["colors"], reply
        final = w.wait_json("/deploy", lambda m: any(s["version"] == 2 and s["state"] in ("active", "rolled_back")
                                                     for s in m), timeout=90)[-1]
        rc, (models,) = fleet(broker, prefix, "cmd", DEVICE, "models", timeout=20)
        active = models["result"]["models"]["colors"]["active"] or 1  # None: the config's model, version 1
        assert active == (2 if final["state"] == "active" else 1), (final, models)
        seen = len(results(w))
        got = w.wait_json("/results/colors", lambda m: len(m) >= seen + 10, timeout=60)
        assert {r["model"]["version"] for r in got[-3:]} == {active}, (final, [r["model"] for r in got[-3:]])
        assert daemon.terminate(signal.SIGTERM) == 0


def test_reload_rotates_trusted_keys_and_names_what_needs_a_restart(tmp_path: Path, broker: Broker, fixtures: Path,
                                                                    keys: Keys, prefix: str) -> None:
    # Fault 8: reload ignored [trusted_keys], [supervisor] and [delivery] and said nothing about it.
    rotated = new_keys()
    pipeline = _pipeline("colors", fixtures)
    config = write_config(tmp_path, broker.port, prefix, keys, pipeline)
    with connect(broker.port) as link:
        publish(link, FleetTopics(prefix), variant(tmp_path, fixtures, version=2), "colors", 2, rotated)
    with Watcher(broker.port, [f"{prefix}/{DEVICE}/#"]) as w, Daemon(config) as daemon:
        w.wait_json("/results/colors", lambda m: len(m) >= 3, timeout=60)
        write_config(tmp_path, broker.port, prefix, rotated, pipeline, probation_s=3.0)
        config.write_text(config.read_text() + "\n[supervisor]\nmax_restarts = 7\n")
        rc, (reply,) = fleet(broker, prefix, "cmd", DEVICE, "reload", timeout=30)
        assert rc == 0, reply
        rc, (row,) = fleet(broker, prefix, "deploy", "colors@2", "--to", DEVICE)
        assert rc == 0 and (row["state"], row["active"]) == ("active", 2), row  # signed with the new key
        assert reply["result"]["applied"] == ["supervisor", "trusted_keys"], reply
        assert reply["result"]["restart_needed"] == ["delivery"], reply  # probation_s changed
        assert reply["result"]["unchanged"] == ["colors"]
        assert daemon.terminate(signal.SIGTERM) == 0


def _delivered(name: str, model: str) -> str:
    return f"""
[[pipelines]]
name = "{name}"
source = "test:colors"
delivered = "{model}"
[pipelines.source_options]
fps = 20
hold = 1
width = 64
height = 48
[pipelines.policy]
on_change = true
max_rate = 100
"""


def test_delivered_pipelines_wait_start_on_deployment_and_keep_their_model(
        tmp_path: Path, broker: Broker, fixtures: Path, keys: Keys, prefix: str) -> None:
    pipelines = _delivered("door", "faces") + _delivered("hall", "faces")
    config = write_config(tmp_path, broker.port, prefix, keys, pipelines)
    topics = FleetTopics(prefix)
    with connect(broker.port) as link:
        publish(link, topics, variant(tmp_path, fixtures, version=1), "faces", 1, keys)
        publish(link, topics, variant(tmp_path, fixtures, pad=16, version=2), "faces", 2, keys)

    def stats(name: str) -> dict[str, Any]:
        rc, (status,) = fleet(broker, prefix, "cmd", DEVICE, "status", timeout=20)
        assert rc == 0, status
        return status["result"]["pipeline_stats"][name]

    with Watcher(broker.port, [f"{prefix}/{DEVICE}/#"]) as w, Daemon(config) as daemon:
        w.wait_json("/status", lambda m: bool(m) and m[-1]["state"] == "online" and
                    [p["state"] for p in m[-1]["pipelines"]] == ["waiting_for_model"] * 2, timeout=60)
        door = stats("door")
        assert (door["state"], door["restarts"], door["errors"]) == ("waiting_for_model", 0, 0), door

        # Stopped on purpose, a waiting pipeline stays stopped when the model arrives; started, it waits again.
        rc, (reply,) = fleet(broker, prefix, "cmd", DEVICE, "stop", '{"pipeline": "hall"}', timeout=20)
        assert rc == 0 and reply["result"]["pipelines"][0]["state"] == "stopped", reply
        rc, (reply,) = fleet(broker, prefix, "cmd", DEVICE, "start", '{"pipeline": "hall"}', timeout=20)
        assert rc == 0 and reply["result"]["pipelines"][0]["state"] == "waiting_for_model", reply
        assert fleet(broker, prefix, "cmd", DEVICE, "stop", '{"pipeline": "hall"}', timeout=20)[0] == 0

        rc, rows = fleet(broker, prefix, "deploy", "faces@1", "--to", DEVICE)
        assert rc == 0 and [(r["state"], r["active"]) for r in rows] == [("active", 1)], rows
        w.wait_json("/results/door", lambda m: len(m) >= 3, timeout=60)
        assert {r["model"]["version"] for r in results(w, "door")} == {1}
        assert stats("hall")["state"] == "stopped" and not results(w, "hall")

        # Nothing older kept and no file to go back to: the rollback is refused, saying why; door runs on.
        rc, (row,) = fleet(broker, prefix, "rollback", "faces", "--to", DEVICE)
        assert rc == 1 and row["reason"] == "not_found", row
        assert "faces runs by its delivered name in pipeline door, hall" in row["detail"], row
        seq = max(r["seq"] for r in results(w, "door"))
        w.wait_json("/results/door", lambda m: any(r["seq"] > seq for r in m), timeout=30)

        # A newer version swaps in as for any pipeline (no restart), and a rollback returns to the kept one.
        rc, rows = fleet(broker, prefix, "deploy", "faces@2", "--to", DEVICE)
        assert rc == 0 and rows[0]["active"] == 2, rows
        w.wait_json("/results/door", lambda m: m[-1]["model"]["version"] == 2, timeout=30)
        rc, (row,) = fleet(broker, prefix, "rollback", "faces", "--to", DEVICE)
        assert rc == 0 and row["active"] == 1, row
        w.wait_json("/results/door", lambda m: m[-1]["model"]["version"] == 1, timeout=30)
        door = stats("door")
        assert (door["state"], door["restarts"], door["swaps"]) == ("running", 0, 2), door

        # Started now, the stopped one runs the active model at once.
        assert fleet(broker, prefix, "cmd", DEVICE, "start", '{"pipeline": "hall"}', timeout=20)[0] == 0
        w.wait_json("/results/hall", lambda m: len(m) >= 1, timeout=30)
        assert {r["model"]["version"] for r in results(w, "hall")} == {1}
        assert daemon.terminate(signal.SIGTERM) == 0
    assert "Traceback" not in (tmp_path / "agent.log").read_text()
