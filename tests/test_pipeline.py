"""One pipeline in-process, on real models and the synthetic source: live fps changes, stop and start."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RegisterSource

from agent.config import PipelineSettings, SupervisorSection
from agent.errors import LeptonError
from agent.pipeline import Pipeline
from agent.profiles import load_profile
from agent.sources.source import Item, Source


class Seen:
    """An observer counting the items the loop processes; waits on a condition, never sleeps."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.n = 0

    def observe(self, item: Any, results: list[dict[str, Any]], latency_ms: float) -> None:
        with self.cond:
            self.n += 1
            self.cond.notify_all()

    def more(self, k: int, timeout: float = 30.0) -> bool:
        with self.cond:
            target = self.n + k
            return self.cond.wait_for(lambda: self.n >= target, timeout)


def _pipeline(fixtures: Path, source: str = "test:colors", fps: float | None = None) -> Pipeline:
    settings = PipelineSettings(name="p", source=source, model=fixtures / "colors_int8.json", fps=fps)
    return Pipeline(settings, profile=load_profile("generic-x86_64"), supervisor=SupervisorSection(),
                    backend=None, sink=lambda n, p: None, stop=threading.Event())


def test_a_new_fps_takes_effect_on_the_next_frame(fixtures: Path) -> None:
    # Fault 7: fps 0.01 then 5 used to leave the next frame due 100 s later.
    pipeline, seen = _pipeline(fixtures, fps=5), Seen()
    pipeline.slot.attach(seen)
    pipeline.start()
    try:
        assert seen.more(1)
        pipeline.reconfigure(fps=0.01)
        assert seen.more(1)  # the frame that was already due; the next would be 100 s away
        pipeline.reconfigure(fps=5)
        assert seen.more(2), "fps 5 did not take effect"
        assert pipeline.stats.state == "running"
    finally:
        pipeline.halt()
        pipeline.join(10)


class _Gated(Source):
    """Blocks in read until the test opens the gate, whatever the timeout: a loop slow to notice a halt."""

    gate = threading.Event()

    def open(self) -> None:
        pass

    def read(self, timeout: float) -> Item | None:
        _Gated.gate.wait()
        return None

    def close(self) -> None:
        pass


@pytest.fixture
def gated(source_kind: RegisterSource) -> Iterator[type[_Gated]]:
    source_kind(lambda uri: uri == "gated:", _Gated)
    _Gated.gate.clear()
    try:
        yield _Gated
    finally:
        _Gated.gate.set()


def test_start_while_the_halted_loop_is_still_alive_is_not_a_silent_no_op(fixtures: Path,
                                                                           gated: type[_Gated]) -> None:
    # Fault 6: start() returned early because the halted thread was alive, and the loop then ended.
    pipeline = _pipeline(fixtures, source="gated:")
    running = threading.Event()
    pipeline.on_state = lambda: running.set() if pipeline.stats.state == "running" else None
    pipeline.start()
    assert running.wait(30)
    pipeline.halt()
    assert not pipeline.join(0.1)  # still inside read
    with pytest.raises(LeptonError, match="still stopping"):
        pipeline.start(wait_s=0.1)
    running.clear()
    gated.gate.set()
    pipeline.start(wait_s=30)  # waits for the old loop to end, then starts a fresh one
    assert running.wait(30) and pipeline.running
    pipeline.halt()
    assert pipeline.join(10) and pipeline.stats.state == "stopped"


def test_an_undo_made_before_a_reload_changed_the_model_settings_reloads_the_previous_model(fixtures: Path) -> None:
    # The old runner was built for the old settings: putting it back would run them again.
    from agent.manifest import load_spec
    from agent.slot import ModelSlot

    settings = PipelineSettings(name="p", source="test:colors", model=fixtures / "colors_int8.json")
    slot = ModelSlot(settings, profile=load_profile("generic-x86_64"), backend=None)
    first = slot.load()
    trial = load_spec(fixtures / "colors_int8.json").model_copy(update={"version": 2})
    model, runner = slot.prepare(trial)
    undo = slot.swap(trial, runner, model)
    assert slot.take() is not None and slot.spec is not None and slot.spec.version == 2
    slot.configure(settings.model_copy(update={"task": "classify"}))  # a reload with another task
    undo()
    back = slot.take()
    assert back is not None and back[0].version == 1 and back[2] is not first
    assert slot.spec is not None and slot.spec.version == 1


