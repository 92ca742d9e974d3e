"""`serve-models`' seeder on a real mosquitto: requests for the same chunk that arrive together are answered
with one publish that every waiting device gets; requests it cannot serve are counted, never fatal."""

from __future__ import annotations

import threading
from pathlib import Path

from broker import Broker, wait_until
from delivery_kit import FIXTURES, connect, new_keys, unique_prefix

from agent.fleet.publish import build
from agent.fleet.seeder import Seeder, load_seeds, save_seed
from agent.mqtt.topics import FleetTopics
from agent.version import parse_version


def test_one_publish_for_every_device_waiting(tmp_path: Path, broker: Broker) -> None:
    version = parse_version("1.0.2")
    pub = build(FIXTURES / "colors_int8.json", name="colors", version=version, key=new_keys().private,
                chunk_size=1024)
    save_seed(tmp_path, "colors", version, pub.raw, pub.path)
    topics = FleetTopics(unique_prefix())
    operator = connect(broker.port)
    devices = [connect(broker.port) for _ in range(3)]
    got: list[list[bytes]] = [[] for _ in devices]
    lock = threading.Condition()
    try:
        seeder = Seeder(operator, topics, load_seeds(tmp_path))
        seeder.subscribe()
        operator.wait_subscribed(10)
        for n, device in enumerate(devices):
            def on_chunk(_t: str, data: bytes, n: int = n) -> None:
                with lock:
                    got[n].append(data)
                    lock.notify_all()

            device.subscribe(topics.chunk("colors", version, 2), on_chunk)
            device.wait_subscribed(10)
            device.publish(topics.want("colors", version), b'{"chunks": [2], "v": 1}')
        device.publish(topics.want("colors", version), b'{"chunks": [99999]}')  # not a chunk of it
        device.publish(topics.want("other", version), b'{"chunks": [0]}')  # not held
        device.publish(topics.want("colors", version), b'[1, 2]')  # not an object
        assert wait_until(lambda: seeder.stats.requests == 3 and seeder.stats.ignored == 3)
        stop = threading.Event()
        worker = threading.Thread(target=seeder.run, args=(stop,))
        worker.start()
        with lock:
            assert lock.wait_for(lambda: all(got), 15)
        stop.set()
        worker.join(10)
        expected = pub.path.read_bytes()[2048:3072]
        assert all(g == [expected] for g in got)
        assert seeder.stats.asked == 3 and seeder.stats.published == 1
    finally:
        for link in (operator, *devices):
            link.close()
