"""`lepton-fleet keygen | publish | deploy | rollback | status` (DESIGN §3, docs/delivery.md).

`add_commands()` registers the sub-commands on the fleet parser; the handlers import
paho, cryptography and rich (through `output`, optional) only when they run.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

from agent.errors import BadInput, LeptonError
from agent.fleet import output


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text) if text not in ("0", "0.0") else 0.0
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _chunk_size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of bytes or 'auto'") from None
    if value < 64:
        raise argparse.ArgumentTypeError(f"{text}: at least 64 bytes")
    return value


def _broker_options(p: argparse.ArgumentParser) -> None:
    from agent.fleet.live import add_connection_options

    add_connection_options(p)
    p.add_argument("--timeout", type=_positive_float, default=120.0,
                   help="seconds to wait for the broker and the devices (default: %(default)s)")


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, metavar="TARGET", help="a device id, group:NAME, or all")


def add_commands(sub: Any) -> None:
    """Register the delivery sub-commands on `lepton-fleet`'s sub-parsers."""
    p = sub.add_parser("keygen", help="make an Ed25519 signing key pair")
    p.add_argument("--out", type=Path, default=Path("lepton-signing.key"),
                   help="private key file to create, mode 0600 (default: %(default)s); the public key goes "
                        "beside it as .pub")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("publish", help="sign a model and upload it over MQTT for devices to pull")
    p.add_argument("model", metavar="MODEL", help="a .tflite, or a manifest .json beside its .tflite")
    p.add_argument("--name", required=True, help="model name in the fleet")
    p.add_argument("--version", required=True, help="an integer or semver (1.2.3)")
    p.add_argument("--key", required=True, type=Path, help="private key file from `keygen`")
    p.add_argument("--chunk-size", type=_chunk_size, default=None, metavar="BYTES",
                   help="bytes per chunk, or auto: 64 KiB or less to fit the broker's limit (default: auto)")
    p.add_argument("--task", help="task key when MODEL is a bare .tflite (default: recognised)")
    p.add_argument("--expires-in", type=_positive_float, metavar="DAYS",
                   help="devices refuse the manifest after this many days (default: never)")
    p.add_argument("--backend", action="append", default=[], metavar="NAME",
                   help="runtime constraint: only agents on this backend accept it (repeatable)")
    p.add_argument("--board", action="append", default=[], metavar="CLASS",
                   help="runtime constraint: only these profile classes accept it (repeatable)")
    p.add_argument("--seed-dir", type=Path, metavar="DIR",
                   help="also keep the signed manifest and the model in DIR for `serve-models`")
    p.add_argument("--format", choices=("text", "json"), default="text")
    _broker_options(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("serve-models", help="answer devices' requests for models where retained messages do not "
                                            "reach them (RabbitMQ cluster): one for the fleet, on any node")
    p.add_argument("--dir", type=Path, required=True, help="the --seed-dir of `publish`")
    p.add_argument("--seconds", type=_positive_float, help="stop after this long (default: until Ctrl-C)")
    _broker_options(p)
    p.set_defaults(func=cmd_serve_models)

    p = sub.add_parser("deploy", help="tell devices to pull and activate NAME@VERSION, with live progress")
    p.add_argument("ref", metavar="NAME@VERSION")
    _target(p)
    p.add_argument("--shadow", type=int, nargs="?", const=200, metavar="ITEMS",
                   help="run beside the active model on ITEMS items (default 200) and promote only if it agrees")
    p.add_argument("--shadow-seconds", type=_positive_float, metavar="S", help="shadow trial length in seconds")
    p.add_argument("--min-agreement", type=_fraction, default=0.9, help="shadow: fraction of items that must agree")
    p.add_argument("--max-latency-ratio", type=_positive_float, default=1.5,
                   help="shadow: candidate p95 / active p95 must not exceed this")
    p.add_argument("--settle", type=_positive_float, default=3.0,
                   help="group/all: seconds without a new device before the list is complete (default: 3)")
    p.add_argument("--no-wait", action="store_true", help="send the command and exit")
    p.add_argument("--format", choices=("table", "json"), default="table")
    _broker_options(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("rollback", help="return devices to a model version they keep (the previous one)")
    p.add_argument("name", metavar="NAME")
    _target(p)
    p.add_argument("--version", help="the kept version to return to (default: the previous one)")
    p.add_argument("--settle", type=_positive_float, default=3.0)
    p.add_argument("--format", choices=("table", "json"), default="table")
    _broker_options(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("status", help="every device's deployment state and presence, optionally live")
    p.add_argument("--model", help="only this model")
    p.add_argument("--settle", type=_positive_float, default=2.0,
                   help="seconds to collect the devices' answers to the presence query (default: %(default)s)")
    p.add_argument("--follow", action="store_true", help="keep the table live until interrupted")
    p.add_argument("--format", choices=("table", "json"), default="table")
    _broker_options(p)
    p.set_defaults(func=cmd_status)


# -- helpers ------------------------------------------------------------------------


def _connect(args: argparse.Namespace) -> Any:
    from agent.fleet.live import open_link

    return open_link(args, timeout=min(args.timeout, 30.0))


def _topics(args: argparse.Namespace) -> Any:
    from agent.mqtt.topics import FleetTopics

    if not args.prefix or any(c in args.prefix for c in "+#") or args.prefix.endswith("/"):
        raise BadInput(f"--prefix {args.prefix!r}: not a topic prefix")
    return FleetTopics(args.prefix)


def _check_target(target: str) -> None:
    from agent.delivery.signed_manifest import NAME_RE

    name = target[6:] if target.startswith("group:") else target
    if target != "all" and not NAME_RE.match(name):
        raise BadInput(f"--to {target!r}: give a device id, group:NAME or all")


def _send(link: Any, topics: Any, target: str, action: str, fields: dict[str, Any]) -> str:
    request = uuid.uuid4().hex[:12]
    cmd = {"id": request, "action": action, **fields, "ts": time.time(), "v": 1}
    link.publish_wait(topics.cmd(target), json.dumps(cmd).encode(), qos=1)
    return request


def _row(view: Any) -> dict[str, Any]:
    s = view.state or {}
    error = (view.reply or {}).get("error") if view.reply and not view.reply.get("ok") else None
    return {
        "device": view.device, "model": s.get("model"), "version": s.get("version"),
        "state": s.get("state") or ("refused" if error else "waiting"),
        "progress": s.get("progress"), "active": s.get("active"),
        "reason": s.get("reason") or (error or {}).get("code"),
        "detail": s.get("detail") or (error or {}).get("message"),
    }


def _print_table(out: TextIO, rows: list[dict[str, Any]], title: str,
                 columns: tuple[str, ...] = ("device", "state", "version", "active", "reason", "detail")) -> None:
    output.print_table(out, title, columns, [["" if r[c] is None else str(r[c]) for c in columns] for r in rows])


def _follow(args: argparse.Namespace, link: Any, view: Any, expected: set[str] | None, out: TextIO) -> bool:
    """Live progress bars per device until every device is done (or the timeout); True if they all were."""
    stop = threading.Event()
    deadline = time.monotonic() + args.timeout
    finished: list[bool] = []
    waiter = threading.Thread(target=lambda: finished.append(view.wait(expected, args.settle, deadline, stop)))
    waiter.start()
    bars: dict[str, Any] = {}
    with output.progress(sys.stderr) as progress:
        try:
            while True:
                alive = waiter.is_alive()
                waiter.join(0.2)
                for v in view.snapshot():
                    row = _row(v)
                    if v.device not in bars:
                        bars[v.device] = progress.add_task("", total=1.0, device=v.device, state="")
                    label = row["state"] + (f" ({row['reason']})" if row["reason"] else "")
                    progress.update(bars[v.device], completed=row["progress"] or 0.0, state=label)
                if not alive:
                    break  # one last pass after the end, so every device's final state is drawn
        except KeyboardInterrupt:
            stop.set()
            waiter.join()
            raise
    return bool(finished and finished[0])


def _finish(args: argparse.Namespace, view: Any, complete: bool, out: TextIO, title: str) -> int:
    views = view.snapshot()
    rows = [_row(v) for v in views]
    if args.format == "json":
        for r in rows:
            out.write(json.dumps(r) + "\n")
    else:
        _print_table(out, rows, title)
    if not views:
        print(f"lepton-fleet: no device answered within {args.timeout:g} s", file=sys.stderr)
        return 1
    if not complete:
        print(f"lepton-fleet: not every device finished within {args.timeout:g} s", file=sys.stderr)
        return 1
    return 0 if all(v.succeeded for v in views) else 1


# -- commands -----------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace, out: TextIO) -> int:
    from agent.delivery.signing import generate_key_file, key_id, public_text

    private = generate_key_file(args.out)
    kid, pub = key_id(private.public_key()), public_text(private.public_key())
    if args.format == "json":
        out.write(json.dumps({"key_id": kid, "public_key": pub, "private_key_file": str(args.out),
                              "public_key_file": f"{args.out}.pub"}) + "\n")
    else:
        out.write(f"private key: {args.out} (keep it secret; mode 0600)\npublic key:  {args.out}.pub\n"
                  f"key id:      {kid}\n\nadd to the agent config (agent.toml):\n\n"
                  f"[trusted_keys]\n\"{kid}\" = \"{pub}\"\n")
    return 0


def cmd_publish(args: argparse.Namespace, out: TextIO) -> int:
    from agent.delivery.signing import load_private_key
    from agent.fleet.publish import DEFAULT_CHUNK, build, upload
    from agent.version import parse_version

    try:
        version = parse_version(args.version)
    except ValueError as exc:
        raise BadInput(f"--version: {exc}") from None
    key = load_private_key(args.key)
    topics = _topics(args)
    link = _connect(args)
    try:
        chunk = args.chunk_size
        if chunk is None:
            chunk = DEFAULT_CHUNK
            if link.max_packet_size is not None:
                room = link.max_packet_size - len(topics.chunk(args.name, version, 99999)) - 64
                chunk = max(64, min(chunk, room))
        days = args.expires_in
        pub = build(Path(args.model), name=args.name, version=version, key=key, chunk_size=chunk, task=args.task,
                    expires_in=days * 86400 if days is not None else None, backends=tuple(args.backend),
                    boards=tuple(args.board))
        if args.seed_dir is not None:
            from agent.fleet.seeder import save_seed

            save_seed(args.seed_dir, args.name, version, pub.raw, pub.path)
        started = time.perf_counter()
        sent = upload(link, pub, topics, timeout=args.timeout)
        took = time.perf_counter() - started
    finally:
        link.close()
    m = pub.manifest
    summary = {"name": m["name"], "version": m["version"], "sha256": m["sha256"], "size": m["size"],
               "chunks": len(m["delivery"]["chunks"]), "chunk_size": m["delivery"]["chunk_size"],
               "key_id": m["key_id"], "topic": topics.model(m["name"], m["version"]),
               "bytes_sent": sent, "seconds": round(took, 3)}
    if args.format == "json":
        out.write(json.dumps(summary) + "\n")
    else:
        out.write(f"published {m['name']}@{m['version']}: {m['size']} bytes in {summary['chunks']} chunks of "
                  f"{summary['chunk_size']} on {summary['topic']}/ (sha256 {m['sha256'][:16]}…, key {m['key_id']})\n")
    return 0


def cmd_serve_models(args: argparse.Namespace, out: TextIO) -> int:
    from agent.fleet.seeder import serve

    return serve(args, out, _topics(args))


def _parse_ref(ref: str) -> tuple[str, Any]:
    from agent.delivery.signed_manifest import NAME_RE
    from agent.version import parse_version

    name, sep, version = ref.partition("@")
    if not sep or not NAME_RE.match(name):
        raise BadInput(f"{ref!r}: give NAME@VERSION, e.g. colors@3")
    try:
        return name, parse_version(version)
    except ValueError as exc:
        raise BadInput(f"{ref!r}: {exc}") from None


def _send_tracked(to: str, link: Any, topics: Any, action: str, fields: dict[str, Any]) -> tuple[Any, set[str] | None]:
    """Send a deploy or rollback command, watching its states from before it leaves (none is missed); returns
    the view and the devices expected to answer (None for a group or all: whoever answers)."""
    from agent.fleet.watch import FleetView

    request = uuid.uuid4().hex[:12]
    view = FleetView(link, topics, request=request)
    view.sync()
    cmd = {"id": request, "action": action, **fields, "ts": time.time(), "v": 1}
    link.publish_wait(topics.cmd(to), json.dumps(cmd).encode(), qos=1)
    return view, None if to == "all" or to.startswith("group:") else {to}


def cmd_deploy(args: argparse.Namespace, out: TextIO) -> int:

    name, version = _parse_ref(args.ref)
    _check_target(args.to)
    fields: dict[str, Any] = {"model": name, "version": version}
    if args.shadow is not None or args.shadow_seconds is not None:
        if args.shadow is not None and args.shadow < 1:
            raise BadInput(f"--shadow {args.shadow}: at least 1 item")
        fields["shadow"] = {"items": args.shadow if args.shadow_seconds is None else None,
                            "seconds": args.shadow_seconds, "min_agreement": args.min_agreement,
                            "max_latency_ratio": args.max_latency_ratio}
    topics = _topics(args)
    link = _connect(args)
    try:
        view, expected = _send_tracked(args.to, link, topics, "deploy", fields)
        if args.no_wait:
            out.write(json.dumps({"sent": True, "id": view.request, "to": args.to}) + "\n")
            return 0
        complete = _follow(args, link, view, expected, out)
        return _finish(args, view, complete, out, f"deploy {name}@{version} to {args.to}")
    finally:
        link.close()


def cmd_rollback(args: argparse.Namespace, out: TextIO) -> int:
    from agent.delivery.signed_manifest import NAME_RE
    from agent.version import parse_version

    if not NAME_RE.match(args.name):
        raise BadInput(f"{args.name!r}: not a model name")
    fields: dict[str, Any] = {"model": args.name}
    if args.version is not None:
        try:
            fields["version"] = parse_version(args.version)
        except ValueError as exc:
            raise BadInput(f"--version: {exc}") from None
    _check_target(args.to)
    topics = _topics(args)
    link = _connect(args)
    try:
        view, expected = _send_tracked(args.to, link, topics, "rollback", fields)
        stop = threading.Event()
        complete = view.wait(expected, args.settle, time.monotonic() + args.timeout, stop)
        return _finish(args, view, complete, out, f"rollback {args.name} on {args.to}")
    finally:
        link.close()


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    from agent.fleet.watch import FleetView

    topics = _topics(args)
    link = _connect(args)
    try:
        view = FleetView(link, topics, model=args.model)
        if not view.sync(args.timeout):
            raise LeptonError(f"broker {link.broker}: no answer to our own message in {args.timeout:g} s")
        view.ask_presence()
        # The answers come over the settle time, however many devices there are: collect until it ends.
        threading.Event().wait(args.settle)
        if args.follow:
            _status_live(view, args.model)
        rows = [_status_row(v, args.model) for v in view.snapshot()]
    finally:
        link.close()
    if args.format == "json":
        for r in rows:
            out.write(json.dumps(r) + "\n")
    else:
        _print_table(out, rows, "deployments" + (f" of {args.model}" if args.model else ""),
                     ("device", "presence", "state", "version", "active", "reason", "detail"))
    return 0


def _status_row(view: Any, model: str | None) -> dict[str, Any]:
    row = _row(view) | {"online": view.online, "presence": view.presence, "last_seen": (view.status or {}).get("ts")}
    waiting = {p: m for p, m in view.waiting_for_model.items() if model is None or m == model}
    if waiting:  # pipelines that name a delivered model the device has none of yet
        row["waiting_for_model"] = waiting
        if view.state is None:
            row["state"] = "waiting_for_model"
        # Beside a deployment's own detail, not instead of it: after a failed deployment of the name the
        # pipeline still waits, and the table is where the operator reads both.
        waits = "; ".join(f"{p} waits for {m}" for p, m in sorted(waiting.items()))
        row["detail"] = f"{row['detail']}; {waits}" if row["detail"] else waits
    return row


def _status_live(view: Any, model: str | None) -> None:
    """The table `status` prints, redrawn until Ctrl-C (its rows from `_status_row`, so the two agree)."""
    columns = ("device", "presence", "model", "version", "state", "progress", "reason", "detail")
    title = "deployments" + (f" of {model}" if model else "") + " (live; Ctrl-C to stop)"

    def rows() -> list[list[str]]:
        out = []
        for v in view.snapshot():
            r = _status_row(v, model)
            r["progress"] = f"{r['progress']:.0%}" if isinstance(r["progress"], int | float) else None
            out.append(["" if r[c] is None else str(r[c]) for c in columns])
        return out

    stop = threading.Event()
    # rich's Live draws nothing on a pipe or a file until it stops: there, as without rich, the plain table
    # again whenever a row changes (a line per row, unwrapped), so a log or a script reading it sees each change.
    if not output.have_rich() or not output.console(sys.stderr).is_terminal:
        shown: list[list[str]] = []
        try:
            while not stop.wait(0.25):
                if (now := rows()) != shown:
                    shown = now
                    output.print_table(sys.stderr, title, columns, now, plain=True)
        except KeyboardInterrupt:
            return
        return
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def render() -> Table:
        table = Table(title=title)
        for column in columns:
            table.add_column(column.upper())
        for row in rows():
            table.add_row(*row)
        return table

    with Live(render(), console=Console(file=sys.stderr), refresh_per_second=4) as live:
        try:
            while not stop.wait(0.25):
                live.update(render())
        except KeyboardInterrupt:
            return
