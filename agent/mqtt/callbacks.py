"""The paho callbacks of the daemon's link, bound to each new client by `_bind`: what the link does when
the broker answers (CONNACK, PUBACK, SUBACK, UNSUBACK) or sends a message. They run in the link thread,
inside paho's loop_read/loop_write, each wrapped by `_guard` (an exception is logged, counted, survived)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttSection
from agent.mqtt import wire
from agent.mqtt.guard import OVERSIZED_TOPIC
from agent.mqtt.routes import Routes
from agent.mqtt.session import PRESENCE_MIN_S, LinkStats, Session
from agent.mqtt.spool import Spool
from agent.mqtt.topics import Topics
from agent.mqtt.wire import encode

logger = logging.getLogger("agent.mqtt.link")

F = TypeVar("F", bound=Callable[..., None])

STATUS_LIMIT = 64 * 1024
"""A status (birth or will) is a few hundred bytes; anything far bigger on our status topic is not ours."""


class PahoCallbacks:
    """Mixed into `Link`; the attributes below are the link's own (set in `Link.__init__`)."""

    topics: Topics
    groups: tuple[str, ...]
    spool: Spool
    stats: LinkStats
    routes: Routes
    birth: Callable[[], dict[str, Any]]
    on_command: Callable[[str, bytes], None]
    connected: threading.Event
    subscribed: threading.Event
    attempted: threading.Event
    on_connected: list[Callable[[], None]]
    settings: MqttSection
    _command_topics: frozenset[str]
    _announce: bool

    def wake(self) -> None:
        raise NotImplementedError

    def _resend_retained(self) -> None:
        raise NotImplementedError

    def _oversized(self, topic: str, size: int) -> None:
        self.stats.oversized += 1
        logger.warning("mqtt: a %d-byte message on %s is over max_packet_bytes (%d); dropped unread",
                       size, topic[:200], self.settings.max_packet_bytes)

    def _bind(self, s: Session) -> None:
        c = s.client
        c.on_connect = self._guard(functools.partial(self._on_connect, s))
        c.on_disconnect = self._guard(functools.partial(self._on_disconnect, s))
        c.on_publish = self._guard(functools.partial(self._on_publish, s))
        c.on_message = self._guard(functools.partial(self._on_message, s))
        c.on_subscribe = self._guard(functools.partial(self._on_subscribe, s))
        c.on_unsubscribe = self._guard(functools.partial(self._on_unsubscribe, s))
        c.on_log = functools.partial(self._on_log, s)

    def _on_log(self, s: Session, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        # paho says why a read failed only in its log (a TLS alert from the broker, for one).
        if level == mqtt.MQTT_LOG_ERR:
            s.socket_error = text

    def _guard(self, callback: F) -> F:
        @functools.wraps(callback)
        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception:
                self.stats.callback_errors += 1
                logger.exception("mqtt: error in %s (survived)", getattr(callback, "func", callback).__name__)

        return guarded  # type: ignore[return-value]

    def _on_connect(self, s: Session, client: mqtt.Client, userdata: Any, flags: Any,
                    reason: ReasonCode, properties: Properties | None) -> None:
        s.last_inbound = time.monotonic()
        self.attempted.set()
        if reason.is_failure:
            s.lost = True
            s.reason = f"refused by the broker: {reason}"
            logger.error("mqtt %s: connection refused by the broker: %s", s.url, reason)
            return
        s.connected_at = time.monotonic()
        s.first_live_id = self.spool.last_id() + 1
        s.cursor = 0
        s.more = True
        self.stats.connects += 1
        self.stats.last_connect_s = time.time()
        _, s.command_sub_mid = client.subscribe([(t, 1) for t in self._subscriptions()])
        if self.routes.watches:
            s.watch_mid = client.subscribe([(t, 1) for t in self.routes.watches])[1]
        others = self.routes.for_new_connection()
        if others:
            client.subscribe(others)
        self._resend_retained()
        self._publish_birth(s)
        self.connected.set()
        logger.info("mqtt %s: connected (bdseq %d)", s.url, s.bdseq)
        for hook in self.on_connected:
            try:
                hook()
            except Exception:
                self.stats.callback_errors += 1
                logger.exception("mqtt: on_connected hook failed (survived)")

    def _publish_birth(self, s: Session) -> None:
        payload = {**self.birth(), "state": "online", "bdseq": s.bdseq, "heartbeat_s": self.settings.heartbeat_s}
        info = s.client.publish(self.topics.status, encode(payload), qos=1, retain=True)
        s.others[info.mid] = s.birth_at = time.monotonic()

    def _answer_presence(self, s: Session) -> None:
        """Status and deploy states again, live: what a wildcard subscriber on RabbitMQ never gets retained."""
        now = time.monotonic()
        if now - s.presence_at < PRESENCE_MIN_S:
            return
        s.presence_at = now
        self._announce = True
        self._resend_retained()
        self.wake()

    def _on_disconnect(self, s: Session, client: mqtt.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Properties | None) -> None:
        s.lost = True
        s.reason = s.reason or str(reason)

    def _on_publish(self, s: Session, client: mqtt.Client, userdata: Any, mid: int,
                    reason: ReasonCode, properties: Properties | None) -> None:
        s.last_inbound = time.monotonic()
        row = s.inflight.pop(mid, None)
        if row is None:
            s.others.pop(mid, None)
            s.unacked.pop(mid, None)
            return
        if reason.is_failure:
            self.stats.rejected += 1
            logger.warning("mqtt: broker refused a result (%s); dropped", reason)
        else:
            self.stats.acked += 1
        s.acked.append(row[0])
        s.more = True

    def _subscriptions(self) -> list[str]:
        # Our own status topic too: see _stale_will.
        return [*self.topics.command_topics(self.groups), self.topics.status, self.topics.presence]

    def _on_message(self, s: Session, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        s.last_inbound = time.monotonic()
        if message.topic == OVERSIZED_TOPIC:
            return  # acknowledged by paho, counted by the guard
        if message.topic == self.topics.status:
            self._stale_will(s, message)
            return
        if message.topic == self.topics.presence:
            self._answer_presence(s)
            return
        watcher = self.routes.watches.get(message.topic)
        if watcher is not None:
            watcher(bytes(message.payload))
            return
        if message.topic in self._command_topics:
            self.on_command(message.topic, bytes(message.payload))
            return
        self.routes.deliver(message.topic, bytes(message.payload))

    def _stale_will(self, s: Session, message: mqtt.MQTTMessage) -> None:
        """Re-announce when the broker publishes an earlier connection's will after our birth.

        After a half-open connection the broker may only give up the old session (and publish
        its retained `offline` will) once we are back: that would leave `offline` retained while
        we are online. The retained copy delivered on subscribing is history, not news.
        """
        if message.retain:
            return
        try:
            status = wire.decode(bytes(message.payload), STATUS_LIMIT, "status message")
        except wire.WireError as exc:
            self.stats.bad_messages += 1
            logger.warning("mqtt: %s on %s ignored: %s", exc.code, message.topic, exc.message)
            return
        if status.get("state") == "offline" and status.get("bdseq") != s.bdseq:
            logger.info("mqtt: an earlier connection's will (bdseq %s) replaced our status; re-announcing",
                        status.get("bdseq"))
            self._announce = True
            self.wake()

    def _on_subscribe(self, s: Session, client: mqtt.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Properties | None) -> None:
        s.last_inbound = time.monotonic()
        if mid == s.watch_mid:
            for topic, code in zip(self.routes.watches, reasons, strict=False):
                if code.is_failure:
                    logger.error("mqtt: subscription to %s refused: %s", topic, code)
            return
        if mid != s.command_sub_mid:
            for code in reasons:
                if code.is_failure:
                    logger.error("mqtt: a subscription was refused: %s", code)
            return
        for topic, code in zip(self._subscriptions(), reasons, strict=False):
            if code.is_failure:
                logger.error("mqtt: subscription to %s refused: %s", topic, code)
        self.subscribed.set()

    def _on_unsubscribe(self, s: Session, client: mqtt.Client, userdata: Any, mid: int,
                        reasons: list[ReasonCode], properties: Properties | None) -> None:
        s.last_inbound = time.monotonic()
        s.probe_sent = None
