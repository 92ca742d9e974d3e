"""Drive an audio runner from an audio source: the loop `infer` and the daemon's audio pipelines share."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from agent.sources.base import EndOfStream, Source
from agent.tasks.base import Runner

AUDIO_SOURCE_MODULES = ["agent.sources.audio"]
"""What `open_source` needs for audio: never the vision sources (they import OpenCV)."""


def detections(runner: Runner, source: Source, stop: threading.Event | None = None,
               timeout: float = 0.5) -> Iterator[dict[str, Any]]:
    """Feed every chunk of an opened source to the runner; yield each result until the source ends or `stop`."""
    while stop is None or not stop.is_set():
        try:
            item = source.read(timeout)
        except EndOfStream:
            return
        if item is None:
            continue
        yield from runner.process(item.data)
