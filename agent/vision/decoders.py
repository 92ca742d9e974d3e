"""Detection decoders: output tensors → boxes, scores and classes, vectorised.

Every decoder reads the model's output views after `invoke()` and returns
`Detections` with boxes `[xmin, ymin, xmax, ymax]` normalised to the *input
tensor* (the task maps them back to the frame). Decoders register by key
(`ssd`, `yolov5`, `yolov8`, `blazeface`); `match_decoder()` names the one a bare
model fits from its output tensors. Per frame, work grows with the number of
candidates above the score threshold, not with the number of anchors: scores
are compared before anything else is decoded.

numpy only: `agent.tasks.task.recognise` may use this module without OpenCV.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from agent.errors import BadInput
from agent.manifest import ModelSpec
from agent.runtime import Model, TensorInfo
from agent.vision.anchors import BLAZEFACE_ANCHORS, SsdAnchorOptions, ssd_anchors
from agent.vision.nms import nms, weighted_groups, weighted_means, weighted_nms_few

Array = np.ndarray[Any, Any]

DECODERS: dict[str, type[Decoder]] = {}


def register_decoder(key: str) -> Callable[[type[Decoder]], type[Decoder]]:
    def wrap(cls: type[Decoder]) -> type[Decoder]:
        cls.key = key
        DECODERS[key] = cls
        return cls

    return wrap


class Detections:
    """Decoded detections, best first; boxes normalised to the input tensor.

    `boxes` may be made when first read (`make_boxes`): BlazeFace's weighted NMS knows its scores and count
    before it averages any box, and a result the policy holds back never reads them.

    `few` holds a handful of detections a decoder finished in plain Python floats (`rows`, `score_list`);
    `boxes` and `scores` are then made as arrays only when read, and the task builds its result from the
    lists without a numpy call."""

    __slots__ = ("_boxes", "_make_boxes", "_scores", "classes", "rows", "score_list")

    def __init__(self, boxes: Array | None, scores: Array | None, classes: Array | None,
                 make_boxes: Callable[[], Array] | None = None) -> None:
        self._boxes, self._make_boxes = boxes, make_boxes
        self._scores = scores  # [N] float32; None only for `few`
        self.classes = classes  # [N] int; None: a one-class model, every detection class 0
        self.rows: list[tuple[float, float, float, float]] | None = None
        self.score_list: list[float] | None = None

    @classmethod
    def few(cls, rows: list[tuple[float, float, float, float]], scores: list[float]) -> Detections:
        """One-class detections as Python lists: [xmin, ymin, xmax, ymax] rows and their scores."""
        found = cls(None, None, None)  # boxes and scores made from the lists when read
        found.rows, found.score_list = rows, scores
        return found

    def __len__(self) -> int:
        return len(self.score_list) if self.score_list is not None else int(self.scores.shape[0])

    @property
    def scores(self) -> Array:
        """[N] float32."""
        if self._scores is None:
            self._scores = np.array(self.score_list, np.float32)
        return self._scores

    @property
    def boxes(self) -> Array:
        """[N, 4] float32 xmin, ymin, xmax, ymax."""
        if self._boxes is None:
            if self.rows is not None:
                self._boxes = np.array(self.rows, np.float32).reshape(-1, 4)
            else:
                assert self._make_boxes is not None
                self._boxes = self._make_boxes()
        return self._boxes


_EMPTY = Detections(np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.intp))


class Decoder(abc.ABC):
    """Turns the output views of one model into `Detections`."""

    key: ClassVar[str]
    default_threshold: ClassVar[float] = 0.5
    default_preprocess: ClassVar[dict[str, Any]] = {}
    """Preprocessing this family expects, used where the manifest does not say."""
    pad_value: ClassVar[int] = 0
    """Pixel value of the letterbox border."""
    class_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: Model, spec: ModelSpec) -> None:
        self.model = model
        self.params = dict(spec.postprocess.params)
        threshold = spec.postprocess.threshold
        self.threshold = float(threshold) if threshold > 0 else self.default_threshold
        self.max_results = int(self.params.get("max_results", 100))

    @abc.abstractmethod
    def decode(self) -> Detections: ...

    @classmethod
    @abc.abstractmethod
    def fits(cls, model: Model) -> bool:
        """True when the model's outputs have this decoder's layout."""

    def _param(self, name: str, default: float) -> float:
        value = self.params.get(name, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise BadInput(f"postprocess.params.{name}: expected a number, got {value!r}")
        return float(value)


def match_decoder(model: Model) -> str | None:
    """The decoder whose output layout the model has, or None."""
    for key in ("ssd", "blazeface", "yolov8", "yolov5"):
        if DECODERS[key].fits(model):
            return key
    return None


def _image_input(model: Model) -> tuple[int, int] | None:
    """(height, width) of a single NHWC/NCHW image input."""
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4 or model.inputs[0].shape[0] != 1:
        return None
    _, a, b, c = model.inputs[0].shape
    if c in (1, 3):
        return a, b
    if a in (1, 3):
        return b, c
    return None


class _Dequantized:
    """A float32 copy of one output tensor, refreshed per frame into the same buffer."""

    def __init__(self, model: Model, index: int) -> None:
        self.model, self.index = model, index
        info: TensorInfo = model.outputs[index]
        self.buffer = np.empty(info.shape, np.float32)
        self.copy = info.quantized or info.dtype != np.float32
        # `values` reads the tensor's own values where they are float32 or quantized integers (with their scale
        # and zero point), anything else (float16) from `read()`'s float32 copy.
        self._own = info.quantized or not self.copy
        self._scale, self._zero = (info.scale, info.zero_point) if info.quantized else (1.0, 0)
        self._source: Array | None = None
        self._values = self.buffer.reshape(-1).data

    def read(self) -> Array:
        if self.copy:
            return self.model.dequantize_output(self.index, self.buffer)
        return self.model.output(self.index)

    def values(self) -> tuple[memoryview, float, int]:
        """The output's values, flat, as a memoryview, and the (scale, zero point) making them real numbers:
        Python reads a few of them by index without a numpy call (after an invoke, on emptied caches, each
        numpy call costs more than a dozen indexed reads). A float16 output is read from `read()`'s copy."""
        if not self._own:
            self.read()
            return self._values, 1.0, 0
        view = self.model.output(self.index)
        if view is not self._source:  # a new view: the model reallocated its tensors
            self._source, self._values = view, view.data.cast("B").cast(view.dtype.char)  # C-contiguous, flat
        return self._values, self._scale, self._zero


