"""The LiteRT runtime core: backend choice and the interpreter wrapper.

This is the only module that imports an interpreter package. The order is
`ai_edge_litert` (LiteRT, numpy 2), then `tflite_runtime` (2.14, numpy < 2, the
wheel older Raspberry Pi OS images have), then full TensorFlow. `LEPTON_BACKEND`
or the config's `backend` forces one.

`Model` allocates once and hands out the input and output tensors as numpy views
into the interpreter's arena. The views are taken once and kept: the public
`Interpreter.invoke()` refuses to run while any such view is alive (it guards
against `allocate_tensors()` moving the arena), so the hot path calls the native
`Invoke()` directly. The arena is only ever reallocated by `Model` itself, which
retakes its views when it does.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from agent.errors import BadInput
from agent.modelfile import ModelFile, read_model_file

logger = logging.getLogger(__name__)

BACKENDS: dict[str, tuple[str, str]] = {
    # name: (module to import, distribution whose version is reported)
    "ai-edge-litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "tflite-runtime": ("tflite_runtime.interpreter", "tflite-runtime"),
    "tensorflow": ("tensorflow", "tensorflow"),
}

DELEGATE_ALIASES = {"edgetpu": "libedgetpu.so.1"}

# Ops that only move float data in or out of an otherwise integer graph.
_BOUNDARY_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})
_STATE_OPS = frozenset({"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"})


@dataclass(frozen=True)
class Backend:
    """An importable interpreter package."""

    name: str
    version: str
    interpreter_cls: Any
    load_delegate: Callable[..., Any]
    op_resolver: Any


_backend_lock = threading.Lock()
_backend_cache: dict[str, Backend] = {}


def _import_backend(name: str) -> Backend:
    module_name, dist = BACKENDS[name]
    module: ModuleType = importlib.import_module(module_name)
    if name == "tensorflow":
        lite = module.lite
        interp_cls, load_delegate, resolver = (
            lite.Interpreter,
            lite.experimental.load_delegate,
            lite.experimental.OpResolverType,
        )
    else:
        interp_cls, load_delegate, resolver = module.Interpreter, module.load_delegate, module.OpResolverType
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(module, "__version__", "unknown"))
    return Backend(name, version, interp_cls, load_delegate, resolver)


def load_backend(name: str | None = None) -> Backend:
    """The named backend, or the first importable one; `LEPTON_BACKEND` when name is None."""
    wanted = name or os.environ.get("LEPTON_BACKEND") or "auto"
    if wanted != "auto" and wanted not in BACKENDS:
        raise BadInput(f"backend {wanted!r}: unknown, choose one of auto, {', '.join(BACKENDS)}")
    with _backend_lock:
        if wanted in _backend_cache:
            return _backend_cache[wanted]
        candidates = list(BACKENDS) if wanted == "auto" else [wanted]
        errors = []
        for candidate in candidates:
            try:
                backend = _import_backend(candidate)
            except ImportError as exc:
                errors.append(f"{candidate}: {exc}")
                continue
            _backend_cache[wanted] = backend
            return backend
    if wanted == "auto":
        raise BadInput(
            "no LiteRT runtime installed: install ai-edge-litert (or tflite-runtime) ("
            + "; ".join(errors)
            + ")"
        )
    raise BadInput(f"backend {wanted!r} is not installed ({errors[0]})")


@dataclass(frozen=True)
class TensorInfo:
    """One input or output tensor as the interpreter declares it."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and self.dtype.kind in "iu"

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name}
        if self.quantized:
            d["quantization"] = {"scale": self.scale, "zero_point": self.zero_point}
        return d


@dataclass(frozen=True)
class OpInfo:
    """One operator of the main subgraph, before any delegate rewrote the graph."""

    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Delegation:
    """How a delegate split the graph: its partitions, and the ops left to the builtin kernels."""

    partitions: int
    delegated: int
    undelegated: tuple[OpInfo, ...]

    def undelegated_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.undelegated:
            counts[op.name] = counts.get(op.name, 0) + 1
        return counts


@dataclass
class _Views:
    inputs: list[np.ndarray[Any, Any]] = field(default_factory=list)
    outputs: list[np.ndarray[Any, Any]] = field(default_factory=list)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[0].split())
    return text or type(exc).__name__


def _tensor_info(d: dict[str, Any]) -> TensorInfo:
    scale, zero_point = d["quantization"]
    return TensorInfo(
        index=int(d["index"]),
        name=str(d["name"]),
        shape=tuple(int(s) for s in d["shape"]),
        dtype=np.dtype(d["dtype"]),
        scale=float(scale),
        zero_point=int(zero_point),
    )


