"""Model versions as manifests, topics and commands carry them: an integer or a semver string."""

from __future__ import annotations

import re
from typing import Any

_SEMVER_RE = re.compile(r"^(\d{1,9})\.(\d{1,9})\.(\d{1,9})(?:-([0-9A-Za-z.-]{1,64}))?$")

Version = int | str


def version_key(version: Version) -> tuple[Any, ...]:
    """Sort key: integers are versions n.0.0; semver orders a pre-release before its release."""
    if isinstance(version, bool):
        raise ValueError("a version is an integer or a semver string")
    if isinstance(version, int):
        if not 0 <= version < 10**12:
            raise ValueError(f"version {version} is out of range")
        return (version, 0, 0, 1, ())
    m = _SEMVER_RE.match(version)
    if not m:
        raise ValueError(f"version {version!r} is neither an integer nor semver (1.2.3 or 1.2.3-rc.1)")
    pre = m.group(4)
    if pre is None:
        return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 0, parts)


def parse_version(text: str) -> Version:
    """A version as typed on a command line or found in a topic: digits are an integer."""
    value: Version = int(text) if text.isdigit() else text
    version_key(value)
    return value


def version_text(version: Version) -> str:
    return str(version)
