"""The MQTT link against a real mosquitto: birth/will with bdseq, order, replay after outages,
half-open detection, re-subscribe on reconnect, surviving callback errors, MQTT 3.1.1."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.publish as publish
import pytest
from broker import Broker, Partition, Watcher, wait_until

from agent.agent_state import AgentState
from agent.config import MqttSection
from agent.mqtt.link import Link
from agent.mqtt.session import Backoff
from agent.mqtt.spool import Spool
from agent.mqtt.topics import Topics

T = Topics("lepton", "dev1")


@dataclass
class Agentlet:
    """The link and its spool, as the daemon wires them, without pipelines."""

    link: Link
    spool: Spool
    state: AgentState
    stop: threading.Event
    commands: list[tuple[str, bytes]]

    def put(self, n: int, start: int = 0) -> None:
        for i in range(start, start + n):
            self.spool.append("p", T.results("p"), {"pipeline": "p", "i": i})


def make_link(tmp: Path, url: str, on_command: Any = None, **settings: Any) -> Agentlet:
    spool = Spool(tmp / "spool.sqlite3", 1 << 22)
    state = AgentState(tmp / "agent.sqlite3")
    stop = threading.Event()
    commands: list[tuple[str, bytes]] = []
    link = Link(MqttSection(broker=(url,), **{"keepalive_s": 3, **settings}), topics=T, groups=("g1",),
                client_id="lepton-dev1", spool=spool, next_bdseq=state.next_bdseq,
                birth=lambda: {"agent": "test", "pipelines": []},
                on_command=on_command or (lambda t, p: commands.append((t, p))), stop=stop)
    return Agentlet(link, spool, state, stop, commands)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


def _results(w: Watcher) -> list[dict[str, Any]]:
    return w.json("/results/p")


def _close(a: Agentlet) -> None:
    a.stop.set()
    a.link.close({"state": "stopped"}, 3)
    a.spool.close()
    a.state.close()


def test_birth_after_connack_results_in_order_and_goodbye(tmp_path: Path, broker: Broker) -> None:
    with Watcher(broker.port, ["lepton/dev1/#"]) as w:
        a = make_link(tmp_path, broker.url)
        a.link.start()
        assert a.link.connected.wait(10)
        a.put(50)
        got = w.wait_json("/results/p", lambda m: len(m) >= 50)
        assert [m["seq"] for m in got] == list(range(1, 51))
        assert not any(m.get("historical") for m in got)
        births = w.json("/status")
        assert births[0]["state"] == "online" and births[0]["bdseq"] == a.link.bdseq
        assert wait_until(lambda: a.spool.stats().queued == 0, 10)  # every PUBACK in: nothing left to replay
        _close(a)
        status = w.wait_json("/status", lambda m: m[-1]["state"] == "stopped")
        assert status[-1]["bdseq"] == births[0]["bdseq"]
    with Watcher(broker.port, ["lepton/dev1/status"]) as late:  # retained
        assert late.wait_json("/status", lambda m: bool(m))[0]["state"] == "stopped"


def test_broker_outage_replays_in_order_as_historical(tmp_path: Path, own_broker: Broker) -> None:
    a = make_link(tmp_path, own_broker.url)
    a.link.start()
    assert a.link.connected.wait(10)
    with Watcher(own_broker.port, ["lepton/dev1/results/#"], client_id="w1", clean=False) as w:
        a.put(20)
        w.wait_json("/results/p", lambda m: len(m) >= 20)
    own_broker.stop()
    a.put(30, start=20)  # while the broker is away: spooled
    assert a.spool.stats().queued == 30
    own_broker.start()
    assert a.link.connected.wait(20)
    with Watcher(own_broker.port, ["lepton/dev1/results/#"]) as w2:
        # The new connection sends the backlog first; a fresh subscriber sees what comes after
        # it subscribed, so wait on the spool emptying instead.
        assert wait_until(lambda: a.spool.stats().queued == 0, 20)
        a.put(5, start=50)
        got = w2.wait_json("/results/p", lambda m: any(x["i"] == 54 for x in m))
    assert [m["i"] for m in got if m["i"] >= 50] == [50, 51, 52, 53, 54]
    assert not any(m.get("historical") for m in got if m["i"] >= 50)
    assert a.link.stats.connects == 2
    _close(a)


def test_backlog_is_marked_historical(tmp_path: Path, broker: Broker) -> None:
    a = make_link(tmp_path, broker.url)
    a.put(10)  # spooled before any connection: e.g. results from before a restart
    with Watcher(broker.port, ["lepton/dev1/results/#"]) as w:
        a.link.start()
        got = w.wait_json("/results/p", lambda m: len(m) >= 10)
        a.put(3, start=10)
        got = w.wait_json("/results/p", lambda m: len(m) >= 13)
    assert [m["i"] for m in got] == list(range(13))
    assert all(m["historical"] is True for m in got[:10])
    assert not any("historical" in m for m in got[10:])
    _close(a)


def test_half_open_is_noticed_and_the_will_goes_out(tmp_path: Path, own_broker: Broker) -> None:
    a = make_link(tmp_path, own_broker.url, keepalive_s=2)
    a.link.start()
    assert a.link.connected.wait(10)
    first_bdseq = a.link.bdseq
    own_broker.freeze()
    try:
        a.put(3)  # waiting for a PUBACK that will not come
        lost = threading.Event()

        def watch_disconnect() -> None:
            while a.link.connected.is_set() and not lost.wait(0.05):
                pass
            lost.set()

        threading.Thread(target=watch_disconnect, daemon=True).start()
        assert lost.wait(30)
        assert a.link.stats.half_open == 1
    finally:
        own_broker.thaw()
    assert a.link.connected.wait(30)
    assert a.link.bdseq > first_bdseq
    with Watcher(own_broker.port, ["lepton/dev1/#"]) as w:
        assert wait_until(lambda: a.spool.stats().queued == 0, 20)  # the 3 results went out after all
        status = w.wait_json("/status", lambda m: bool(m))
        assert status[-1]["state"] == "online" and status[-1]["bdseq"] == a.link.bdseq
    _close(a)


@pytest.mark.parametrize("timeouts", [{"connect_timeout_s": 0.5, "keepalive_s": 3},  # ours ends the wait
                                      {"connect_timeout_s": 60, "keepalive_s": 3}])  # paho's keepalive does
def test_a_thawed_broker_is_reached_again_soon_after_timed_out_attempts(tmp_path: Path, own_broker: Broker,
                                                                        timeouts: dict[str, float]) -> None:
    # A SIGSTOPped broker still completes TCP handshakes (the kernel does), so each attempt waits for a CONNACK
    # until a timeout gives up. Those attempts must not grow the backoff, or the agent stays away long after
    # the thaw (17.6 s was the delay chosen after 4 such attempts with paho's keepalive giving up).
    a = make_link(tmp_path, own_broker.url, backoff_min_s=0.2, backoff_max_s=60, **timeouts)
    own_broker.freeze()
    try:
        a.link.start()
        timed_out = threading.Event()
        while not timed_out.wait(0.05):
            if a.link.stats.connect_failures >= 3:
                timed_out.set()
        assert not a.link.connected.is_set()
        assert a.link.backoff.failures == 0
        assert a.link.backoff.last_delay <= 0.2 * 1.5  # grown, the 3rd delay would be 0.8 s or more
    finally:
        own_broker.thaw()
    assert a.link.connected.wait(30)
    _close(a)


def test_refused_connack_never_announces_online(tmp_path: Path) -> None:
    b = Broker(tmp_path / "b")
    write_config = b._config

    def no_anonymous() -> Path:
        conf = write_config()
        conf.write_text(conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
        return conf

    b._config = no_anonymous  # type: ignore[method-assign]
    with b:
        a = make_link(tmp_path, b.url, backoff_min_s=0.1, backoff_max_s=0.2)
        a.link.start()
        failed = threading.Event()
        while not failed.wait(0.05):
            if a.link.stats.connect_failures >= 3:
                failed.set()
        assert not a.link.connected.is_set() and a.link.stats.connects == 0
        assert a.link.backoff.failures >= 2  # an answer that says no grows the backoff
        _close(a)


def test_commands_heard_again_after_reconnect(tmp_path: Path, own_broker: Broker) -> None:
    a = make_link(tmp_path, own_broker.url)
    a.link.start()
    assert a.link.subscribed.wait(10)
    for topic in ("lepton/dev1/cmd", "lepton/group/g1/cmd", "lepton/all/cmd", "lepton/group/g2/cmd"):
        publish.single(topic, b'{"id": "1", "action": "ping"}', qos=1, hostname="127.0.0.1", port=own_broker.port)
    # Delivered before the broker goes: with a clean session it would drop what it had not sent yet.
    assert wait_until(lambda: len(a.commands) >= 3, 20)
    first_bdseq = a.link.bdseq
    own_broker.stop()
    own_broker.start()
    assert wait_until(lambda: a.link.bdseq > first_bdseq and a.link.subscribed.is_set(), 30)
    with Watcher(own_broker.port, ["lepton/dev1/status"]) as w:  # re-announced
        # The retained copy the watcher gets first may still be the will the broker kept over its restart.
        seen = w.wait_json("/status", lambda m: any(x["state"] == "online" for x in m))
        assert seen[-1]["state"] == "online" and seen[-1]["bdseq"] == a.link.bdseq
    publish.single("lepton/dev1/cmd", b'{"id": "2", "action": "ping"}', qos=1, hostname="127.0.0.1",
                   port=own_broker.port)
    ok = threading.Event()
    while not ok.wait(0.05):
        if any(b'"2"' in p for _, p in a.commands):
            ok.set()
        if a.stop.is_set():
            break
    topics = [t for t, _ in a.commands]
    assert topics == ["lepton/dev1/cmd", "lepton/group/g1/cmd", "lepton/all/cmd", "lepton/dev1/cmd"]
    assert a.link.stats.unrouted == 0
    _close(a)


def test_callback_exceptions_are_counted_and_survived(tmp_path: Path, broker: Broker) -> None:
    heard: list[bytes] = []

    def on_command(topic: str, payload: bytes) -> None:
        heard.append(payload)
        if payload == b"explode":
            raise ValueError("handler bug")

    a = make_link(tmp_path, broker.url, on_command=on_command)
    a.link.start()
    assert a.link.subscribed.wait(10)
    publish.single("lepton/dev1/cmd", b"explode", qos=1, hostname="127.0.0.1", port=broker.port)
    publish.single("lepton/dev1/cmd", b"fine", qos=1, hostname="127.0.0.1", port=broker.port)
    with Watcher(broker.port, ["lepton/dev1/results/#"]) as w:
        a.put(1)
        w.wait_json("/results/p", lambda m: len(m) >= 1)
    assert heard == [b"explode", b"fine"]
    assert a.link.stats.callback_errors == 1
    assert a.link.connected.is_set()
    _close(a)


def test_mqtt_311(tmp_path: Path, broker: Broker) -> None:
    a = make_link(tmp_path, broker.url, protocol="3.1.1")
    with Watcher(broker.port, ["lepton/dev1/#"]) as w:
        a.link.start()
        assert a.link.connected.wait(10)
        a.put(5)
        got = w.wait_json("/results/p", lambda m: len(m) >= 5)
        assert [m["seq"] for m in got] == [1, 2, 3, 4, 5]
        a.link.send(T.reply, {"id": "r", "ok": True, "result": {}})
        assert json.loads(json.dumps(w.wait_json("/reply", lambda m: bool(m))[0]))["id"] == "r"
    _close(a)


def test_backoff_grows_caps_and_resets() -> None:
    import random

    b = Backoff(1.0, 120.0, random.Random(1))
    delays = [b.next_delay() for _ in range(12)]
    assert delays[0] < 2 and all(later >= earlier * 0.6 for earlier, later in itertools.pairwise(delays))
    assert max(delays) <= 120.0 and delays[-1] > 60
    assert 1.0 <= b.next_delay(refused=True) <= 1.5  # nobody listening: keep knocking softly
    grown = b.failures
    assert 1.0 <= b.next_delay(timed_out=True) <= 1.5  # the attempt's own timeout was the pause
    assert b.failures == grown
    b.reset()
    assert b.next_delay() < 2


def test_unacknowledged_replies_and_retained_states_survive_a_lost_connection(tmp_path: Path,
                                                                              broker: Broker) -> None:
    """Fault 10: a reply and a retained deploy state sent just before the network went away (no PUBACK)
    are sent again on the next connection, and the broker ends up retaining the current state."""
    net = Partition(broker.port)
    a = make_link(tmp_path, net.url, keepalive_s=2)
    try:
        with Watcher(broker.port, ["lepton/dev1/deploy", "lepton/dev1/reply"]) as w:
            a.link.start()
            assert a.link.connected.wait(10)
            a.link.publish(T.deploy, json.dumps({"state": "activating"}).encode(), retain=True)
            assert w.wait_json("/deploy", lambda m: bool(m))
            net.cut()
            a.link.publish(T.deploy, json.dumps({"state": "active"}).encode(), retain=True)
            a.link.send(T.reply, {"id": "r1", "ok": True})
            assert wait_until(lambda: b"r1" in net.dropped and b"active" in net.dropped, 10)
            assert wait_until(lambda: a.link.stats.connects >= 2, 30)
            assert w.wait_json("/reply", lambda m: any(r.get("id") == "r1" for r in m), 15)
        with Watcher(broker.port, ["lepton/dev1/deploy"]) as late:  # what the broker retains now
            assert late.wait_json("/deploy", lambda m: bool(m), 10)[-1]["state"] == "active"
    finally:
        _close(a)
        net.close()


def test_a_deeply_nested_status_message_is_a_bad_message(tmp_path: Path, broker: Broker,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Fault 14c: JSON nested deeper than the parser follows, on our own status topic, is counted and
    logged in one line, not a RecursionError traceback from the link thread."""
    a = make_link(tmp_path, broker.url)
    try:
        a.link.start()
        assert a.link.subscribed.wait(10)
        publish.single(T.status, "[" * 100_000, qos=1, hostname="127.0.0.1", port=broker.port)
        assert wait_until(lambda: a.link.stats.bad_messages == 1, 10)
        assert a.link.stats.callback_errors == 0
        assert not [r for r in caplog.records if r.exc_info]
    finally:
        _close(a)