def test_stop_says_so_when_the_loop_has_not_ended(tmp_path: Path, fixtures: Path, gated: type[_Gated],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault 6, the command side: `stop` ignored the join result and replied ok with the loop still alive.
    from test_daemon import write_config

    from agent import actions
    from agent.commands import CommandError, Start, Stop
    from agent.config_load import load
    from agent.daemon import Agent

    # The gate holds the loop for as long as the test likes: how long stop waits for it proves nothing.
    monkeypatch.setattr(actions, "STOP_WAIT_S", 0.2)

    agent = Agent(load(str(write_config(tmp_path, 1, fixtures))))
    p = agent._pipeline(PipelineSettings(name="cam", source="gated:", model=fixtures / "colors_int8.json"))
    agent.pipelines["cam"] = p
    running = threading.Event()
    p.on_state = lambda: running.set() if p.stats.state == "running" else None
    p.start()
    assert running.wait(30)
    with pytest.raises(CommandError) as stuck:
        agent.actions.stop(Stop(id="s", action="stop", pipeline="cam"))
    assert stuck.value.code == "busy" and "still ending" in stuck.value.message
    gated.gate.set()
    assert p.join(10)
    running.clear()
    agent.actions.start(Start(id="t", action="start", pipeline="cam"))
    assert running.wait(30) and p.running
    agent.actions.stop(Stop(id="u", action="stop", pipeline="cam"))
    assert not p.running and p.stats.state == "stopped"


def test_a_wake_word_pipeline_runs_its_model_on_one_thread_whatever_the_profile(models_dir: Path,
                                                                                fixtures: Path) -> None:
    # generic-x86_64 gives 4 threads (2 on this machine's cores): a wake word's tiny graph invoked with a
    # pool is ~5x slower on LiteRT (3 us -> 15 us); a vision model keeps the profile's threads.
    import os

    from agent.slot import ModelSlot

    profile = load_profile("generic-x86_64")
    assert profile.threads > 1
    audio = ModelSlot(PipelineSettings(name="w", source="mic:", model=models_dir / "wakeword" / "alexa.json"),
                      profile=profile, backend=None)
    model, _ = audio.prepare(audio.configured_spec())
    assert model.threads == 1
    vision = ModelSlot(PipelineSettings(name="v", source="test:colors", model=fixtures / "colors_int8.json"),
                       profile=profile, backend=None)
    model, _ = vision.prepare(vision.configured_spec())
    assert model.threads == min(profile.threads, os.cpu_count() or 1)


def test_a_pipeline_naming_a_delivered_model_waits_without_a_thread_until_there_is_one(fixtures: Path) -> None:
    from agent.manifest import ModelSpec, load_spec

    store: dict[str, ModelSpec] = {}  # what the daemon's model store says runs, by name
    settings = PipelineSettings(name="door", source="test:colors", delivered="colors")
    p = Pipeline(settings, profile=load_profile("generic-x86_64"), supervisor=SupervisorSection(), backend=None,
                 sink=lambda n, r: None, stop=threading.Event())
    p.slot.model_source = store.get
    p.start()
    assert (p.stats.state, p.running, p.stats.restarts, p.stats.errors) == ("waiting_for_model", False, 0, 0)
    described = p.describe()
    assert described["delivered"] == "colors" and "model" not in described, described
    p.halt()  # stopped on purpose: no longer waiting, so a deployment does not start it
    assert p.stats.state == "stopped" and not p.waiting
    p.start()
    assert p.waiting

    store["colors"] = load_spec(fixtures / "colors_int8.json")
    seen = Seen()
    p.slot.attach(seen)
    p.start()
    try:
        assert seen.more(3) and p.stats.state == "running"
        assert p.describe()["model"]["name"] == "colors"
    finally:
        p.halt()
        assert p.join(10)


def test_a_reload_to_a_delivered_model_the_store_lacks_forgets_the_files_model(fixtures: Path) -> None:
    from agent.slot import ModelSlot

    file_settings = PipelineSettings(name="door", source="test:colors", model=fixtures / "colors_int8.json")
    slot = ModelSlot(file_settings, profile=load_profile("generic-x86_64"), backend=None)
    slot.model_source = lambda name: None
    assert slot.spec is not None and slot.waiting_for() is None
    slot.configure(file_settings.model_copy(update={"model": None, "delivered": "faces"}))
    assert slot.spec is None and slot.waiting_for() == "faces"  # status must not name the file's model
