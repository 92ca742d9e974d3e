#!/usr/bin/env python3
"""Model delivery benchmark; prints JSON.

1. One device: a 4 MB model pulled over MQTT, every chunk and the whole file
   verified and the file fsynced into the store, against one `mosquitto_pub -f`
   of the same file (QoS 1) to a subscriber, through the same broker, in the same
   run, alternating; the ratio is our throughput over the C client's. The pull
   runs twice each round: over `PahoLink` (paho's own network thread, what the
   tools use) and over the daemon's own link (`agent.mqtt.link.Link`, the
   connection `lepton-agent run` shares with results and commands). Each round also
   uploads the model again as `lepton-fleet publish` does (`upload_ratio`: our upload's
   throughput over the same `mosquitto_pub -f`).
2. A fleet: N devices (one process, one MQTT client each) pull the same model at
   once: seconds until all have it verified on disk, and the broker's RSS.

The broker is a fresh mosquitto on a free loopback port; the model is built by
scripts/make_delivery_fixtures.py's flatbuffer writer (a classifier with a 4 MB
weight table), so it is a real, loadable .tflite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
from broker import Broker  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from agent.delivery.download import Downloader  # noqa: E402
from agent.delivery.signed_manifest import DevicePolicy  # noqa: E402
from agent.delivery.signing import TrustedKeys, key_id, public_text  # noqa: E402
from agent.delivery.store import ModelStore  # noqa: E402
from agent.fleet.publish import build, upload  # noqa: E402
from agent.mqtt.client import BrokerAddress, PahoLink  # noqa: E402
from agent.mqtt.topics import FleetTopics  # noqa: E402


def big_model(path: Path, size: int) -> Path:
    """A loadable int8 classifier whose weight table makes the file about `size` bytes."""
    from make_delivery_fixtures import GATHER as gather_op
    from make_delivery_fixtures import IMAGE_QUANT, INT8, INT32, SCORE_QUANT, _Graph

    g = _Graph()
    x = g.tensor([1, 32, 32, 3], INT8, "image", quant=IMAGE_QUANT)
    rows = max(1, size // 3)
    table = g.tensor([rows, 3], INT8, "table", np.random.default_rng(0).integers(-128, 128, (rows, 3),
                                                                                  dtype=np.int8).tobytes(),
                     quant=SCORE_QUANT)
    index = g.tensor([1], INT32, "index", np.zeros(1, np.int32).tobytes())
    y = g.tensor([1, 3], INT8, "scores", quant=SCORE_QUANT)
    g.op(gather_op, [table, index], [y])
    path.write_bytes(g.build([x], [y]))
    return path


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def mosquitto_pub_once(port: int, model: Path, topic: str, sub: PahoLink) -> float:
    """Seconds from starting `mosquitto_pub -f` to the subscriber holding the whole message."""
    got = threading.Event()
    size = model.stat().st_size

    def on_message(_t: str, payload: bytes) -> None:
        if len(payload) == size:
            got.set()

    sub.subscribe(topic, on_message)
    sub.wait_subscribed(10)  # else a slow SUBSCRIBE lets the message pass unseen
    t0 = time.perf_counter()
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-f", str(model)],
                   check=True)
    if not got.wait(60):
        raise SystemExit("bench_delivery: mosquitto_pub's message never arrived")
    took = time.perf_counter() - t0
    sub.unsubscribe(topic)
    return took


def daemon_link(port: int, tmp: Path) -> tuple[Any, Any]:
    """The daemon's MQTT link as `lepton-agent run` wires it (spool, state), connected; and how to close it."""
    from agent.agent_state import AgentState
    from agent.config import MqttSection
    from agent.mqtt.link import Link
    from agent.mqtt.spool import Spool
    from agent.mqtt.topics import Topics as DeviceTopics

    spool = Spool(tmp / "spool.sqlite3", 1 << 22)
    state = AgentState(tmp / "agent.sqlite3")
    stop = threading.Event()
    link = Link(MqttSection(broker=(f"mqtt://127.0.0.1:{port}",)), topics=DeviceTopics("bench", "dev"), groups=(),
                client_id="bench-daemon-link", spool=spool, next_bdseq=state.next_bdseq, birth=dict,
                on_command=lambda t, p: None, stop=stop)
    link.start()
    if not link.connected.wait(10):
        raise SystemExit("bench_delivery: the daemon link did not connect")

    def close() -> None:
        stop.set()
        link.close({"state": "stopped"}, 2)
        spool.close()
        state.close()

    return link, close


