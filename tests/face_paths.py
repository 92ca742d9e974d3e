"""Both ways BlazeFace decodes a frame give one result: a few candidates in Python floats, more in arrays."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest

from agent.tasks import Inference
from agent.vision import decoders


def assert_both_paths_agree(inference: Inference, frames: Iterable[np.ndarray],
                            monkeypatch: pytest.MonkeyPatch) -> int:
    """Run each BGR frame through both paths (`decoders.FEW` moved); the results must agree to the digits a
    result carries (scores 6 decimals, boxes 5, a last-digit rounding difference at most). Returns how many
    frames took the Python path (a frame without a candidate takes neither)."""
    decoder = inference.task.decoder  # type: ignore[attr-defined]
    few_paths = 0
    for k, frame in enumerate(frames):
        monkeypatch.setattr(decoders, "FEW", 10_000)
        fast = inference.run(frame)["detections"]
        few_paths += decoder.decode().rows is not None
        monkeypatch.setattr(decoders, "FEW", 0)
        arrays = inference.run(frame)["detections"]
        assert decoder.decode().rows is None
        assert len(fast) == len(arrays), k
        for a, b in zip(fast, arrays, strict=True):
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) <= 2e-6, (k, a, b)
            assert max(abs(x - y) for x, y in zip(a["box"], b["box"], strict=True)) <= 2e-5, (k, a, b)
    monkeypatch.undo()
    return few_paths