@register_decoder("ssd")
class SsdPostprocess(Decoder):
    """Models ending in TFLite_Detection_PostProcess: boxes, classes, scores, count (already NMS'd)."""

    @classmethod
    def fits(cls, model: Model) -> bool:
        return "TFLite_Detection_PostProcess" in model.op_counts and len(model.outputs) == 4

    def __init__(self, model: Model, spec: ModelSpec) -> None:
        super().__init__(model, spec)
        if not self.fits(model):
            raise BadInput(f"{model.path}: decoder 'ssd' needs the TFLite_Detection_PostProcess op and 4 outputs")
        op = next(o for o in model.ops if o.name == "TFLite_Detection_PostProcess")
        # The op's outputs are boxes, classes, scores, count; the model may list them in another order.
        position = {t.index: i for i, t in enumerate(model.outputs)}
        try:
            self._boxes, self._classes, self._scores, self._count = (position[t] for t in op.outputs[:4])
        except KeyError:
            raise BadInput(f"{model.path}: TFLite_Detection_PostProcess does not write the model's outputs") from None
        self.label_offset = int(self._param("label_offset", 0))

    def decode(self) -> Detections:
        out = self.model.output
        count = int(np.asarray(out(self._count)).reshape(-1)[0])
        boxes = out(self._boxes).reshape(-1, 4)[:count]
        scores = out(self._scores).reshape(-1)[:count]
        keep = np.flatnonzero(scores >= self.threshold)[: self.max_results]
        if keep.size == 0:
            return _EMPTY
        # ymin, xmin, ymax, xmax → xmin, ymin, xmax, ymax
        picked = boxes[keep][:, [1, 0, 3, 2]].astype(np.float32)
        classes = out(self._classes).reshape(-1)[keep].astype(np.intp) + self.label_offset
        return Detections(picked, scores[keep].astype(np.float32), classes)


