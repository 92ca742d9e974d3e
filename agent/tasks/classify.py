"""Image classification: one score vector → top-k labels."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from agent.errors import BadInput
from agent.manifest import ModelSpec
from agent.runtime import Model
from agent.tasks.task import Task, register
from agent.vision.preprocess import ImagePreprocessor

# Ops whose output is already a probability.
_PROBABILITY_OPS = frozenset({"SOFTMAX", "LOGISTIC"})

FEW = 64
"""Up to this many classes the scores are finished in Python floats (`Classify._postprocess_few`)."""

_exp = math.exp


@register("classify")
class Classify(Task):
    def __init__(self, model: Model, spec: ModelSpec) -> None:
        super().__init__(model, spec)
        if len(model.outputs) != 1:
            raise BadInput(f"{model.path}: classify needs one output tensor, the model has {len(model.outputs)}")
        self.preprocessor = ImagePreprocessor(model, spec.preprocess)
        out = model.outputs[0]
        n = math.prod(out.shape)
        labels = spec.labels
        if labels and len(labels) != n:
            raise BadInput(f"{spec.manifest_path or model.path}: {len(labels)} labels for {n} model outputs")
        self.labels: tuple[str, ...] = labels or tuple(str(i) for i in range(n))
        post = spec.postprocess
        if post.softmax == "auto":
            self.softmax = model.source_op(out.index) not in _PROBABILITY_OPS
        else:
            self.softmax = bool(post.softmax)
        self.top_k = min(post.top_k, n)
        self.threshold = post.threshold
        self._scores = np.empty(n, np.float32)
        self._few = n <= FEW
        self._scale, self._zero = (out.scale, out.zero_point) if out.quantized else (1.0, 0)

    def preprocess(self, item: Any) -> None:
        self.preprocessor(item)

    def postprocess(self) -> dict[str, Any]:
        if self._few:
            return self._postprocess_few()
        s = self.model.dequantize_output(0, self._scores)
        if self.softmax:
            s -= s.max()
            np.exp(s, out=s)
            s /= s.sum()
        k = self.top_k
        if k < s.size:
            best = np.argpartition(s, s.size - k)[-k:]
            best = best[np.argsort(s[best])[::-1]]
        else:
            best = np.argsort(s)[::-1]
        classes = []
        for i in best.tolist():
            score = float(s[i])
            if score < self.threshold:
                break
            classes.append({"label": self.labels[i], "score": round(score, 6)})
        return {"task": "classify", "classes": classes}

    def _postprocess_few(self) -> dict[str, Any]:
        """`postprocess` for a few classes, in Python floats: one numpy call (the scores as a list) instead of
        some eight, each of which costs microseconds on the caches an invoke has just emptied. Same order as
        the array path: best first, equal scores the higher index first."""
        scale, zero = self._scale, self._zero
        s = [(q - zero) * scale for q in self.model.output(0).reshape(-1).tolist()]
        if self.softmax:
            top = max(s)
            e = [_exp(v - top) for v in s]
            total = sum(e)
            s = [v / total for v in e]
        classes = []
        for i in sorted(range(len(s)), key=s.__getitem__)[::-1][: self.top_k]:
            score = s[i]
            if score < self.threshold:
                break
            classes.append({"label": self.labels[i], "score": round(score, 6)})
        return {"task": "classify", "classes": classes}

    def synthetic_item(self) -> Any:
        return np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
