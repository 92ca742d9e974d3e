"""One injective encoding of names (devices, pipelines) into `[a-z0-9_-]`.

Configured names may hold `.` and capitals (`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`), but some
places take a narrower alphabet: Home Assistant's discovery node and object ids take
`[a-zA-Z0-9_-]`, and entity ids are lower case. Replacing the other characters by `_` made
`cam.a` and `cam_a` one entity and silently lost the other (issue 18), so names go through
`encode_name`, which keeps distinct names distinct:

- a name made of `[a-z0-9_-]` only (nearly every name) stays as it is, unless it starts
  with `x--`;
- any other name becomes `x--` followed by its UTF-8 bytes, where `a-z`, `0-9` and `_` stay
  and every other byte is `-` and two hex digits (`cam.a` → `x--cam-2ea`, `Cam` → `x---43am`).

A plain result never starts with `x--` and an encoded one always does; after the prefix every
`-` opens exactly one escape. So `decode_name` inverts it, and that is what makes it injective.

The broker-portability work uses this same function for topic segments: RabbitMQ's MQTT
plugin maps a `.` in a topic segment to `/`, which would split `lepton/cam.a/…` into levels.
One function for both keeps a device's topic segment and its Home Assistant ids in step.
"""

from __future__ import annotations

import re

PREFIX = "x--"
_PLAIN = re.compile(r"[a-z0-9_-]*")
_KEPT = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")


def encode_name(name: str) -> str:
    """`name` in `[a-z0-9_-]`, distinct for distinct names (see the module's docstring)."""
    if _PLAIN.fullmatch(name) and not name.startswith(PREFIX):
        return name
    return PREFIX + "".join(chr(b) if b in _KEPT else f"-{b:02x}" for b in name.encode())


def decode_name(encoded: str) -> str:
    """The name `encode_name` made `encoded` from; ValueError for a string it cannot have made."""
    if not encoded.startswith(PREFIX):
        if not _PLAIN.fullmatch(encoded):
            raise ValueError(f"not an encoded name: {encoded!r}")
        return encoded
    out = bytearray()
    body = encoded[len(PREFIX):]
    i = 0
    while i < len(body):
        if body[i] == "-":
            digits = body[i + 1:i + 3]
            if not re.fullmatch(r"[0-9a-f]{2}", digits):
                raise ValueError(f"not an encoded name: {encoded!r}")
            out.append(int(digits, 16))
            i += 3
        elif ord(body[i]) in _KEPT:
            out.append(ord(body[i]))
            i += 1
        else:
            raise ValueError(f"not an encoded name: {encoded!r}")
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise ValueError(f"not an encoded name: {encoded!r}") from None
