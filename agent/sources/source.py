"""The source seam: a frame or audio source the loops read items from.

A source is chosen by its URI (`camera:0`, `/dev/video0`, `rtsp://…`, `mic:`, `-`,
a file, …): each kind registers the prefixes or suffixes it answers for, and
`open_source()` picks the first that claims the URI. Sources deal with their own
device trouble: `read()` returns None on a timeout, reopens a device that went
away (with backoff, counted in `stats.restarts`) and raises `EndOfStream` only
when a finite source (a file) is used up. Configuration problems (no such file,
unknown scheme) are `BadInput` at `open()`.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.errors import BadInput, LeptonError


class EndOfStream(LeptonError):
    """A finite source has nothing more to give."""


@dataclass(frozen=True)
class Item:
    """One frame (BGR uint8 ndarray) or one audio chunk (int16 mono 16 kHz ndarray)."""

    data: Any
    index: int
    """Frame index, or chunk index for audio."""
    t: float
    """Seconds into the source (media time for files, since open for live devices)."""
    ts: float
    """Wall-clock capture time (Unix seconds)."""
    file: str | None = None
    """The file the item came from, when the source is a folder or glob of files."""


@dataclass
class SourceStats:
    items: int = 0
    dropped: int = 0
    """Stale frames replaced by newer ones before anyone read them, or audio overruns."""
    restarts: int = 0
    errors: int = 0


class Source(abc.ABC):
    """Where a pipeline's items come from."""

    kind: ClassVar[str] = "frames"
    """`frames` or `audio`."""

    def __init__(self, uri: str, options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.options = options or {}
        self.stats = SourceStats()

    @abc.abstractmethod
    def open(self) -> None: ...

    @abc.abstractmethod
    def read(self, timeout: float) -> Item | None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Source:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SourceFactory = Callable[[str, dict[str, Any]], Source]

# (matcher, factory) in registration order; matcher(uri) -> bool.
_REGISTRY: list[tuple[Callable[[str], bool], SourceFactory]] = []

# Modules that register source kinds; imported on first use so that an
# audio-only agent never imports OpenCV.
SOURCE_MODULES: list[str] = ["agent.sources.synthetic", "agent.sources.audio", "agent.sources.camera",
                               "agent.sources.network", "agent.sources.files"]


def register_source(matcher: Callable[[str], bool]) -> Callable[[SourceFactory], SourceFactory]:
    def wrap(factory: SourceFactory) -> SourceFactory:
        _REGISTRY.append((matcher, factory))
        return factory

    return wrap


def open_source(uri: str, options: dict[str, Any] | None = None, modules: list[str] | None = None) -> Source:
    """Build (not yet open) the source that claims `uri`."""
    for name in modules if modules is not None else SOURCE_MODULES:
        importlib.import_module(name)
    for matcher, factory in _REGISTRY:
        if matcher(uri):
            return factory(uri, options or {})
    raise BadInput(f"{uri}: no source kind takes this input")
