"""The fleet on brokers other than one mosquitto: a two-node RabbitMQ cluster (MQTT 3.1.1 only, retained messages
kept per node, `.` in a topic turned into `/`), with the agent on one node and the operator on the other."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fleet_workflow as flow
import paho.mqtt.client as mqtt
import pytest
import rabbitmq
from broker import Broker, Watcher
from conftest import Run, run_cli
from delivery_kit import FIXTURES, CommandDevice, Keys, connect, service, unique_prefix
from test_link import Agentlet, make_link

from agent.delivery.signing import load_private_key
from agent.mqtt.topics import FleetTopics
from agent.version import parse_version

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not rabbitmq.available(), reason="rabbitmq-server missing (scripts/test installs it)")]


def fleet(*args: str) -> Run:
    return run_cli(*args, prog="fleet")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rabbitmq.Cluster]:
    with rabbitmq.Cluster(tmp_path_factory.mktemp("rabbitmq")) as c:
        yield c


@pytest.fixture(autouse=True)
def _node_a_up(request: pytest.FixtureRequest) -> None:
    """The failover test stops node A for good (a restart takes ~100 s): it must stay the module's last test.
    A test placed after it would fail with a bare 'connection refused'; say why instead."""
    if "cluster" in request.fixturenames:
        c: rabbitmq.Cluster = request.getfixturevalue("cluster")
        assert c.a.proc is not None, "node A was stopped by the failover test, which must stay last in test_brokers.py"


def answering_agent(tmp: Path, url: str, prefix: str = "lepton", **settings: Any) -> Agentlet:
    """The daemon's real link as `dev1`, answering every command on its reply topic (as the daemon's commands do)."""
    return flow.device_link(tmp, url, "dev1", prefix=prefix, **settings)


def test_agent_falls_back_to_311_and_says_why(tmp_path: Path, cluster: rabbitmq.Cluster,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """RabbitMQ 3.10 closes the connection on an MQTT 5 CONNECT: the agent (protocol "5", the default) must
    not retry that forever at INFO; it says why at WARNING and talks 3.1.1, across the cluster."""
    caplog.set_level(logging.INFO, logger="agent.mqtt.link")
    with Watcher(cluster.b.mqtt_port, ["lepton/dev1/results/#"], protocol=mqtt.MQTTv311) as w:
        a = make_link(tmp_path, cluster.a.url)
        assert a.link.settings.protocol == "5"
        a.link.start()
        try:
            assert a.link.connected.wait(30)
            a.put(5)
            got = w.wait_json("/results/p", lambda m: len(m) >= 5)
            assert [m["i"] for m in got] == [0, 1, 2, 3, 4]
        finally:
            flow.close_link(a)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("MQTT 5" in m and "trying MQTT 3.1.1" in m for m in warnings), warnings
    assert a.link.stats.connects == 1


def test_fleet_cmd_falls_back_to_311_on_the_other_node(tmp_path: Path, cluster: rabbitmq.Cluster) -> None:
    a = answering_agent(tmp_path, cluster.a.url, protocol="3.1.1")
    a.link.start()
    try:
        assert a.link.subscribed.wait(30)
        r = fleet("cmd", "dev1", "ping", "--broker", cluster.b.url, "--format", "json")
        assert r.rc == 0, r.err
        assert json.loads(r.out)["result"] == {"pong": True}
        assert any("MQTT 5 CONNECT" in line and "connected with MQTT 3.1.1" in line for line in r.err_lines), r.err
        r = fleet("cmd", "dev1", "ping", "--broker", cluster.b.url, "--protocol", "3.1.1", "--format", "json")
        assert r.rc == 0 and r.err_lines == [], r.err
    finally:
        flow.close_link(a)


def test_protocol_on_mosquitto_both_versions_no_fallback(tmp_path: Path, broker: Broker) -> None:
    prefix = unique_prefix()
    a = answering_agent(tmp_path, broker.url, prefix=prefix)
    a.link.start()
    try:
        assert a.link.subscribed.wait(10)
        on = ["--broker", broker.url, "--prefix", prefix]
        for protocol in ("5", "3.1.1"):
            r = fleet("cmd", "dev1", "ping", *on, "--protocol", protocol, "--format", "json")
            assert r.rc == 0 and r.err_lines == [], r.err
        r = fleet("cmd", "dev1", "ping", *on, "--protocol", "4")
        assert r.rc == 2 and "--protocol" in r.err
    finally:
        flow.close_link(a)


def test_fleet_tool_on_a_closed_port_names_it(tmp_path: Path) -> None:
    """Nothing listening: one line, exit 1, no fallback noise."""
    from broker import free_port

    r = fleet("status", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--timeout", "5")
    assert r.rc == 1 and len(r.err_lines) == 1 and "cannot connect" in r.err_lines[0], r.err



@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "release.key"
    assert fleet("keygen", "--out", str(path)).rc == 0
    return path


def test_dotted_version_and_device_id_survive_rabbitmq(tmp_path: Path, cluster: rabbitmq.Cluster, key_file: Path,
                                                       backend: str) -> None:
    """RabbitMQ turns `.` into `/`: `colors@2.0.1` for device `cam.1` must still arrive, be verified and be
    active, with the operator on the other node."""
    keys = Keys(load_private_key(key_file))
    prefix = unique_prefix()
    topics = FleetTopics(prefix)
    assert "." not in topics.manifest("colors", parse_version("2.0.1")) and "." not in topics.deploy("cam.1")
    on_a = ["--broker", cluster.a.url, "--prefix", prefix, "--timeout", "60"]
    on_b = ["--broker", cluster.b.url, "--prefix", prefix, "--timeout", "60"]
    r = fleet("publish", str(FIXTURES / "colors_int8.json"), "--name", "colors", "--version", "2.0.1",
              "--key", str(key_file), *on_a)
    assert r.rc == 0, r.err
    link = connect(cluster.a.mqtt_port)
    try:
        svc = service(link, tmp_path / "store", keys, topics, backend, device="cam.1").start()
        CommandDevice(link, svc, topics, "cam.1")
        r = fleet("deploy", "colors@2.0.1", "--to", "cam.1", "--format", "json", *on_b)
        assert r.rc == 0, (r.out, r.err)
        row = json.loads(r.out.splitlines()[-1])
        assert row["device"] == "cam.1" and row["state"] == "active" and row["version"] == "2.0.1"
    finally:
        link.close()


def test_status_and_watch_find_a_device_on_the_other_node(tmp_path: Path, cluster: rabbitmq.Cluster) -> None:
    """RabbitMQ sends no retained message to `lepton/+/status`, and keeps it on the node it was published on:
    the presence query makes the device say it again, live, and both views see it."""
    a = answering_agent(tmp_path, cluster.a.url, protocol="3.1.1")
    a.link.start()
    try:
        assert a.link.subscribed.wait(30)
        b = ["--broker", cluster.b.url, "--protocol", "3.1.1"]
        r = fleet("status", "--format", "json", *b)
        assert r.rc == 0, r.err
        rows = {row["device"]: row for row in map(json.loads, r.out.splitlines())}
        assert rows["dev1"]["presence"] == "yes", rows
        r = fleet("watch", "--status", "--seconds", "3", "--format", "jsonl", *b)
        assert r.rc == 0, r.err
        lines = [json.loads(line) for line in r.out.splitlines()]
        assert any(x["device"] == "dev1" and x["payload"]["state"] == "online" for x in lines), lines
    finally:
        flow.close_link(a)


def test_deploy_and_rollback_across_nodes_through_the_seeder(tmp_path: Path, cluster: rabbitmq.Cluster,
                                                             key_file: Path, backend: str) -> None:
    """Retained chunks published through node B never reach node A: the devices there find no manifest, ask,
    and one `serve-models` (on node B) answers; deploy and rollback from node B to a group on node A complete."""
    prefix = unique_prefix()
    on_b = ["--broker", cluster.b.url, "--prefix", prefix, "--timeout", "60"]
    stats = flow.deploy_and_rollback(tmp_path, cluster.a.mqtt_port, on_b, key_file, backend, prefix,
                                     seeds=tmp_path / "seeds")
    # Every chunk and the manifest went out at least once, and never more often than they were asked for.
    assert 0 < stats["published"] <= stats["asked"] and stats["ignored"] == 0, stats


def test_cmd_to_a_group_on_the_other_node(tmp_path: Path, cluster: rabbitmq.Cluster) -> None:
    prefix = unique_prefix()
    flow.cmd_to_a_group(cluster.a.url, ["--broker", cluster.b.url, "--prefix", prefix], tmp_path, prefix)


def test_watch_shows_a_device_going_stale(tmp_path: Path, cluster: rabbitmq.Cluster) -> None:
    """Its status is retained on node A only and never sent to a wildcard: the operator on node B learns of the
    device from its heartbeats, and `watch --status` says stale when they stop with no will."""
    prefix = unique_prefix()
    flow.live_and_stale(cluster.a.mqtt_port, ["--broker", cluster.b.url, "--prefix", prefix], tmp_path, prefix,
                        watch=True)


def test_serve_models_bad_input(tmp_path: Path) -> None:
    r = fleet("serve-models", "--dir", str(tmp_path / "nowhere"))
    assert r.rc == 2 and len(r.err_lines) == 1 and "not a folder" in r.err_lines[0], r.err
    (tmp_path / "x@1.manifest.json").write_text("{")
    r = fleet("serve-models", "--dir", str(tmp_path))
    assert r.rc == 2 and len(r.err_lines) == 1 and "not a signed manifest" in r.err_lines[0], r.err


def test_samples_pull_across_nodes(tmp_path: Path, cluster: rabbitmq.Cluster, models_dir: Path) -> None:
    """The device's offer is retained on node A only; the operator on node B finds no manifest there, asks the
    device (`…/samples/<id>/want`), and the device publishes the manifest and each chunk again, live."""
    prefix = unique_prefix()
    on_b = ["--broker", cluster.b.url, "--prefix", prefix, "--protocol", "3.1.1", "--timeout", "60"]
    flow.samples_pull(tmp_path, cluster.a.url, cluster.a.mqtt_port, on_b, models_dir, prefix, mqtt.MQTTv311)


def test_results_replayed_in_order_after_failover_to_the_other_node(tmp_path: Path,
                                                                     cluster: rabbitmq.Cluster) -> None:
    """The agent's node stops (last in this module: RabbitMQ 3.10's MQTT plugin takes ~100 s to come back on a
    two-node cluster); the agent fails over to the next URL of its broker list and the results made meanwhile
    arrive in order, as historical."""
    flow.replay_after_restart((cluster.a.url, cluster.b.url), cluster.b.mqtt_port, lambda: None, cluster.a.stop,
                              tmp_path, unique_prefix())
