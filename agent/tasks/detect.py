"""Object detection: a frame in, `{"task": "detect", "detections": [{label, score, box}]}` out.

The decoder comes from the manifest (`postprocess.decoder`: ssd, yolov5, yolov8,
blazeface) or is recognised from the output tensors. Boxes are mapped through
the preprocessor's letterbox / region of interest back to the original frame,
normalised 0..1 as `[xmin, ymin, xmax, ymax]` (DESIGN §5).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.errors import BadInput
from agent.manifest import ModelSpec, Preprocess
from agent.runtime import Model
from agent.tasks.task import Gate, Task, register
from agent.vision.decoders import DECODERS, Decoder, match_decoder
from agent.vision.preprocess import ImagePreprocessor

_GENERIC_KEYS = frozenset({None, "detect", "auto"})


def choose_decoder(model: Model, spec: ModelSpec) -> type[Decoder]:
    """The manifest's decoder, else the one whose output layout the model has; BadInput when none fits."""
    key = spec.postprocess.decoder
    if key not in _GENERIC_KEYS:
        if key not in DECODERS:
            where = spec.manifest_path or model.path
            raise BadInput(f"{where}: postprocess.decoder {key!r} is not a detection decoder "
                           f"(choose one of {', '.join(sorted(DECODERS))})")
        return DECODERS[str(key)]
    found = match_decoder(model)
    if found is None:
        shapes = ", ".join(str(list(o.shape)) for o in model.outputs)
        raise BadInput(f"{model.path}: outputs {shapes} match no detection decoder (SSD with "
                       "TFLite_Detection_PostProcess, YOLOv5 [1,N,5+C], YOLOv8 [1,4+C,N], BlazeFace)")
    return DECODERS[found]


def effective_preprocess(given: Preprocess, decoder: type[Decoder]) -> Preprocess:
    """The manifest's preprocessing, with the decoder family's defaults for what it leaves unsaid."""
    explicit = given.model_dump(exclude_unset=True)
    if not decoder.default_preprocess or {"normalize", "mean", "std"} & set(explicit):
        defaults = {k: v for k, v in decoder.default_preprocess.items() if k not in ("normalize", "mean", "std")}
    else:
        defaults = dict(decoder.default_preprocess)
    return Preprocess.model_validate({**given.model_dump(), **defaults, **explicit})


@register("detect")
class Detect(Task):
    def __init__(self, model: Model, spec: ModelSpec) -> None:
        super().__init__(model, spec)
        decoder_cls = choose_decoder(model, spec)
        self.decoder = decoder_cls(model, spec)
        pre = effective_preprocess(spec.preprocess, decoder_cls)
        self.preprocessor = ImagePreprocessor(model, pre, pad_value=decoder_cls.pad_value)
        self.labels = spec.labels or decoder_cls.class_names

    def preprocess(self, item: Any) -> None:
        self.preprocessor(item)

    def postprocess(self) -> dict[str, Any]:
        result: dict[str, Any] = self._result(None)  # type: ignore[assignment]  # no gate: always a result
        return result

    def postprocess_gated(self, gate: Gate) -> dict[str, Any] | None:
        return self._result(gate)

    def _result(self, gate: Gate | None) -> dict[str, Any] | None:
        found = self.decoder.decode()
        if not len(found):
            if gate is not None and not gate([], []):
                return None
            return {"task": "detect", "detections": []}
        few = found.score_list
        scores = [round(score, 6) for score in (few if few is not None else found.scores.tolist())]
        labels = self.labels
        if found.classes is None:
            names = [labels[0] if labels else "0"] * len(scores)
        else:
            names = [labels[c] if 0 <= c < len(labels) else str(c) for c in found.classes.tolist()]
        # The boxes (BlazeFace: averaged over each group), their mapping back to the frame and the dicts wait
        # for the gate: most frames of a steady scene are held back by the policy and need none of them.
        if gate is not None and not gate(names, scores):
            return None
        if found.rows is not None:
            boxes = self.preprocessor.map_box_rows(found.rows)
        else:
            boxes = self.preprocessor.map_boxes(found.boxes).tolist()
        # Box corners (mapped into 0..1, NaN made 0) cut to 5 decimals by int(), not round(): round() goes through
        # a decimal conversion, twice the cost on the caches an invoke has emptied (they differ at exact ties only).
        return {"task": "detect", "detections": [
            {"label": name, "score": score, "box": [int(x0 * 1e5 + 0.5) / 1e5, int(y0 * 1e5 + 0.5) / 1e5,
                                                    int(x1 * 1e5 + 0.5) / 1e5, int(y1 * 1e5 + 0.5) / 1e5]}
            for name, score, (x0, y0, x1, y1) in zip(names, scores, boxes, strict=True)]}

    def synthetic_item(self) -> Any:
        return np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