class _Yolo(Decoder):
    """Raw YOLO heads: centre/size boxes and per-class scores for every candidate, NMS here."""

    default_threshold = 0.25
    default_preprocess: ClassVar[dict[str, Any]] = {"resize": "letterbox", "normalize": None, "mean": (0.0,),
                                                     "std": (255.0,)}
    pad_value = 114  # the grey Ultralytics letterboxes with

    def __init__(self, model: Model, spec: ModelSpec) -> None:
        super().__init__(model, spec)
        if _yolo_shape(model) is None:
            shape = list(model.outputs[0].shape) if model.outputs else []
            raise BadInput(f"{model.path}: decoder {self.key!r} does not fit the output {shape}")
        self.iou_threshold = self._param("iou_threshold", 0.45)
        self.class_agnostic = bool(self.params.get("class_agnostic", False))
        size = _image_input(model) or (1, 1)
        self.input_size = np.array([size[1], size[0], size[1], size[0]], np.float32)
        self._out = _Dequantized(model, 0)

    def _finish(self, cand: Array, centres: Array, scores: Array, classes: Array) -> Detections:
        """centres: [k, 4] cx, cy, w, h of the candidates → NMS'd normalised corner boxes."""
        boxes = np.empty_like(centres)
        half = centres[:, 2:4] * 0.5
        boxes[:, 0:2] = centres[:, 0:2] - half
        boxes[:, 2:4] = centres[:, 0:2] + half
        if float(np.abs(centres[:, :2]).max()) > 2.0:  # pixel coordinates (some exports): normalise
            boxes /= self.input_size
        keep = nms(boxes, scores, self.iou_threshold, self.max_results, None if self.class_agnostic else classes)
        return Detections(boxes[keep], scores[keep], classes[keep])


@register_decoder("yolov5")
class YoloV5(_Yolo):
    """[1, N, 5 + classes]: cx, cy, w, h, objectness, class probabilities; score = objectness * class."""

    @classmethod
    def fits(cls, model: Model) -> bool:
        return _yolo_shape(model) == "yolov5"

    def decode(self) -> Detections:
        rows = self._out.read()[0]  # [N, 5 + C]
        cand = np.flatnonzero(rows[:, 4] >= self.threshold)  # score ≤ objectness: nothing else can pass
        if cand.size == 0:
            return _EMPTY
        picked = rows[cand]
        class_scores = picked[:, 5:] * picked[:, 4:5]
        classes = class_scores.argmax(axis=1)
        scores = class_scores[np.arange(cand.size), classes]
        ok = scores >= self.threshold
        if not ok.any():
            return _EMPTY
        return self._finish(cand[ok], picked[ok, :4], scores[ok].astype(np.float32), classes[ok])


