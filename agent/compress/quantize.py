"""`lepton-fleet model quantize`: a float model as it comes → a smaller model and its manifest.

The float model is first rewritten (`agent.compress.graph`) and loaded into our own
runtime, where the agent's preprocessing writes each calibration input into its input
tensor (`agent.compress.calibration`). ai-edge-quantizer (the `compress` extra, no
TensorFlow) then calibrates and quantizes:

- `int8`: int8 weights and activations, int8 input and output (static range; needs --calib);
- `dynamic`: int8 weights, float activations quantized on the fly (no calibration);
- `fp16`: float16 weights widened at run time (no calibration);
- `float32`: the rewritten float model alone (fp16 weights folded, activations fused,
  orphans removed, a signature added): the reference the other variants are measured by.

The result must load, allocate and run in our runtime before anything is written. The
model and its manifest (DESIGN §4, preprocessing and decoder settings carried over) go
to temporary files beside OUT that are fsynced and renamed into place, so OUT never holds
half a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.compress.atomic import write_together
from agent.errors import BadInput, LeptonError
from agent.manifest import Manifest, MicroManifest, ModelSpec, load_spec
from agent.modelfile import read_model_file
from agent.runtime import Model

logger = logging.getLogger(__name__)

SCHEMES = ("int8", "dynamic", "fp16", "float32")
DEFAULT_CALIBRATION_LIMIT = 500


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize_model` wrote and what it measured on the way."""

    path: Path
    manifest_path: Path
    scheme: str
    size: int
    source_size: int
    float32_size: int
    calibration_items: int
    preparation: dict[str, Any]
    float_ops: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.path),
            "manifest": str(self.manifest_path),
            "scheme": self.scheme,
            "size_bytes": self.size,
            "source_size_bytes": self.source_size,
            "float32_size_bytes": self.float32_size,
            "size_ratio_to_float32": round(self.size / self.float32_size, 4),
            "calibration_items": self.calibration_items,
            "prepared": self.preparation,
            "float_ops": list(self.float_ops),
        }


def _quantizer_modules() -> tuple[Any, Any, Any]:
    try:
        from ai_edge_quantizer import qtyping, quantizer, recipe
    except ImportError as exc:
        raise BadInput(
            f"model quantize needs ai-edge-quantizer: pip install 'lepton-agent[compress]' ({exc})"
        ) from None
    return quantizer, recipe, qtyping


