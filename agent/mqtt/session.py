"""The parts of the daemon's link that outlive or belong to one connection: counters, backoff, and what one
connection knows (`Session`), plus the select() helpers the link thread waits with."""

from __future__ import annotations

import contextlib
import random
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt


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
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self, refused: bool = False) -> float:
        """The wait before the next attempt; `refused`: nobody was listening, try again soon."""
        if refused:
            return self.low * self._rng.uniform(1.0, 1.5)
        delay = min(self.high, self.low * (2 ** min(self.failures, 30)))
        self.failures += 1
        return min(self.high, delay * self._rng.uniform(1.0, 1.25))


QUICK_CLOSE_S = 2.0
"""A connection the peer closes this soon after accepting it, before any CONNACK, counts as refused."""


def closed_before_connack(s: Session) -> bool:
    return (s.connected_at is None and not s.reason.startswith("refused by the broker")
            and time.monotonic() - s.started < QUICK_CLOSE_S)


@dataclass
class Session:
    """What one connection knows; thrown away with it."""

    client: mqtt.Client
    url: str
    bdseq: int
    started: float
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


def select_ready(rlist: list[Any], wlist: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
    try:
        readable, writable, _ = select.select(rlist, wlist, [], max(0.0, timeout))
    except (OSError, ValueError):
        # A socket closed under us (the connection just died): the caller sees it next round.
        return [], []
    return readable, writable


def tls_pending(sock: Any) -> bool:
    # Bytes already decrypted by the TLS layer do not make the socket readable again.
    pending = getattr(sock, "pending", None)
    return bool(pending and pending() > 0)
