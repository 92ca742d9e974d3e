"""The synthetic test-pattern sources: real frames through the real colour classifier."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import BadInput
from agent.manifest import load_spec
from agent.runtime import Model
from agent.sources.source import EndOfStream, open_source
from agent.tasks import Inference, create_task


def test_colors_cycle_through_the_classifier(fixtures: Path) -> None:
    spec = load_spec(fixtures / "colors_int8.json")
    model = Model(spec.path)
    inference = Inference(model, create_task(model, spec))
    source = open_source("test:colors", {"fps": 0, "hold": 3, "count": 12, "width": 64, "height": 48})
    labels = []
    with source:
        while True:
            try:
                item = source.read(1.0)
            except EndOfStream:
                break
            assert item is not None and item.data.shape == (48, 64, 3)
            labels.append(inference.run(item.data)["classes"][0]["label"])
    assert labels == ["red"] * 3 + ["green"] * 3 + ["blue"] * 3 + ["red"] * 3
    assert source.stats.items == 12


def test_pattern_moves_without_copies() -> None:
    source = open_source("test:pattern", {"fps": 0, "width": 80, "height": 20})
    with source:
        a, b = source.read(1.0), source.read(1.0)
        assert a is not None and b is not None
        assert a.data.shape == b.data.shape == (20, 80, 3)
        assert (a.data != b.data).any()
        assert a.data.base is b.data.base is not None  # views of one strip


def test_close_ends_a_waiting_read() -> None:
    source = open_source("test:colors", {"fps": 0.01})
    source.open()
    assert source.read(1.0) is not None
    source.close()
    with pytest.raises(EndOfStream):
        source.read(5.0)


@pytest.mark.parametrize(("uri", "options", "fragment"), [
    ("test:rainbow", {}, "unknown test source"),
    ("test:colors", {"fps": -1}, "source_options.fps"),
    ("test:colors", {"colour": "red"}, "source_options.colour: unknown option"),
])
def test_bad_synthetic_source(uri: str, options: dict, fragment: str) -> None:
    with pytest.raises(BadInput, match=fragment):
        open_source(uri, options)
