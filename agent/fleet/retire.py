"""`lepton-fleet retire DEVICE`: take a device out of Home Assistant and out of the fleet's view.

Home Assistant keeps a discovered device, its entities `unavailable`, until it receives an
empty config for each of them. The agent's configs are not retained, so nothing else would
ever remove them.

- Device online (its retained status says so): the `retire` command; the agent empties its
  configs and announces nothing more until it restarts.
- Device offline, stopped or gone: this command empties the configs itself, for the sensors
  the device's last retained status implies (its pipelines, plus every telemetry sensor), and
  clears the device's retained messages (`status`, the deployment state), so that neither Home
  Assistant nor `lepton-fleet status` keeps a ghost. A device that comes back announces itself
  again.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import uuid
from typing import Any, TextIO

from agent.errors import BadInput, LeptonError
from agent.mqtt.topics import SCHEMA_VERSION, FleetTopics


def add_retire_command(sub: Any) -> None:
    from agent.fleet.live import add_connection_options

    p = sub.add_parser("retire", help="remove a device from Home Assistant (and, once it is off, from the fleet)")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--discovery-prefix", default="homeassistant",
                   help="Home Assistant's discovery prefix (the agent's [homeassistant] discovery_prefix)")
    p.add_argument("--pipeline", action="append", default=[], metavar="NAME",
                   help="a pipeline whose sensors to remove too (when the retained status does not list it)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker and the device")
    p.add_argument("--format", choices=("pretty", "json"), default="pretty")
    add_connection_options(p)
    p.set_defaults(func=cmd_retire)


def cmd_retire(args: argparse.Namespace, out: TextIO) -> int:
    import paho.mqtt.client as mqtt

    from agent.config import _TOPIC_NAME
    from agent.fleet.live import open_link
    from agent.homeassistant import every_config_topic

    for name, what in ((args.device, "DEVICE"), (args.discovery_prefix, "--discovery-prefix"),
                       *((p, "--pipeline") for p in args.pipeline)):
        if not re.match(_TOPIC_NAME, name):
            raise BadInput(f"{what} {name!r}: not a name the agent allows ({_TOPIC_NAME})")
    fleet = FleetTopics(args.prefix)
    device = fleet.device(args.device)
    marker = fleet.sync(uuid.uuid4().hex)
    request = uuid.uuid4().hex[:12]
    retained: dict[str, bytes] = {}
    cond = threading.Condition()
    synced: list[bool] = []
    replies: list[dict[str, Any]] = []

    def on_message(msg: mqtt.MQTTMessage) -> None:
        with cond:
            if msg.topic == marker:
                synced.append(True)
            elif msg.topic == device.reply:
                try:
                    reply = json.loads(msg.payload)
                except ValueError:
                    return
                if isinstance(reply, dict) and reply.get("id") == request:
                    replies.append(reply)
            elif msg.retain and msg.payload:
                retained[msg.topic] = bytes(msg.payload)
            cond.notify_all()

    link = open_link(args, args.timeout)
    try:
        link.subscribe_messages(f"{device.base}/#", on_message)
        link.subscribe_messages(marker, on_message)
        link.wait_subscribed(args.timeout)
        # Our own message comes back after the retained ones the subscriptions brought.
        link.publish(marker, b"{}", qos=1)
        with cond:
            if not cond.wait_for(lambda: bool(synced), args.timeout):
                raise LeptonError(f"broker {link.broker}: no answer to our own message in {args.timeout:g} s")
        status = _json(retained.get(device.status))
        if status.get("state") == "online":
            command = {"id": request, "action": "retire", "ts": round(time.time(), 3), "v": SCHEMA_VERSION}
            link.publish_wait(device.cmd, json.dumps(command).encode(), qos=1, timeout=args.timeout)
            with cond:
                if not cond.wait_for(lambda: bool(replies), args.timeout):
                    raise LeptonError(f"{args.device}: its status says online but it did not answer `retire` in "
                                      f"{args.timeout:g} s; if it is gone, retry once the broker has published "
                                      "its will (1.5 x its keepalive)")
            reply = replies[0]
            _print(out, args, {"device": args.device, "by": "agent", **reply})
            return 0 if reply.get("ok") else 1
        pipelines = [p["name"] for p in status.get("pipelines") or [] if isinstance(p, dict) and "name" in p]
        pipelines += [p for p in args.pipeline if p not in pipelines]
        if not status and not args.pipeline:
            raise BadInput(f"{args.device}: no retained status on {device.status} (a device id this broker never "
                           "saw?); give its pipelines with --pipeline to remove its sensors anyway")
        configs = every_config_topic(args.discovery_prefix, args.device, pipelines)
        for topic in configs:
            link.publish(topic, b"", qos=1)
        for topic in sorted(retained):
            link.publish(topic, b"", qos=1, retain=True)
        # QoS 1 and one connection: the broker has the earlier ones once the last is acknowledged.
        link.publish_wait(marker, b"{}", qos=1, timeout=args.timeout)
    finally:
        link.close()
    _print(out, args, {"device": args.device, "by": "fleet", "state": status.get("state"), "pipelines": pipelines,
                       "configs_emptied": configs, "retained_cleared": sorted(retained)})
    return 0


def _print(out: TextIO, args: argparse.Namespace, report: dict[str, Any]) -> None:
    out.write((json.dumps(report) if args.format == "json" else json.dumps(report, indent=2)) + "\n")


def _json(payload: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(payload) if payload else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
