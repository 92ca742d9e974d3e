"""Non-maximum suppression, vectorised over the candidates: hard (per class) and MediaPipe's weighted.

Boxes are `[N, 4]` float arrays `[xmin, ymin, xmax, ymax]` in any one unit. Each
pass keeps the best remaining box and compares it with all the others in one
numpy expression, so the Python loop runs once per kept box, not per pair.
`weighted_nms_few` is weighted NMS for a few candidates in plain Python floats:
straight after an invoke that is cheaper than any numpy call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]


def box_areas(boxes: Array) -> Array:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def iou_one_to_many(box: Array, boxes: Array, areas: Array | None = None) -> Array:
    """IoU of one box with each of `boxes` (0 where the union is empty); `areas`: theirs, if known."""
    iw = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    ih = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    np.maximum(iw, 0.0, out=iw)
    np.maximum(ih, 0.0, out=ih)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    if areas is None:
        areas = box_areas(boxes)
    union = area + areas - inter
    # No overlap gives 0 whatever the union; a tiny floor keeps empty boxes from dividing by zero.
    return inter / np.maximum(union, 1e-12)


def nms(boxes: Array, scores: Array, iou_threshold: float, max_results: int, classes: Array | None = None) -> Array:
    """Indices of the boxes kept by greedy NMS, best first.

    With `classes`, boxes of different classes never suppress each other (each
    class is shifted to its own region of the plane, the usual batched trick).
    """
    if boxes.shape[0] == 0:
        return np.empty(0, np.intp)
    if classes is not None:
        span = float(boxes.max() - boxes.min()) + 1.0
        boxes = boxes + (classes.astype(boxes.dtype) * span)[:, None]
    order = np.argsort(-scores, kind="stable")
    areas = box_areas(boxes)
    keep: list[int] = []
    while order.size and len(keep) < max_results:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        order = rest[iou_one_to_many(boxes[best], boxes[rest], areas[rest]) <= iou_threshold]
    return np.asarray(keep, np.intp)


def weighted_nms(boxes: Array, scores: Array, iou_threshold: float, max_results: int) -> tuple[Array, Array]:
    """MediaPipe's weighted NMS: each kept box is the score-weighted mean of the boxes it overlaps.

    Like MediaPipe's NonMaxSuppressionCalculator (overlap type IoU, algorithm
    WEIGHTED): the best remaining box gathers every remaining box whose IoU with
    it exceeds the threshold, itself included; their coordinates are averaged
    with the scores as weights and the best score is kept. Returns (boxes, scores).
    Sums run in the group's order (best first), one term after the other, as MediaPipe's loop adds them.
    """
    groups = weighted_groups(boxes, scores, iou_threshold, max_results)
    if not groups:
        return np.empty((0, 4), boxes.dtype), np.empty(0, scores.dtype)
    return weighted_means(boxes, scores, groups), scores[[g[0] for g in groups]]


def weighted_groups(boxes: Array, scores: Array, iou_threshold: float, max_results: int) -> list[list[int]]:
    """The groups of weighted NMS, best first, each its best box's index first: the kept scores and their
    count are known from these alone, before any box is averaged (`weighted_means`). One IoU pass per kept
    box; a few candidates take `weighted_nms_few` instead (plain Python, no numpy call)."""
    order = (-scores).argsort(kind="stable")
    areas = box_areas(boxes)  # once, not per kept box
    groups: list[list[int]] = []
    while order.size and len(groups) < max_results:
        best = int(order[0])
        overlap = iou_one_to_many(boxes[best], boxes[order], areas[order]) > iou_threshold
        group = order[overlap]
        if group.size == 0:  # a degenerate (empty) box overlaps nothing, not even itself
            group = order[:1]
            overlap[0] = True
        groups.append(group.tolist())
        order = order[~overlap]
    return groups


def weighted_means(boxes: Array, scores: Array, groups: list[list[int]]) -> Array:
    """Each group's score-weighted mean box, all groups in one numpy pass.

    Boxes and scores share one table, so the weighted coordinates and the weights are summed by one
    reduction along axis 0, which numpy runs term after term in the group's order, as MediaPipe's loop adds
    them (a 1-D sum would be pairwise). A row of zeros pads the shorter groups: adding 0 changes no sum."""
    n = boxes.shape[0]
    table = np.empty((n + 1, 5), boxes.dtype)  # xmin, ymin, xmax, ymax, score; then the zero row
    table[:n, :4] = boxes
    table[:n, 4] = scores
    table[n] = 0.0
    width = max(map(len, groups))
    rows = np.array([g + [n] * (width - len(g)) for g in groups], np.intp).T  # [width, groups]
    picked = table[rows]
    picked[..., :4] *= picked[..., 4:]
    sums = _add(picked, axis=0)  # [groups, 5]
    merged = sums[:, :4]
    merged /= sums[:, 4:]
    return merged


def weighted_nms_few(boxes: list[tuple[float, float, float, float]], scores: list[float], iou_threshold: float,
                     max_results: int) -> tuple[list[tuple[float, float, float, float]], list[float]]:
    """`weighted_nms` for a few candidates given as plain Python floats, in plain Python: (boxes, scores).

    Straight after an invoke the caches hold the model, not numpy: each numpy call then costs 2-10 us, and
    the array path makes some forty. A handful of candidates (a few faces) is cheaper in Python floats:
    the same greedy grouping (best first, stable order, IoU > threshold, a degenerate box alone) and each
    group's score-weighted mean summed in the group's order, as MediaPipe's loop adds them, in double
    precision (MediaPipe's float32 agrees to ~1e-7, far below the 5 decimals a result carries)."""
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)  # sorted() is stable
    kept_boxes: list[tuple[float, float, float, float]] = []
    kept_scores: list[float] = []
    # Conditional expressions, not min()/max(): a builtin call is the dearest thing in this loop (half its time).
    while order and len(kept_scores) < max_results:
        best = order[0]
        bx0, by0, bx1, by1 = boxes[best]
        best_area = (bx1 - bx0) * (by1 - by0)
        group: list[int] = []
        rest: list[int] = []
        for j in order:
            x0, y0, x1, y1 = boxes[j]
            iw = (x1 if x1 < bx1 else bx1) - (x0 if x0 > bx0 else bx0)
            ih = (y1 if y1 < by1 else by1) - (y0 if y0 > by0 else by0)
            inter = iw * ih if iw > 0.0 and ih > 0.0 else 0.0
            union = best_area + (x1 - x0) * (y1 - y0) - inter
            if inter / (union if union > 1e-12 else 1e-12) > iou_threshold:
                group.append(j)
            else:
                rest.append(j)
        if not group:  # a degenerate (empty) box overlaps nothing, not even itself: it stands alone
            group, rest = [best], order[1:]
        order = rest
        total = s0 = s1 = s2 = s3 = 0.0
        for j in group:
            w = scores[j]
            x0, y0, x1, y1 = boxes[j]
            total += w
            s0 += x0 * w
            s1 += y0 * w
            s2 += x1 * w
            s3 += y1 * w
        kept_boxes.append((s0 / total, s1 / total, s2 / total, s3 / total))
        kept_scores.append(scores[best])
    return kept_boxes, kept_scores


_add = np.add.reduce  # what ndarray.sum runs, without its Python wrapper
