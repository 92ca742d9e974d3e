"""Deciding, per item, what to keep; handing it to one writer thread so the loop never waits on a disk.

`PipelineCapture.observe` runs in a pipeline's loop after each item: it finds the item's top score
(the best class, detection or event, or a wake word model's windowed score while it stays under its
cutoff: a near miss) and keeps the item when the score lies inside the configured band, when a
`capture` command asked for it, when a shadow trial's candidate or (checked a few times a minute) the
base model answers it differently from the cheaper variant the governor runs, or at random (the
baseline). A kept frame is copied (the source may
reuse its buffer) and queued; audio goes through a ring buffer holding `pre_roll_s` of the past, and
the clip is queued once `post_roll_s` more has arrived, so a word that ended the clip's trigger is
inside it whole. The queue is bounded: when the writer falls behind, a sample is dropped and counted
rather than the loop slowed. The writer (`CaptureWriter`) encodes JPEG/WAV, hashes, and stores.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import queue
import random
import threading
import time
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.config import SampleCaptureSettings
from agent.delivery.activation import answer
from agent.samples.dataset import SIDECAR_VERSION
from agent.samples.sample_store import SampleStore
from agent.sources.source import Item
from agent.tasks.task import Runner

logger = logging.getLogger(__name__)

AUDIO_RATE = 16000
"""Audio items are int16 mono at this rate (agent.sources.source.Item)."""
FREE_FRAMES = 2
"""Frame buffers a pipeline keeps for its next kept frames: copying into a fresh 512x512 array costs ~7x a copy
into one already mapped (the pages of a fresh one fault in first), which is most of capture's time in the loop."""
QUEUE_ITEMS = 16
"""Samples waiting for the writer at most; a full queue drops (and counts) rather than blocks."""
JPEG_QUALITY = 92


@dataclass
class CaptureStats:
    """Per pipeline: what was kept, and why the rest was not."""

    queued: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    limited: int = 0
    """Wanted but over `max_per_minute`."""
    dropped: int = 0
    """Wanted but the writer's queue was full."""
    variant_checks: int = 0
    """Items the base model also ran on while a variant ran (`variant_checks_per_minute`)."""
    variant_disagreed: int = 0
    """Of those, the items the two answered differently on."""
    variant_errors: int = 0
    """Checks in which the base model raised."""

    def as_dict(self) -> dict[str, Any]:
        return {"queued": self.queued, "reasons": dict(self.reasons), "limited": self.limited,
                "dropped": self.dropped, "variant_checks": self.variant_checks,
                "variant_disagreed": self.variant_disagreed, "variant_errors": self.variant_errors}


@dataclass
class Pending:
    """One sample on its way to the store."""

    sid: str
    kind: str  # image | audio
    data: np.ndarray[Any, Any]
    sidecar: dict[str, Any]
    release: Callable[[np.ndarray[Any, Any]], None] | None = None
    """Hands `data` back for reuse once it is written (a frame buffer of the pipeline's pool)."""


class CaptureWriter:
    """One thread for the whole agent: encodes, hashes and stores what the pipelines queued."""

    def __init__(self, store: SampleStore, device: str, stop: threading.Event, size: int = QUEUE_ITEMS) -> None:
        self.store = store
        self.device = device
        self.stop = stop
        self.queue: queue.Queue[Pending] = queue.Queue(size)
        self.errors = 0
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._busy = 0

    def next_id(self, ts: float, pipeline: str) -> str:
        return f"{int(ts * 1000):013d}-{pipeline}-{next(self._ids)}"

    def offer(self, pending: Pending) -> bool:
        """Queue a sample without waiting; False when the queue is full (the caller counts it)."""
        with self._idle:
            try:
                self.queue.put_nowait(pending)
            except queue.Full:
                return False
            self._busy += 1
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued so far is stored (tests, shutdown); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                pending = self.queue.get(timeout=0.25)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            try:
                self.write(pending)
            except Exception:
                self.errors += 1
                logger.exception("capture: writing sample %s failed", pending.sid)
            finally:
                if pending.release is not None:
                    pending.release(pending.data)
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def write(self, pending: Pending) -> bool:
        if pending.kind == "image":
            data, suffix = encode_jpeg(pending.data), ".jpg"
        else:
            data, suffix = encode_wav(pending.data), ".wav"
        sidecar = {**pending.sidecar, "file": pending.sid + suffix, "bytes": len(data),
                   "sha256": hashlib.sha256(data).hexdigest()}
        return self.store.add(pending.sid, suffix, data, sidecar)


