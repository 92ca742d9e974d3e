"""microWakeWord on real recordings: each model fires on its own word only, exactly when pymicro-wakeword does."""

from __future__ import annotations

import dataclasses
import itertools
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from wavs import LABELS, RECORDINGS, WORDS, pcm16, word_of

from agent.errors import BadInput
from agent.manifest import load_spec
from agent.runtime import Model
from agent.tasks import create_runner
from agent.tasks.wakeword import EXACT_MODEL_OPTIONS, MODEL_OPTIONS, WakeWordModel, WakeWordRunner, WakeWordSettings

ALL_MODELS = (*WORDS, "okay_nabu")


def _manifest(models_dir: Path, name: str) -> Path:
    return models_dir / "wakeword" / f"{name}.json"


def _detector(models_dir: Path, name: str, refractory_s: float | None = None,
              options: dict | None = None) -> WakeWordModel:
    spec = load_spec(_manifest(models_dir, name))
    settings = WakeWordSettings.from_spec(spec)
    if refractory_s is not None:
        settings = dataclasses.replace(settings, refractory_s=refractory_s)
    return WakeWordModel(Model(spec.path, **(options or MODEL_OPTIONS)), spec, settings)


def _feed(runner: WakeWordRunner, samples: np.ndarray, chunk: int = 480) -> list[dict]:
    results: list[dict] = []
    for start in range(0, len(samples), chunk):
        results += runner.process(samples[start : start + chunk])
    return results


def _oracle(manifest: Path, samples: np.ndarray) -> list[tuple[float, float]]:
    """(t, probability) of every step at which pymicro-wakeword's own loop says `detected`."""
    from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures

    peer = MicroWakeWord.from_config(manifest)
    features = MicroWakeWordFeatures()
    fired = []
    for step, row in enumerate(features.process_streaming(samples.tobytes()), start=1):
        prob = peer.process_streaming_prob(row)
        # process_streaming's own test: `prob <= probability_cutoff` is not a detection.
        if prob is not None and prob > peer.probability_cutoff:
            # The first row needs 30 ms of audio (one 30 ms window), each next one 10 ms more.
            fired.append((round((step + 2) * 0.01, 3), round(prob, 6)))
    peer.close()
    return fired


@pytest.fixture(scope="module")
def recordings() -> dict[Path, np.ndarray]:
    return {path: pcm16(path) for path in RECORDINGS}


