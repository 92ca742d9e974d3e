"""The operator-side `PahoLink` against a real mosquitto: one connection however it is started, and
subscriptions acknowledged again after a connection is lost with a SUBSCRIBE unanswered."""

from __future__ import annotations

from pathlib import Path

from broker import Broker

from agent.mqtt.client import BrokerAddress, PahoLink


def test_starting_twice_keeps_the_one_connection(tmp_path: Path) -> None:
    # `with PahoLink(...).start() as link` starts it twice; a second connect orphaned the socket paho's
    # thread reads, which then reconnected a second later and forgot the SUBSCRIBE in flight.
    with Broker(tmp_path / "b") as broker:
        link = PahoLink(BrokerAddress("127.0.0.1", broker.port, False)).start()
        first = link.client.socket()
        with link.start() as same:
            assert same is link and link.client.socket() is first
            got: list[bytes] = []
            link.subscribe("t/x", lambda t, p: got.append(p))
            link.wait_subscribed(10)
            link.publish_wait("t/x", b"hello", timeout=10)
            assert link.connects == 1


def test_a_subscribe_lost_with_its_connection_is_acknowledged_after_the_reconnect(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "b").start()
    try:
        link = PahoLink(BrokerAddress("127.0.0.1", broker.port, False)).start()
        broker.freeze()
        link.subscribe("t/x", lambda t, p: None)  # sent; the frozen broker never answers it
        broker.kill()  # the connection ends with the SUBSCRIBE unanswered
        broker.start()
        link.wait_subscribed(60)  # answered on the new connection (the old one's mid must not wait forever)
        assert link.connects == 2
        link.close()
    finally:
        broker.stop()
