"""Where a key is written in a TOML text: a small line scanner, so that config errors can say `line N`."""

from __future__ import annotations

import re
from typing import Any


def toml_key(loc: tuple[Any, ...]) -> str:
    """('pipelines', 0, 'policy', 'max_rate') → `pipelines[0].policy.max_rate`."""
    out = ""
    for part in loc:
        if part == "[key]":
            continue  # the error is in a table's key itself: name the key
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "config"


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_.:\-\"' ]+?)\s*=")


def find_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """The line where the key at `loc` is written (1-based), or of its nearest written parent.

    A small scan of table headers, arrays of tables and `key =` lines: enough for how
    config files are written by hand; keys inside inline tables resolve to the parent key.
    """
    want = tuple(loc)
    best: tuple[int, int] | None = None  # (matched length, line)
    table: tuple[Any, ...] = ()
    counters: dict[tuple[Any, ...], int] = {}
    in_multiline = False
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                in_multiline = False
            continue
        header = _HEADER.match(line)
        if header:
            path = tuple(_split_key(header.group(2)))
            if header.group(1) == "[[":
                index = counters.get(path, -1) + 1
                counters[path] = index
                table = (*path, index)
            else:
                table = _with_indices(path, counters)
            best = _better(best, want, table, number)
            continue
        key = _KEY.match(line)
        if key:
            full = (*table, *_split_key(key.group(1)))
            best = _better(best, want, full, number)
            rest = line[key.end():]
            if rest.count('"""') % 2 == 1 or rest.count("'''") % 2 == 1:
                in_multiline = True
    return best[1] if best else None


def _split_key(key: str) -> list[str]:
    return [part.strip().strip("\"'") for part in key.split(".")]


def _with_indices(path: tuple[str, ...], counters: dict[tuple[Any, ...], int]) -> tuple[Any, ...]:
    # `[pipelines.policy]` after the 2nd `[[pipelines]]` belongs to pipelines[1].
    out: list[Any] = []
    for part in path:
        out.append(part)
        index = counters.get(tuple(p for p in out if not isinstance(p, int)))
        if index is not None and tuple(out) != path:
            out.append(index)
    return tuple(out)


def _better(best: tuple[int, int] | None, want: tuple[Any, ...], have: tuple[Any, ...],
            line: int) -> tuple[int, int] | None:
    if len(have) > len(want) or want[: len(have)] != have:
        return best
    if best is None or len(have) >= best[0]:
        return (len(have), line)
    return best