def test_oversized_messages_on_mqtt_311_are_dropped_unread_acknowledged_and_counted(tmp_path: Path,
                                                                                    broker: Broker) -> None:
    """Fault 13: 3.1.1 has no Maximum Packet Size, so the link bounds what it reads itself. More oversized
    QoS 1 commands than the broker keeps in flight: each is acknowledged (or the window would close and
    the command after them never arrive), none reaches the command handler."""
    a = make_link(tmp_path, broker.url, protocol="3.1.1", max_packet_bytes=65536)
    try:
        a.link.start()
        assert a.link.subscribed.wait(10)
        big = [(T.cmd, b"x" * (256 * 1024 + i), 1, False) for i in range(25)]
        after = b'{"id": "after", "action": "ping"}'
        publish.multiple([*big, (T.cmd, after, 1, False)], hostname="127.0.0.1", port=broker.port)
        assert wait_until(lambda: (T.cmd, after) in a.commands, 20)
        assert a.commands == [(T.cmd, after)]
        assert a.link.stats.oversized == 25
        assert a.link.connected.is_set() and a.link.stats.connects == 1
    finally:
        _close(a)


@contextlib.contextmanager
def many_files_open() -> Iterator[None]:
    """Over 1,024 descriptors open, as in the fleet simulator's process (1,000 devices, two databases each):
    every descriptor opened after this is numbered past select()'s FD_SETSIZE."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}: cannot open 1,100 files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(4096, hard)) if hard != resource.RLIM_INFINITY
                                                else max(soft, 4096), hard))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_link_whose_socket_is_numbered_past_1024(tmp_path: Path, broker: Broker) -> None:
    """select() refuses such a descriptor (ValueError): the link never read its CONNACK and spun to its connect
    timeout. poll() has no such limit."""
    with Watcher(broker.port, ["lepton/dev1/#"]) as w, many_files_open():
        a = make_link(tmp_path, broker.url)
        a.link.start()
        try:
            assert a.link.connected.wait(10) and a.link.subscribed.wait(10)
            a.put(5)
            assert [m["seq"] for m in w.wait_json("/results/p", lambda m: len(m) >= 5)] == [1, 2, 3, 4, 5]
            w.client.publish(T.cmd, b'{"id": "c1", "action": "ping"}', qos=1)  # the watcher's own socket is < 1024
            assert wait_until(lambda: len(a.commands) == 1, 10), a.commands
        finally:
            _close(a)
