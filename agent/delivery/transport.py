"""The MQTT seam of the delivery code: the three methods it needs, and nothing paho-specific.

The daemon's link (agent.mqtt.link.Link) and the operator tools' client (agent.mqtt.client.PahoLink)
both provide it. A `Link` must (1) deliver each message to every callback whose filter matches, on
one thread, one message at a time, (2) survive and count an exception in a callback, and (3)
re-subscribe its filters after a reconnect, so that retained messages are sent again: the
downloader relies on that to resume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

MessageCallback = Callable[[str, bytes], None]
"""Called with (topic, payload) on the link's thread; keep it short, never block on the network."""


class Link(Protocol):
    def subscribe(self, topic_filter: str, callback: MessageCallback, qos: int = 1) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...