def download_once(link: Any, store_dir: Path, trusted: TrustedKeys, backend: str, topics: FleetTopics,
                  name: str) -> float:
    shutil.rmtree(store_dir, ignore_errors=True)
    store = ModelStore(store_dir)
    d = Downloader(link, store, trusted, DevicePolicy(backend=backend, max_model_bytes=1 << 30), topics=topics)
    stop = threading.Event()
    t0 = time.perf_counter()
    signed = d.fetch_manifest(name, 1, stop)
    d.download(signed, stop)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--fleet-size-mb", type=float, default=4.0, help="model size for the fleet part")
    p.add_argument("--chunk-size", type=int, default=64 * 1024)
    args = p.parse_args()
    if shutil.which("mosquitto_pub") is None:
        raise SystemExit("bench_delivery: mosquitto_pub not found (apt-get install mosquitto-clients)")
    from agent.runtime import load_backend

    backend = load_backend().name
    key = Ed25519PrivateKey.generate()
    trusted = TrustedKeys.from_config({key_id(key.public_key()): public_text(key.public_key())})
    topics = FleetTopics("bench")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = big_model(tmp / "model.tflite", int(args.size_mb * 1024 * 1024))
        size = model.stat().st_size
        report: dict[str, Any] = {"backend": backend, "model_bytes": size, "chunk_size": args.chunk_size,
                                  "reps": args.reps}
        with Broker(tmp / "mosquitto") as broker, \
                PahoLink(BrokerAddress("127.0.0.1", broker.port, False)) as link, \
                PahoLink(BrokerAddress("127.0.0.1", broker.port, False)) as sub:
            pub = build(model, name="big", version=1, key=key, chunk_size=args.chunk_size, task="classify")
            t0 = time.perf_counter()
            upload(link, pub, topics)
            first_upload_s = time.perf_counter() - t0
            ref, ups, ours, daemon = [], [], [], []
            agent_link, close_agent_link = daemon_link(broker.port, tmp)
            try:
                for _ in range(args.reps):
                    ref.append(mosquitto_pub_once(broker.port, model, "bench/reference", sub))
                    t0 = time.perf_counter()
                    upload(link, pub, topics)  # the same retained chunks again: what an operator's upload costs
                    ups.append(time.perf_counter() - t0)
                    ours.append(download_once(link, tmp / "store", trusted, backend, topics, "big"))
                    daemon.append(download_once(agent_link, tmp / "store", trusted, backend, topics, "big"))
            finally:
                close_agent_link()
            ref_s, ours_s, daemon_s = statistics.median(ref), statistics.median(ours), statistics.median(daemon)
            upload_s = statistics.median(ups)
            mb = size / 1e6
            report["single"] = {
                "mosquitto_pub_s": round(ref_s, 4), "mosquitto_pub_mb_s": round(mb / ref_s, 1),
                "download_verified_on_disk_s": round(ours_s, 4), "download_mb_s": round(mb / ours_s, 1),
                "throughput_ratio": round(ref_s / ours_s, 3),
                "daemon_link_s": round(daemon_s, 4), "daemon_link_mb_s": round(mb / daemon_s, 1),
                "daemon_link_throughput_ratio": round(ref_s / daemon_s, 3),
                "daemon_link_vs_paho_link": round(ours_s / daemon_s, 3),
                "upload_s": round(upload_s, 4), "upload_mb_s": round(mb / upload_s, 1),
                "upload_ratio": round(ref_s / upload_s, 3), "first_upload_s": round(first_upload_s, 4),
                "end_to_end_ratio": round(ref_s / (ours_s + upload_s), 3),
            }
        with Broker(tmp / "mosquitto-fleet") as broker:
            fleet_model = big_model(tmp / "fleet.tflite", int(args.fleet_size_mb * 1024 * 1024))
            with PahoLink(BrokerAddress("127.0.0.1", broker.port, False)) as op:
                upload(op, build(fleet_model, name="fleet", version=1, key=key, chunk_size=args.chunk_size,
                                 task="classify"), topics)
            assert broker.proc is not None
            idle_kb = rss_kb(broker.proc.pid)
            links = [PahoLink(BrokerAddress("127.0.0.1", broker.port, False), client_id=f"dev{i:03d}").start()
                     for i in range(args.devices)]
            done: list[float] = []
            errors: list[str] = []
            go = threading.Event()
            peak = [idle_kb]

            def device(i: int) -> None:
                go.wait()
                try:
                    store = ModelStore(tmp / "fleet" / f"dev{i:03d}")
                    d = Downloader(links[i], store, trusted, DevicePolicy(backend=backend, max_model_bytes=1 << 30),
                                   topics=topics)
                    stop = threading.Event()
                    d.download(d.fetch_manifest("fleet", 1, stop), stop)
                    done.append(time.perf_counter())
                except Exception as exc:
                    errors.append(f"dev{i}: {exc}")

            threads = [threading.Thread(target=device, args=(i,)) for i in range(args.devices)]
            for t in threads:
                t.start()
            t0 = time.perf_counter()
            go.set()
            watching = True

            def sample() -> None:
                while watching:
                    assert broker.proc is not None
                    peak[0] = max(peak[0], rss_kb(broker.proc.pid))
                    time.sleep(0.05)  # a sampling interval, not synchronisation

            sampler = threading.Thread(target=sample)
            sampler.start()
            for t in threads:
                t.join()
            watching = False
            sampler.join()
            for lk in links:
                lk.close()
            fleet_bytes = fleet_model.stat().st_size
            total = (max(done) - t0) if done else None
            report["fleet"] = {
                "devices": args.devices, "model_bytes": fleet_bytes, "verified": len(done), "errors": errors[:3],
                "all_verified_s": round(total, 3) if total else None,
                "aggregate_mb_s": round(fleet_bytes * len(done) / 1e6 / total, 1) if total else None,
                "broker_rss_mb": {"idle_with_model": round(idle_kb / 1024, 1), "peak": round(peak[0] / 1024, 1),
                                  "high_water": round(rss_kb(broker.proc.pid, "VmHWM") / 1024, 1)},
            }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
