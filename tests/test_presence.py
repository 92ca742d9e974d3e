"""Fleet views that need no retained message to reach a wildcard subscription: the status heartbeat (a stale
`online` shows as stale) and the presence query devices answer live. Real link, real mosquitto."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from broker import Broker, Partition, Watcher, wait_until
from conftest import run_cli
from test_link import Agentlet, T, _close, make_link

from agent.agent_state import AgentState
from agent.config import MqttSection
from agent.fleet.watch import STALE_GRACE_S, is_stale
from agent.mqtt.link import Link
from agent.mqtt.spool import Spool
from agent.mqtt.topics import Topics


def device_link(tmp: Path, url: str, device: str, **settings: Any) -> Agentlet:
    """test_link's `make_link` for another device id."""
    spool = Spool(tmp / "spool.sqlite3", 1 << 22)
    state = AgentState(tmp / "agent.sqlite3")
    stop = threading.Event()
    link = Link(MqttSection(broker=(url,), **settings), topics=Topics("lepton", device), groups=(),
                client_id=f"lepton-{device}", spool=spool, next_bdseq=state.next_bdseq,
                birth=lambda: {"agent": "test", "pipelines": []}, on_command=lambda t, p: None, stop=stop)
    return Agentlet(link, spool, state, stop, [])


def _births(w: Watcher) -> list[dict[str, object]]:
    return [m for m in w.json("/status") if m.get("state") == "online"]


def test_status_is_published_again_every_heartbeat(tmp_path: Path, broker: Broker) -> None:
    with Watcher(broker.port, [T.status]) as w:
        a = make_link(tmp_path, broker.url, heartbeat_s=1)
        a.link.start()
        try:
            w.wait_json("/status", lambda m: len([x for x in m if x.get("state") == "online"]) >= 3, timeout=20)
        finally:
            _close(a)
    births = _births(w)
    assert all(b["heartbeat_s"] == 1 and b["bdseq"] == births[0]["bdseq"] for b in births)
    ts = [float(b["ts"]) for b in births]  # type: ignore[arg-type]
    assert ts == sorted(ts) and ts[-1] > ts[0]


def test_presence_query_gets_status_and_deploy_states_again(tmp_path: Path, broker: Broker) -> None:
    a = make_link(tmp_path, broker.url)  # heartbeat 60 s: nothing comes again on its own during the test
    a.link.start()
    try:
        assert a.link.subscribed.wait(10)
        a.link.publish(T.deploy, b'{"model": "colors", "version": 2, "state": "active"}', retain=True)
        with Watcher(broker.port, [T.status, T.deploy]) as w:
            w.wait_for(lambda m: len(m) >= 2)  # the retained pair
            before = len(w.messages)
            with Watcher(broker.port, ["unused/#"]) as asker:
                asker.client.publish(T.presence, b"{}", qos=1)
                w.wait_for(lambda m: len(m) >= before + 2)
                live = [(t, r) for t, _, r in w.messages[before:]]
                assert sorted(live) == [(T.deploy, False), (T.status, False)]
        assert a.link.stats.callback_errors == 0
    finally:
        _close(a)


def test_status_shows_live_and_stale_devices(tmp_path: Path, broker: Broker) -> None:
    """A device cut off without its will being sent (its broker node halted) stays `online` retained: its
    stopped heartbeat makes `lepton-fleet status` say stale, while a live device says yes."""
    live = make_link(tmp_path / "live", broker.url)
    part = Partition(broker.port)
    gone = device_link(tmp_path / "gone", part.url, "dev2", heartbeat_s=1, keepalive_s=3600)
    try:
        live.link.start()
        gone.link.start()
        assert live.link.subscribed.wait(10) and gone.link.subscribed.wait(10)
        with Watcher(broker.port, ["lepton/dev2/status"]) as w:
            w.wait_json("/status", lambda m: any(x.get("state") == "online" for x in m))
            part.cut()
            last = w.json("/status")[-1]
        assert not is_stale(last)
        assert wait_until(lambda: is_stale(last), timeout=2 + STALE_GRACE_S + 5, step=0.2)
        r = run_cli("status", "--broker", broker.url, "--format", "json", "--settle", "1", prog="fleet")
        assert r.rc == 0, r.err
        rows = {row["device"]: row for row in map(json.loads, r.out.splitlines())}
        assert rows["dev1"]["presence"] == "yes" and rows["dev2"]["presence"] == "stale", rows
        assert rows["dev2"]["last_seen"] < time.time() - 2
    finally:
        _close(live)
        gone.stop.set()
        gone.link.close({"state": "stopped"}, 0.5)
        gone.spool.close()
        gone.state.close()
        part.close()


def test_group_cmd_collects_replies_until_its_timeout(broker: Broker) -> None:
    """A reply must not end the collection (it did: the first reply woke the wait and ended it)."""
    from delivery_kit import connect

    from agent.mqtt.topics import FleetTopics

    topics = FleetTopics("tgroup")
    early, late = connect(broker.port), connect(broker.port)
    try:
        def answer(link: Any, device: str) -> Any:
            return lambda t, p: link.publish(topics.reply(device), json.dumps(
                {"id": json.loads(p)["id"], "ok": True}).encode())

        early.subscribe(topics.cmd("group:g"), answer(early, "dev-early"))
        late.subscribe(topics.reply("dev-early"), lambda t, p: answer(late, "dev-late")(t, p))
        early.wait_subscribed(10)
        late.wait_subscribed(10)
        started = time.monotonic()
        r = run_cli("cmd", "group:g", "ping", "--broker", broker.url, "--prefix", "tgroup", "--timeout", "3",
                    "--format", "json", prog="fleet")
        # A lower bound only (the documented wait), never a ceiling: a loaded machine cannot make it fail.
        assert time.monotonic() - started >= 3.0
        assert r.rc == 0, r.err
        assert sorted(json.loads(line)["device"] for line in r.out.splitlines()) == ["dev-early", "dev-late"]
    finally:
        early.close()
        late.close()
