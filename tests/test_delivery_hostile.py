"""Issue 12, fault 1: a signed model whose tensors are absurdly large is refused from its flatbuffer,
before any interpreter sees it (one flipped byte in a real fixture made a tensor's batch 8,323,073: 27 s
and 6.4 GB to load, an OOM kill under MemoryMax), and the self-test runs under a time budget. The crash
marker (a deployment that died in its self-test is not resumed) is in tests/test_delivery_crash.py."""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from delivery_kit import FIXTURES, Keys, StateWatch, publish, service

from agent import modelfile as mf
from agent.delivery import failpoints
from agent.delivery.service import DeliverySettings, DeployRequest
from agent.modelfile import read_model_file
from agent.mqtt.client import PahoLink
from agent.mqtt.topics import FleetTopics

MIB = 1024 * 1024
BATCH = 8_323_073  # 0x007F0001: the batch 1 of an intermediate tensor with one byte flipped (0x00 -> 0x7F)


def hostile_copy(tmp: Path) -> tuple[Path, int]:
    """colors_int8 with one byte flipped in an intermediate tensor's batch dimension; (its manifest, the
    tensor's index). The file is only ever read as bytes here."""
    data = bytearray((FIXTURES / "colors_int8.tflite").read_bytes())
    # The flatbuffer walk's own reader finds where the shape is; nothing here interprets the model.
    r = mf._Reader(bytes(data))
    model = mf._Table(r, r.u32(0))
    buffers = model.tables(mf._M_BUFFERS)
    sg = model.tables(mf._M_SUBGRAPHS)[0]
    io = set(sg.ints(mf._SG_INPUTS) + sg.ints(mf._SG_OUTPUTS))
    for i, t in enumerate(sg.tables(mf._SG_TENSORS)):
        start, dims = t.vector(mf._T_SHAPE, 4)
        constant = buffers[t.scalar(mf._T_BUFFER, "I", 0)].vector(mf._B_DATA, 1)[1] > 0
        if i not in io and not constant and dims and r.i32(start) == 1:
            data[start + 2] = 0x7F
            assert struct.unpack_from("<i", data, start)[0] == BATCH
            break
    else:
        raise AssertionError("no intermediate tensor with batch 1 in the fixture")
    path = tmp / "colors_hostile.tflite"
    path.write_bytes(bytes(data))
    manifest = json.loads((FIXTURES / "colors_int8.json").read_text())
    manifest.update(file=path.name, version=2)
    for key in ("sha256", "size"):
        manifest.pop(key)
    (tmp / "colors_hostile.json").write_text(json.dumps(manifest))
    return tmp / "colors_hostile.json", i


@pytest.fixture
def reached() -> Iterator[list[str]]:
    """The failpoints the self-test passes: `selftest` is reached just before the runtime loads the model."""
    seen: list[str] = []
    failpoints.handler = lambda point, ctx: seen.append(point) if point == "selftest" else None
    yield seen
    failpoints.handler = None


def test_the_flatbuffer_walk_bounds_the_tensors(tmp_path: Path) -> None:
    manifest, _ = hostile_copy(tmp_path)
    sane = read_model_file(FIXTURES / "colors_int8.tflite").arena_bound
    hostile = read_model_file(manifest.with_suffix(".tflite")).arena_bound
    assert 0 < sane < MIB
    assert hostile > 512 * MIB  # over any profile's memory budget (the largest is 768 MiB)


def test_absurd_tensors_are_refused_before_any_interpreter(link: PahoLink, topics: FleetTopics, keys: Keys,
                                                           tmp_path: Path, backend: str, reached: list[str]) -> None:
    hostile, _ = hostile_copy(tmp_path)
    publish(link, topics, FIXTURES / "colors_int8.json", "colors", 1, keys)
    publish(link, topics, hostile, "colors", 2, keys)
    settings = DeliverySettings(memory_budget=512 * MIB)
    svc = service(link, tmp_path / "store", keys, topics, backend, settings=settings)
    assert svc.deploy(DeployRequest("colors", 1)).state.value == "active"
    assert reached == ["selftest"]
    watch = StateWatch(link, topics, "dev1")
    final = svc.deploy(DeployRequest("colors", 2, request="hostile"))
    assert final.state.value == "rolled_back" and final.reason is not None
    assert final.reason.value == "memory_budget" and "MiB" in (final.detail or "")
    assert reached == ["selftest"]  # the hostile model never got as far as the runtime
    assert svc.store.active("colors").version == 1  # type: ignore[union-attr]
    assert watch.wait_terminal(2)["reason"] == "memory_budget"
    assert svc.store.pending() == {} and svc.store.selftest_marker() is None


def test_a_self_test_over_its_time_budget_is_rolled_back(link: PahoLink, topics: FleetTopics, keys: Keys,
                                                         tmp_path: Path, backend: str) -> None:
    publish(link, topics, FIXTURES / "colors_int8.json", "colors", 1, keys)
    # No real self-test ends within a nanosecond: the budget is certainly spent by the end of loading.
    svc = service(link, tmp_path / "store", keys, topics, backend, settings=DeliverySettings(selftest_timeout_s=1e-9))
    final: Any = svc.deploy(DeployRequest("colors", 1))
    assert final.state.value == "rolled_back" and final.reason.value == "selftest_timeout"
    assert "by the end of loading" in final.detail
    assert svc.store.active("colors") is None and svc.store.selftest_marker() is None


def test_a_self_test_stuck_past_its_budget_is_reported_while_it_runs(link: PahoLink, topics: FleetTopics, keys: Keys,
                                                                     tmp_path: Path, backend: str) -> None:
    """A self-test still running when its budget ends is reported then (the daemon withholds systemd's watchdog
    ping on it), not only once it returns: a runtime that never returns must not hold the agent for good."""
    publish(link, topics, FIXTURES / "colors_int8.json", "colors", 1, keys)
    svc = service(link, tmp_path / "store", keys, topics, backend, settings=DeliverySettings(selftest_timeout_s=0.05))
    told: list[bool] = []
    overran = threading.Event()

    def overrun(over: bool) -> None:
        told.append(over)
        overran.set()

    def stuck(point: str, ctx: dict[str, Any]) -> None:
        if point == "selftest":  # stands for a runtime call that does not return: held until the budget is over
            assert overran.wait(30)

    svc.overrun = overrun
    failpoints.handler = stuck
    try:
        final: Any = svc.deploy(DeployRequest("colors", 1))
    finally:
        failpoints.handler = None
    assert told == [True, False]  # withheld while stuck, released when it ended after all
    assert final.state.value == "rolled_back" and final.reason.value == "selftest_timeout"
