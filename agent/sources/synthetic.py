"""Test-pattern frame sources that need no files or devices: for the daemon's tests and the demo.

- `test:colors` — solid red, green, blue frames in turn (each colour held `hold` frames), so
  the colour classifier in `tests/fixtures` gives results that change.
- `test:pattern` — colour bars scrolling sideways, a moving picture for any vision model.

Options: `fps` (frames per second, 0: as fast as they are read), `width`, `height`, `hold`
(frames per colour, default one second's worth), `count` (frames in all; default endless:
a finite count ends with `EndOfStream`). Frames are made once and handed out as views, so a
frame costs no allocation.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import BadInput
from agent.sources.source import EndOfStream, Item, Source, register_source

PATTERNS = ("colors", "pattern")
# BGR, as every frame source delivers.
_COLORS = ((0, 0, 255), (0, 255, 0), (255, 0, 0))
_BARS = ((255, 255, 255), (0, 255, 255), (255, 255, 0), (0, 255, 0), (255, 0, 255), (0, 0, 255), (255, 0, 0),
         (0, 0, 0))


class SyntheticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fps: Annotated[float, Field(ge=0, le=10_000)] = 10.0
    width: Annotated[int, Field(ge=8, le=4096)] = 320
    height: Annotated[int, Field(ge=8, le=4096)] = 240
    hold: Annotated[int, Field(ge=1)] | None = None
    count: Annotated[int, Field(ge=1)] | None = None
    stall_after: Annotated[int, Field(ge=0)] | None = None
    """After this many frames `read()` blocks until closed, as a wedged camera driver does
    (for testing the watchdog)."""


def _is_test_uri(uri: str) -> bool:
    return uri.startswith("test:")


@register_source(_is_test_uri)
class SyntheticSource(Source):
    """Frames computed in memory, paced to `fps` in wall time."""

    kind = "frames"

    def __init__(self, uri: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, options)
        self.pattern = uri.removeprefix("test:")
        if self.pattern not in PATTERNS:
            raise BadInput(f"{uri}: unknown test source (known: {', '.join('test:' + p for p in PATTERNS)})")
        try:
            self.settings = SyntheticOptions.model_validate(self.options)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            raise BadInput(f"{uri}: source_options.{loc}: {msg}") from None
        fps = self.settings.fps
        self.hold = self.settings.hold or max(1, round(fps) if fps else 30)
        self._frames: list[np.ndarray[Any, Any]] = []
        self._strip: np.ndarray[Any, Any] | None = None
        self._closed = threading.Event()
        self._index = 0
        self._t0 = 0.0

    def open(self) -> None:
        w, h = self.settings.width, self.settings.height
        if self.pattern == "colors":
            self._frames = [np.full((h, w, 3), c, dtype=np.uint8) for c in _COLORS]
        else:
            # Twice as wide as a frame: a frame is a sliding window over it, so nothing is copied.
            bar = max(1, (2 * w) // len(_BARS))
            strip = np.zeros((h, 2 * w, 3), dtype=np.uint8)
            for i, c in enumerate(_BARS):
                strip[:, i * bar:(i + 1) * bar] = c
            strip[:, len(_BARS) * bar:] = _BARS[-1]
            self._strip = strip
        self._closed.clear()
        self._index = 0
        self._t0 = time.monotonic()

    def read(self, timeout: float) -> Item | None:
        if self._closed.is_set():
            raise EndOfStream(f"{self.uri}: closed")
        count = self.settings.count
        if count is not None and self._index >= count:
            raise EndOfStream(f"{self.uri}: {count} frames given")
        if self.settings.stall_after is not None and self._index >= self.settings.stall_after:
            self._closed.wait()
            raise EndOfStream(f"{self.uri}: closed")
        fps = self.settings.fps
        media_t = self._index / fps if fps else time.monotonic() - self._t0
        if fps:
            wait = self._t0 + media_t - time.monotonic()
            if wait > timeout:
                self._closed.wait(timeout)
                return None
            if wait > 0 and self._closed.wait(wait):
                raise EndOfStream(f"{self.uri}: closed")
        frame = self._frame(self._index)
        item = Item(frame, self._index, media_t, time.time())
        self._index += 1
        self.stats.items += 1
        return item

    def _frame(self, index: int) -> np.ndarray[Any, Any]:
        if self._strip is not None:
            w = self.settings.width
            offset = (index * 4) % w
            return self._strip[:, offset:offset + w]
        return self._frames[(index // self.hold) % len(self._frames)]

    def close(self) -> None:
        self._closed.set()
