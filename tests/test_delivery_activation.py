"""Activation in a running pipeline: hot swap with no gap in `seq`, probation rollback, shadow trials.

`LoopPipeline` is a minimal pipeline loop of the shape the daemon's has: one thread,
a frame source (real fixture images, cycled), a runner it drives, a `seq` counter,
and the three hooks the delivery service calls (swap, health, attach).
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from delivery_kit import FIXTURES, Keys, StateWatch, publish, service, unique_prefix

from agent.delivery.activation import PipelineHealth, ProbationSettings, ShadowSpec, ShadowTrial
from agent.delivery.reasons import Reason
from agent.delivery.selftest import Fit, Prepared
from agent.delivery.service import DeliverySettings, DeployRequest, PipelineHooks
from agent.manifest import load_spec
from agent.mqtt.client import PahoLink
from agent.mqtt.topics import FleetTopics
from agent.runtime import Model
from agent.tasks import Inference, Runner, create_task


def _image(name: str) -> np.ndarray[Any, Any]:
    img = cv2.imread(str(FIXTURES / "images" / f"{name}.png"))
    assert img is not None
    return img


class LoopPipeline:
    def __init__(self, model: Model, runner: Runner, version: int, frames: list[np.ndarray[Any, Any]]) -> None:
        self.runner, self.version = runner, version
        self.frames = frames
        self.seq = 0
        self.items = self.errors = self.restarts = 0
        self.last_error: str | None = None
        self.results: list[tuple[int, Any]] = []  # (seq, model version)
        self.paused = threading.Event()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._next: tuple[Runner, Any] | None = None
        self._shadow: ShadowTrial | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.current_model = model

    def start(self) -> LoopPipeline:
        self._thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        for frame in itertools.cycle(self.frames):
            if self.stop.wait(0.005):  # a camera's frame interval; also the loop's stop check
                return
            if self.paused.is_set():
                continue
            with self._lock:
                if self._next is not None:
                    (self.runner, self.version), self._next = self._next, None
                runner, version, shadow = self.runner, self.version, self._shadow
            try:
                results = runner.process(frame)
            except Exception as exc:  # the daemon's loop: log, count, carry on with the next frame
                self.errors += 1
                self.restarts += 1
                self.last_error = str(exc).splitlines()[0]
                continue
            for _ in results:
                self.seq += 1
                self.results.append((self.seq, version))
            self.items += 1
            if shadow is not None:
                lat = runner.latency
                shadow.observe(frame, results, lat.pre + lat.invoke + lat.post)

    # -- the hooks ------------------------------------------------------------------

    def swap(self, prepared: Prepared) -> Any:
        with self._lock:
            old = (self.runner, self.version)
            self._next = (prepared.runner, prepared.stored.version)

        def undo() -> None:
            with self._lock:
                self._next = old

        return undo

    def health(self) -> PipelineHealth:
        return PipelineHealth(self.items, self.errors, self.restarts, self.last_error)

    def attach(self, trial: ShadowTrial | None) -> None:
        with self._lock:
            self._shadow = trial

    def hooks(self) -> PipelineHooks:
        return PipelineHooks(swap=self.swap, health=self.health, attach=self.attach,
                             fit=lambda: Fit.like(self.current_model, self.runner))

    def wait_items(self, n: int, timeout: float = 30.0) -> None:
        done = threading.Event()
        target = self.items + n

        def poll() -> None:
            while not done.is_set() and self.items < target and not self.stop.is_set():
                done.wait(0.01)
            done.set()

        t = threading.Thread(target=poll)
        t.start()
        t.join(timeout)
        done.set()
        assert self.items >= target


CANDIDATE = "fails_on_dark.tflite"
"""Same tensors as colors_int8; always answers 'red'; fails at invoke on frames whose top-left red is < 128."""


def _setup(link: PahoLink, keys: Keys, tmp_path: Path, backend: str, frames: list[np.ndarray[Any, Any]],
           probation: ProbationSettings) -> tuple[Any, LoopPipeline, FleetTopics]:
    topics = FleetTopics(unique_prefix())
    publish(link, topics, FIXTURES / "colors_int8.json", "colors", 1, keys)
    manifest = load_spec(FIXTURES / "colors_int8.json").manifest
    assert manifest is not None
    candidate = tmp_path / "candidate.json"
    data = manifest.model_dump(mode="json", exclude_none=True, exclude={"sha256", "size"})
    candidate.write_text(__import__("json").dumps({**data, "file": CANDIDATE}))
    (tmp_path / CANDIDATE).write_bytes((FIXTURES / CANDIDATE).read_bytes())
    publish(link, topics, candidate, "colors", 2, keys)
    svc = service(link, tmp_path / "store", keys, topics, backend,
                  settings=DeliverySettings(probation=probation))
    assert svc.deploy(DeployRequest("colors", 1)).state.value == "active"
    spec = load_spec(FIXTURES / "colors_int8.json")
    model = Model(spec.path)
    pipeline = LoopPipeline(model, Inference(model, create_task(model, spec)), 1, frames).start()
    svc.hooks = lambda name: pipeline.hooks() if name == "colors" else None
    return svc, pipeline, topics


def _seq_has_no_gap(pipeline: LoopPipeline) -> list[Any]:
    seqs = [s for s, _ in pipeline.results]
    assert seqs == list(range(1, len(seqs) + 1))
    return [v for _, v in pipeline.results]


def test_hot_swap_keeps_the_loop_and_seq(link: PahoLink, keys: Keys, tmp_path: Path, backend: str) -> None:
    frames = [_image("red_1"), _image("red_2")]
    svc, pipeline, topics = _setup(link, keys, tmp_path, backend, frames, ProbationSettings(window_s=1.0, poll_s=0.1))
    watch = StateWatch(link, topics, "dev1")
    try:
        pipeline.wait_items(5)
        loop_thread = pipeline._thread
        final = svc.deploy(DeployRequest("colors", 2))
        assert final.state.value == "active", final
        pipeline.wait_items(5)
    finally:
        pipeline.close()
    versions = _seq_has_no_gap(pipeline)
    assert versions[0] == 1 and versions[-1] == 2
    first_v2 = versions.index(2)
    assert set(versions[first_v2:]) == {2}  # switched once, between two frames
    assert pipeline._thread is loop_thread and pipeline.restarts == 0
    slot = svc.store.slot("colors")
    assert slot.active is not None and slot.active.version == 2 and slot.previous is not None
    watch.wait_for("active", 2)  # the retained state travels through the broker after deploy() returns
    assert [s["state"] for s in watch.states if s["version"] == 2][-2:] == ["activating", "active"]


def test_crash_in_probation_rolls_back(link: PahoLink, keys: Keys, tmp_path: Path, backend: str) -> None:
    # Passes the self-test (grey sample) and crashes on the real green and blue frames.
    frames = [_image("red_1"), _image("green_1"), _image("blue_1")]
    svc, pipeline, _ = _setup(link, keys, tmp_path, backend, frames,
                              ProbationSettings(window_s=30.0, poll_s=0.05))
    try:
        pipeline.wait_items(3)
        final = svc.deploy(DeployRequest("colors", 2))
        assert (final.state.value, final.reason) == ("rolled_back", Reason.PIPELINE_CRASHED), final
        assert final.active == 1
        pipeline.wait_items(6)
    finally:
        pipeline.close()
    versions = _seq_has_no_gap(pipeline)
    assert versions[-1] == 1 and 2 in versions  # v2 ran, then v1 again
    slot = svc.store.slot("colors")
    assert slot.active is not None and slot.active.version == 1 and slot.trial is None


def test_stall_in_probation_rolls_back(link: PahoLink, keys: Keys, tmp_path: Path, backend: str) -> None:
    svc, pipeline, _ = _setup(link, keys, tmp_path, backend, [_image("red_1")],
                              ProbationSettings(window_s=30.0, stall_s=0.5, poll_s=0.05))
    try:
        pipeline.wait_items(2)
        pipeline.paused.set()  # the source stops delivering right after the swap
        final = svc.deploy(DeployRequest("colors", 2))
    finally:
        pipeline.close()
    assert (final.state.value, final.reason) == ("rolled_back", Reason.PIPELINE_STALLED), final
    assert svc.store.active("colors").version == 1


def test_restart_during_probation_comes_back_on_the_previous_model(link: PahoLink, keys: Keys, tmp_path: Path,
                                                                  backend: str) -> None:
    svc, pipeline, topics = _setup(link, keys, tmp_path, backend, [_image("red_1")],
                                   ProbationSettings(window_s=60.0, poll_s=0.05))
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(_deploy_until_stopped(svc)))
    try:
        worker.start()
        watch = StateWatch(link, topics, "dev1")
        watch.wait_for("activating", 2)
        svc.stop.set()  # the agent stops (SIGTERM) in the probation window
        worker.join(10)
    finally:
        pipeline.close()
    assert result == ["stopped"]
    assert svc.store.slot("colors").trial is not None
    restarted = service(link, tmp_path / "store", keys, topics, backend)
    undone = restarted.recover()
    assert [m.version for m in undone] == [2]
    slot = restarted.store.slot("colors")
    assert slot.active is not None and slot.active.version == 1 and slot.trial is None
    assert watch.wait_for("rolled_back", 2)["reason"] == "restarted_in_probation"


def _deploy_until_stopped(svc: Any) -> str:
    from agent.delivery.reasons import DeliveryError

    try:
        svc.deploy(DeployRequest("colors", 2))
    except DeliveryError as exc:
        return str(exc.reason.value)
    return "finished"


@pytest.mark.parametrize(("frames", "promoted", "reason"), [
    (["red_1", "red_2"], True, None),
    (["magenta"], False, Reason.SHADOW_AGREEMENT),
    (["red_1", "green_1"], False, Reason.PIPELINE_CRASHED),
])
def test_shadow_trial(frames: list[str], promoted: bool, reason: Reason | None, link: PahoLink, keys: Keys,
                      tmp_path: Path, backend: str) -> None:
    images = []
    for name in frames:
        if name == "magenta":
            img = np.zeros((480, 640, 3), np.uint8)
            img[:] = (255, 0, 200)  # BGR: colors_int8 says blue, the candidate says red
            images.append(img)
        else:
            images.append(_image(name))
    svc, pipeline, topics = _setup(link, keys, tmp_path, backend, images, ProbationSettings(window_s=0.5, poll_s=0.05))
    watch = StateWatch(link, topics, "dev1")
    try:
        pipeline.wait_items(2)
        shadow = ShadowSpec(items=20, min_agreement=0.9, max_latency_ratio=None)
        final = svc.deploy(DeployRequest("colors", 2, shadow=shadow))
    finally:
        pipeline.close()
    report = final.extra.get("shadow")
    if promoted:
        assert final.state.value == "active", final
        assert report["items"] == 20 and report["agreement"] == 1.0
        assert report["latency_ms"]["candidate_p95"] > 0
        assert svc.store.active("colors").version == 2
        phases = [(s["state"], s.get("phase")) for s in watch.states if s["version"] == 2]
        assert phases.index(("activating", "shadow")) < phases.index(("activating", "probation"))
    else:
        assert (final.state.value, final.reason) == ("rolled_back", reason), final
        assert svc.store.active("colors").version == 1
        if reason is Reason.SHADOW_AGREEMENT:
            assert report["agreement"] == 0.0
    # The active model ran on every frame throughout: the shadow never replaced it.
    assert pipeline.errors == 0
    assert {v for _, v in pipeline.results} == ({1, 2} if promoted else {1})


def test_shadow_spec_from_command() -> None:
    assert ShadowSpec.from_command({"items": 50, "min_agreement": 0.95}).items == 50
    for bad in ({"items": 0}, {"min_agreement": 2}, {"bogus": 1}, {"items": None, "seconds": None},
                {"seconds": float("nan")}, {"items": "10"}):
        with pytest.raises(ValueError):
            ShadowSpec.from_command(bad)
