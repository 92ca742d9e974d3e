"""Any model without a known decoder: inputs filled from an image or arrays, outputs reported raw."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from agent.errors import BadInput
from agent.manifest import ModelSpec
from agent.runtime import Model
from agent.tasks.task import Task, register

# Outputs larger than this are summarised instead of listed.
MAX_LISTED_VALUES = 4096


@register("tensors")
class Tensors(Task):
    def __init__(self, model: Model, spec: ModelSpec) -> None:
        super().__init__(model, spec)
        self._outputs = [np.empty(math.prod(o.shape), np.float32) for o in model.outputs]
        self.preprocessor: Any = None
        from agent.vision.preprocess import image_input

        if len(model.inputs) == 1 and image_input(model.inputs[0], spec.preprocess.layout) is not None:
            from agent.vision.preprocess import ImagePreprocessor

            self.preprocessor = ImagePreprocessor(model, spec.preprocess)
            self.item_kind = "image"
        else:
            self.item_kind = "tensor"

    def preprocess(self, item: Any) -> None:
        if self.preprocessor is not None:
            self.preprocessor(item)
            return
        arrays = item if isinstance(item, list | tuple) else [item]
        if len(arrays) != len(self.model.inputs):
            raise BadInput(f"{self.model.path}: {len(self.model.inputs)} inputs needed, {len(arrays)} given")
        for i, (info, values) in enumerate(zip(self.model.inputs, arrays, strict=True)):
            if math.prod(np.shape(values)) != math.prod(info.shape):
                raise BadInput(f"input {info.name!r} takes {list(info.shape)}, got {list(np.shape(values))}")
            self.model.quantize_into(i, np.asarray(values))

    def postprocess(self) -> dict[str, Any]:
        outputs = []
        for i, (info, buf) in enumerate(zip(self.model.outputs, self._outputs, strict=True)):
            values = self.model.dequantize_output(i, buf)
            entry: dict[str, Any] = {"name": info.name, "shape": list(info.shape)}
            if values.size <= MAX_LISTED_VALUES:
                entry["values"] = [round(v, 6) for v in values.tolist()]
            else:
                entry.update(min=float(values.min()), max=float(values.max()), mean=float(values.mean()))
            outputs.append(entry)
        return {"task": "tensors", "outputs": outputs}

    def synthetic_item(self) -> Any:
        rng = np.random.default_rng(0)
        if self.preprocessor is not None:
            return rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        items = []
        for info in self.model.inputs:
            if info.quantized:
                lo = (np.iinfo(info.dtype).min - info.zero_point) * info.scale
                hi = (np.iinfo(info.dtype).max - info.zero_point) * info.scale
                items.append(rng.uniform(lo, hi, info.shape).astype(np.float32))
            elif info.dtype.kind == "f":
                items.append(rng.standard_normal(info.shape).astype(info.dtype))
            else:
                items.append(np.zeros(info.shape, info.dtype))
        return items
