"""The operator's side of the MQTT contract: `lepton-fleet watch` and `lepton-fleet cmd`, and the broker
options and connection (`open_link`, the shared `agent.mqtt.client.PahoLink`) of every fleet verb.

`watch` subscribes to results (and status) of one device or all and prints them as they
arrive: a line each on a terminal (coloured with rich when installed), or JSON lines for scripts. `cmd` sends
one command with a fresh id and prints the reply (or every reply, for a group or all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion

from agent.errors import BadInput, LeptonError
from agent.fleet import output
from agent.fleet.watch import is_stale
from agent.mqtt.client import BrokerAddress, PahoLink, TlsOptions, Unanswered
from agent.mqtt.tls import read_password
from agent.mqtt.topics import SCHEMA_VERSION, FleetTopics

DEFAULT_BROKER = "mqtt://localhost:1883"
PASSWORD_ENV = "LEPTON_MQTT_PASSWORD"  # noqa: S105 - the name of the variable, not a password

logger = logging.getLogger(__name__)


def add_connection_options(p: argparse.ArgumentParser) -> None:
    """The broker options every `lepton-fleet` command that talks MQTT takes (the agent config's names)."""
    g = p.add_argument_group("broker")
    g.add_argument("--broker", help=f"mqtt://host:port or mqtts://… (default: LEPTON_BROKER, else {DEFAULT_BROKER})")
    g.add_argument("--protocol", choices=("5", "3.1.1"), default="5",
                   help="MQTT version; 5 falls back to 3.1.1 when the broker does not answer it (default 5)")
    g.add_argument("--prefix", default="lepton", help="topic prefix (default lepton)")
    g.add_argument("--ca-file", type=Path, help="CA file to trust for mqtts:// (pinned)")
    g.add_argument("--cert-file", type=Path, help="client certificate (mutual TLS)")
    g.add_argument("--key-file", type=Path, help="client private key (mutual TLS; mode 0600)")
    g.add_argument("--username", help="broker user name")
    g.add_argument("--password-file", type=Path, help=f"broker password, first line (default: {PASSWORD_ENV})")


def broker_url(args: argparse.Namespace) -> str:
    return str(args.broker or os.environ.get("LEPTON_BROKER") or DEFAULT_BROKER)


def broker_password(args: argparse.Namespace) -> str | None:
    return read_password(args.password_file, PASSWORD_ENV) if args.username else None


def open_link(args: argparse.Namespace, timeout: float = 10.0) -> PahoLink:
    """The operator's connection, connected, from the broker options; BadInput/LeptonError otherwise.

    `--protocol 5` (the default) falls back to 3.1.1 when the broker ends the MQTT 5 attempt unanswered or
    refuses the version: RabbitMQ before 3.13 closes the connection on an MQTT 5 CONNECT."""
    address = BrokerAddress.parse(broker_url(args))
    for flag, path in (("--ca-file", args.ca_file), ("--cert-file", args.cert_file), ("--key-file", args.key_file)):
        if path is not None and not Path(path).is_file():
            raise BadInput(f"{flag} {path}: no such file")
    tls = TlsOptions(args.ca_file, args.cert_file, args.key_file)
    password = broker_password(args)
    client_id = f"lepton-fleet-{uuid.uuid4().hex[:8]}"

    def link(protocol: MQTTProtocolVersion) -> PahoLink:
        return PahoLink(address, client_id=client_id, tls=tls, username=args.username, password=password,
                        protocol=protocol)

    if getattr(args, "protocol", "5") == "3.1.1":
        return link(MQTTProtocolVersion.MQTTv311).start(timeout=timeout, give_up_unanswered=True)
    started = time.monotonic()
    try:
        return link(MQTTProtocolVersion.MQTTv5).start(timeout=timeout, give_up_unanswered=True)
    except Unanswered as exc:
        if "TLS handshake" in str(exc):
            raise LeptonError(str(exc)) from None  # the broker's TLS alert: not about the MQTT version
        refused = exc
    # Said once the fallback worked: when it does not, its own error is the one line the operator needs (over
    # TLS the broker's alert can be lost to a reset, so a bare close there may mean a missing certificate).
    left = max(1.0, timeout - (time.monotonic() - started))
    fallback = link(MQTTProtocolVersion.MQTTv311).start(timeout=left, give_up_unanswered=True)
    logger.warning("%s; connected with MQTT 3.1.1 instead", refused)
    return fallback


# -- watch --------------------------------------------------------------------------------------


def summary(payload: dict[str, Any]) -> str:
    if "event" in payload:
        return f"{payload.get('event')} {payload.get('label')} {payload.get('score', 0):.2f}"
    for key in ("classes", "detections"):
        if key in payload:
            return ", ".join(f"{e.get('label')} {e.get('score', 0):.2f}" for e in payload[key]) or "(nothing)"
    return json.dumps(payload)[:120]


def watch(args: argparse.Namespace, out: TextIO) -> int:
    device = args.device or "+"
    of = FleetTopics(args.prefix).device(device)
    topics = [of.results("#")]
    if args.status:
        topics.append(of.status)
    received = threading.Semaphore(0)
    lock = threading.Lock()
    statuses: dict[str, tuple[str, dict[str, Any]]] = {}
    """device → (topic, latest status) not yet shown as stale: checked every second for a stopped heartbeat."""
    console = None
    if args.format == "table":
        console = output.console(out)

    def on_message(msg: mqtt.MQTTMessage) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = {"raw": msg.payload[:200].decode(errors="replace")}
        parts = msg.topic.split("/")
        dev = FleetTopics(args.prefix).device_of(msg.topic) or "?"
        is_result = "/results/" in msg.topic
        with lock:
            if not is_result:
                statuses[dev] = (msg.topic, payload)
            if not is_result and is_stale(payload):
                show_stale(dev)
            elif console is None:
                out.write(json.dumps({"topic": msg.topic, "device": dev, "retained": bool(msg.retain),
                                      "payload": payload}) + "\n")
                out.flush()
            elif is_result:
                when = time.strftime("%H:%M:%S", time.localtime(payload.get("ts", time.time())))
                hist = " [yellow](historical)[/]" if payload.get("historical") else ""
                console.print(f"[dim]{when}[/] [bold cyan]{dev}[/] [magenta]{payload.get('pipeline', parts[-1])}[/]"
                              f" #{payload.get('seq', '?')} [green]{summary(payload)}[/]{hist}", markup=True)
            else:
                state = payload.get("state", "?")
                colour = {"online": "green", "offline": "red", "stopped": "yellow"}.get(state, "white")
                console.print(f"[bold cyan]{dev}[/] status [{colour}]{state}[/] bdseq {payload.get('bdseq')}",
                              markup=True)
        if is_result:
            received.release()

    def show_stale(dev: str) -> None:
        """Under `lock`: the device's last status is `online` but its heartbeat stopped (no will came)."""
        topic, status = statuses.pop(dev)
        if console is None:
            out.write(json.dumps({"topic": topic, "device": dev, "stale": True, "payload": status}) + "\n")
            out.flush()
        else:
            when = time.strftime("%H:%M:%S", time.localtime(status.get("ts", 0)))
            console.print(f"[bold cyan]{dev}[/] status [red]stale[/] (online, last heard {when})", markup=True)

    link = open_link(args)
    try:
        if console is not None:
            # Before subscribing: a retained result is printed (on paho's thread) as soon as the broker has the
            # subscription, which may be before wait_subscribed returns here.
            console.print(f"[dim]watching {', '.join(topics)} on {link.broker} (Ctrl-C to stop)[/]", markup=True)
        for topic in topics:
            link.subscribe_messages(topic, on_message)
        link.wait_subscribed(10.0)
        if args.status:
            # Devices answer with their status, live: a wildcard subscriber gets no retained one on RabbitMQ.
            link.publish(FleetTopics(args.prefix).device("all").presence, b'{"v": 1}', qos=1)
        deadline = time.monotonic() + args.seconds if args.seconds else None
        got = 0
        while args.count is None or got < args.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if received.acquire(timeout=min(left, 1.0) if left is not None else 1.0):
                got += 1
            with lock:
                for dev in [d for d, (_, status) in statuses.items() if is_stale(status)]:
                    show_stale(dev)
    finally:
        link.close()
    if args.count is not None and got < args.count:
        print(f"lepton-fleet: {got} of {args.count} results within {args.seconds:g} s", file=sys.stderr)
        return 1
    return 0


# -- cmd ----------------------------------------------------------------------------------------


def command_topic(prefix: str, target: str) -> tuple[str, str]:
    """(command topic, reply topic filter) for DEVICE, group:G or all."""
    topics = FleetTopics(prefix)
    if target == "all" or target.startswith("group:"):
        return topics.cmd(target), topics.reply("+")
    if not target or any(c in target for c in "/+#"):
        raise BadInput(f"TARGET {target!r}: give a device id, group:NAME or all")
    return topics.cmd(target), topics.reply(target)


def cmd(args: argparse.Namespace, out: TextIO) -> int:
    extra: dict[str, Any] = {}
    if args.args:
        try:
            extra = json.loads(args.args)
        except ValueError as exc:
            raise BadInput(f"ARGS: not JSON ({exc})") from None
        if not isinstance(extra, dict):
            raise BadInput("ARGS: give a JSON object, e.g. '{\"pipeline\": \"cam\"}'")
    replies = ask(args, args.target, args.action, extra, args.timeout, command_id=args.id)
    if not replies:
        print(f"lepton-fleet: no reply from {args.target} within {args.timeout:g} s", file=sys.stderr)
        return 1
    for reply in replies:
        out.write((json.dumps(reply) if args.format == "json" else json.dumps(reply, indent=2)) + "\n")
    return 0 if all(r.get("ok") for r in replies) else 1


def ask(args: argparse.Namespace, target: str, action: str, extra: dict[str, Any], timeout: float,
        command_id: str | None = None) -> list[dict[str, Any]]:
    """Send one command to DEVICE, group:G or all; the replies (`device` added): the first from a device,
    all that came within `timeout` from a group."""
    topic, reply_topic = command_topic(args.prefix, target)
    command = {**extra, "id": command_id or uuid.uuid4().hex, "action": action, "ts": round(time.time(), 3),
               "v": SCHEMA_VERSION}
    single = not (target == "all" or target.startswith("group:"))
    replies: list[dict[str, Any]] = []
    cond = threading.Condition()

    def on_reply(reply_topic: str, payload: bytes) -> None:
        try:
            reply = json.loads(payload)
        except ValueError:
            return
        if isinstance(reply, dict) and reply.get("id") == command["id"]:
            with cond:
                replies.append({"device": FleetTopics(args.prefix).device_of(reply_topic), **reply})
                cond.notify_all()

    link = open_link(args)
    try:
        link.subscribe(reply_topic, on_reply)
        link.wait_subscribed(10.0)
        link.publish_wait(topic, json.dumps(command).encode(), qos=1, timeout=timeout)
        with cond:
            if single:
                cond.wait_for(lambda: bool(replies), timeout)
            else:
                # A group answers over time: collect until the timeout (each reply wakes us: wait on).
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    cond.wait(left)
    finally:
        link.close()
    return replies
