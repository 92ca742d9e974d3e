"""The agent's MQTT link (paho-mqtt 2, `CallbackAPIVersion.VERSION2`).

One thread owns the connection and drives paho's network calls from its own `select()`,
which also watches a wake-up socket: a new result, a reply to send or shutdown wake it at
once, and nothing polls. Each connection attempt gets a fresh paho client, so nothing paho
kept from an old connection is re-sent behind our back: what was published and not
acknowledged is still in the spool, and is sent again from there, in order, as
`historical`.

- The retained will `{"state": "offline", "bdseq"}` is set on every connect; `online`
  (the birth, same `bdseq`) is published only from a CONNACK that is not a failure.
- Every (re)connect subscribes to the command topics and announces again.
- Results leave the spool only on the broker's PUBACK; at most `max_inflight` at a time.
- Replies the broker did not acknowledge before a connection ended go first on the next one; every
  retained state published through the link (deploy states) is published again on each connect, as
  its current value, so a lost PUBACK cannot leave a stale one retained (the status is the birth).
- A link that stops answering is noticed within 1.5 x keepalive: a result waiting for its
  PUBACK longer than keepalive, or a probe (an UNSUBSCRIBE of a topic never subscribed,
  sent after keepalive/2 of silence) left unanswered for keepalive, drops the connection.
- With `protocol = "5"`, a broker that ends an MQTT 5 attempt unanswered or refuses the version is tried
  again at once with 3.1.1 (a WARNING says why), and keeps 3.1.1 while it answers (session.Protocols).
- Reconnects back off exponentially from `backoff_min_s` to `backoff_max_s` (with jitter).
  A broker not listening (refused), or one that let an attempt wait out `connect_timeout_s`
  (frozen: that wait is the pause), is retried after 1-1.5 x `backoff_min_s`: back within seconds.
  The backoff resets once a connection has lasted `STABLE_S`.
- Every paho callback is wrapped: an exception is logged, counted and survived.
- Other parts of the agent (model delivery) subscribe and publish through the same
  connection with `subscribe`/`unsubscribe`/`publish` (agent.delivery.transport.Link), safe from
  any thread: the link thread sends the packets, keeps the filters and subscribes them again
  after every reconnect, so the broker re-sends what is retained on them.
- Periodic figures (telemetry) go through `offer()`: QoS 0, latest only — while the link is
  down a newer message replaces the older one instead of queueing. Other parts of the agent
  may `watch()` extra topics (Home Assistant's birth) and add `on_connected` hooks (discovery).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import MqttSection, parse_broker_url
from agent.mqtt.callbacks import PahoCallbacks
from agent.mqtt.guard import GuardedClient
from agent.mqtt.routes import MessageCallback, Routes
from agent.mqtt.session import (
    Backoff,
    LinkStats,
    Protocols,
    Session,
    Waker,
    closed_before_connack,
    select_ready,
    tls_pending,
    went_unanswered,
)
from agent.mqtt.spool import Spool
from agent.mqtt.tls import tls_context
from agent.mqtt.topics import Topics
from agent.mqtt.wire import encode
from agent.sdnotify import Heartbeat

logger = logging.getLogger(__name__)

STABLE_S = 10.0
"""A connection that lasted this long resets the backoff; one dropped sooner counts as a failure."""
OUTBOX_MAX = 1000
"""Replies and status messages waiting for a connection, at most (the oldest go first)."""


class Link(PahoCallbacks):
    """The MQTT connection of one device: publishes the spool, status and replies; hears commands."""

    def __init__(
        self,
        settings: MqttSection,
        *,
        topics: Topics,
        groups: tuple[str, ...],
        client_id: str,
        spool: Spool,
        next_bdseq: Callable[[], int],
        birth: Callable[[], dict[str, Any]],
        on_command: Callable[[str, bytes], None],
        stop: threading.Event,
        password: str | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.groups = groups
        self.client_id = client_id
        self.spool = spool
        self.next_bdseq = next_bdseq
        self.birth = birth
        self.on_command = on_command
        self.stop = stop
        self._password = password
        self._tls: ssl.SSLContext | None = None
        if any(parse_broker_url(u)[2] for u in settings.broker):
            self._tls = tls_context(settings)
        self.stats = LinkStats()
        self.routes = Routes(self.stats)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        """Set once the broker has acknowledged the command subscriptions of the current connection."""
        self.attempted = threading.Event()
        """Set once the first connection attempt has an outcome (CONNACK, refusal or error)."""
        self.heartbeat: Heartbeat | None = None
        """When set, the link thread beats it each time round its loop (systemd watchdog)."""
        self.backoff = Backoff(settings.backoff_min_s, settings.backoff_max_s)
        self.protocols = Protocols(settings.protocol)
        self._waker = Waker()
        self._outbox: deque[tuple[str, bytes, int, bool]] = deque()
        self._outbox_lock = threading.Lock()
        self._command_topics = frozenset(topics.command_topics(groups))
        self._announce = False
        self._closing = threading.Event()
        self._goodbye: dict[str, Any] | None = None
        self._close_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._session: Session | None = None
        self._bdseq = -1
        self._url_index = 0
        self._rows_waiting = True
        self._latest: dict[str, tuple[bytes, bool]] = {}
        self._retained: dict[str, bytes] = {}
        """The current value of every retained topic published through `publish` (the deploy states): each
        connection publishes them again, so a value lost with a connection (no PUBACK) is not left stale."""
        self.on_connected: list[Callable[[], None]] = []
        """Called in the link thread after each successful connect and birth (e.g. to send discovery)."""
        spool.on_append = self._spool_grew

    # -- the API other threads use ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Make the link thread look at the spool, the outbox and the stop flag now."""
        self._waker.wake()

    def _spool_grew(self) -> None:
        self._rows_waiting = True
        self.wake()

    def send(self, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        """Queue a QoS 1 message (a reply, a status) for the current or next connection."""
        self.publish(topic, encode(payload), qos=1, retain=retain)

    def send_raw(self, topic: str, body: bytes, retain: bool = False) -> None:
        """Queue a QoS 1 message whose body is given as is (no `ts`/`v`: Home Assistant discovery)."""
        self.publish(topic, body, qos=1, retain=retain)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue raw bytes for the current or next connection (never blocks; the oldest go when too many wait)."""
        with self._outbox_lock:
            if retain:
                self._retained[topic] = payload
            if len(self._outbox) >= OUTBOX_MAX:
                self._outbox.popleft()
                self.stats.outbox_dropped += 1
            self._outbox.append((topic, payload, qos, retain))
        self.wake()

    def subscribe(self, topic_filter: str, callback: MessageCallback, qos: int = 1) -> None:
        """Hear `topic_filter` on this connection and every later one: `callback(topic, payload)` runs on the
        link thread. Each (re)subscribe makes the broker send what is retained on the filter again."""
        self.routes.add(topic_filter, callback, qos)
        self.wake()

    def unsubscribe(self, topic_filter: str) -> None:
        if self.routes.remove(topic_filter):
            self.wake()

    def offer(self, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        """Publish at QoS 0 when connected; an unsent older message on the same topic is replaced."""
        body = encode(payload)
        with self._outbox_lock:
            self._latest[topic] = (body, retain)
        self.wake()

    def watch(self, topic: str, callback: Callable[[bytes], None]) -> None:
        """Subscribe to `topic` (exact, no wildcards) on every connection and hand its payloads to
        `callback` in the link thread. Call before `start()`."""
        self.routes.watches[topic] = callback

    def announce(self) -> None:
        """Publish the birth status again (pipelines or models changed)."""
        self._announce = True
        self.wake()

    def close(self, goodbye: dict[str, Any], timeout: float) -> None:
        """Publish `goodbye` as the retained status, send what the spool holds until `timeout`,
        then disconnect cleanly (the broker then drops the will). Unsent results stay spooled."""
        self._goodbye = goodbye
        self._close_deadline = time.monotonic() + timeout
        self._closing.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout + 0.5)
            if self._thread.is_alive():
                logger.warning("mqtt link did not finish within %.1f s", timeout)
                return
        self._waker.close()

    @property
    def bdseq(self) -> int:
        return self._bdseq

    # -- the link thread ----------------------------------------------------------------------

    def _run(self) -> None:
        # Stop (the agent's one stop event) ends the attempts; a connection already up is kept
        # until close() has said goodbye and flushed.
        while not self._closing.is_set() and not self.stop.is_set():
            url = self.settings.broker[self._url_index % len(self.settings.broker)]
            session: Session | None = None
            refused = timed_out = False
            failed = False
            try:
                session = self._connect(url)
                self._serve(session)
            except Exception as exc:
                failed = True
                refused = isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED
                timed_out = isinstance(exc, TimeoutError)
                self._note_failure(url, exc, refused)
            finally:
                if session is not None:
                    self._end(session)
            if session is not None and self.protocols.after(session):
                continue
            if not failed and session is not None and closed_before_connack(session):
                # Accepted, then closed with nothing said: a proxy, NAT or load balancer with no broker
                # behind it. That is "nobody listening" as much as a refusal is: retry soon, not later.
                refused = True
            timed_out = timed_out or (not failed and not refused and session is not None and went_unanswered(session))
            up_since = session.connected_at if session is not None else None
            up = up_since is not None
            if up_since is not None and time.monotonic() - up_since >= STABLE_S:
                self.backoff.reset()
            elif up_since is None:
                self.stats.connect_failures += 1
                self._url_index += 1
            if self._closing.is_set() or self.stop.is_set():
                break
            self._wait(self.backoff.next_delay(refused=refused and not up, timed_out=timed_out and not up))

    def _note_failure(self, url: str, exc: Exception, refused: bool) -> None:
        self.attempted.set()
        self.stats.last_error = "connection refused" if refused else f"{type(exc).__name__}: {exc}"
        if refused:
            logger.info("mqtt %s: connection refused (no broker listening)", url)
        elif isinstance(exc, OSError | TimeoutError):
            logger.warning("mqtt %s: %s", url, self.stats.last_error)
        else:
            logger.exception("mqtt %s: link failure", url)

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat()

    def _wait(self, delay: float) -> None:
        logger.debug("mqtt: next attempt in %.2f s", delay)
        end = time.monotonic() + delay
        while not self._closing.is_set() and not self.stop.is_set():
            self._beat()
            left = end - time.monotonic()
            if left <= 0:
                return
            select_ready([self._waker.reader], [], min(left, 1.0))
            self._waker.drain()
        # Stopping while disconnected: there is no broker to say goodbye to.

    def _connect(self, url: str) -> Session:
        host, port, tls = parse_broker_url(url)
        self._bdseq = bdseq = self.next_bdseq()
        protocol = self.protocols.for_url(url)
        v5 = protocol == "5"
        client = GuardedClient(
            max_packet_bytes=self.settings.max_packet_bytes,
            on_oversized=self._oversized,
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        client.suppress_exceptions = True
        client.connect_timeout = self.settings.connect_timeout_s
        # Our own window bounds what is in flight; paho must not queue on top of it.
        client.max_inflight_messages_set(self.settings.max_inflight + OUTBOX_MAX)
        if tls:
            assert self._tls is not None
            client.tls_set_context(self._tls)
        if self.settings.auth.username:
            client.username_pw_set(self.settings.auth.username, self._password)
        client.will_set(self.topics.status, encode({"state": "offline", "bdseq": bdseq}), qos=1, retain=True)
        session = Session(client=client, url=url, bdseq=bdseq, started=time.monotonic(), protocol=protocol)
        self._bind(session)
        logger.info("mqtt: connecting to %s as %s (MQTT %s, bdseq %d)", url, self.client_id, protocol, bdseq)
        self._session = session
        client.connect_clean(host, port, self.settings.keepalive_s)
        sock: Any = client.socket()
        if sock is not None:
            # Small packets go out at once: with Nagle, a SUBSCRIBE written right after a PUBACK waits for the
            # broker's delayed ACK (~40 ms), which paced model downloads (a chunk per round trip) to a crawl.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return session

    def _serve(self, s: Session) -> None:
        """Run one connection until it is lost or the agent closes."""
        client = s.client
        while not s.lost:
            self._beat()
            sock = client.socket()
            if sock is None:
                return
            now = time.monotonic()
            if s.connected_at is None and now - s.started > self.settings.connect_timeout_s:
                raise TimeoutError(f"no CONNACK within {self.settings.connect_timeout_s:g} s")
            if self._closing.is_set() and self._say_goodbye(s):
                return
            if s.connected_at is not None:
                self._pump(s, now)
                if s.lost:
                    return
            timeout = 0.0 if tls_pending(sock) else self._next_timer(s, now)
            wlist = [sock] if client.want_write() else []
            readable, writable = select_ready([sock, self._waker.reader], wlist, timeout)
            if self._waker.reader in readable:
                self._waker.drain()
            if sock in readable or tls_pending(sock):
                client.loop_read()
            if client.socket() is not None and (sock in writable or client.want_write()):
                client.loop_write()
            if client.socket() is not None:
                client.loop_misc()
            if s.acked:
                self.spool.ack(s.acked)
                s.acked.clear()

    def _next_timer(self, s: Session, now: float) -> float:
        # Wake in time for the connect deadline, the probe and paho's keepalive (checked each round).
        if s.connected_at is None:
            return max(0.0, min(1.0, s.started + self.settings.connect_timeout_s - now))
        if self._closing.is_set():
            return max(0.0, min(0.2, self._close_deadline - now))
        return min(1.0, self.settings.keepalive_s / 4)

    def _pump(self, s: Session, now: float) -> None:
        client = s.client
        if now - s.birth_at >= self.settings.heartbeat_s:
            self._announce = True
        if self._announce and not self._closing.is_set():  # never an `online` after the goodbye
            self._announce = False
            self._publish_birth(s)
        self._send_filter_ops(s)
        with self._outbox_lock:
            outgoing = list(self._outbox)
            self._outbox.clear()
            latest = list(self._latest.items())
            self._latest.clear()
        self._send_outbox(s, outgoing, now)
        for topic, (body, retain) in latest:
            client.publish(topic, body, qos=0, retain=retain)
        self._send_results(s, now)
        self._check_liveness(s, now)

    def _send_filter_ops(self, s: Session) -> None:
        for topic_filter, (subscribe, qos) in self.routes.take_ops().items():
            if subscribe:
                s.client.subscribe(topic_filter, qos)
            else:
                s.client.unsubscribe(topic_filter)

    def _send_results(self, s: Session, now: float) -> None:
        room = self.settings.max_inflight - len(s.inflight)
        if room <= 0 or not (s.more or self._rows_waiting):
            return
        # Cleared before reading, so an append racing with the query sets them again.
        s.more = self._rows_waiting = False
        rows = self.spool.pending(s.cursor, room)
        if len(rows) == room:
            s.more = True
        for row in rows:
            info = s.client.publish(row.topic, row.body(historical=row.id < s.first_live_id), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                s.more = True
                return
            s.inflight[info.mid] = (row.id, now)
            s.cursor = row.id
            self.stats.published += 1

    def _check_liveness(self, s: Session, now: float) -> None:
        keepalive = self.settings.keepalive_s
        waiting = [t for _, t in s.inflight.values()] + list(s.others.values())
        if s.probe_sent is not None:
            waiting.append(s.probe_sent)
        if waiting and now - min(waiting) > keepalive:
            self.stats.half_open += 1
            logger.warning("mqtt %s: no answer from the broker for %.1f s; dropping the connection",
                           s.url, now - min(waiting))
            self._abandon(s, "broker stopped answering")
            return
        if s.probe_sent is None and now - s.last_inbound > keepalive / 2:
            s.probe_sent = now
            s.client.unsubscribe(self.topics.probe)

    def _abandon(self, s: Session, reason: str) -> None:
        # Close without DISCONNECT, so that the broker (if it is still there) publishes the will.
        s.lost = True
        s.reason = reason
        sock: Any = s.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _say_goodbye(self, s: Session) -> bool:
        """The closing sequence, run each round while closing; True when done."""
        now = time.monotonic()
        if s.connected_at is None:
            return True
        if s.goodbye_mid is None and self._goodbye is not None:
            payload = {**self._goodbye, "bdseq": s.bdseq}
            info = s.client.publish(self.topics.status, encode(payload), qos=1, retain=True)
            s.goodbye_mid = info.mid
            s.others[info.mid] = now
            self._pump_outbox_only(s, now)
        # Closing flushes too: the pipelines have stopped, so the spool only shrinks now.
        settled = s.goodbye_mid not in s.others and not s.inflight and not (s.more or self._rows_waiting)
        if settled or now >= self._close_deadline:
            if not settled:
                logger.warning("mqtt: closing with %d results unacknowledged (they stay in the spool)",
                               len(s.inflight))
            s.client.disconnect()
            s.client.loop_write()
            return True
        return False

    def _pump_outbox_only(self, s: Session, now: float) -> None:
        with self._outbox_lock:
            outgoing = list(self._outbox)
            self._outbox.clear()
        self._send_outbox(s, outgoing, now)

    def _send_outbox(self, s: Session, outgoing: list[tuple[str, bytes, int, bool]], now: float) -> None:
        for message in outgoing:
            topic, body, qos, retain = message
            info = s.client.publish(topic, body, qos=qos, retain=retain)
            if qos:
                s.others[info.mid] = now
                s.unacked[info.mid] = message

    def _requeue_unacked(self, s: Session) -> None:
        """Replies this connection took and the broker never acknowledged go first on the next one (retained
        states need not: `_resend_retained` publishes their current value)."""
        lost = [m for m in s.unacked.values() if not m[3]]
        s.unacked.clear()
        if not lost:
            return
        with self._outbox_lock:
            self._outbox.extendleft(reversed(lost))
            while len(self._outbox) > OUTBOX_MAX:
                self._outbox.popleft()
                self.stats.outbox_dropped += 1

    def _resend_retained(self) -> None:
        """On each connect: the current value of each retained topic replaces what of it was queued."""
        with self._outbox_lock:
            if not self._retained:
                return
            kept = [m for m in self._outbox if not (m[3] and m[0] in self._retained)]
            self._outbox = deque([*kept, *((t, body, 1, True) for t, body in self._retained.items())])

    def _end(self, s: Session) -> None:
        if s.connected_at is not None:
            self.stats.disconnects += 1
            logger.info("mqtt %s: disconnected (%s)", s.url, s.reason or "closed")
        self.connected.clear()
        self.subscribed.clear()
        sock = s.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        if s.acked:
            self.spool.ack(s.acked)
            s.acked.clear()
        self._requeue_unacked(s)
        self._session = None