@register_decoder("yolov8")
class YoloV8(_Yolo):
    """[1, 4 + classes, N] (or [1, N, 4 + classes]): cx, cy, w, h and class scores, no objectness."""

    @classmethod
    def fits(cls, model: Model) -> bool:
        return _yolo_shape(model) == "yolov8"

    def __init__(self, model: Model, spec: ModelSpec) -> None:
        super().__init__(model, spec)
        _, d1, d2 = model.outputs[0].shape
        self.transposed = d1 < d2  # the Ultralytics export: channels first
        n = max(d1, d2)
        self._best = np.empty(n, np.float32)

    def decode(self) -> Detections:
        out = self._out.read()[0]
        rows = out.T if self.transposed else out  # a view: [N, 4 + C]
        np.max(rows[:, 4:], axis=1, out=self._best)
        cand = np.flatnonzero(self._best >= self.threshold)
        if cand.size == 0:
            return _EMPTY
        picked = rows[cand]
        classes = picked[:, 4:].argmax(axis=1)
        return self._finish(cand, np.ascontiguousarray(picked[:, :4]), self._best[cand].copy(), classes)


def _yolo_shape(model: Model) -> str | None:
    if _image_input(model) is None or len(model.outputs) != 1 or len(model.outputs[0].shape) != 3:
        return None
    _, d1, d2 = model.outputs[0].shape
    if min(d1, d2) < 6 or max(d1, d2) < 100:
        return None
    return "yolov8" if d1 < d2 else "yolov5"


