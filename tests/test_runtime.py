"""The runtime core on real models: backend choice, persistent views, quantization, state, delegates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from agent.errors import BadInput
from agent.modelfile import read_model_file
from agent.runtime import BACKENDS, Model, load_backend


def test_backend_follows_lepton_backend(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEPTON_BACKEND", backend)
    assert load_backend().name == backend
    assert load_backend(backend).version[0].isdigit()


def test_unknown_backend_is_bad_input() -> None:
    with pytest.raises(BadInput, match="unknown, choose one of auto"):
        load_backend("onnxruntime")


@pytest.mark.parametrize("name", list(BACKENDS))
def test_missing_backend_is_bad_input(name: str) -> None:
    # Whether it is installed is found without the code under test: a backend load_backend wrongly
    # "loaded" used to end the old loop in a skip, not a failure.
    if importlib.util.find_spec(BACKENDS[name][0].split(".")[0]) is not None:
        pytest.skip(f"{name} is installed in this lane")
    with pytest.raises(BadInput, match="is not installed"):
        load_backend(name)


def test_views_are_persistent_and_shared_with_the_interpreter(fixtures: Path) -> None:
    model = Model(fixtures / "colors_int8.tflite", threads=1)
    view = model.input()
    assert view is model.input()  # taken once, not per frame
    assert view.flags.writeable and view.shape == model.inputs[0].shape
    view[...] = 0
    model.invoke()
    first = model.output().copy()
    view[...] = 100
    model.invoke()  # the native invoke runs while our views are alive
    assert not np.array_equal(first, model.output())
    # The interpreter reads what we wrote into the view.
    assert np.array_equal(model._interp.get_tensor(model.inputs[0].index), view)


def test_quantize_and_dequantize_use_each_tensors_own_parameters(models_dir: Path) -> None:
    model = Model(models_dir / "wakeword" / "alexa.tflite", threads=1)
    info = model.inputs[0]
    values = np.linspace(0.0, 20.0, num=int(np.prod(info.shape)), dtype=np.float32).reshape(info.shape)
    model.quantize_into(0, values)
    expected = np.clip(np.rint(values / info.scale) + info.zero_point, -128, 127).astype(np.int8)
    assert np.array_equal(model.input(), expected)
    model.invoke()
    out = np.empty(1, np.float32)
    model.dequantize_output(0, out)
    o = model.outputs[0]
    assert out[0] == pytest.approx((int(model.output()[0, 0]) - o.zero_point) * o.scale)
    assert 0.0 <= out[0] <= 1.0


def test_stateful_model_accumulates_and_resets(fixtures: Path) -> None:
    model = Model(fixtures / "counter_stateful.tflite", threads=1)
    assert model.stateful
    assert {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"} <= set(model.op_counts)
    ones = np.ones(model.inputs[0].shape, np.float32)
    out = np.empty(int(np.prod(model.outputs[0].shape)), np.float32)
    seen = []
    for _ in range(3):
        model.quantize_into(0, ones)
        model.invoke()
        seen.append(model.dequantize_output(0, out).copy())
    assert [float(s[0]) for s in seen] == [1.0, 2.0, 3.0]
    model.reset_state()
    model.quantize_into(0, ones)
    model.invoke()
    assert float(model.dequantize_output(0, out)[0]) == 1.0


def test_models_with_and_without_signatures_both_run(models_dir: Path) -> None:
    signed = Model(models_dir / "wakeword" / "hey_jarvis.tflite", threads=1)
    unsigned = Model(models_dir / "face" / "face_detection_short_range.tflite", threads=1)
    assert signed.signatures and signed.file.has_signatures
    assert not unsigned.signatures and not unsigned.file.has_signatures
    for model in (signed, unsigned):
        model.input()[...] = 1
        model.invoke()
        assert np.isfinite(model.output().astype(np.float64)).all()


def test_threads_and_xnnpack_switch(fixtures: Path) -> None:
    model = Model(fixtures / "colors_float.tflite", threads=1, xnnpack=False)
    assert model.threads == 1 and not model.xnnpack
    assert model.delegated_ops == 0
    fast = Model(fixtures / "colors_float.tflite", threads=2)
    assert fast.xnnpack and fast.delegated_ops >= 1
    for m in (model, fast):
        m.input()[...] = 0.5
        m.invoke()
    assert np.allclose(model.output(), fast.output(), atol=1e-4)


def test_missing_edgetpu_delegate_is_a_clear_error(fixtures: Path) -> None:
    with pytest.raises(BadInput, match=r"delegate libedgetpu\.so\.1: cannot be loaded.*libedgetpu1-std"):
        Model(fixtures / "colors_int8.tflite", delegate="edgetpu")


def test_int8_and_float_ops_are_told_apart(fixtures: Path, models_dir: Path) -> None:
    assert Model(fixtures / "colors_int8.tflite").float_ops() == []
    assert Model(models_dir / "wakeword" / "okay_nabu.tflite").float_ops() == []
    face = Model(models_dir / "face" / "face_detection_full_range.tflite")
    assert "CONV_2D" in face.float_ops()
    assert face.op_counts["DEQUANTIZE"] > 0  # fp16 weights expanded at load


@pytest.mark.parametrize("cut", [0.001, 0.1, 0.5, 0.9, 0.9999])
def test_truncated_model_is_refused_before_the_interpreter(models_dir: Path, tmp_path: Path, cut: float) -> None:
    data = (models_dir / "face" / "face_detection_short_range.tflite").read_bytes()
    path = tmp_path / "cut.tflite"
    path.write_bytes(data[: max(8, int(len(data) * cut))])
    with pytest.raises(BadInput, match=r"cut\.tflite: (truncated or corrupt|not a TFLite)"):
        Model(path)


def test_model_file_walk_reads_every_real_model(models_dir: Path) -> None:
    files = sorted(models_dir.glob("*/*.tflite"))
    assert len(files) >= 11
    for path in files:
        info = read_model_file(path)
        assert info.size == path.stat().st_size and info.operators > 0 and info.custom_ops == ()


def test_unsupported_op_is_bad_input(fixtures: Path) -> None:
    with pytest.raises(BadInput, match=r"flex_op\.tflite: op not supported by .*Flex"):
        Model(fixtures / "flex_op.tflite")


def test_a_failed_state_reset_keeps_the_working_interpreter(tmp_path: Path, fixtures: Path) -> None:
    # Fault 14b: the rebuild reads the file again; when that fails the Model must not be left without one.
    path = tmp_path / "counter.tflite"
    path.write_bytes((fixtures / "counter_stateful.tflite").read_bytes())
    model = Model(path, threads=1)
    ones = np.ones(model.inputs[0].shape, np.float32)
    out = np.empty(int(np.prod(model.outputs[0].shape)), np.float32)
    model.quantize_into(0, ones)
    model.invoke()
    path.write_bytes(b"not a model any more")
    with pytest.raises(BadInput, match="cannot load model"):
        model.reset_state()
    model.quantize_into(0, ones)
    model.invoke()
    assert float(model.dequantize_output(0, out)[0]) == 2.0  # the same interpreter, its state kept
    assert model.generation == 0