@contextlib.contextmanager
def _quiet(what: str) -> Iterator[None]:
    """The quantizer prints progress bars and a report; keep them off our stdout/stderr, log them."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
    text = sink.getvalue().strip()
    if text:
        logger.debug("%s said:\n%s", what, text)


def quantize_model(
    model_arg: str | Path,
    out: str | Path,
    *,
    scheme: str = "int8",
    calib: list[str] | None = None,
    labels: str | None = None,
    threads: int | None = None,
    backend: str | None = None,
    limit: int = DEFAULT_CALIBRATION_LIMIT,
    fuse: bool = True,
) -> QuantizeResult:
    """Quantize MODEL (a float `.tflite` or our manifest) to OUT (`.tflite`) and OUT's manifest (`.json`)."""
    if scheme not in SCHEMES:
        raise BadInput(f"--scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    out = Path(out)
    if out.suffix.lower() != ".tflite":
        raise BadInput(f"-o {out}: the output must be a .tflite file (its manifest goes beside it as .json)")
    if not out.parent.is_dir():
        raise BadInput(f"-o {out}: folder {out.parent} does not exist")
    spec = load_spec(model_arg, labels)
    if spec.path.resolve() == out.resolve() or (
        spec.manifest_path is not None and spec.manifest_path.resolve() == out.with_suffix(".json").resolve()
    ):
        raise BadInput(f"-o {out}: would overwrite the model being quantized or its manifest")
    if scheme == "int8" and not calib:
        raise BadInput("--calib: int8 needs calibration inputs (images, video files, WAV clips for a wake word "
                       "model, or .npy/.npz arrays)")
    _quantizer_modules()  # a clear error before any work when the extra is missing
    from agent.compress import graph
    from agent.compress.calibration import collect_samples

    read_model_file(spec.path)  # refuses a truncated or corrupt file before the flatbuffer reader sees it
    source = spec.path.read_bytes()
    content, signature, preparation = graph.prepare(source, str(spec.path), fuse=fuse)

    with tempfile.TemporaryDirectory(prefix="lepton-quantize-") as tmp:
        float_path = Path(tmp) / "float32.tflite"
        float_path.write_bytes(content)
        try:
            # Our runtime refuses unsupported ops (Flex, unknown custom ops) with one clear line.
            float_model = Model(float_path, backend=backend, threads=threads)
        except BadInput as exc:
            raise BadInput(str(exc).replace(str(float_path), str(spec.path))) from None
        float_model.path = spec.path  # messages name the operator's file, not the temporary one
        names = {index: name for name, index in signature.inputs.items()}
        samples: list[dict[str, Any]] = []
        if scheme == "int8":
            samples = collect_samples(float_model, spec, names, calib or [], limit)
        elif calib:
            logger.info("--calib: %s needs no calibration; the inputs are not used", scheme)
        task = spec.task
        if task is None:
            from agent.tasks.task import recognise

            task = recognise(float_model).task
        del float_model

        if scheme == "float32":
            quantized = content  # the rewritten float model itself: the reference the others are measured by
        else:
            quantized = _run_quantizer(content, scheme, spec.path, signature.key, samples, threads)

        quantized_path = Path(tmp) / "quantized.tflite"
        quantized_path.write_bytes(quantized)
        float_ops = _check_runs(quantized_path, spec.path, samples, backend, threads)
        if scheme == "int8" and float_ops:
            logger.warning("%s: ops still computing in float after int8 quantization: %s "
                           "(the quantizer does not support them)", spec.path, ", ".join(float_ops))

    manifest = _manifest(spec, out, quantized, task, scheme, {
        "tool": f"lepton-agent {_version('lepton-agent')}" if scheme == "float32"
        else f"ai-edge-quantizer {_version('ai-edge-quantizer')}",
        "scheme": scheme,
        "calibration_items": len(samples),
        "source": {"file": spec.path.name, "size": len(source), "sha256": hashlib.sha256(source).hexdigest()},
        "float32_size": len(content),
        "prepared": preparation.as_dict(),
    })
    manifest_path = out.with_suffix(".json")
    write_together({out: quantized, manifest_path: (json.dumps(manifest, indent=2) + "\n").encode()})
    return QuantizeResult(
        path=out, manifest_path=manifest_path, scheme=scheme, size=len(quantized), source_size=len(source),
        float32_size=len(content), calibration_items=len(samples), preparation=preparation.as_dict(),
        float_ops=tuple(float_ops),
    )


def _recipe(scheme: str) -> Any:
    quantizer, recipe, qtyping = _quantizer_modules()
    if scheme == "int8":
        return recipe.static_wi8_ai8()
    if scheme == "dynamic":
        return recipe.dynamic_wi8_afp32()
    from ai_edge_quantizer import recipe_manager

    manager = recipe_manager.RecipeManager()
    manager.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                   algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING)
    return manager.get_quantization_recipe()


def _run_quantizer(content: bytes, scheme: str, origin: Path, key: str, samples: list[dict[str, Any]],
                   threads: int | None) -> bytes:
    quantizer, _, _ = _quantizer_modules()
    # The quantizer raises plain ValueError/RuntimeError/KeyError/NotImplementedError for
    # graphs it cannot handle; those are facts about the model, so they are bad input.
    problems = (ValueError, RuntimeError, KeyError, NotImplementedError, IndexError, TypeError)
    try:
        with _quiet("ai-edge-quantizer"):
            recipe = _recipe(scheme)
            qt = quantizer.Quantizer(bytearray(content), recipe)
            calibration = _calibrate(content, recipe, key, samples, threads) if qt.need_calibration else None
            result = qt.quantize(calibration, enable_progress_bar=False, enable_progress_report=False)
    except problems as exc:
        logger.debug("quantizer failure", exc_info=True)
        first = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
        raise BadInput(f"{origin}: the quantizer cannot handle this model: {first}") from None
    if result.quantized_model is None:
        raise LeptonError(f"{origin}: the quantizer returned no model")
    return bytes(result.quantized_model)


