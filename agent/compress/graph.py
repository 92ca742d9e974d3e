"""Flatbuffer rewrites that make a float model, as operators hold it, ready for the quantizer.

Models come from many exporters. MediaPipe's BlazeFace, for one, stores its weights as
float16 constants that DEQUANTIZE ops widen at run time, writes only the old
`deprecated_builtin_code` of each operator, applies RELU as separate ops, and has no
signature. ai-edge-quantizer needs float32 constants it can see, reads `builtin_code`,
and calibrates per signature; and a RELU left as its own op after an int8 ADD or CONV
has its own output scale, which XNNPACK does not run (it falls back to the slow
builtin kernel and splits the graph into dozens of partitions). So, in order:

1. `upgrade_opcodes`: `builtin_code` filled from `deprecated_builtin_code`;
2. `fold_fp16_weights`: each DEQUANTIZE of a float16 constant becomes a float32 constant;
3. `fuse_activations`: a RELU/RELU6/RELU_N1_TO_1 whose only input comes from an op with
   a fused-activation slot (CONV_2D, DEPTHWISE_CONV_2D, ADD, FULLY_CONNECTED, …) goes into
   that slot;
4. `prune`: tensors, buffers and operator codes that nothing references any more are
   removed (a fold that leaves the fp16 tensors and their buffers in the file carries them
   into the quantized model, which then ends up at more than half the folded size);
5. `add_default_signature`: `serving_default` over the main subgraph's inputs and outputs
   when the model has no signature.

Every step keeps the model's arithmetic: folding widens exactly, fusing moves the same
clamp into the producing kernel. Needs the `compress` extra (ai-edge-litert's schema).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from agent.errors import BadInput

logger = logging.getLogger(__name__)

Op = schema.BuiltinOperator
TensorType = schema.TensorType
Activation = schema.ActivationFunctionType

DEFAULT_SIGNATURE = "serving_default"

# Standalone activation op -> the fused-activation value that does the same clamp.
_FUSABLE_ACTIVATIONS = {
    Op.RELU: Activation.RELU,
    Op.RELU6: Activation.RELU6,
    Op.RELU_N1_TO_1: Activation.RELU_N1_TO_1,
}
# Ops whose options carry a fused activation the kernels (and XNNPACK) apply.
_ACTIVATION_SLOTS = frozenset({
    Op.CONV_2D, Op.DEPTHWISE_CONV_2D, Op.ADD, Op.SUB, Op.MUL, Op.FULLY_CONNECTED,
    Op.AVERAGE_POOL_2D, Op.MAX_POOL_2D, Op.CONCATENATION, Op.TRANSPOSE_CONV,
})
# Tensor types that only a quantized model has as activations.
_QUANTIZED_TYPES = frozenset({TensorType.INT8, TensorType.UINT8, TensorType.INT16})

OP_NAMES: dict[int, str] = {v: k for k, v in vars(Op).items() if not k.startswith("_")}


@dataclass
class Preparation:
    """What the rewrites did, for the manifest and the report."""

    upgraded_opcodes: int = 0
    folded_fp16_weights: int = 0
    fused_activations: dict[str, int] = field(default_factory=dict)
    removed_tensors: int = 0
    removed_buffers: int = 0
    removed_bytes: int = 0
    renamed_tensors: int = 0
    added_signature: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "upgraded_opcodes": self.upgraded_opcodes,
            "folded_fp16_weights": self.folded_fp16_weights,
            "fused_activations": dict(self.fused_activations),
            "removed_tensors": self.removed_tensors,
            "removed_buffers": self.removed_buffers,
            "removed_bytes": self.removed_bytes,
            "renamed_tensors": self.renamed_tensors,
            "added_signature": self.added_signature,
        }


@dataclass(frozen=True)
class Signature:
    """The signature the quantizer calibrates: argument name -> tensor index."""

    key: str
    inputs: dict[str, int]
    outputs: dict[str, int]


def read(content: bytes, origin: str = "model") -> Any:
    """The model as schema objects (`ModelT`), with buffers resolved from their offsets."""
    try:
        return flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    except Exception as exc:  # the generated reader raises anything on a bad buffer
        raise BadInput(f"{origin}: cannot read the flatbuffer ({type(exc).__name__}: {exc})") from None


def serialize(model: Any) -> bytes:
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def op_code(model: Any, op: Any) -> int:
    code = model.operatorCodes[op.opcodeIndex]
    return int(max(code.builtinCode, code.deprecatedBuiltinCode))


def _has_data(model: Any, tensor: Any) -> bool:
    data = model.buffers[tensor.buffer].data
    return data is not None and len(data) > 0


def quantized_activations(model: Any) -> list[str]:
    """Names of non-constant tensors that are already integer-quantized (empty for a float model)."""
    found = []
    for sg in model.subgraphs:
        for t in sg.tensors:
            q = t.quantization
            if t.type in _QUANTIZED_TYPES and q is not None and q.scale is not None and len(q.scale) \
                    and not _has_data(model, t):
                found.append(_name(t))
    return found


def _name(tensor: Any) -> str:
    name = tensor.name
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name or "")


# -- the rewrites -----------------------------------------------------------------


def upgrade_opcodes(model: Any, report: Preparation) -> None:
    """Fill `builtin_code` from `deprecated_builtin_code` (schemas before 2.4 wrote only the latter)."""
    for code in model.operatorCodes:
        if code.builtinCode < code.deprecatedBuiltinCode:
            code.builtinCode = code.deprecatedBuiltinCode
            report.upgraded_opcodes += 1


def fold_fp16_weights(model: Any, report: Preparation) -> None:
    """Replace DEQUANTIZE(float16 constant) by a float32 constant holding the same values."""
    for sg in model.subgraphs:
        kept = []
        for op in sg.operators:
            if op_code(model, op) == Op.DEQUANTIZE and len(op.inputs) == 1 and len(op.outputs) == 1:
                src, dst = sg.tensors[op.inputs[0]], sg.tensors[op.outputs[0]]
                if src.type == TensorType.FLOAT16 and dst.type == TensorType.FLOAT32 and _has_data(model, src):
                    widened = np.frombuffer(bytes(model.buffers[src.buffer].data), dtype="<f2").astype("<f4")
                    buffer = schema.BufferT()
                    buffer.data = np.frombuffer(widened.tobytes(), dtype=np.uint8)
                    model.buffers.append(buffer)
                    dst.buffer = len(model.buffers) - 1
                    report.folded_fp16_weights += 1
                    continue
            kept.append(op)
        sg.operators = kept


def fuse_activations(model: Any, report: Preparation) -> None:
    """Move a standalone RELU/RELU6/RELU_N1_TO_1 into its producer's fused-activation slot."""
    fused: Counter[str] = Counter()
    for sg_index, sg in enumerate(model.subgraphs):
        pinned = set(sg.outputs) | _signature_tensors(model, sg_index)
        consumers: Counter[int] = Counter(i for op in sg.operators for i in op.inputs if i >= 0)
        producer = {out: op for op in sg.operators for out in op.outputs}
        dropped: set[int] = set()
        for op in sg.operators:
            code = op_code(model, op)
            if code not in _FUSABLE_ACTIVATIONS or len(op.inputs) != 1:
                continue
            src = op.inputs[0]
            parent = producer.get(src)
            if parent is None or id(parent) in dropped or src in pinned or consumers[src] != 1:
                continue
            options = parent.builtinOptions
            if op_code(model, parent) not in _ACTIVATION_SLOTS or len(parent.outputs) != 1 \
                    or getattr(options, "fusedActivationFunction", None) != Activation.NONE:
                continue
            options.fusedActivationFunction = _FUSABLE_ACTIVATIONS[code]
            parent.outputs = [op.outputs[0]]
            producer[op.outputs[0]] = parent
            dropped.add(id(op))
            fused[OP_NAMES.get(code, str(code))] += 1
        sg.operators = [op for op in sg.operators if id(op) not in dropped]
    report.fused_activations = dict(fused)


