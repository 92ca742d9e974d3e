"""The parts of the daemon's link that outlive or belong to one connection: counters, backoff, and what one
connection knows (`Session`), plus the select() helpers the link thread waits with."""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

logger = logging.getLogger("agent.mqtt.link")

@dataclass
class LinkStats:
    """Counters of the link's life, reported in status."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    half_open: int = 0
    """Connections dropped because the broker stopped answering."""
    published: int = 0
    acked: int = 0
    rejected: int = 0
    """Results the broker answered with a failure reason code (dropped: retrying cannot help)."""
    callback_errors: int = 0
    outbox_dropped: int = 0
    """Messages waiting for a connection that were dropped because too many were waiting."""
    oversized: int = 0
    """Messages over `max_packet_bytes` skipped unread (MQTT 3.1.1; with 5 the broker drops them)."""
    bad_messages: int = 0
    """Messages the link reads itself (its own status topic) that were not an acceptable JSON object."""
    unrouted: int = 0
    """Messages on topics nobody listens to any more (e.g. after an unsubscribe crossed them)."""
    last_connect_s: float | None = None
    """Wall time of the last successful CONNACK."""
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Backoff:
    """Exponential delays between connection attempts, with jitter."""

    def __init__(self, low: float, high: float, rng: random.Random | None = None) -> None:
        self.low, self.high = low, high
        self.failures = 0
        self.last_delay = 0.0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self, refused: bool = False, timed_out: bool = False) -> float:
        """The wait before the next attempt. `refused`: nobody was listening, try again soon. `timed_out`:
        the attempt already waited its whole connect timeout (a frozen or swamped broker): that wait is
        the pause, and growing the delay on top would leave the agent away for long after the broker
        answers again (21 s after a SIGSTOPped broker was thawed)."""
        if refused or timed_out:
            delay = self.low * self._rng.uniform(1.0, 1.5)
        else:
            delay = self.low * (2 ** min(self.failures, 30)) * self._rng.uniform(1.0, 1.25)
            self.failures += 1
        self.last_delay = min(self.high, delay)
        return self.last_delay


PRESENCE_MIN_S = 1.0
"""Presence queries closer together than this are answered once (a query storm costs one answer a second)."""

QUICK_CLOSE_S = 2.0
"""A connection the peer closes this soon after accepting it, before any CONNACK, counts as refused."""


def closed_before_connack(s: Session) -> bool:
    return (s.connected_at is None and not s.reason.startswith("refused by the broker")
            and time.monotonic() - s.started < QUICK_CLOSE_S)


def went_unanswered(s: Session) -> bool:
    """Accepted and waited on, then given up with no CONNACK at all (paho's keepalive closes a connection
    still waiting for one): a frozen or swamped broker, retried like a connect timeout."""
    return s.connected_at is None and not s.reason.startswith("refused by the broker")


@dataclass
class Session:
    """What one connection knows; thrown away with it."""

    client: mqtt.Client
    url: str
    bdseq: int
    started: float
    protocol: str = "5"
    socket_error: str = ""
    """paho's last error on the socket (e.g. the TLS alert of a broker that wants a client certificate)."""
    connected_at: float | None = None
    refused: bool = False
    lost: bool = False
    reason: str = ""
    first_live_id: int = 0
    """Spool rows below this id were made before this connection: they go out as `historical`."""
    cursor: int = 0
    """The last spool id handed to paho in this session."""
    more: bool = True
    """The spool may hold rows after `cursor`."""
    inflight: dict[int, tuple[int, float]] = field(default_factory=dict)
    """mid → (spool id, sent at) of results awaiting PUBACK."""
    others: dict[int, float] = field(default_factory=dict)
    """mid → sent at, of status and replies awaiting PUBACK."""
    unacked: dict[int, tuple[str, bytes, int, bool]] = field(default_factory=dict)
    """mid → (topic, body, qos, retain) of outbox messages awaiting PUBACK: sent again if this connection ends."""
    acked: list[int] = field(default_factory=list)
    last_inbound: float = 0.0
    probe_sent: float | None = None
    goodbye_mid: int | None = None
    command_sub_mid: int | None = None
    """The SUBSCRIBE of the command topics, whose SUBACK sets `Link.subscribed`."""
    watch_mid: int | None = None
    birth_at: float = 0.0
    """When the status was last published (the heartbeat publishes it again after `heartbeat_s`)."""
    presence_at: float = -PRESENCE_MIN_S
    """When the last presence query was answered."""



