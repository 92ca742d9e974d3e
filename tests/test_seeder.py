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


def test_a_chunk_asked_again_right_after_its_publish_waits_and_goes_once(tmp_path: Path, broker: Broker) -> None:
    """Requests that come just after a chunk's publish (devices that subscribed a moment later) are answered
    together by one more publish once `repeat_s` has passed, not one publish each: at 200 devices on RabbitMQ
    one each made the cluster queue ~700 copies per device and the deploy stalled."""
    version = parse_version("1")
    pub = build(FIXTURES / "colors_int8.json", name="colors", version=version, key=new_keys().private,
                chunk_size=1024)
    save_seed(tmp_path, "colors", version, pub.raw, pub.path)
    topics = FleetTopics(unique_prefix())
    operator, device = connect(broker.port), connect(broker.port)
    copies: dict[int, int] = {0: 0, 1: 0}
    cond = threading.Condition()
    stop = threading.Event()
    seeder = Seeder(operator, topics, load_seeds(tmp_path), repeat_s=3600.0)
    worker = threading.Thread(target=seeder.run, args=(stop,))
    try:
        seeder.subscribe()
        operator.wait_subscribed(10)
        for index in copies:
            def on_chunk(_t: str, _data: bytes, index: int = index) -> None:
                with cond:
                    copies[index] += 1
                    cond.notify_all()

            device.subscribe(topics.chunk("colors", version, index), on_chunk)
        device.wait_subscribed(10)
        worker.start()
        want = topics.want("colors", version)
        device.publish(want, b'{"chunks": [0], "v": 1}')
        with cond:
            assert cond.wait_for(lambda: copies[0] == 1, 15)
        for _ in range(10):  # ten devices that subscribed just after the publish
            device.publish(want, b'{"chunks": [0], "v": 1}')
        # Handled in order: once chunk 1 (asked after them) is out, the ten were seen and held, not sent.
        device.publish(want, b'{"chunks": [1], "v": 1}')
        with cond:
            assert cond.wait_for(lambda: copies[1] == 1, 15)
        assert copies[0] == 1 and seeder.stats.published == 2 and seeder.stats.asked == 12
        with seeder._cond:  # the hold-down over: the ten requests get one publish between them
            seeder.repeat_s = 0.0
            seeder._cond.notify_all()
        with cond:
            assert cond.wait_for(lambda: copies[0] == 2, 15)
        assert wait_until(lambda: seeder.stats.published == 3)
    finally:
        stop.set()
        if worker.is_alive():
            worker.join(10)
        for link in (operator, device):
            link.close()