def _signature_tensors(model: Any, sg_index: int) -> set[int]:
    found: set[int] = set()
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == sg_index:
            found.update(m.tensorIndex for m in (sig.inputs or []) + (sig.outputs or []))
    return found


def prune(model: Any, report: Preparation) -> None:
    """Remove tensors, buffers and operator codes that nothing references."""
    before_bytes = sum(len(b.data) for b in model.buffers if b.data is not None)
    for sg_index, sg in enumerate(model.subgraphs):
        used = set(sg.inputs) | set(sg.outputs) | _signature_tensors(model, sg_index)
        for op in sg.operators:
            used.update(i for i in list(op.inputs) + list(op.outputs) + list(op.intermediates or []) if i >= 0)
        order = sorted(used)
        new_index = {old: new for new, old in enumerate(order)}
        report.removed_tensors += len(sg.tensors) - len(order)
        sg.tensors = [sg.tensors[i] for i in order]
        for op in sg.operators:
            op.inputs, op.outputs = _remap(op.inputs, new_index), _remap(op.outputs, new_index)
            if op.intermediates:
                op.intermediates = _remap(op.intermediates, new_index)
        sg.inputs, sg.outputs = _remap(sg.inputs, new_index), _remap(sg.outputs, new_index)
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == sg_index:
                for m in (sig.inputs or []) + (sig.outputs or []):
                    m.tensorIndex = new_index[m.tensorIndex]

    # Buffer 0 is the shared empty buffer by convention; metadata names its own buffers.
    used_buffers = {0} | {t.buffer for sg in model.subgraphs for t in sg.tensors}
    used_buffers |= {m.buffer for m in model.metadata or []}
    order = sorted(b for b in used_buffers if b < len(model.buffers))
    new_buffer = {old: new for new, old in enumerate(order)}
    report.removed_buffers += len(model.buffers) - len(order)
    model.buffers = [model.buffers[b] for b in order]
    for sg in model.subgraphs:
        for t in sg.tensors:
            t.buffer = new_buffer[t.buffer]
    for m in model.metadata or []:
        m.buffer = new_buffer[m.buffer]
    report.removed_bytes += before_bytes - sum(len(b.data) for b in model.buffers if b.data is not None)

    used_codes = sorted({op.opcodeIndex for sg in model.subgraphs for op in sg.operators})
    new_code = {old: new for new, old in enumerate(used_codes)}
    model.operatorCodes = [model.operatorCodes[c] for c in used_codes]
    for sg in model.subgraphs:
        for op in sg.operators:
            op.opcodeIndex = new_code[op.opcodeIndex]


