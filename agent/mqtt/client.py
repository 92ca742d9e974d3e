"""The small operator-side MQTT client: `PahoLink`, a paho-mqtt 2 client with the three methods of
delivery's `Link` (agent.delivery.transport) for the fleet tools, the benchmarks and the tests.

The daemon's own connection is `agent.mqtt.link.Link` (its will, spool and reconnect policy are its
business). A `Link` must (1) deliver each message to every callback whose filter matches, on one
thread, one message at a time, (2) survive and count an exception in a callback, and (3) re-subscribe
its filters after a reconnect, so that retained messages are sent again: the downloader relies on that
to resume.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import threading
import time
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

UNSUPPORTED_PROTOCOL = 0x84
"""CONNACK reason: Unsupported Protocol Version (3.1.1's return code 1 maps to it too)."""


class Unanswered(LeptonError):
    """The broker ended a connection attempt before any CONNACK (or refused its protocol version)."""

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


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _PromptClient(mqtt.Client):
    """paho, acknowledging at once (TCP) what it reads. A broker without `set_tcp_nodelay` (mosquitto's
    default) holds each small PUBACK back until its previous segment is acknowledged (Nagle), and a
    client that has nothing more to send delays that acknowledgement by 40 ms: an upload waiting for
    its last PUBACKs stalled 40 ms of its 50 (4 MB; 7 ms without the stall). Setting TCP_QUICKACK
    after a read sends the pending acknowledgement now. And TCP_NODELAY, as the daemon's link: with
    Nagle, a SUBSCRIBE written right after a PUBACK waits for the broker's delayed ACK (a download
    subscribes chunk after chunk)."""

    def _create_socket(self) -> Any:
        sock: Any = super()._create_socket()
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _sock_recv(self, bufsize: int) -> bytes:
        data = super()._sock_recv(bufsize)
        sock: Any = self._sock
        if _QUICKACK is not None and sock is not None:
            with contextlib.suppress(OSError, AttributeError):  # AttributeError: a websocket wrapper
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return data


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
        self._client = _PromptClient(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol,
                                     reconnect_on_failure=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=15)
        self.tls_client_cert = tls.cert_file if tls is not None else None
        if broker.tls:
            tls = tls or TlsOptions()
            self._client.tls_set_context(client_context(tls.ca_file, tls.cert_file, tls.key_file))
        if username is not None:
            self._client.username_pw_set(username, password)
        self._keepalive = keepalive
        self._started = False
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
        self.protocol = protocol
        self.ended_unanswered: str | None = None
        """Why the first attempt ended before any CONNACK, if it did (the fallback and the error lines use it)."""
        self._outcome = threading.Event()
        self._last_socket_error: str | None = None
        self._client.on_log = self._on_log
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout: float = 10.0, give_up_unanswered: bool = False) -> PahoLink:
        """Connect and start the network thread; wait for the first connect up to `timeout`. A link already
        started is returned as it is: connecting again would orphan the socket paho's thread is reading,
        which then reconnects a second later and forgets what was in flight (`with link.start()` did).

        `give_up_unanswered`: when the broker ends the first attempt before any CONNACK (what a 3.1.1-only
        broker does with an MQTT 5 CONNECT), raise `Unanswered` at once instead of retrying until `timeout`."""
        if self._started:
            return self
        try:
            self._client.connect(self.broker.host, self.broker.port, keepalive=self._keepalive)
        except (OSError, ssl.SSLError) as exc:
            raise LeptonError(f"broker {self.broker}: cannot connect ({exc})") from None
        self._client.loop_start()
        self._started = True
        deadline = time.monotonic() + timeout
        if give_up_unanswered and self._outcome.wait(timeout) and not self.connected.is_set():
            # Ended unanswered, or refused (bad credentials, not authorised): trying on will not change that.
            self._stop_loop()
            error = Unanswered if self.ended_unanswered is not None else LeptonError
            raise error(f"broker {self.broker}: {self._why_not_connected(timeout)}")
        if not self.connected.wait(max(0.0, deadline - time.monotonic())):
            self._stop_loop()
            raise LeptonError(f"broker {self.broker}: {self._why_not_connected(timeout)}")
        return self

    def _stop_loop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False

    def _why_not_connected(self, timeout: float) -> str:
        if self._refused:
            return f"refused the connection ({self._refused})"
        unanswered = self.ended_unanswered
        hint = "it may require a client certificate (--cert-file and --key-file)"
        if unanswered is not None and self.broker.tls and "alert" in unanswered:
            # TLS 1.3 finishes the client's side of the handshake before the broker checks the client's
            # certificate, so a missing one shows up as an alert on the first read, not as a connect error.
            return f"the broker closed the TLS handshake ({unanswered}); {hint}"
        if unanswered is not None:
            version = "5" if self.protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1"
            if self.broker.tls and self.tls_client_cert is None:
                # The alert may be lost when the broker closes at once: a bare close over TLS hints the same.
                return f"the broker closed the TLS connection without answering our MQTT {version} CONNECT; {hint}"
            return f"closed the connection without answering our MQTT {version} CONNECT ({unanswered})"
        return f"no answer within {timeout:g} s"

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False

    def __enter__(self) -> PahoLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._last_socket_error = text

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            if reason.value == UNSUPPORTED_PROTOCOL:
                self.ended_unanswered = f"the broker does not accept this protocol version ({reason})"
            logger.warning("broker %s refused the connection: %s", self.broker, reason)
            self._outcome.set()
            return
        if props is not None and getattr(props, "MaximumPacketSize", None):
            self.max_packet_size = int(props.MaximumPacketSize)
        with self._lock:
            filters = [(f, qos) for f, (_, qos) in [*self._filters.items(), *self._message_filters.items()]]
            # SUBSCRIBEs of a lost connection are never answered; the ones below replace them.
            self._unacked_subscribes.clear()
        for topic_filter, qos in filters:
            self._send_subscribe(topic_filter, qos)
        self.connects += 1
        self.connected.set()
        self._outcome.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected.clear()
        if self.connects == 0 and not self._outcome.is_set():
            self.ended_unanswered = self._last_socket_error or "closed with no CONNACK"
            self._outcome.set()
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
