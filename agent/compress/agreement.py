"""How far a variant's answers are from the base model's, computed from the tasks' own results.

Each evaluation item gives, per model, the list of result dicts its runner returned
(`Runner.process(item)`): one `classes` result per image for a classifier, one
`detections` result per image for a detector, zero or more wake word events per audio
chunk. Agreement compares the variant's list with the base's item by item:

- classifiers: top-1 agreement (the same best label);
- detectors: boxes matched greedily by IoU within the same label, the mean IoU of the
  matches, recall/precision of the variant's boxes against the base's, and count
  agreement (the same number of boxes);
- wake words: decision agreement (the same set of detected wake words per item).

The kind is read from the results (`classes`, `detections`, `event`), so a new task only
needs a function here, registered by the result key it produces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Results = Sequence[Sequence[dict[str, Any]]]
"""Per evaluation item, the result dicts one model produced for it."""

DEFAULT_IOU = 0.5


def top1(results: Sequence[dict[str, Any]]) -> str | None:
    for result in results:
        classes = result.get("classes") or []
        if classes:
            return str(classes[0]["label"])
    return None


def classification_agreement(base: Results, variant: Results) -> dict[str, Any]:
    """Fraction of items whose best label is the same."""
    same = [top1(b) == top1(v) for b, v in zip(base, variant, strict=True)]
    return {
        "kind": "classify",
        "items": len(same),
        "top1_agreement": _fraction(sum(same), len(same)),
        "disagreements": [i for i, s in enumerate(same) if not s][:20],
    }


def iou_matrix(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """IoU of every box in a [N,4] against every box in b [M,4]; boxes are [xmin, ymin, xmax, ymax]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_boxes(
    base: Sequence[dict[str, Any]], variant: Sequence[dict[str, Any]], iou: float = DEFAULT_IOU
) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching: highest IoU first, same label only, IoU >= `iou`.

    Returns (base index, variant index, IoU) for each match.
    """
    if not base or not variant:
        return []
    ious = iou_matrix(np.array([d["box"] for d in base]), np.array([d["box"] for d in variant]))
    labels_b = [d.get("label") for d in base]
    labels_v = [d.get("label") for d in variant]
    same_label = np.array([[lb == lv for lv in labels_v] for lb in labels_b])
    ious = np.where(same_label, ious, -1.0)
    pairs = []
    order = np.argsort(-ious, axis=None, kind="stable")
    used_b: set[int] = set()
    used_v: set[int] = set()
    for flat in order.tolist():
        i, j = divmod(flat, ious.shape[1])
        value = float(ious[i, j])
        if value < iou:
            break
        if i in used_b or j in used_v:
            continue
        used_b.add(i)
        used_v.add(j)
        pairs.append((i, j, value))
    return pairs


def _detections(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for r in results for d in r.get("detections") or []]


def detection_agreement(base: Results, variant: Results, iou: float = DEFAULT_IOU) -> dict[str, Any]:
    """Matched-box IoU, recall/precision against the base, and count agreement over the items."""
    matched = base_boxes = variant_boxes = same_count = 0
    ious: list[float] = []
    disagreements = []
    for k, (b, v) in enumerate(zip(base, variant, strict=True)):
        db, dv = _detections(b), _detections(v)
        pairs = match_boxes(db, dv, iou)
        matched += len(pairs)
        ious.extend(p[2] for p in pairs)
        base_boxes += len(db)
        variant_boxes += len(dv)
        if len(db) == len(dv):
            same_count += 1
        if len(pairs) != len(db) or len(pairs) != len(dv):
            disagreements.append(k)
    items = len(base)
    return {
        "kind": "detect",
        "items": items,
        "iou_threshold": iou,
        "base_boxes": base_boxes,
        "variant_boxes": variant_boxes,
        "matched": matched,
        "recall": _fraction(matched, base_boxes),
        "precision": _fraction(matched, variant_boxes),
        "mean_iou": round(float(np.mean(ious)), 4) if ious else None,
        "count_agreement": _fraction(same_count, items),
        "disagreements": disagreements[:20],
    }


def decisions(results: Sequence[dict[str, Any]]) -> frozenset[str]:
    """The wake words an item triggered."""
    return frozenset(str(r.get("label")) for r in results if r.get("event") == "detected")


def wakeword_agreement(base: Results, variant: Results) -> dict[str, Any]:
    """Fraction of items where both models made the same decisions (detected which words, or none)."""
    same = [decisions(b) == decisions(v) for b, v in zip(base, variant, strict=True)]
    return {
        "kind": "wakeword",
        "items": len(same),
        "decision_agreement": _fraction(sum(same), len(same)),
        "base_detections": sum(len(decisions(b)) for b in base),
        "variant_detections": sum(len(decisions(v)) for v in variant),
        "disagreements": [i for i, s in enumerate(same) if not s][:20],
    }


# Result key -> how agreement is measured for results that carry it.
AGREEMENT: dict[str, Callable[[Results, Results], dict[str, Any]]] = {
    "classes": classification_agreement,
    "detections": detection_agreement,
    "event": wakeword_agreement,
}


def result_kind(base: Results) -> str | None:
    """The first registered key found in the base's results (None: no comparable results)."""
    for results in base:
        for result in results:
            for key in AGREEMENT:
                if key in result:
                    return key
    return None


def agreement(base: Results, variant: Results, kind: str | None = None) -> dict[str, Any] | None:
    """Agreement of `variant` with `base`; None when the results carry nothing comparable.

    Give `kind` (a key of AGREEMENT) for results that may all be empty, such as wake word
    events on audio without the word.
    """
    if len(base) != len(variant):
        raise ValueError(f"{len(base)} base items but {len(variant)} variant items")
    kind = kind or result_kind(base) or result_kind(variant)
    return None if kind is None else AGREEMENT[kind](base, variant)


def _fraction(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def snr_db(signal_power: float, noise_power: float) -> float | None:
    """Signal-to-noise ratio in dB from summed powers; None when the outputs were identical."""
    if noise_power <= 0.0:
        return None
    return round(10.0 * float(np.log10(max(signal_power, 1e-30) / noise_power)), 2)
