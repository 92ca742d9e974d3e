"""The small operator-side MQTT client: `PahoLink`, a paho-mqtt 2 client with the three methods of
delivery's `Link` (agent.delivery.transport) for the fleet tools, the benchmarks and the tests.

The daemon's own connection is `agent.mqtt.link.Link` (its will, spool and reconnect policy are its
business). A `Link` must (1) deliver each message to every callback whose filter matches, on one
thread, one message at a time, (2) survive and count an exception in a callback, and (3) re-subscribe
its filters after a reconnect, so that retained messages are sent again: the downloader relies on that
to resume.
"""

from __future__ import annotations

import functools
import logging
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.config import parse_broker_url
from agent.delivery.transport import MessageCallback
from agent.errors import BadInput, LeptonError
from agent.mqtt.tls import client_context

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker is, from `mqtt://host:port` or `mqtts://host:port`."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str, what: str = "--broker") -> BrokerAddress:
        # The agent config's own parser; a bare host:port means mqtt://.
        try:
            host, port, tls = parse_broker_url(url if "://" in url else f"mqtt://{url}")
        except ValueError as exc:
            raise BadInput(f"{what} {exc}") from None
        return cls(host, port, tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsOptions:
    """TLS material as the agent config names it; all optional (system CAs by default)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class PahoLink:
    """A paho-mqtt 2 client (CallbackAPIVersion.VERSION2) behind the `Link` methods."""

    def __init__(
        self,
        broker: BrokerAddress,
        *,
        client_id: str | None = None,
        tls: TlsOptions | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
    ) -> None:
        self.broker = broker
        self.client_id = client_id or f"lepton-{uuid.uuid4().hex[:12]}"
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol,
                                   reconnect_on_failure=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=15)
        if broker.tls:
            tls = tls or TlsOptions()
            self._client.tls_set_context(client_context(tls.ca_file, tls.cert_file, tls.key_file))
        if username is not None:
            self._client.username_pw_set(username, password)
        self._keepalive = keepalive
        self._lock = threading.Lock()
        self._filters: dict[str, tuple[MessageCallback, int]] = {}
        self._message_filters: dict[str, tuple[Callable[[mqtt.MQTTMessage], None], int]] = {}
        self._unacked_subscribes: set[int] = set()
        self._subscribed = threading.Condition(self._lock)
        self.connected = threading.Event()
        self.connects = 0
        """Successful connects so far (the first one included)."""
        self.callback_errors = 0
        self.max_packet_size: int | None = None
        """The broker's Maximum Packet Size from an MQTT 5 CONNACK, if it sent one."""
        self._refused: str | None = None
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> PahoLink:
        """Connect and start the network thread; wait for the first connect up to `timeout`."""
        try:
            self._client.connect(self.broker.host, self.broker.port, keepalive=self._keepalive)
        except (OSError, ssl.SSLError) as exc:
            raise LeptonError(f"broker {self.broker}: cannot connect ({exc})") from None
        self._client.loop_start()
        if not self.connected.wait(timeout):
            self._client.loop_stop()
            why = self._refused or "no answer"
            raise LeptonError(f"broker {self.broker}: not connected after {timeout:g} s ({why})")
        return self

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> PahoLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            logger.warning("broker %s refused the connection: %s", self.broker, reason)
            return
        if props is not None and getattr(props, "MaximumPacketSize", None):
            self.max_packet_size = int(props.MaximumPacketSize)
        with self._lock:
            filters = [(f, qos) for f, (_, qos) in [*self._filters.items(), *self._message_filters.items()]]
        for topic_filter, qos in filters:
            self._send_subscribe(topic_filter, qos)
        self.connects += 1
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected.clear()
        if reason.is_failure:
            logger.info("broker %s: disconnected (%s); reconnecting", self.broker, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            targets: list[Callable[[], None]] = [
                functools.partial(cb, message.topic, bytes(message.payload))
                for f, (cb, _) in self._filters.items() if mqtt.topic_matches_sub(f, message.topic)]
            targets += [functools.partial(cb, message) for f, (cb, _) in self._message_filters.items()
                        if mqtt.topic_matches_sub(f, message.topic)]
        for callback in targets:
            try:
                callback()
            except Exception:
                # One bad message or handler must never end the network thread.
                self.callback_errors += 1
                logger.exception("message handler for %s failed", message.topic)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        for code in reasons:
            if code.is_failure:
                logger.warning("broker %s refused a subscription: %s", self.broker, code)
        with self._lock:
            self._unacked_subscribes.discard(mid)
            self._subscribed.notify_all()

    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        with self._lock:
            rc, mid = self._client.subscribe(topic_filter, qos)
            if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._unacked_subscribes.add(mid)

    # -- Link ----------------------------------------------------------------

    def subscribe(self, topic_filter: str, callback: MessageCallback, qos: int = 1) -> None:
        with self._lock:
            self._filters[topic_filter] = (callback, qos)
        # Not connected: on_connect subscribes everything in _filters.
        self._send_subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._filters.pop(topic_filter, None)
            self._message_filters.pop(topic_filter, None)
        self._client.unsubscribe(topic_filter)

    # -- beyond Link: the operator tools ---------------------------------------

    def subscribe_messages(self, topic_filter: str, callback: Callable[[mqtt.MQTTMessage], None],
                           qos: int = 1) -> None:
        """Like `subscribe`, but the callback gets paho's message (the tools show its `retain` flag)."""
        with self._lock:
            self._message_filters[topic_filter] = (callback, qos)
        self._send_subscribe(topic_filter, qos)

    def wait_subscribed(self, timeout: float) -> None:
        """Until the broker has acknowledged every SUBSCRIBE sent so far (a reply must not beat it)."""
        with self._lock:
            if not self._subscribed.wait_for(lambda: not self._unacked_subscribes, timeout):
                raise LeptonError(f"broker {self.broker}: subscription not acknowledged in {timeout:g} s")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=qos, retain=retain)

    def publish_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                     timeout: float = 30.0) -> None:
        """Publish and wait until the broker has it (QoS ≥ 1) or it left the socket (QoS 0)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise LeptonError(f"broker {self.broker}: publish to {topic} not acknowledged in {timeout:g} s")

    @property
    def client(self) -> mqtt.Client:
        """The paho client, for what the three methods do not cover (publisher flow control)."""
        return self._client