@register_decoder("blazeface")
class BlazeFace(Decoder):
    """MediaPipe BlazeFace: regressors [1, N, 16] and score logits [1, N, 1] over SSD anchors.

    As MediaPipe's TensorsToDetectionsCalculator with the face detection graph's
    options: box centre = raw / input size * anchor size + anchor centre, size =
    raw / input size * anchor size; score = sigmoid(logit); then
    weighted NMS with IoU 0.3. Only anchors whose logit clears the threshold are
    decoded.
    """

    class_names = ("face",)
    default_preprocess: ClassVar[dict[str, Any]] = {"resize": "letterbox"}

    @classmethod
    def fits(cls, model: Model) -> bool:
        if _image_input(model) is None or len(model.outputs) != 2:
            return False
        a, b = sorted((o.shape for o in model.outputs), key=lambda s: -s[-1])
        return len(a) == 3 and len(b) == 3 and a[1] == b[1] and a[2] >= 4 and a[2] % 2 == 0 and b[2] == 1

    def __init__(self, model: Model, spec: ModelSpec) -> None:
        super().__init__(model, spec)
        size = _image_input(model)
        if not self.fits(model) or size is None:
            raise BadInput(f"{model.path}: decoder 'blazeface' needs regressors [1,N,16] and scores [1,N,1]")
        height, width = size
        first, second = model.outputs
        self._reg, self._score = (0, 1) if first.shape[-1] > second.shape[-1] else (1, 0)
        count = model.outputs[self._reg].shape[1]
        self.anchors = self._anchors(model, height, width, count)
        # corners = (raw x, y, w, h) @ _CORNERS * scale + centre, with scale = anchor size / input size and
        # centre = the anchor's, per anchor and computed once: four numpy calls per frame for all candidates.
        scale = self.anchors[:, 2:4] / np.array([width, height], np.float32)
        self._scale4 = np.ascontiguousarray(np.tile(scale, 2), dtype=np.float32)
        self._centre4 = np.ascontiguousarray(np.tile(self.anchors[:, 0:2], 2), dtype=np.float32)
        # The same per anchor as Python floats (x scale, y scale, x centre, y centre) for `_decode_few`.
        self._anchor_rows: list[tuple[float, float, float, float]] = [
            (sx, sy, cx, cy) for sx, sy, cx, cy in np.concatenate((scale, self.anchors[:, 0:2]), axis=1).tolist()]
        self.iou_threshold = self._param("iou_threshold", 0.3)
        # Compare logits, not probabilities: sigmoid(x) > t  ⇔  x > logit(t).
        t = min(max(self.threshold, 1e-6), 1 - 1e-6)
        self.min_logit = math.log(t / (1 - t))
        self._regressors = _Dequantized(model, self._reg)
        self._logits = _Dequantized(model, self._score)
        self._width = model.outputs[self._reg].shape[-1]  # values per anchor: 4 box + 2 per keypoint

    def _anchors(self, model: Model, height: int, width: int, count: int) -> Array:
        custom = self.params.get("anchors")
        try:
            if isinstance(custom, dict):
                fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in custom.items()}
                options = SsdAnchorOptions(**fields)
            elif width == height and width in BLAZEFACE_ANCHORS:
                options = BLAZEFACE_ANCHORS[width]
            else:
                raise BadInput(f"{model.path}: no BlazeFace anchor preset for a {width}x{height} input; give "
                               "postprocess.params.anchors (MediaPipe SsdAnchorsCalculator options)")
            anchors = ssd_anchors(options)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"postprocess.params.anchors: {exc}") from None
        if anchors.shape[0] != count:
            raise BadInput(f"{model.path}: {anchors.shape[0]} anchors generated for {count} model outputs")
        return anchors

    def decode(self) -> Detections:
        logits = self._logits.read().reshape(-1)
        cand = (logits > self.min_logit).nonzero()[0]  # np.flatnonzero, without its wrapper
        if cand.size == 0:
            return _EMPTY
        if cand.size <= FEW:
            return self._decode_few(cand)
        raw = self._regressors.read()[0, cand, :4]  # x, y, w, h of the box; keypoints are not reported
        boxes = raw @ _CORNERS
        boxes *= self._scale4[cand]
        boxes += self._centre4[cand]
        # Candidates are above logit(threshold), so exp(-x) cannot overflow: no clipping needed.
        scores = np.exp(-logits[cand])
        scores += 1.0
        np.reciprocal(scores, out=scores)
        sized = raw[:, 2:4] > 0
        if not _all(sized, axis=None):  # a box of no width or height: MediaPipe drops it
            valid = _all(sized, axis=1)
            boxes, scores = boxes[valid], scores[valid]
        groups = weighted_groups(boxes, scores, self.iou_threshold, self.max_results)
        return Detections(None, scores[[g[0] for g in groups]], None, lambda: weighted_means(boxes, scores, groups))

    def _decode_few(self, cand: Array) -> Detections:
        """`decode` for a few candidates (a few faces seen by a few anchors each), in Python floats reading the
        output tensors by index: numpy found the candidates, and the rest is three numpy calls fewer than a
        take per tensor, some forty fewer than the array path (each costs several microseconds on the caches
        an invoke has just emptied). Same arithmetic as the array path, in double precision."""
        anchors = self._anchor_rows
        regs, scale, zero = self._regressors.values()
        logits, logit_scale, logit_zero = self._logits.values()
        width = self._width
        boxes: list[tuple[float, float, float, float]] = []
        scores: list[float] = []
        for i in cand.tolist():
            k = i * width  # x, y, w, h of the box first; keypoints are not reported
            w, h = (regs[k + 2] - zero) * scale, (regs[k + 3] - zero) * scale
            if w <= 0.0 or h <= 0.0:  # a box of no width or height: MediaPipe drops it
                continue
            sx, sy, cx, cy = anchors[i]
            x, y = (regs[k] - zero) * scale * sx + cx, (regs[k + 1] - zero) * scale * sy + cy
            w, h = w * sx * 0.5, h * sy * 0.5
            boxes.append((x - w, y - h, x + w, y + h))
            scores.append(1.0 / (1.0 + _exp((logit_zero - logits[i]) * logit_scale)))
        if not scores:
            return _EMPTY
        return Detections.few(*weighted_nms_few(boxes, scores, self.iou_threshold, self.max_results))


FEW = 32
"""Up to this many candidates above the threshold BlazeFace decodes in Python floats (`_decode_few`)."""

_exp = math.exp


_all = np.logical_and.reduce  # ndarray.all without its Python wrapper

# (x, y, w, h) → (x - w/2, y - h/2, x + w/2, y + h/2)
_CORNERS = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]], np.float32)