def _calibrate(content: bytes, recipe: Any, key: str, samples: list[dict[str, Any]], threads: int | None) -> Any:
    """Activation ranges as the min and max over every sample.

    `Quantizer.calibrate` keeps a moving average (weight 0.95 on what came before), so
    the first few samples decide the ranges: with a face-free photo first, BlazeFace's
    face logits were clipped at 0 and no face could ever score above 0.5. The TFLite
    converter takes the plain min/max; so do we, which also makes the order of the
    calibration inputs irrelevant.
    """
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe)
    calib = calibrator.Calibrator(bytes(content), num_threads=threads or os.cpu_count() or 1,
                                  qsv_update_func=qsv_utils.min_max_update)
    with _numeric_tensors_only():
        calib.calibrate({key: samples}, manager)
    return calib.get_model_qsvs()


@contextlib.contextmanager
def _numeric_tensors_only() -> Iterator[None]:
    """After each run the calibrator reads every named tensor. A streaming wake word model keeps its state in
    resource variables: reading a resource tensor crashes LiteRT (SIGSEGV), and tensors the interpreter left
    without data raise. Those hold no activations to calibrate; while calibrating, only numbers are read."""
    from ai_edge_quantizer.utils import tfl_interpreter_utils as tiu

    original, read = tiu.get_tensor_name_to_content_map, tiu.get_tensor_data

    def numeric(interpreter: Any, subgraph_index: int = 0, dequantize: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in interpreter.get_tensor_details(subgraph_index):
            if not d["name"] or not np.all(d["shape"]) or np.dtype(d["dtype"]).kind not in "biuf":
                continue
            with contextlib.suppress(ValueError):  # no data kept for it
                out[d["name"]] = read(interpreter, d, subgraph_index, dequantize)
        return out

    tiu.get_tensor_name_to_content_map = numeric
    try:
        yield
    finally:
        tiu.get_tensor_name_to_content_map = original


def _check_runs(path: Path, origin: Path, samples: list[dict[str, Any]], backend: str | None,
                threads: int | None) -> list[str]:
    """Load, allocate and invoke the quantized model once; its float ops (empty when fully integer)."""
    try:
        model = Model(path, backend=backend, threads=threads)
    except BadInput as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        raise LeptonError(f"{origin}: the quantizer wrote a model the runtime refuses: {reason}") from None
    if samples:
        for i, value in enumerate(samples[0].values()):
            model.quantize_into(i, np.asarray(value, dtype=np.float32))
    else:
        for i in range(len(model.inputs)):
            model.input(i).fill(0)  # the arena starts with whatever memory held
    model.invoke()
    for i, info in enumerate(model.outputs):
        values = model.dequantize_output(i, np.empty(model.output(i).size, np.float32))
        if not np.all(np.isfinite(values)):
            raise LeptonError(f"{origin}: the quantized model's output {info.name!r} is not finite")
    return model.float_ops()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _manifest(spec: ModelSpec, out: Path, content: bytes, task: str, scheme: str,
              quantization: dict[str, Any]) -> dict[str, Any]:
    """The source's manifest carried over to the new file (or one made from what the model says); a microWakeWord
    manifest stays one (ESPHome and the runtime read it), naming the new file, with the quantization beside."""
    if spec.micro is not None and spec.manifest_path is not None:
        micro = json.loads(spec.manifest_path.read_text())
        micro.update(model=out.name, metrics={"quantization": quantization})
        MicroManifest.model_validate(micro)
        return dict(micro)
    source = spec.manifest
    pre = spec.preprocess
    if pre.normalize is None:
        # The default differs between float and integer inputs; say what the float model was fed.
        pre = pre.model_copy(update={"normalize": "mean_std"})
    data: dict[str, Any] = {
        "name": spec.name,
        "version": spec.version if spec.version is not None else 1,
        "task": task,
        "file": out.name,
        "sha256": hashlib.sha256(content).hexdigest(),
        "size": len(content),
        "labels": list(spec.labels) or None,
        "preprocess": pre.model_dump(),
        "postprocess": spec.postprocess.model_dump(),
        "runtime": source.runtime.model_dump() if source is not None else {},
        "metrics": {"quantization": quantization},
    }
    if data["labels"] is None:
        del data["labels"]
    Manifest.model_validate(data)  # what we write must read back
    return data
