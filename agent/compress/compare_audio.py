"""`model compare` for streaming wake word models, on WAV clips (field audio from `samples pull`).

A wake word model is not run once per item: it streams (agent.tasks.wakeword). Each clip is
therefore fed from a fresh stream (`reset`) in 30 ms steps to BASE and to each VARIANT, and
what is compared is the decision per clip: which words were detected, or none
(`agreement.wakeword_agreement`), overall and per capture reason for a pulled dataset
folder. Latency is per clip (the whole stream), in rotating order so that every model sees
the same machine load, with the realtime factor (audio seconds per wall second).
"""

from __future__ import annotations

import hashlib
import platform
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench import percentiles
from agent.compress import agreement as agree
from agent.errors import BadInput
from agent.manifest import load_spec
from agent.runtime import Model, load_backend

RATE = 16000
STEP = 480
"""Samples per feed: 30 ms, as a microphone delivers them."""


def is_wakeword(spec: Any) -> bool:
    return spec.micro is not None or spec.task == "wakeword"


def read_clip(path: str, option: str = "--eval") -> np.ndarray[Any, Any]:
    """A 16 kHz mono 16-bit WAV (what capture writes); BadInput names anything else."""
    try:
        with wave.open(path, "rb") as w:
            if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (RATE, 1, 2):
                raise BadInput(f"{option} {path}: want 16 kHz mono 16-bit WAV, this is {w.getframerate()} Hz, "
                               f"{w.getnchannels()} channel(s), {8 * w.getsampwidth()}-bit")
            return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
    except (OSError, EOFError, wave.Error) as exc:
        raise BadInput(f"{option} {path}: not a readable WAV ({exc})") from None


def clips(inputs: list[str], limit: int, option: str = "--eval") -> tuple[list[np.ndarray[Any, Any]], list[str | None]]:
    """The clips of `inputs` (.wav files, folders of them, pulled dataset folders' audio) and their reasons."""
    from agent.samples.dataset import reasoned_inputs

    out: list[np.ndarray[Any, Any]] = []
    reasons: list[str | None] = []
    for uri, reason in reasoned_inputs(inputs, "audio"):
        path = Path(uri)
        files = sorted(path.glob("*.wav")) if path.is_dir() else [path]
        for f in files:
            if not f.is_file():
                raise BadInput(f"{option} {f}: no such file")
            out.append(read_clip(str(f), option))
            reasons.append(reason)
            if len(out) >= limit:
                return out, reasons
    if not out:
        raise BadInput(f"{option} {' '.join(inputs)}: no WAV clips")
    return out, reasons


def compare_wakeword(base_arg: str, variant_args: list[str], eval_inputs: list[str], *, runs: int, limit: int,
                     precision: Callable[[Model], str], backend: str | None = None) -> dict[str, Any]:
    """The report of `model compare` for a wake word BASE (`precision`: compare's reading of the tensors)."""
    from agent.tasks import create_runner

    items, reasons = clips(eval_inputs, limit)
    args = [base_arg, *variant_args]
    runners = []
    precisions: list[str] = []
    for arg in args:
        spec = load_spec(arg)
        if not is_wakeword(spec):
            raise BadInput(f"{arg}: not a wake word model (BASE is one)")
        model = Model(spec.path, backend=backend, threads=1)
        runners.append((spec, create_runner(model, spec, None)))
        precisions.append(precision(model))
    results: list[list[list[dict[str, Any]]]] = [[] for _ in runners]
    for clip in items:
        for k, (_, runner) in enumerate(runners):
            runner.reset()  # type: ignore[attr-defined]  # a streaming runner: a fresh stream per clip
            results[k].append([r for s in range(0, len(clip), STEP) for r in runner.process(clip[s:s + STEP])])
    spent: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for r in range(runs):
        clip = items[r % len(items)]
        for k in order:
            runner = runners[k][1]
            runner.reset()  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            for s in range(0, len(clip), STEP):
                runner.process(clip[s:s + STEP])
            spent[k].append((time.perf_counter() - t0) * 1000)
        order = order[1:] + order[:1]
    audio_ms = [1000 * len(items[r % len(items)]) / RATE for r in range(runs)]
    base_size = runners[0][0].path.stat().st_size
    rows = []
    for k, (arg, (spec, _)) in enumerate(zip(args, runners, strict=True)):
        size = spec.path.stat().st_size
        row: dict[str, Any] = {
            "model": arg, "file": str(spec.path), "role": "base" if k == 0 else "variant",
            "sha256": hashlib.sha256(spec.path.read_bytes()).hexdigest(), "size_bytes": size,
            "size_ratio": round(size / base_size, 4), "precision": precisions[k],
            "latency_ms": {"1": {"clip_ms": percentiles(spent[k])}},
            "realtime_factor": round(sum(audio_ms) / max(sum(spent[k]), 1e-9), 1),
        }
        if k:
            row["agreement"] = agree.wakeword_agreement(results[0], results[k])
            if any(r is not None for r in reasons):
                row["agreement_by_reason"] = {
                    reason: {"items": len(picked), **agree.wakeword_agreement([results[0][i] for i in picked],
                                                                               [results[k][i] for i in picked])}
                    for reason in sorted({r or "none" for r in reasons})
                    for picked in [[i for i, r in enumerate(reasons) if (r or "none") == reason]]}
        rows.append(row)
    info = load_backend(backend)
    return {"kind": "wakeword", "base": base_arg, "backend": {"name": info.name, "version": info.version},
            "machine": platform.machine(),
            "threads": [1], "runs": runs, "eval_items": len(items), "models": rows}


def format_wakeword_table(report: dict[str, Any]) -> str:
    lines = [f"backend {report['backend']['name']} {report['backend']['version']} on {report['machine']}, "
             f"{report['eval_items']} clips, {report['runs']} timed runs, per clip p50 in ms",
             f"{'MODEL':<34} {'PREC':<8} {'SIZE KB':>8} {'CLIP ms':>8} {'xRT':>7}  DECISIONS AGREE"]
    for row in report["models"]:
        agreement = row.get("agreement")
        agreed = "(base)" if agreement is None else f"{100 * (agreement['decision_agreement'] or 0):.1f}%"
        lines.append(f"{Path(row['model']).name[-34:]:<34} {row['precision']:<8} {row['size_bytes'] / 1024:>8.1f} "
                     f"{row['latency_ms']['1']['clip_ms']['p50']:>8.2f} {row['realtime_factor']:>7.1f}  {agreed}")
    return "\n".join(lines)
