"""`lepton-fleet samples list|pull|purge`: bring captured samples from devices into a dataset folder.

A pull names its devices (DEVICE, group:G, or `all` with `--yes`), lists their samples (`--since`,
`--reason`, `--pipeline`), asks each device to `offer` a batch (retained chunks plus a manifest,
agent.samples.offer) and pulls each with model delivery's chunk session in the other direction:
a window of chunk subscriptions, each chunk and then the whole file checked against the manifest's
sha256, written into `OUT/.partial/` so that a pull cut short resumes from what it had. A sample
enters the folder (data file renamed into place, then its sidecar) only once whole and verified, and
only then is it acknowledged: the device deletes what the operator holds, and nothing else.
The folder's layout and labels files are `agent.samples.dataset`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from agent.errors import BadInput, LeptonError

BATCH = 16
"""Samples offered per command: bounded by what the device's link holds retained until acknowledged."""


@dataclass(frozen=True)
class SampleFile:
    """A sample's manifest as the device published it (the `ChunkedFile` the chunk session pulls)."""

    name: str
    sha256: str
    size: int
    chunk_size: int
    chunks: tuple[str, ...]
    file: str
    sidecar: dict[str, Any]
    version: str = "sample"

    def chunk_span(self, index: int) -> tuple[int, int]:
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    @classmethod
    def parse(cls, raw: bytes, sid: str) -> SampleFile:
        from agent.delivery.signed_manifest import parse_json_object
        from agent.samples.sample_store import DATA_SUFFIXES, SAMPLE_ID

        try:
            m = parse_json_object(raw, "sample manifest")
            chunks = tuple(str(c) for c in m["chunks"])
            out = cls(name=str(m["id"]), sha256=str(m["sha256"]), size=int(m["size"]),
                      chunk_size=int(m["chunk_size"]), chunks=chunks, file=str(m["file"]),
                      sidecar=dict(m["sidecar"]))
        except Exception as exc:
            raise LeptonError(f"sample {sid}: bad manifest ({exc})") from None
        # The device names the file; the operator's folder takes only a plain name that is the sample's id.
        if (out.name != sid or not SAMPLE_ID.match(sid) or Path(out.file).suffix not in DATA_SUFFIXES
                or out.file != sid + Path(out.file).suffix or out.size <= 0 or out.chunk_size <= 0
                or len(chunks) != -(-out.size // out.chunk_size)):
            raise LeptonError(f"sample {sid}: manifest does not describe this sample")
        return out


class _Topics:
    def __init__(self, base: str) -> None:
        self.base = base

    def chunk(self, name: str, version: Any, index: int) -> str:
        from agent.samples.offer import sample_topic

        return f"{sample_topic(self.base, name)}/chunk/{index}"


class _Partials:
    def __init__(self, path: Path) -> None:
        self.path = path

    def discard_part(self, sha256: str) -> None:
        self.path.unlink(missing_ok=True)


ASK_AFTER_S = 1.0
"""Seconds without the retained manifest before asking the device for it (and for every chunk after it)."""


def ask(link: Any, base: str, sid: str, request: dict[str, Any]) -> None:
    """Ask the device for an offered sample's manifest or chunks, published again not retained (QoS 0: a lost
    request is asked again). For brokers whose retained messages stay on the node the device is connected to."""
    from agent.samples.offer import sample_topic

    body = json.dumps({**request, "ts": round(time.time(), 3), "v": 1}, separators=(",", ":")).encode()
    link.publish(f"{sample_topic(base, sid)}/want", body, qos=0)


class _Puller:
    """The chunk session's view of the operator: link, settings, topics, where a bad partial goes."""

    def __init__(self, link: Any, base: str, partial: Path, stall_s: float, asked: SampleFile | None) -> None:
        from agent.delivery.download import DownloadSettings

        self.link = link
        self.base = base
        self.settings = DownloadSettings(window=8, stall_timeout=stall_s, max_stalls=3)
        self.topics = _Topics(base)
        self.store = _Partials(partial)
        self.asking = set() if asked is None else {(asked.name, asked.version)}
        """A sample whose manifest was not retained here: each chunk is asked of the device as it is subscribed."""

    def want(self, name: str, version: Any, request: dict[str, Any]) -> None:
        ask(self.link, self.base, name, request)


class Requests:
    """Commands to devices and their replies, over one operator connection."""

    def __init__(self, link: Any, prefix: str, timeout: float) -> None:
        self.link = link
        self.prefix = prefix
        self.timeout = timeout
        self._cond = threading.Condition()
        self._replies: dict[str, list[dict[str, Any]]] = {}
        link.subscribe(f"{prefix}/+/reply", self._on_reply)
        link.wait_subscribed(10.0)

    def _on_reply(self, topic: str, payload: bytes) -> None:
        from agent.mqtt.topics import unsegment

        try:
            reply = json.loads(payload)
        except ValueError:
            return
        if isinstance(reply, dict) and isinstance(reply.get("id"), str):
            with self._cond:
                if reply["id"] in self._replies:
                    self._replies[reply["id"]].append({"device": unsegment(topic.split("/")[-2]), **reply})
                    self._cond.notify_all()

    def send(self, target: str, fields: dict[str, Any], *, many: bool = False) -> list[dict[str, Any]]:
        """Send to DEVICE (wait for its reply) or a group/all (collect replies until the timeout)."""
        from agent.mqtt.topics import SCHEMA_VERSION, FleetTopics

        cid = uuid.uuid4().hex
        with self._cond:
            self._replies[cid] = []
        command = {"id": cid, "action": "samples", **fields, "ts": round(time.time(), 3), "v": SCHEMA_VERSION}
        self.link.publish_wait(FleetTopics(self.prefix).cmd(target), json.dumps(command).encode(), qos=1,
                               timeout=self.timeout)
        with self._cond:
            if many:
                self._cond.wait(self.timeout)
            else:
                self._cond.wait_for(lambda: bool(self._replies[cid]), self.timeout)
            replies = self._replies.pop(cid)
        if not replies and not many:
            raise LeptonError(f"no reply from {target} within {self.timeout:g} s")
        return replies

    def one(self, device: str, fields: dict[str, Any]) -> dict[str, Any]:
        reply = self.send(device, fields)[0]
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise LeptonError(f"{device}: {err.get('code')}: {err.get('message')}")
        result: dict[str, Any] = reply["result"]
        return result


def pull_one(link: Any, prefix: str, device: str, sample: dict[str, Any], folder: Path, stop: threading.Event,
             stall_s: float, progress: Any = None) -> tuple[SampleFile, int]:
    """Pull one offered sample into `folder` (resuming its partial file); the verified manifest and the
    chunks an earlier, interrupted pull had left in the partial file."""
    from agent.delivery.download import ChunkSession
    from agent.delivery.reasons import DeliveryError
    from agent.delivery.store import PartFile
    from agent.mqtt.topics import FleetTopics
    from agent.samples.dataset import place
    from agent.samples.offer import sample_topic

    sid = sample["id"]
    base = FleetTopics(prefix).device(device).base
    arrived = threading.Event()
    raw: list[bytes] = []

    def on_manifest(_topic: str, data: bytes) -> None:
        if data and not arrived.is_set():
            raw.append(bytes(data))
            arrived.set()

    topic = f"{sample_topic(base, sid)}/manifest"
    link.subscribe(topic, on_manifest)
    asked = False
    try:
        deadline = time.monotonic() + stall_s * 3
        wait = min(ASK_AFTER_S, stall_s)
        while not arrived.wait(wait):
            if time.monotonic() >= deadline:
                raise LeptonError(f"{device}: sample {sid}: no manifest on {topic}")
            # Not retained where this operator is connected: the device answers the request itself.
            ask(link, base, sid, {"manifest": True, "chunks": []})
            asked, wait = True, min(stall_s, max(0.0, deadline - time.monotonic()))
    finally:
        link.unsubscribe(topic)
    manifest = SampleFile.parse(raw[0], sid)
    partials = folder / ".partial"
    partials.mkdir(parents=True, exist_ok=True)
    partial = partials / manifest.file
    part = PartFile(partial)
    session = ChunkSession(_Puller(link, base, partial, stall_s, manifest if asked else None), manifest, part, stop,
                           progress)
    try:
        session.run()
        part.sync()
    except DeliveryError as exc:
        raise LeptonError(f"{device}: sample {sid}: {exc}") from None
    finally:
        part.close()
    place(folder, partial, manifest.sidecar | {"sha256": manifest.sha256, "bytes": manifest.size})
    return manifest, session.stats.chunks_on_disk


def _targets(args: argparse.Namespace, requests: Requests, filters: dict[str, Any]) -> list[tuple[str, dict]]:
    """(device, its `list` result) for DEVICE, group:G or all (all only with --yes)."""
    target = args.target
    if target == "all" and not args.yes:
        raise BadInput("TARGET all: a pull from every device needs --yes (name a device or group:G)")
    if not target or any(c in target for c in "/+#") or target == "group:":
        raise BadInput(f"TARGET {target!r}: give a device id, group:NAME or all")
    fields = {"op": "list", **filters}
    if target == "all" or target.startswith("group:"):
        replies = requests.send(target, fields, many=True)
    else:
        replies = requests.send(target, fields)
    out = []
    for r in replies:
        if r.get("ok"):
            out.append((r["device"], r["result"]))
        else:
            err = r.get("error") or {}
            print(f"lepton-fleet: {r['device']}: {err.get('code')}: {err.get('message')}", file=sys.stderr)
    return out


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    f: dict[str, Any] = {}
    if args.since is not None:
        f["since"] = args.since
    if args.reason:
        f["reason"] = args.reason
    if args.pipeline:
        f["pipeline"] = args.pipeline
    return f


def cmd_samples(args: argparse.Namespace, out: TextIO) -> int:
    from agent.fleet.live import open_link

    if args.op == "pull":
        if args.out is None:
            raise BadInput("samples pull: give --out DIR")
        if args.out.exists() and not args.out.is_dir():
            raise BadInput(f"--out {args.out}: not a folder")
    link = open_link(args, timeout=min(args.timeout, 30.0))
    try:
        requests = Requests(link, args.prefix, args.timeout)
        if args.op == "purge":
            if args.target == "all" or args.target.startswith("group:"):
                raise BadInput("samples purge: name one device")
            result = requests.one(args.target, {"op": "purge"})
            out.write(json.dumps({"device": args.target, **result}) + "\n")
            return 0
        listed = _targets(args, requests, _filters(args))
        if args.op == "list":
            for device, result in listed:
                out.write(json.dumps({"device": device, **result}) + "\n")
            return 0 if listed else 1
        return _pull(args, link, requests, listed, out)
    finally:
        link.close()


def _pull(args: argparse.Namespace, link: Any, requests: Requests, listed: list[tuple[str, dict]],
          out: TextIO) -> int:
    from agent.samples.dataset import has, write_labels

    folder: Path = args.out
    folder.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    bar = _Bar(enabled=args.format == "table" and sys.stderr.isatty())
    failed = 0
    for device, result in listed:
        resumed = 0
        wanted = [s for s in result["samples"] if not has(folder, s)]
        done = [s["id"] for s in result["samples"] if has(folder, s)]  # pulled before, not yet acknowledged
        for i in range(0, len(wanted), BATCH):
            batch = wanted[i:i + BATCH]
            offered = requests.one(device, {"op": "offer", "ids": [s["id"] for s in batch]})["offered"]
            for sample in offered:
                try:
                    resumed += pull_one(link, args.prefix, device, sample, folder, stop, args.stall,
                                        bar.task(f"{device} {sample['id']}", sample["size"]))[1]
                except LeptonError as exc:
                    failed += 1
                    print(f"lepton-fleet: {exc}", file=sys.stderr)
                    continue
                done.append(sample["id"])
        if done:
            acked = requests.one(device, {"op": "delete", "ids": done})
            out.write(json.dumps({"device": device, "pulled": len(done), "deleted": acked["deleted"],
                                  "resumed_chunks": resumed}) + "\n")
    labels = write_labels(folder)
    out.write(json.dumps({"out": str(folder), **labels}) + "\n")
    return 1 if failed else 0


class _Bar:
    """Progress per sample on stderr when it is a terminal; nothing for scripts."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def task(self, label: str, size: int) -> Any:
        if not self.enabled:
            return None
        pct = [-1]

        def progress(fraction: float) -> None:
            p = int(fraction * 20)
            if p != pct[0]:
                pct[0] = p
                sys.stderr.write(f"\r{label} [{'#' * p}{'.' * (20 - p)}] {fraction * size / 1024:.0f} KiB")
                if p == 20:
                    sys.stderr.write("\n")
                sys.stderr.flush()

        return progress


def add_sample_commands(sub: Any) -> None:
    from agent.fleet.live import add_connection_options

    p = sub.add_parser("samples", help="list, pull (to a dataset folder) or purge the samples devices captured")
    p.add_argument("op", choices=("list", "pull", "purge"))
    p.add_argument("target", metavar="TARGET", help="DEVICE, group:NAME, or all (with --yes)")
    p.add_argument("--out", type=Path, help="pull: the dataset folder (created; a pull cut short resumes into it)")
    p.add_argument("--since", type=float, metavar="UNIX_S", help="only samples captured from then on")
    p.add_argument("--reason", help="only samples kept for this reason (band, command, random)")
    p.add_argument("--pipeline", help="only this pipeline's samples")
    p.add_argument("--yes", action="store_true", help="allow TARGET all")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each reply (default 10)")
    p.add_argument("--stall", type=float, default=5.0, help="seconds without a chunk before asking again")
    p.add_argument("--format", choices=("table", "json"), default="table")
    add_connection_options(p)
    p.set_defaults(func=cmd_samples)

