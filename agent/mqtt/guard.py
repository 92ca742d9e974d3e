"""A bound on what the link accepts from the broker, below paho, for MQTT 3.1.1 too.

With MQTT 5 the CONNECT carries `Maximum Packet Size` and the broker drops bigger messages for us.
MQTT 3.1.1 has no such field, and paho reads a whole packet into memory before anyone sees it: a
200 MB PUBLISH on the command topic cost the agent 200 MB for good. `GuardedClient` wraps paho's
socket in `PacketGuard`, which reads the byte stream packet by packet: a PUBLISH whose remaining
length is over the limit is skipped as it arrives (never held in memory), and paho is handed in its
place an empty PUBLISH with the same packet id on `OVERSIZED_TOPIC`, so that paho acknowledges it
as usual (the broker's in-flight window stays open) and the link drops it, counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

OVERSIZED_TOPIC = "$lepton/oversized"
"""Where a dropped PUBLISH is handed to paho: no broker delivers on `$` topics to a client."""

_PUBLISH = 3
_CHUNK = 65536


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


class PacketGuard:
    """The socket as paho sees it: every packet passes unchanged except oversized PUBLISHes."""

    def __init__(self, sock: Any, limit: int, v5: bool, on_drop: Callable[[str, int], None]) -> None:
        self._sock = sock
        self._limit = limit
        self._v5 = v5
        self._on_drop = on_drop
        self._ready = bytearray()
        """Bytes parsed and due to paho."""
        self._head = bytearray()
        """The fixed header of the packet being read, until its length is known."""
        self._pass = 0
        """Bytes of the current packet still to pass through."""
        self._skip = 0
        """Bytes of the current (oversized) packet still to throw away."""
        self._drop: bytearray | None = None
        """The start of an oversized PUBLISH, kept until its topic and packet id are read."""
        self._drop_len = 0
        self._flags = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def pending(self) -> int:
        """Bytes readable without the socket becoming readable (parsed here, or decrypted by TLS)."""
        inner = getattr(self._sock, "pending", None)
        return len(self._ready) + (inner() if inner else 0)

    def recv(self, bufsize: int) -> bytes:
        while not self._ready:
            data = self._sock.recv(_CHUNK)  # BlockingIOError/SSLWantRead: paho's business, as before
            if not data:
                return b""
            self._feed(memoryview(data))
        out = bytes(self._ready[:bufsize])
        del self._ready[:bufsize]
        return out

    def _feed(self, data: memoryview) -> None:
        i = 0
        while i < len(data):
            if self._pass:
                n = min(self._pass, len(data) - i)
                self._ready += data[i:i + n]
                self._pass -= n
                i += n
            elif self._drop is not None:
                i = self._read_dropped_head(data, i)
            elif self._skip:
                n = min(self._skip, len(data) - i)
                self._skip -= n
                i += n
            else:
                self._head.append(data[i])
                i += 1
                self._start_packet()

    def _start_packet(self) -> None:
        head = self._head
        if len(head) < 2 or (head[-1] & 128 and len(head) < 5):
            return  # the remaining length goes on (malformed beyond 4 bytes: paho says so)
        length, mult = 0, 1
        for byte in head[1:]:
            length += (byte & 127) * mult
            mult *= 128
        self._head = bytearray()
        if head[0] >> 4 == _PUBLISH and length > self._limit:
            self._flags, self._drop_len, self._drop = head[0], length, bytearray()
            return
        self._ready += head
        self._pass = length

    def _read_dropped_head(self, data: memoryview, i: int) -> int:
        """Collect topic length, topic and packet id of an oversized PUBLISH; then skip the rest."""
        assert self._drop is not None
        if len(self._drop) < 2:
            n = min(2 - len(self._drop), len(data) - i)
            self._drop += data[i:i + n]
            return i + n
        topic_end = 2 + int.from_bytes(self._drop[:2], "big")
        want = topic_end + (2 if (self._flags >> 1) & 3 else 0)
        n = min(want - len(self._drop), len(data) - i)
        self._drop += data[i:i + n]
        i += n
        if len(self._drop) < want:
            return i
        topic = bytes(self._drop[2:topic_end]).decode("utf-8", "replace")
        packet_id = bytes(self._drop[topic_end:want])
        self._skip = self._drop_len - want
        self._drop = None
        name = OVERSIZED_TOPIC.encode()
        body = len(name).to_bytes(2, "big") + name + packet_id + (b"\0" if self._v5 else b"")
        self._ready += bytes([self._flags & 0xF6]) + _varint(len(body)) + body  # retain and dup flags off
        self._on_drop(topic, self._drop_len)
        return i


class GuardedClient(mqtt.Client):
    """A paho client whose socket is a `PacketGuard`."""

    def __init__(self, *args: Any, max_packet_bytes: int, on_oversized: Callable[[str, int], None],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_packet_bytes = max_packet_bytes
        self._on_oversized = on_oversized

    def _create_socket(self) -> Any:
        return PacketGuard(super()._create_socket(), self._max_packet_bytes,
                           self.protocol == mqtt.MQTTv5, self._on_oversized)

    def connect_clean(self, host: str, port: int, keepalive: int) -> None:
        """CONNECT in this client's protocol: with MQTT 5 a clean start, no session kept after it, and our
        Maximum Packet Size (the broker then drops bigger messages for us)."""
        if self.protocol != mqtt.MQTTv5:
            self.connect(host, port, keepalive=keepalive)
            return
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        props.MaximumPacketSize = self._max_packet_bytes
        self.connect(host, port, keepalive=keepalive, clean_start=True, properties=props)
