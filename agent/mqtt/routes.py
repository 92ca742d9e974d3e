"""Who hears what on the daemon's link: the filters other parts of the agent subscribed (model delivery),
the exact topics it watches (Home Assistant's birth), and the SUBSCRIBE/UNSUBSCRIBE still to send."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt

from agent.delivery.transport import MessageCallback
from agent.mqtt.session import LinkStats

logger = logging.getLogger(__name__)

class Routes:
    """Filters and their callbacks, safe from any thread; the link thread sends `take_ops()` each round."""

    def __init__(self, stats: LinkStats) -> None:
        self.stats = stats
        self._filters: dict[str, tuple[MessageCallback, int]] = {}
        """Other subscribers' filters: re-subscribed on every connect."""
        self._ops: dict[str, tuple[bool, int]] = {}
        """filter → (subscribe?, qos) still to send on the current connection. The last change of a filter is
        all that counts (a SUBSCRIBE of a filter already held replaces it and re-sends its retained
        messages), so this stays as small as the set of filters, however long the link is down."""
        self._lock = threading.Lock()
        self.watches: dict[str, Callable[[bytes], None]] = {}
        """Exact topics → callback(payload); fixed before the link starts."""

    def add(self, topic_filter: str, callback: MessageCallback, qos: int) -> None:
        with self._lock:
            self._filters[topic_filter] = (callback, qos)
            self._ops[topic_filter] = (True, qos)

    def remove(self, topic_filter: str) -> bool:
        """False when the filter was not subscribed (nothing to send)."""
        with self._lock:
            if self._filters.pop(topic_filter, None) is None:
                return False
            self._ops[topic_filter] = (False, 0)
            return True

    def take_ops(self) -> dict[str, tuple[bool, int]]:
        with self._lock:
            ops, self._ops = self._ops, {}
        return ops

    def for_new_connection(self) -> list[tuple[str, int]]:
        """Every filter with its QoS; a new connection starts from the whole set, so queued changes go."""
        with self._lock:
            self._ops.clear()
            return [(f, qos) for f, (_, qos) in self._filters.items()]

    def deliver(self, topic: str, payload: bytes) -> None:
        """To every subscriber whose filter matches; one failing callback does not stop the others."""
        with self._lock:
            targets = [cb for f, (cb, _) in self._filters.items() if mqtt.topic_matches_sub(f, topic)]
        if not targets:
            self.stats.unrouted += 1
            return
        for callback in targets:
            try:
                callback(topic, payload)
            except Exception:
                self.stats.callback_errors += 1
                logger.exception("mqtt: handler for %s failed (survived)", topic)
