"""Agreement measures on hand-made results: classes, boxes (greedy IoU matching), wake word events."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agent.compress.agreement import (
    agreement,
    detection_agreement,
    iou_matrix,
    match_boxes,
    result_kind,
    snr_db,
    wakeword_agreement,
)


def box(x0: float, y0: float, x1: float, y1: float, label: str = "face", score: float = 0.9) -> dict[str, Any]:
    return {"label": label, "score": score, "box": [x0, y0, x1, y1]}


def detections(*boxes: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"task": "detect", "detections": list(boxes)}]


def classes(*labels: str) -> list[dict[str, Any]]:
    return [{"task": "classify", "classes": [{"label": label, "score": 0.5} for label in labels]}]


def test_iou_of_known_boxes() -> None:
    a = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]])
    b = np.array([[0.25, 0.0, 0.75, 0.5], [0.6, 0.6, 0.9, 0.9], [0.0, 0.0, 0.5, 0.5]])
    ious = iou_matrix(a, b)
    assert ious.shape == (2, 3)
    assert ious[0, 0] == pytest.approx(0.125 / 0.375)  # half overlaps: 1/3
    assert ious[0, 1] == 0.0 and ious[0, 2] == pytest.approx(1.0)
    assert ious[1, 1] == pytest.approx(0.09) and ious[1, 2] == pytest.approx(0.25)
    assert iou_matrix(np.zeros((0, 4)), b).shape == (0, 3)
    degenerate = iou_matrix(np.array([[0.5, 0.5, 0.5, 0.5]]), np.array([[0.5, 0.5, 0.5, 0.5]]))
    assert degenerate[0, 0] == 0.0  # zero-area boxes: no overlap, no division by zero


def test_greedy_matching_takes_the_best_pair_first() -> None:
    # Base 0 likes variant 0 best (IoU 0.9), but base 1 *is* variant 0 (IoU 1.0): highest IoU
    # first pairs base 1 with variant 0 and leaves variant 1 (IoU 0.7) to base 0, although
    # base 0 comes first.
    base = [box(0.0, 0.0, 1.0, 1.0), box(0.0, 0.0, 0.9, 1.0)]
    variant = [box(0.0, 0.0, 0.9, 1.0), box(0.0, 0.0, 0.7, 1.0)]
    pairs = match_boxes(base, variant, iou=0.5)
    assert [(i, j) for i, j, _ in pairs] == [(1, 0), (0, 1)]
    assert [iou for _, _, iou in pairs] == [pytest.approx(1.0), pytest.approx(0.7)]


def test_matching_needs_the_same_label_and_enough_overlap() -> None:
    base = [box(0.0, 0.0, 0.5, 0.5, label="face"), box(0.5, 0.5, 1.0, 1.0)]
    variant = [box(0.0, 0.0, 0.5, 0.5, label="cat"), box(0.7, 0.5, 1.2, 1.0)]  # IoU 0.15 / 0.35
    assert match_boxes(base, variant, iou=0.5) == []
    pairs = match_boxes(base, variant, iou=0.4)
    assert [(i, j) for i, j, _ in pairs] == [(1, 1)] and pairs[0][2] == pytest.approx(0.15 / 0.35)
    assert match_boxes([], variant) == [] and match_boxes(base, []) == []


def test_detection_agreement_counts_and_ious() -> None:
    base = [
        detections(box(0.1, 0.1, 0.4, 0.4), box(0.6, 0.6, 0.9, 0.9)),
        detections(box(0.2, 0.2, 0.5, 0.5)),
        detections(),
        detections(box(0.0, 0.0, 0.2, 0.2)),
    ]
    variant = [
        detections(box(0.1, 0.1, 0.4, 0.4), box(0.6, 0.6, 0.9, 0.9)),  # the same
        detections(box(0.2, 0.2, 0.5, 0.45)),  # a slightly shorter box: IoU 0.833
        detections(box(0.3, 0.3, 0.6, 0.6)),  # a box the base does not have
        detections(),  # a box missed
    ]
    a = detection_agreement(base, variant)
    assert a["kind"] == "detect" and a["items"] == 4
    assert (a["base_boxes"], a["variant_boxes"], a["matched"]) == (4, 4, 3)
    assert a["recall"] == 0.75 and a["precision"] == 0.75
    assert a["mean_iou"] == pytest.approx((1 + 1 + 0.075 / 0.09) / 3, abs=1e-4)
    assert a["count_agreement"] == 0.5
    assert a["disagreements"] == [2, 3]


def test_detection_agreement_of_nothing_found_anywhere() -> None:
    a = detection_agreement([detections(), detections()], [detections(), detections()])
    assert a["count_agreement"] == 1.0 and a["recall"] is None and a["mean_iou"] is None


def test_classification_top1() -> None:
    base = [classes("red", "green"), classes("blue"), classes("green"), classes()]
    variant = [classes("red", "blue"), classes("green"), classes("green"), classes()]
    a = agreement(base, variant)
    assert a is not None and a["kind"] == "classify"
    assert a["top1_agreement"] == 0.75 and a["disagreements"] == [1]


def test_wakeword_decisions() -> None:
    hit = {"event": "detected", "label": "okay nabu", "score": 0.97}
    other = {"event": "detected", "label": "alexa", "score": 0.9}
    base: list[list[dict[str, Any]]] = [[hit], [], [hit, hit], [], [other]]
    variant: list[list[dict[str, Any]]] = [[hit], [hit], [hit], [], [hit]]
    a = wakeword_agreement(base, variant)
    assert a["decision_agreement"] == 0.6 and a["disagreements"] == [1, 4]
    assert a["base_detections"] == 3 and a["variant_detections"] == 4
    silent: list[list[dict[str, Any]]] = [[], []]
    assert agreement(silent, silent) is None  # nothing says what kind of results these are
    assert agreement(silent, silent, kind="event")["decision_agreement"] == 1.0  # type: ignore[index]


def test_kind_comes_from_the_results() -> None:
    assert result_kind([classes("red")]) == "classes"
    assert result_kind([[], detections()]) == "detections"
    assert result_kind([[{"task": "tensors", "outputs": []}]]) is None
    with pytest.raises(ValueError, match="2 base items but 1 variant"):
        agreement([classes("a"), classes("b")], [classes("a")])


def test_snr() -> None:
    assert snr_db(100.0, 1.0) == 20.0
    assert snr_db(5.0, 0.0) is None  # identical outputs
    assert snr_db(0.0, 1.0) is not None and snr_db(0.0, 1.0) < -100  # type: ignore[operator]
