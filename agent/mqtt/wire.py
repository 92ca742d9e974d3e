"""What goes over the wire (DESIGN §5): `encode` for every payload the agent sends, and the one strict
JSON decoder for every payload it reads from a peer it does not trust (commands, manifests).

Decoding is strict: a size limit checked before anything is parsed, UTF-8, JSON without NaN/Infinity,
without numbers that overflow to infinity, without duplicate keys, nesting that Python's parser can
follow (deeper is refused, never a RecursionError), an object at the top. `WireError` carries a
machine-readable `code` and a one-line message; callers wrap it in their own error type.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from agent.mqtt.topics import SCHEMA_VERSION


class WireError(ValueError):
    """Bytes that are not an acceptable JSON object: `code` is one of too_large, bad_encoding, bad_json,
    bad_request (valid JSON, but not an object)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Refused(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:20]} is out of range")
    return value


def decode(raw: bytes, limit: int, what: str = "message") -> dict[str, Any]:
    """The JSON object in `raw`, or WireError saying what is wrong with the bytes."""
    if len(raw) > limit:
        raise WireError("too_large", f"{what} is {len(raw)} bytes, the limit is {limit}")
    if not raw:
        raise WireError("bad_json", f"empty {what}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("bad_encoding", f"{what} is not UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite)
    except _Refused as exc:
        raise WireError("bad_json", str(exc)) from None
    except json.JSONDecodeError as exc:
        raise WireError("bad_json", f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise WireError("bad_json", f"{what} is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise WireError("bad_json", str(exc)[:200]) from None
    if not isinstance(data, dict):
        raise WireError("bad_request", f"a {what} is a JSON object, not {type(data).__name__}")
    return data


def encode(payload: dict[str, Any]) -> bytes:
    """A payload as DESIGN §5 wants it: JSON object with `ts` and `v`, numbers as numbers."""
    body = {**payload}
    body.setdefault("ts", round(time.time(), 3))
    body.setdefault("v", SCHEMA_VERSION)
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
