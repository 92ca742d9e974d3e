"""A float microWakeWord model for `model quantize` tests, made from a real int8 one.

microWakeWord publishes its models int8 only and no TensorFlow is installed here, so the float model is the
int8 one with every quantized tensor dequantized ((q - zero_point) * scale, per axis where the scale is) and
its QUANTIZE/DEQUANTIZE ops dropped: the same streaming graph and state variables, in float32, tracking the
int8 model closely (hey_mycroft: correlation 0.9997 of the probabilities over the recordings' windows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def dequantized(source: Path, out: Path) -> None:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    t_ = schema.TensorType
    types = {t_.INT8: np.int8, t_.UINT8: np.uint8, t_.INT32: np.int32}
    model = flatbuffer_utils.read_model(str(source))
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            q = tensor.quantization
            if tensor.type not in types or q is None or q.scale is None or not len(q.scale):
                continue
            buffer = model.buffers[tensor.buffer]
            if buffer.data is not None and len(buffer.data):
                raw = np.frombuffer(bytes(buffer.data), dtype=types[tensor.type]).astype(np.float32)
                scale, zero = np.array(q.scale, np.float32), np.array(q.zeroPoint, np.float32)
                if len(scale) > 1:  # per channel, along quantizedDimension
                    shape = [1] * len(tensor.shape)
                    shape[q.quantizedDimension] = -1
                    raw = raw.reshape(list(tensor.shape))
                    scale, zero = scale.reshape(shape), zero.reshape(shape)
                buffer.data = np.frombuffer(((raw - zero) * scale).astype(np.float32).tobytes(), np.uint8)
            tensor.type, tensor.quantization = t_.FLOAT32, None
        kept = []
        for op in graph.operators:
            if codes[op.opcodeIndex] not in (schema.BuiltinOperator.QUANTIZE, schema.BuiltinOperator.DEQUANTIZE):
                kept.append(op)
                continue
            src, dst = op.inputs[0], op.outputs[0]  # its consumers, outputs and signature read its input instead
            for other in graph.operators:
                other.inputs = [src if i == dst else i for i in other.inputs]
            graph.outputs = [src if i == dst else i for i in graph.outputs]
            for signature in model.signatureDefs or []:
                for entry in [*(signature.inputs or []), *(signature.outputs or [])]:
                    if entry.tensorIndex == dst:
                        entry.tensorIndex = src
        graph.operators = kept
    flatbuffer_utils.write_model(model, str(out))


def float_wakeword(models_dir: Path, folder: Path, name: str = "hey_mycroft") -> Path:
    """`folder/<name>_float.json`: the model's microWakeWord manifest naming its float version."""
    folder.mkdir(parents=True, exist_ok=True)
    dequantized(models_dir / "wakeword" / f"{name}.tflite", folder / f"{name}_float.tflite")
    manifest = json.loads((models_dir / "wakeword" / f"{name}.json").read_text())
    manifest["model"] = f"{name}_float.tflite"
    path = folder / f"{name}_float.json"
    path.write_text(json.dumps(manifest))
    return path