class Protocols:
    """Which MQTT version each broker URL gets: the configured one, except that with "5" a broker that ends an
    MQTT 5 attempt unanswered (RabbitMQ before 3.13 closes the connection) or refuses the version gets 3.1.1."""

    def __init__(self, configured: str) -> None:
        self.configured = configured
        self._fallen_back: set[str] = set()

    def for_url(self, url: str) -> str:
        return "3.1.1" if self.configured == "3.1.1" or url in self._fallen_back else "5"

    def after(self, s: Session) -> bool:
        """Note how attempt `s` ended; True if the next attempt should go at once, to the same URL, in 3.1.1."""
        if s.connected_at is not None:
            return False
        if "alert" in s.socket_error:
            # TLS 1.3 completes the client's side before the broker checks the client's certificate: a missing or
            # refused one arrives as an alert on the first read. Not a protocol version matter.
            logger.warning("mqtt %s: the broker closed the TLS handshake (%s); it may require a client certificate "
                           "(mqtt.tls.cert_file and key_file)", s.url, s.socket_error)
            return False
        unsupported = "nsupported protocol version" in s.reason
        if not (unsupported or closed_before_connack(s)):
            return False
        if s.protocol == "5" and self.configured == "5":
            self._fallen_back.add(s.url)
            why = "refused MQTT 5" if unsupported else "closed the connection on our MQTT 5 CONNECT without answering"
            guess = "a broker that speaks only 3.1.1?"
            if s.url.startswith("mqtts:") and not unsupported:
                guess += " Over TLS, also one that wants a client certificate (mqtt.tls.cert_file and key_file)"
            logger.warning("mqtt %s: the broker %s (%s); trying MQTT 3.1.1 on it", s.url, why, guess)
            return True
        # 3.1.1 was not answered either: the version was not the reason (e.g. a proxy with no broker behind it).
        self._fallen_back.discard(s.url)
        return False


class Waker:
    """A socket pair the link thread selects on, so that other threads wake it at once instead of it polling."""

    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)

    def wake(self) -> None:
        # Full of wake-ups already (BlockingIOError), or closing: either way nothing to add.
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self.reader.close()
        self._writer.close()


_READ = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL
"""What counts as readable: data, and the error and hang-up states select() reports as readable too (a read then
says what happened)."""


def select_ready(rlist: list[Any], wlist: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
    """select()'s answer, asked with poll(): select() refuses a descriptor numbered 1024 or more (FD_SETSIZE)
    with ValueError, and a link in a process with that many files open (the fleet simulator's 1,000 devices, each
    with its spool and state databases) then never read its CONNACK and spun until its connect timeout."""
    poller = select.poll()
    by_fd: dict[int, Any] = {}
    masks: dict[int, int] = {}
    for objs, mask in ((rlist, select.POLLIN | select.POLLPRI), (wlist, select.POLLOUT)):
        for obj in objs:
            try:
                fd = obj.fileno()
            except (OSError, ValueError):
                fd = -1
            if fd < 0:
                return [], []  # a socket closed under us (the connection just died): the caller sees it next round
            by_fd[fd] = obj
            masks[fd] = masks.get(fd, 0) | mask
    for fd, mask in masks.items():
        poller.register(fd, mask)
    try:
        events = poller.poll(max(0.0, timeout) * 1000.0)
    except (OSError, ValueError):
        return [], []
    readable = [by_fd[fd] for fd, ev in events if ev & _READ and by_fd[fd] in rlist]
    writable = [by_fd[fd] for fd, ev in events if ev & select.POLLOUT and by_fd[fd] in wlist]
    return readable, writable


def tls_pending(sock: Any) -> bool:
    # Bytes already decrypted by the TLS layer do not make the socket readable again.
    pending = getattr(sock, "pending", None)
    return bool(pending and pending() > 0)
