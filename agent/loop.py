"""The item loop: source → runner → results → sink, one item at a time.

One loop serves the daemon's pipelines, `lepton-agent infer` (images and audio) and the
audio path. What differs is passed in: `emit` gets each item's results (the daemon applies
its policy and spools them, `infer` prints them), `on_bad` decides what a bad item does
(`infer` reports it and goes on; without it, BadInput ends the loop, which the daemon's
supervisor parks as a configuration problem), and a `LoopControl` adds the daemon's work
around each item: heartbeat, swaps between two items, governor pauses and the fps limit.
The source ending raises EndOfStream to the caller.

The loop itself allocates nothing per item: it hands the source's item and the runner's
results on as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from agent.errors import BadInput
from agent.sources.source import Item, Source
from agent.tasks.task import Runner

READ_TIMEOUT_S = 0.25
"""Longest a loop waits on its source before looking at its stop condition again."""

Emit = Callable[[Item, list[dict[str, Any]], Runner], None]
"""(item, its results, the runner that made them): publish, print, count."""

OnBad = Callable[[BadInput, Item | None], None]
"""A bad item: (the error, the item when it was read but could not be processed)."""


class LoopControl(Protocol):
    """The daemon's work around each item (see `agent.pipeline`)."""

    def between(self) -> Runner | None:
        """Before each read: the runner to use from now on, or None to go round again (paused)."""

    def admit(self, item: Item) -> bool:
        """After a read: False skips the item (the fps limit)."""


def _never() -> bool:
    return False


def run_items(source: Source, runner: Runner, emit: Emit, *, stopping: Callable[[], bool] = _never,
              timeout: float = READ_TIMEOUT_S, limit: int | None = None, on_bad: OnBad | None = None,
              control: LoopControl | None = None) -> int:
    """Drive `runner` from the opened `source` until `stopping()`, or `limit` items were read; returns the
    items read. EndOfStream (the source ended) and, without `on_bad`, BadInput propagate."""
    read = 0
    while limit is None or read < limit:
        if stopping():
            break
        if control is not None:
            current = control.between()
            if current is None:
                continue
            runner = current
        item: Item | None = None
        try:
            item = source.read(timeout)
            if item is None:
                continue
            read += 1
            if control is not None and not control.admit(item):
                continue
            results = runner.process(item.data)
        except BadInput as exc:
            if on_bad is None:
                raise
            on_bad(exc, item)
            continue
        emit(item, results, runner)
    return read
