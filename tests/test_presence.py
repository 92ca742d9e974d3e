"""Fleet views that need no retained message to reach a wildcard subscription: the status heartbeat (a stale
`online` shows as stale) and the presence query devices answer live. Real link, real mosquitto; every test on
its own topic prefix, so nothing retained is left for other modules on the shared broker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import fleet_workflow as flow
from broker import Broker, Watcher
from conftest import run_cli
from delivery_kit import unique_prefix

from agent.mqtt.topics import Topics


def _births(w: Watcher) -> list[dict[str, object]]:
    return [m for m in w.json("/status") if m.get("state") == "online"]


def test_status_is_published_again_every_heartbeat(tmp_path: Path, broker: Broker) -> None:
    prefix = unique_prefix()
    with Watcher(broker.port, [Topics(prefix, "dev-hb").status]) as w:
        a = flow.device_link(tmp_path, broker.url, "dev-hb", prefix=prefix, heartbeat_s=1)
        a.link.start()
        try:
            w.wait_json("/status", lambda m: len([x for x in m if x.get("state") == "online"]) >= 3, timeout=20)
        finally:
            flow.close_link(a)
    births = _births(w)
    assert all(b["heartbeat_s"] == 1 and b["bdseq"] == births[0]["bdseq"] for b in births)
    ts = [float(b["ts"]) for b in births]  # type: ignore[arg-type]
    assert ts == sorted(ts) and ts[-1] > ts[0]


def test_presence_query_gets_status_and_deploy_states_again(tmp_path: Path, broker: Broker) -> None:
    t = Topics(unique_prefix(), "dev-pq")
    a = flow.device_link(tmp_path, broker.url, "dev-pq", prefix=t.prefix)  # heartbeat 60 s: nothing on its own
    a.link.start()
    try:
        assert a.link.subscribed.wait(10)
        a.link.publish(t.deploy, b'{"model": "colors", "version": 2, "state": "active"}', retain=True)
        with Watcher(broker.port, [t.status, t.deploy]) as w:
            w.wait_for(lambda m: len(m) >= 2)  # the retained pair
            before = len(w.messages)
            with Watcher(broker.port, ["unused/#"]) as asker:
                asker.client.publish(t.presence, b"{}", qos=1)
                w.wait_for(lambda m: len(m) >= before + 2)
                live = [(topic, r) for topic, _, r in w.messages[before:]]
                assert sorted(live) == [(t.deploy, False), (t.status, False)]
        assert a.link.stats.callback_errors == 0
    finally:
        flow.close_link(a)


def test_status_shows_live_and_stale_devices(tmp_path: Path, broker: Broker) -> None:
    """A device cut off without its will being sent (its broker node halted) stays `online` retained: its
    stopped heartbeat makes `lepton-fleet status` say stale, while a live device says yes."""
    prefix = unique_prefix()
    flow.live_and_stale(broker.port, ["--broker", broker.url, "--prefix", prefix], tmp_path, prefix)


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
