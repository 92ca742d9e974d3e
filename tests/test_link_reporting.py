"""What the link adds for reporting, against a real mosquitto: latest-only telemetry, watched topics,
on-connect hooks and raw bodies (Home Assistant discovery)."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.publish as publish
from broker import Broker, Watcher
from test_link import T, _close, make_link


def test_offer_keeps_only_the_latest_while_disconnected(tmp_path: Path, broker: Broker) -> None:
    a = make_link(tmp_path, broker.url)
    for n in range(10):  # before any connection: each replaces the one before
        a.link.offer(T.telemetry, {"n": n})
    with Watcher(broker.port, ["lepton/dev1/telemetry"]) as w:
        a.link.start()
        assert a.link.connected.wait(10)
        w.wait_json("/telemetry", lambda m: bool(m))
        a.link.offer(T.telemetry, {"n": 10})
        got = w.wait_json("/telemetry", lambda m: any(x["n"] == 10 for x in m))
    assert [m["n"] for m in got] == [9, 10]
    assert all(isinstance(m["ts"], float) and m["v"] == 1 for m in got)
    assert a.link.stats.published == 0  # QoS 0 telemetry never waits in the results window
    _close(a)


def test_watched_topic_hooks_and_raw_bodies(tmp_path: Path, broker: Broker) -> None:
    a = make_link(tmp_path, broker.url)
    heard: list[bytes] = []
    connects: list[int] = []
    got_it = threading.Event()

    def on_ha(payload: bytes) -> None:
        heard.append(payload)
        got_it.set()

    a.link.watch("homeassistant/status", on_ha)
    a.link.on_connected.append(lambda: connects.append(a.link.bdseq))
    a.link.on_connected.append(lambda: a.link.send_raw("homeassistant/sensor/x/y/config", b'{"raw":1}'))
    with Watcher(broker.port, ["homeassistant/sensor/#"]) as w:
        a.link.start()
        assert a.link.connected.wait(10)
        assert w.wait_for(lambda m: any(p == b'{"raw":1}' for _, p, _ in m), 10)  # no ts/v added
    publish.single("homeassistant/status", "online", hostname="127.0.0.1", port=broker.port)
    assert got_it.wait(10)
    assert heard == [b"online"] and connects == [a.link.bdseq]
    assert a.commands == []  # a watched topic is not a command
    assert a.link.stats.callback_errors == 0
    _close(a)