class Model:
    """A loaded, allocated `.tflite` model with persistent numpy views of its I/O tensors."""

    def __init__(
        self,
        path: Path | str,
        *,
        backend: Backend | str | None = None,
        threads: int | None = None,
        xnnpack: bool = True,
        delegate: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.file: ModelFile = read_model_file(self.path)
        self.backend = backend if isinstance(backend, Backend) else load_backend(backend)
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.xnnpack = xnnpack and delegate is None
        self.delegate = delegate
        kwargs: dict[str, Any] = {"model_path": str(self.path), "num_threads": self.threads}
        if delegate is not None:
            kwargs["experimental_delegates"] = [self._load_delegate(delegate)]
        if not self.xnnpack:
            kwargs["experimental_op_resolver_type"] = self.backend.op_resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        if self.file.custom_ops:
            # Fail before the runtime does: some builds abort instead of raising here.
            known = self._known_custom_ops()
            missing = [op for op in self.file.custom_ops if op not in known]
            if missing:
                raise BadInput(
                    f"{self.path}: op not supported by {self.backend.name}: custom op "
                    f"{', '.join(missing)} (convert without it, e.g. without SELECT_TF_OPS)"
                )
        self._kwargs = kwargs
        self.generation = 0
        """Bumped whenever the interpreter is rebuilt; holders of derived views rebind when it changes."""
        self._open()
        self.inputs: tuple[TensorInfo, ...] = tuple(_tensor_info(d) for d in self._interp.get_input_details())
        self.outputs: tuple[TensorInfo, ...] = tuple(_tensor_info(d) for d in self._interp.get_output_details())
        self.signatures: dict[str, Any] = dict(self._interp.get_signature_list())
        self.delegated_ops = sum(1 for o in self._interp._get_ops_details() if o["op_name"] == "DELEGATE")
        self._take_views()

    def _open(self) -> None:
        try:
            self._interp = self.backend.interpreter_cls(**self._kwargs)
        except (ValueError, RuntimeError) as exc:
            raise BadInput(f"{self.path}: cannot load model: {_first_line(exc)}") from None
        # Before allocation the graph still shows the model's own ops; the default
        # delegates (XNNPACK) are applied lazily by AllocateTensors.
        self.ops: tuple[OpInfo, ...] = tuple(
            OpInfo(str(o["op_name"]), tuple(int(i) for i in o["inputs"]), tuple(int(i) for i in o["outputs"]))
            for o in self._interp._get_ops_details()
        )
        try:
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BadInput(f"{self.path}: op not supported by {self.backend.name}: {_first_line(exc)}") from None
        self._invoke: Callable[[], Any] = self._interp._interpreter.Invoke
        self._dynamic_outputs = False
        self._checked_outputs = False

    # -- set-up ---------------------------------------------------------------

    def _load_delegate(self, name: str) -> Any:
        library = DELEGATE_ALIASES.get(name, name)
        try:
            # Probe with ctypes first: a failed load_delegate() leaves a half-made Delegate whose
            # __del__ prints a second, confusing error at exit.
            ctypes.CDLL(library)
            return self.backend.load_delegate(library)
        except (ValueError, OSError, RuntimeError) as exc:
            hint = " (install libedgetpu1-std and plug in the Edge TPU)" if "edgetpu" in library else ""
            raise BadInput(f"delegate {library}: cannot be loaded: {_first_line(exc)}{hint}") from None

    def _known_custom_ops(self) -> frozenset[str]:
        # The custom ops the stock builtin resolvers register themselves.
        return frozenset({"TFLite_Detection_PostProcess", "MaxPoolingWithArgmax2D", "MaxUnpooling2D",
                          "Convolution2DTransposeBias", "AudioSpectrogram", "Mfcc"})

    def _take_views(self) -> None:
        tensor = self._interp.tensor
        self._views = _Views(
            inputs=[tensor(t.index)() for t in self.inputs],
            outputs=[tensor(t.index)() for t in self.outputs],
        )

    # -- the hot path -----------------------------------------------------------

    def input(self, i: int = 0) -> np.ndarray[Any, Any]:
        """The i-th input tensor as a writable numpy view (valid for the model's life)."""
        return self._views.inputs[i]

    def output(self, i: int = 0) -> np.ndarray[Any, Any]:
        """The i-th output tensor as a numpy view; read it after `invoke()`."""
        return self._views.outputs[i]

    def invoke(self) -> None:
        self._invoke()
        if not self._checked_outputs:
            self._check_output_views()
        elif self._dynamic_outputs:
            self._views.outputs = [self._interp.tensor(t.index)() for t in self.outputs]

    def _check_output_views(self) -> None:
        """Outputs whose size depends on the data are reallocated by Invoke; then retake views per call."""
        self._checked_outputs = True
        for t, view in zip(self.outputs, self._views.outputs, strict=True):
            fresh = self._interp.tensor(t.index)()
            if fresh.shape != view.shape or fresh.ctypes.data != view.ctypes.data:
                self._dynamic_outputs = True
        if self._dynamic_outputs:
            logger.debug("%s: outputs are reallocated by invoke; views are retaken per call", self.path)
            self._views.outputs = [self._interp.tensor(t.index)() for t in self.outputs]

    def reset_state(self) -> None:
        """Return a stateful (streaming) model to its initial state.

        Resource variables (VAR_HANDLE) live outside the tensors that
        `reset_all_variables()` clears, and no runtime offers a reset for them, so
        the interpreter is rebuilt; `generation` tells view holders to rebind.
        """
        if any(op.name == "VAR_HANDLE" for op in self.ops):
            # The old interpreter stays until the new one is complete: a reopen that fails (the file
            # replaced or gone meanwhile) leaves this Model as it was, usable, and says so (BadInput).
            kept = (self._interp, self.ops, self._invoke, self._dynamic_outputs, self._checked_outputs, self._views)
            try:
                self._open()
                self._take_views()
            except BaseException:
                (self._interp, self.ops, self._invoke, self._dynamic_outputs, self._checked_outputs,
                 self._views) = kept
                raise
            self.generation += 1
        else:
            self._interp.reset_all_variables()

    # -- quantization helpers (allocation-free when `out` is given) ------------

    def quantize_into(self, i: int, values: np.ndarray[Any, Any]) -> None:
        """Write real `values` into input i, quantizing with that tensor's own scale/zero-point."""
        info, view = self.inputs[i], self._views.inputs[i]
        if not info.quantized:
            np.copyto(view, values.reshape(view.shape), casting="same_kind")
            return
        limits = np.iinfo(info.dtype)
        q = np.rint(values / info.scale) + info.zero_point
        np.clip(q, limits.min, limits.max, out=q)
        np.copyto(view, q.reshape(view.shape), casting="unsafe")

    def dequantize_output(self, i: int, out: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Output i as real numbers written into the float32 buffer `out` (same size)."""
        info, view = self.outputs[i], self._views.outputs[i]
        flat = out.reshape(view.shape)
        np.copyto(flat, view, casting="unsafe")
        if info.quantized:
            flat -= info.zero_point
            flat *= info.scale
        return out

    # -- introspection ----------------------------------------------------------

    def producer(self, tensor_index: int) -> OpInfo | None:
        """The op that writes `tensor_index`, or None for a model input or constant."""
        for op in self.ops:
            if tensor_index in op.outputs:
                return op
        return None

    def source_op(self, tensor_index: int, skip: Sequence[str] = ("QUANTIZE", "DEQUANTIZE", "RESHAPE")) -> str | None:
        """The name of the op that computes `tensor_index`, looking through format-only ops."""
        op = self.producer(tensor_index)
        while op is not None and op.name in skip and op.inputs:
            op = self.producer(op.inputs[0])
        return None if op is None else op.name

    @property
    def stateful(self) -> bool:
        return any(op.name in _STATE_OPS for op in self.ops)

    def float_ops(self) -> list[str]:
        """Ops that compute in floating point (empty for a fully integer model).

        Tensor types come from the flatbuffer: tflite-runtime 2.14's
        get_tensor_details() crashes on models with sparse tensors.
        """
        found: dict[str, None] = {}
        for op in self.ops:
            if op.name in _BOUNDARY_OPS or op.name in _STATE_OPS:
                continue
            if any(self.file.is_float(idx) for idx in op.inputs + op.outputs):
                found[op.name] = None
        return list(found)

    def tensor_dtypes(self) -> dict[int, np.dtype[Any]]:
        """Every tensor's dtype by index (constants included).

        Not `get_tensor_details()`: it also reads each tensor's sparsity parameters, and
        tflite-runtime 2.14 crashes doing that on sparse weights (BlazeFace full-range sparse).
        """
        native = self._interp._interpreter
        found: dict[int, np.dtype[Any]] = {}
        for index in range(native.NumTensors(0)):
            try:
                kind = native.TensorType(index, 0)
            except ValueError:  # a tensor without a type (tflite-runtime says so by raising)
                continue
            if kind:
                found[index] = np.dtype(kind)
        return found

    def delegation(self) -> Delegation:
        """Which of the model's ops the delegate (XNNPACK by default) took, and which it left.

        After allocation the node list holds the original ops followed by one DELEGATE
        node per partition; the ops a partition replaced are the ones between its
        outputs and its inputs. What no partition covers runs on the builtin kernels.
        """
        nodes = self._interp._get_ops_details()
        original = len(self.ops)
        producer = {t: k for k, op in enumerate(self.ops) for t in op.outputs}
        covered: set[int] = set()
        partitions = nodes[original:]
        for node in partitions:
            boundary = {int(t) for t in node["inputs"]}
            todo = [int(t) for t in node["outputs"]]
            seen: set[int] = set()
            while todo:
                t = todo.pop()
                if t in boundary or t in seen:
                    continue
                seen.add(t)
                k = producer.get(t)
                if k is None or k in covered:
                    continue
                covered.add(k)
                todo.extend(i for i in self.ops[k].inputs if i >= 0)
        left = tuple(op for k, op in enumerate(self.ops) if k not in covered)
        return Delegation(partitions=len(partitions), delegated=len(covered), undelegated=left)

    @property
    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.name] = counts.get(op.name, 0) + 1
        return counts
