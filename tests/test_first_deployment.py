"""A fresh device as scripts/install.sh leaves it: the config it writes (docs/agent.device.toml) runs as is
— no pipelines, no trusted key — the agent announces itself and waits; a deployment is refused until the
operator trusts a key, then becomes active. `lepton-fleet` drives it here without `rich` (a device's venv
has no `fleet` extra), so its table and progress come out plain."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, Watcher
from conftest import ROOT, run_cli

from agent.delivery.signing import generate_key_file, key_id, load_private_key, public_text

TEMPLATE = ROOT / "docs" / "agent.device.toml"
# The interpreter refuses `import rich` as if the optional extra were not installed.
NO_RICH = "import sys; sys.modules['rich'] = None; from agent.cli import fleet_main; sys.exit(fleet_main())"
FLEET = "import sys; from agent.cli import fleet_main; sys.exit(fleet_main())"


def _fleet(broker: Broker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NO_RICH, *args, "--broker", broker.url, "--timeout", "90"],
                          capture_output=True, text=True, cwd=ROOT, timeout=180, check=False)


@pytest.fixture
def device(tmp_path: Path, broker: Broker) -> Iterator[dict[str, str]]:
    """The environment the agent of a fresh install runs in (the template itself is used unchanged)."""
    yield {**os.environ, "PYTHONWARNINGS": "ignore", "LEPTON_BROKER": broker.url,
           "LEPTON_DEVICE_ID": f"fresh-{uuid.uuid4().hex[:6]}", "LEPTON_STATE_DIR": str(tmp_path / "state")}


def _run(config: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = (config.parent / "agent.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "agent", "-v", "run", "--config", str(config)], cwd=ROOT,
                            env=env, stdout=log, stderr=log)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_fresh_config_waits_then_takes_a_deployment_from_a_trusted_key_only(
        tmp_path: Path, broker: Broker, fixtures: Path, device: dict[str, str]) -> None:
    config = tmp_path / "agent.toml"
    shutil.copy(TEMPLATE, config)
    fresh = tomllib.loads(config.read_text())
    assert "pipelines" not in fresh and fresh["trusted_keys"] == {}
    dev, model = device["LEPTON_DEVICE_ID"], f"m{uuid.uuid4().hex[:8]}"
    key_file = tmp_path / "release.key"
    generate_key_file(key_file)
    published = subprocess.run(
        [sys.executable, "-c", NO_RICH, "publish", str(fixtures / "colors_int8.json"), "--name", model,
         "--version", "1", "--key", str(key_file), "--broker", broker.url], capture_output=True, text=True,
        cwd=ROOT, timeout=120, check=False)
    assert published.returncode == 0, published.stderr

    def online(n: int) -> None:  # the agent's n-th online announcement: it has subscribed to its commands
        w.wait_json("/status", lambda m: sum(s.get("state") == "online" for s in m) >= n
                    and m[-1].get("state") == "online", timeout=60)

    with Watcher(broker.port, [f"lepton/{dev}/status"]) as w:
        agent = _run(config, device)
        try:
            online(1)
            refused = _fleet(broker, "deploy", f"{model}@1", "--to", dev)
            assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
            lines = refused.stdout.splitlines()
            assert lines[0] == f"deploy {model}@1 to {dev}" and lines[1].split()[:3] == ["DEVICE", "STATE", "VERSION"]
            assert lines[2].split()[:2] == [dev, "failed"] and "untrusted_key" in lines[2], refused.stdout
        finally:
            _stop(agent)

        # The operator trusts their key (as the template's comment says), restarts, deploys again.
        public = load_private_key(key_file).public_key()
        config.write_text(config.read_text() + f'"{key_id(public)}" = "{public_text(public)}"\n')
        agent = _run(config, device)
        try:
            online(2)
            done = _fleet(broker, "deploy", f"{model}@1", "--to", dev)
            assert done.returncode == 0, done.stdout + done.stderr
            row = done.stdout.splitlines()[2].split()
            assert row[:4] == [dev, "active", "1", "1"], done.stdout
            assert dev in done.stderr and "active" in done.stderr  # the plain progress lines
            status = _fleet(broker, "status", "--model", model, "--format", "json")
            assert [json.loads(line)["state"] for line in status.stdout.splitlines()] == ["active"], status.stdout
        finally:
            _stop(agent)


def test_watch_prints_plain_lines_without_rich(broker: Broker) -> None:
    # A retained result: `watch --count 1` gets it at once; the rich markup must not leak into plain text.
    import paho.mqtt.publish as publish

    dev = f"plain-{uuid.uuid4().hex[:6]}"
    payload = {"seq": 7, "pipeline": "colors", "ts": 0, "classes": [{"label": "red", "score": 0.99}]}
    publish.single(f"lepton/{dev}/results/colors", json.dumps(payload), qos=1, retain=True,
                   hostname="127.0.0.1", port=broker.port)
    r = subprocess.run([sys.executable, "-c", NO_RICH, "watch", dev, "--format", "table", "--count", "1",
                        "--seconds", "60", "--broker", broker.url], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    header, line = r.stdout.splitlines()
    assert header.startswith(f"watching lepton/{dev}/results/# on ")
    assert line.endswith(f" {dev} colors #7 red 0.99") and "[" not in line, line


def _publish(fixtures: Path, name: str, version: str, key: Path, broker: Broker) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_RICH, "publish", str(fixtures / "colors_int8.json"), "--name", name,
         "--version", version, "--key", str(key), "--broker", broker.url], capture_output=True, text=True,
        cwd=ROOT, timeout=120, check=False)


def _follow_until_waiting(broker: Broker, dev: str, model: str) -> None:
    """`status --follow` on a pipe, rich installed: rich's Live would draw nothing until it stops, so the live
    table comes as the plain one again on each change. Its row says what the one-shot table says; Ctrl-C ends
    it as the CLI defines (exit 0, the one-shot output after it, no traceback)."""
    follow = subprocess.Popen([sys.executable, "-c", FLEET, "status", "--follow", "--model", model, "--format", "json",
                               "--broker", broker.url, "--timeout", "90"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert follow.stdout is not None and follow.stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read(stream: Any) -> None:
        for x in stream:
            lines.put(x.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, args=(follow.stderr,), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while not (seen and seen[-1].startswith(dev) and seen[-1].endswith(f"door waits for {model}")):
            line = lines.get(timeout=90)
            assert line is not None, "status --follow ended: " + "\n".join(seen)
            seen.append(line)
        follow.send_signal(signal.SIGINT)
        assert follow.wait(60) == 0, "\n".join(seen)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    reader.join(60)
    while (line := lines.get_nowait()) is not None:
        seen.append(line)
    assert f"deployments of {model} (live; Ctrl-C to stop)" in seen, seen
    columns = ["DEVICE", "PRESENCE", "MODEL", "VERSION", "STATE", "PROGRESS", "REASON", "DETAIL"]
    assert columns in [x.split() for x in seen], seen  # the plain table, not rich's (boxes, wrapped cells)
    (row_line,) = {x for x in seen if x.startswith(dev)}
    assert row_line.split()[:3] == [dev, "yes", "waiting_for_model"], seen
    assert not any("Traceback" in x or "KeyboardInterrupt" in x for x in seen), seen
    (row,) = [json.loads(x) for x in follow.stdout.read().splitlines()]
    assert (row["device"], row["state"], row["waiting_for_model"], row["detail"]) == (
        dev, "waiting_for_model", {"door": model}, f"door waits for {model}"), row


def _door(status: dict[str, Any]) -> dict[str, Any]:
    (door,) = [p for p in status["pipelines"] if p["name"] == "door"]
    return door


def test_a_pipeline_naming_a_delivered_model_waits_for_it_then_runs_it(
        tmp_path: Path, broker: Broker, fixtures: Path, device: dict[str, str]) -> None:
    # The fresh device's config, its key trusted and one pipeline that names its model by the name it is deployed
    # under: no model file was copied onto the device, and nobody touches it after this.
    dev, model = device["LEPTON_DEVICE_ID"], f"m{uuid.uuid4().hex[:8]}"
    key_file = tmp_path / "release.key"
    generate_key_file(key_file)
    public = load_private_key(key_file).public_key()
    config = tmp_path / "agent.toml"
    config.write_text(TEMPLATE.read_text() + f'"{key_id(public)}" = "{public_text(public)}"\n\n'
                      f'[[pipelines]]\nname = "door"\nsource = "test:colors"\ndelivered = "{model}"\n')
    published = _publish(fixtures, model, "1", key_file, broker)
    assert published.returncode == 0, published.stderr

    def announced(n: int, state: str) -> dict[str, Any]:  # the n-th run's status once door is in `state`
        return w.wait_json("/status", lambda m: bool(m) and sum(s.get("state") == "stopped" for s in m) >= n - 1
                           and m[-1].get("state") == "online" and _door(m[-1])["state"] == state, timeout=60)[-1]

    with Watcher(broker.port, [f"lepton/{dev}/status", f"lepton/{dev}/results/door"]) as w:
        agent = _run(config, device)
        try:
            door = _door(announced(1, "waiting_for_model"))
            assert door["delivered"] == model and "model" not in door, door
            status = _fleet(broker, "status", "--model", model, "--format", "json")
            (row,) = [json.loads(line) for line in status.stdout.splitlines()]
            assert row["device"] == dev and row["state"] == "waiting_for_model", status.stdout
            assert row["waiting_for_model"] == {"door": model}, status.stdout
            table = _fleet(broker, "status")
            assert f"door waits for {model}" in table.stdout, table.stdout
            _follow_until_waiting(broker, dev, model)
            assert not w.json("/results/door")  # waiting is not running

            # A deployment of the name that fails (signed by a key the device does not trust) leaves door waiting:
            # the row says both, the failure and what still waits for which model.
            other = tmp_path / "other.key"
            generate_key_file(other)
            assert _publish(fixtures, model, "0", other, broker).returncode == 0
            refused = _fleet(broker, "deploy", f"{model}@0", "--to", dev)
            assert refused.returncode == 1 and "untrusted_key" in refused.stdout, refused.stdout + refused.stderr
            table = _fleet(broker, "status")
            (line,) = [x for x in table.stdout.splitlines() if x.startswith(dev)]
            assert line.split()[:3] == [dev, "yes", "failed"] and "untrusted_key" in line, table.stdout
            assert line.endswith(f"; door waits for {model}"), table.stdout
            status = _fleet(broker, "status", "--format", "json")
            (row,) = [r for r in map(json.loads, status.stdout.splitlines()) if r["device"] == dev]
            assert (row["state"], row["waiting_for_model"]) == ("failed", {"door": model}), row

            done = _fleet(broker, "deploy", f"{model}@1", "--to", dev)
            assert done.returncode == 0, done.stdout + done.stderr
            assert done.stdout.splitlines()[2].split()[:3] == [dev, "active", "1"], done.stdout
            first = w.wait_json("/results/door", lambda m: len(m) >= 1, timeout=60)[0]
            assert first["model"]["name"] == model and str(first["model"]["version"]) == "1", first
            door = _door(announced(1, "running"))
            assert door["model"]["name"] == model and door["delivered"] == model, door
        finally:
            _stop(agent)
        before = len(w.json("/results/door"))

        # Restarted with the model active: the pipeline runs it at once, no deployment needed.
        agent = _run(config, device)
        try:
            announced(2, "running")
            again = w.wait_json("/results/door", lambda m: len(m) > before, timeout=60)[before]
            assert again["model"]["name"] == model and str(again["model"]["version"]) == "1", again
        finally:
            _stop(agent)
        assert not any(s.get("state") == "online" and _door(s)["state"] in ("failed", "restarting")
                       for s in w.json("/status"))


def test_the_templates_commented_pipeline_passes_check_config_uncommented(tmp_path: Path) -> None:
    # What the operator does with the template's example: remove the `# ` of the pipeline's lines.
    lines = TEMPLATE.read_text().splitlines()
    table = [i for i, line in enumerate(lines) if line == "# [[pipelines]]"]
    assert len(table) == 1, "the template shows one pipeline to uncomment"
    i = table[0]
    while i < len(lines) and re.match(r"# (\[\[pipelines\]\]|\w+ = )", lines[i]):
        lines[i] = lines[i][2:]
        i += 1
    config = tmp_path / "agent.toml"
    config.write_text("\n".join(lines).replace('"/var/lib/lepton"', f'"{tmp_path / "state"}"'))
    r = run_cli("check-config", "--config", str(config))
    assert r.rc == 0, r.err
    (door,) = json.loads(r.out)["pipelines"]
    assert door["delivered"] == "faces" and door["model"] is None