def encode_jpeg(frame: np.ndarray[Any, Any]) -> bytes:
    from agent.vision.cv import cv2  # only an agent that captures frames needs OpenCV

    ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(encoded.tobytes())


def encode_wav(samples: np.ndarray[Any, Any]) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(AUDIO_RATE)
        w.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
    return out.getvalue()


def top_score(results: list[dict[str, Any]], runner: Runner) -> float:
    """The best score in an item's results; a wake word runner's windowed score when nothing fired."""
    best = 0.0
    for r in results:
        for key in ("classes", "detections"):
            for entry in r.get(key, ()):
                best = max(best, float(entry.get("score", 0.0)))
        if "score" in r:
            best = max(best, float(r["score"]))
    peak = getattr(runner, "peak_score", None)
    if peak is not None:
        best = max(best, float(peak))
    return best


class PipelineCapture:
    """One pipeline's capture: the choice per item (in the loop's thread), the audio ring, the command."""

    def __init__(self, pipeline: str, settings: SampleCaptureSettings, writer: CaptureWriter, *, audio: bool,
                 seed: int | None = None) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.writer = writer
        self.audio = audio
        self.stats = CaptureStats()
        self._rng = random.Random(seed)  # noqa: S311 - a sampling rate, not a secret
        self._interval = 60.0 / settings.max_per_minute
        self._next_ok = 0.0
        self._check_interval = 60.0 / settings.variant_checks_per_minute if settings.variant_checks_per_minute \
            else None
        self._next_check = 0.0
        self._command_left = 0
        self._free: deque[np.ndarray[Any, Any]] = deque(maxlen=FREE_FRAMES)
        """Frame buffers the writer is done with (it appends, the loop pops: both atomic)."""
        self._command_until = 0.0
        # Audio: a ring of the last pre+post seconds, and the clip waiting for its post-roll.
        self._pre = int(settings.pre_roll_s * AUDIO_RATE)
        self._post = int(settings.post_roll_s * AUDIO_RATE)
        self._ring = np.zeros(max(1, self._pre + self._post) if audio else 0, dtype=np.int16)
        self._written = 0
        self._clip: tuple[int, str, float, dict[str, Any]] | None = None  # (due sample, reason, score, context)

    def request(self, count: int | None, duration_s: float | None) -> dict[str, Any]:
        """The `capture` command: keep the next `count` items, or every item for `duration_s`."""
        self._command_left = count or 0
        self._command_until = time.monotonic() + duration_s if duration_s else 0.0
        return {"pipeline": self.pipeline, "count": count, "duration_s": duration_s}

    def _commanded(self, now: float) -> bool:
        if self._command_left > 0:
            self._command_left -= 1
            return True
        return now < self._command_until

    def observe(self, item: Item, results: list[dict[str, Any]], runner: Runner, model: dict[str, Any],
                shadow_disagreed: bool = False, base: Runner | None = None) -> None:
        """After each item: keep it, or not. `shadow_disagreed`: a shadow trial's candidate model answered
        this item differently from the active one. `base`: the base model's runner while `runner` is a
        cheaper variant of it (checked on a few items a minute)."""
        s = self.settings
        score = top_score(results, runner)
        now = time.monotonic()
        reason: str | None = None
        base_results: list[dict[str, Any]] | None = None
        if self._commanded(now):
            reason = "command"
        elif shadow_disagreed and s.shadow_disagreement:
            reason = "shadow"
        elif base is not None and self._check_interval is not None and now >= self._next_check and \
                (base_results := self._check_variant(base, item, results)) is not None:
            reason = "variant"
        elif s.band is not None and s.band[0] <= score <= s.band[1]:
            reason = "band"
        elif s.random_rate and self._rng.random() < s.random_rate:
            reason = "random"
        if self.audio:
            self._take_audio(np.asarray(item.data, dtype=np.int16).reshape(-1))
        if reason is not None and self._clip is None:
            if now < self._next_ok:
                self.stats.limited += 1
            elif not self.audio and self.writer.queue.full():
                self.stats.dropped += 1  # before the frame's copy: the writer is behind and would refuse it
            else:
                self._next_ok = now + self._interval
                # `results` are the pre-labels a labeller starts from: for a variant sample the base's answer,
                # the better model's; the variant's (the answer the sample is kept for being wrong) beside it.
                context = {"ts": round(item.ts, 3), "model": dict(model), "score": round(score, 6)}
                if base_results is None:
                    context["results"] = [dict(r) for r in results]
                else:
                    context["results"] = [dict(r) for r in base_results]
                    context["variant_results"] = [dict(r) for r in results]
                if item.file is not None:
                    context["source_file"] = item.file
                if self.audio:
                    self._clip = (self._written + self._post, reason, score, context)
                else:
                    self._queue("image", self._frame_copy(item.data), reason, context)

    def _frame_copy(self, frame: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The frame copied (the source may reuse its buffer), into a buffer a written sample left if one fits."""
        frame = np.asarray(frame)
        while self._free:
            buffer = self._free.pop()
            if buffer.shape == frame.shape and buffer.dtype == frame.dtype:
                np.copyto(buffer, frame)
                return buffer
        return np.array(frame, copy=True)

    def _check_variant(self, base: Runner, item: Item, results: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Run the base model on the item (in the loop: at most `variant_checks_per_minute` times a minute, the
        base being stateless vision); its results when it answers differently from the variant, else None."""
        assert self._check_interval is not None
        self._next_check = time.monotonic() + self._check_interval
        self.stats.variant_checks += 1
        try:
            base_results = base.process(item.data)
        except Exception:
            self.stats.variant_errors += 1
            if self.stats.variant_errors == 1:
                logger.exception("capture %s: the base model failed on an item", self.pipeline)
            return None
        if answer(base_results) == answer(results):
            return None
        self.stats.variant_disagreed += 1
        return base_results

    def _take_audio(self, chunk: np.ndarray[Any, Any]) -> None:
        """Into the ring; a clip waiting for its post-roll is queued the moment it has it, mid-chunk if need be
        (a chunk that overshot would push the clip's start out of the ring)."""
        clip = self._clip
        if clip is not None and self._written + len(chunk) >= clip[0]:
            head = clip[0] - self._written
            self._push_audio(chunk[:head])
            self.flush()
            chunk = chunk[head:]
        self._push_audio(chunk)

    def flush(self) -> None:
        """Queue the clip waiting for its post-roll with what has arrived (the source ended, or it is due)."""
        clip, self._clip = self._clip, None
        if clip is None:
            return
        due, reason, _, context = clip
        trigger = due - self._post
        # Samples [lo, hi) of the stream: pre-roll before the trigger, post-roll after it, as far as the stream
        # goes (it may have ended before the post-roll).
        lo = max(trigger - self._pre, self._written - len(self._ring), 0)
        hi = min(due, self._written)
        samples = self._ring[np.arange(lo, hi) % len(self._ring)]
        context = {**context, "pre_roll_s": round((trigger - lo) / AUDIO_RATE, 3),
                   "duration_s": round(len(samples) / AUDIO_RATE, 3), "sample_rate": AUDIO_RATE}
        self._queue("audio", samples, reason, context)

    def _push_audio(self, chunk: np.ndarray[Any, Any]) -> None:
        ring, size = self._ring, len(self._ring)
        if len(chunk) >= size:
            total = self._written + len(chunk)
            ring[np.arange(total - size, total) % size] = chunk[-size:]  # sample k lives at k % size
        else:
            pos = self._written % size
            first = min(len(chunk), size - pos)
            ring[pos:pos + first] = chunk[:first]
            ring[: len(chunk) - first] = chunk[first:]
        self._written += len(chunk)

    def _queue(self, kind: str, data: np.ndarray[Any, Any], reason: str, context: dict[str, Any]) -> None:
        writer = self.writer
        sid = writer.next_id(context["ts"], self.pipeline)
        sidecar: dict[str, Any] = {"v": SIDECAR_VERSION, "id": sid, "device": writer.device,
                                   "pipeline": self.pipeline, "reason": reason, "kind": kind, **context}
        if kind == "image":
            sidecar["width"], sidecar["height"] = int(data.shape[1]), int(data.shape[0])
        release = self._free.append if kind == "image" else None
        if writer.offer(Pending(sid, kind, data, sidecar, release)):
            self.stats.queued += 1
            self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
        else:
            self.stats.dropped += 1