def test_the_recordings_are_there() -> None:
    assert len(RECORDINGS) == 9 and {word_of(p) for p in RECORDINGS} == set(WORDS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_decisions_equal_pymicro_wakeword(models_dir: Path, recordings: dict[Path, np.ndarray], name: str,
                                         backend: str) -> None:
    # No refractory period: every step above the cutoff is reported, as the reference reports it.
    runner = WakeWordRunner([_detector(models_dir, name, refractory_s=0.0)])
    for path, samples in recordings.items():
        runner.reset()
        ours = [r["t"] for r in _feed(runner, samples)]
        theirs = [t for t, _ in _oracle(_manifest(models_dir, name), samples)]
        # The decision on the file: whether, and when first, the wake word is detected.
        assert ours[:1] == theirs[:1], path
        assert bool(ours) == (word_of(path) == name), path
        if backend == "ai-edge-litert":
            # And every step after it. (tflite-runtime 2.14's int8 kernels round a few outputs one
            # step away from the reference's newer TFLite: there a later step can differ.)
            assert ours == theirs, path


@pytest.mark.parametrize("name", ALL_MODELS)
def test_exact_mode_equals_the_reference_bit_for_bit(models_dir: Path, recordings: dict[Path, np.ndarray],
                                                    name: str, backend: str) -> None:
    if backend != "ai-edge-litert":
        pytest.skip("only LiteRT's builtin int8 kernels are the reference's; tflite-runtime 2.14 rounds a few "
                    "outputs one step apart")
    runner = WakeWordRunner([_detector(models_dir, name, refractory_s=0.0, options=EXACT_MODEL_OPTIONS)])
    for path, samples in recordings.items():
        runner.reset()
        ours = [(r["t"], r["score"]) for r in _feed(runner, samples)]
        assert ours == _oracle(_manifest(models_dir, name), samples), path


@pytest.mark.parametrize("name", WORDS)
def test_each_model_fires_once_on_its_own_word_only(models_dir: Path, recordings: dict[Path, np.ndarray],
                                                   name: str) -> None:
    runner = create_runner(Model(_manifest(models_dir, name).with_suffix(".tflite"), **MODEL_OPTIONS),
                           load_spec(_manifest(models_dir, name)))
    assert isinstance(runner, WakeWordRunner) and runner.item_kind == "audio"
    for path, samples in recordings.items():
        runner.reset()
        results = _feed(runner, samples)
        if word_of(path) == name:
            assert len(results) == 1, (path, results)
            r = results[0]
            assert r["task"] == "wakeword" and r["event"] == "detected" and r["label"] == LABELS[name]
            assert r["score"] > runner.models[0].settings.probability_cutoff
            assert 0.5 < r["t"] < len(samples) / 16000
        else:
            assert results == [], path


def test_several_wake_words_share_one_frontend(models_dir: Path, recordings: dict[Path, np.ndarray]) -> None:
    runner = WakeWordRunner([_detector(models_dir, name) for name in ALL_MODELS])
    alone = {name: WakeWordRunner([_detector(models_dir, name)]) for name in WORDS}
    for path, samples in recordings.items():
        runner.reset()
        together = _feed(runner, samples)
        assert [r["label"] for r in together] == [LABELS[word_of(path)]], path
        own = alone[word_of(path)]
        own.reset()
        assert together == _feed(own, samples)


@pytest.mark.parametrize("chunk", [1, 77, 160, 479, 1600, 16000, 10**6])
def test_chunking_does_not_change_decisions(models_dir: Path, recordings: dict[Path, np.ndarray], chunk: int) -> None:
    path = next(p for p in RECORDINGS if word_of(p) == "hey_jarvis")
    runner = WakeWordRunner([_detector(models_dir, "hey_jarvis", refractory_s=0.0)])
    reference = _feed(runner, recordings[path], 480)
    runner.reset()
    assert _feed(runner, recordings[path], chunk) == reference and reference


def test_refractory_period_suppresses_repeats(models_dir: Path, recordings: dict[Path, np.ndarray]) -> None:
    path = next(p for p in RECORDINGS if word_of(p) == "hey_mycroft")
    every = _feed(WakeWordRunner([_detector(models_dir, "hey_mycroft", refractory_s=0.0)]), recordings[path])
    once = _feed(WakeWordRunner([_detector(models_dir, "hey_mycroft", refractory_s=30.0)]), recordings[path])
    short = _feed(WakeWordRunner([_detector(models_dir, "hey_mycroft", refractory_s=0.05)]), recordings[path])
    assert len(every) > 3 and once == every[:1]
    assert len(once) < len(short) < len(every)
    assert all(b["t"] - a["t"] >= 0.05 for a, b in itertools.pairwise(short))


def test_reset_starts_a_fresh_stream(models_dir: Path, recordings: dict[Path, np.ndarray]) -> None:
    path = next(p for p in RECORDINGS if word_of(p) == "alexa")
    runner = WakeWordRunner([_detector(models_dir, "alexa", refractory_s=0.0)])
    first = _feed(runner, recordings[path])
    generation = runner.models[0].model.generation
    runner.reset()
    assert runner.models[0].model.generation == generation + 1  # resource variables: interpreter rebuilt
    assert runner.t == 0.0
    assert _feed(runner, recordings[path]) == first


def test_swapping_one_model_leaves_the_others_alone(models_dir: Path, recordings: dict[Path, np.ndarray]) -> None:
    path = next(p for p in RECORDINGS if word_of(p) == "hey_jarvis")
    samples = recordings[path]
    baseline = _feed(WakeWordRunner([_detector(models_dir, "hey_jarvis", 0.0)]), samples)
    runner = WakeWordRunner([_detector(models_dir, "alexa", 0.0), _detector(models_dir, "hey_jarvis", 0.0)])
    half = len(samples) // 4 // 160 * 160
    results = _feed(runner, samples[:half])
    fresh = _detector(models_dir, "hey_mycroft", 0.0)
    before = fresh.model.generation
    runner.replace(0, fresh)
    assert fresh.model.generation == before + 1 and runner.models[0] is fresh
    results += _feed(runner, samples[half:])
    assert results == baseline and baseline


def test_features_outside_int8_are_clipped_not_wrapped(models_dir: Path) -> None:
    detector = _detector(models_dir, "alexa")
    # 30 is beyond the input scale's range (127 * 0.102 - -128 * 0.102 ≈ 26): it must saturate at 127.
    for _ in range(detector.stride):
        detector.push([30.0] * 40, 0.0)
    assert int(detector.model.input(0).max()) == 127


def test_hot_path_allocates_nothing_that_grows(models_dir: Path, recordings: dict[Path, np.ndarray]) -> None:
    runner = WakeWordRunner([_detector(models_dir, name) for name in WORDS])
    samples = np.concatenate(list(recordings.values()))
    chunks = [samples[i : i + 480] for i in range(0, len(samples), 480)]
    _feed(runner, samples[:16000])
    tracemalloc.start()
    try:
        for chunk in chunks:
            runner.process(chunk)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Per chunk only its bytes and the frontend's 40-value rows come and go.
    assert peak < 64 * 1024, peak
    assert current < 16 * 1024, current


def test_a_model_whose_input_does_not_fit_the_frontend(fixtures: Path, models_dir: Path) -> None:
    spec = load_spec(_manifest(models_dir, "alexa"))
    image_model = Model(fixtures / "colors_int8.tflite", threads=1)
    with pytest.raises(BadInput, match=r"input shape \[1, \d+, \d+, 3\] does not fit the micro frontend"):
        WakeWordModel(image_model, spec)


def test_a_wake_word_model_needs_its_manifest(models_dir: Path) -> None:
    bare = models_dir / "wakeword" / "alexa.tflite"
    with pytest.raises(BadInput, match="needs a microWakeWord v2 manifest"):
        create_runner(Model(bare, threads=1), load_spec(bare), "wakeword")


def test_a_stream_runs_on_one_interpreter_with_one_thread(models_dir: Path, recordings: dict[Path, np.ndarray]) -> None:
    # Rebuilding the interpreter (reset_state on these VAR_HANDLE graphs: 0.35 ms on tflite-runtime, 1 ms on
    # LiteRT) costs 20-300 invokes, so it happens per stream, never per chunk or per detection; and the agent
    # builds wake word interpreters with one thread whatever the profile says (a pool makes each invoke ~5x
    # slower on LiteRT).
    from agent.tasks.task import interpreter_threads

    spec = load_spec(_manifest(models_dir, WORDS[0]))
    assert interpreter_threads(spec, 4) == 1 and interpreter_threads(spec, None) == 1
    model = Model(spec.path, threads=interpreter_threads(spec, 4))
    assert model.threads == 1
    runner = create_runner(model, spec)
    assert isinstance(runner, WakeWordRunner)
    runner.reset()
    generation = model.generation
    detections = sum(len(_feed(runner, samples)) for samples in recordings.values())
    assert detections >= 1  # detections happened, and still one interpreter for the whole stream
    assert model.generation == generation