def _remap(indices: Any, new_index: dict[int, int]) -> list[int]:
    # -1 marks an omitted optional input and stays as it is.
    return [new_index[i] if i >= 0 else i for i in indices]


def unique_tensor_names(model: Any, report: Preparation) -> None:
    """The quantizer keys tensors by name: give duplicates a numbered suffix."""
    for sg in model.subgraphs:
        seen: Counter[str] = Counter()
        for t in sg.tensors:
            name = _name(t) or "tensor"
            seen[name] += 1
            if seen[name] > 1 or not _name(t):
                t.name = f"{name}_{seen[name] - 1}".encode()
                report.renamed_tensors += 1


def add_default_signature(model: Any, report: Preparation) -> None:
    """`serving_default` over subgraph 0's inputs and outputs, named after their tensors."""
    if model.signatureDefs:
        return
    sg = model.subgraphs[0]

    def tensor_map(index: int) -> Any:
        entry = schema.TensorMapT()
        entry.name = _name(sg.tensors[index])
        entry.tensorIndex = index
        return entry

    sig = schema.SignatureDefT()
    sig.signatureKey = DEFAULT_SIGNATURE
    sig.subgraphIndex = 0
    sig.inputs = [tensor_map(i) for i in sg.inputs]
    sig.outputs = [tensor_map(i) for i in sg.outputs]
    model.signatureDefs = [sig]
    report.added_signature = True


def signature(model: Any) -> Signature:
    """The signature to calibrate: the default one, else the first over subgraph 0."""
    sigs = [s for s in model.signatureDefs or [] if s.subgraphIndex == 0]
    if not sigs:
        raise BadInput("model has signatures, but none over its main subgraph")
    chosen = next((s for s in sigs if _text(s.signatureKey) == DEFAULT_SIGNATURE), sigs[0])
    return Signature(
        key=_text(chosen.signatureKey),
        inputs={_text(m.name): int(m.tensorIndex) for m in chosen.inputs or []},
        outputs={_text(m.name): int(m.tensorIndex) for m in chosen.outputs or []},
    )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def prepare(content: bytes, origin: str = "model", *, fuse: bool = True) -> tuple[bytes, Signature, Preparation]:
    """All rewrites in order; the float32 model the quantizer gets, its signature, and what changed."""
    model = read(content, origin)
    already = quantized_activations(model)
    if already:
        raise BadInput(f"{origin}: already quantized (tensor {already[0]!r} is integer); give the float model")
    report = Preparation()
    upgrade_opcodes(model, report)
    densify = [sg for sg in model.subgraphs if any(op_code(model, op) == Op.DENSIFY for op in sg.operators)]
    if densify:
        # The quantizer takes the densified weights for activations and writes a model no runtime loads.
        raise BadInput(f"{origin}: sparse weights (DENSIFY ops) are not supported by the quantizer; "
                       "quantize the dense version of the model")
    fold_fp16_weights(model, report)
    if fuse:
        fuse_activations(model, report)
    prune(model, report)
    unique_tensor_names(model, report)
    add_default_signature(model, report)
    return serialize(model), signature(model), report


def naive_fold_size(content: bytes) -> int:
    """Size of the fp16 fold alone, orphans left in (the reference the issue's size target uses)."""
    model = read(content)
    report = Preparation()
    upgrade_opcodes(model, report)
    fold_fp16_weights(model, report)
    return len(serialize(model))
