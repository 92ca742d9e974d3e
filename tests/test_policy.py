"""The result policy: score, labels, top-N, report-on-change with heartbeat, rate limit."""

from __future__ import annotations

from typing import Any

from agent.config import PolicySettings
from agent.policy import ResultPolicy


def _classes(*pairs: tuple[str, float]) -> dict[str, Any]:
    return {"task": "classify", "classes": [{"label": label, "score": score} for label, score in pairs]}


def test_filters_score_labels_and_count() -> None:
    policy = ResultPolicy(PolicySettings(labels=("cat", "dog", "fox"), max_results=2, on_change=False,
                                         max_rate=1000), threshold=0.3)
    out = policy.apply(_classes(("car", 0.9), ("cat", 0.5), ("dog", 0.8), ("fox", 0.4), ("cat", 0.1)), now=0.0)
    assert out is not None
    assert out["classes"] == [{"label": "dog", "score": 0.8}, {"label": "cat", "score": 0.5}]


def test_ties_keep_their_order_when_cut_and_when_sorted() -> None:
    policy = ResultPolicy(PolicySettings(max_results=3, on_change=False, max_rate=1000), threshold=0.3)
    result = _classes(("a", 0.5), ("b", 0.9), ("c", 0.5), ("d", 0.5), ("e", 0.2))
    out = policy.apply(result, now=0.0)
    assert out is not None and [c["label"] for c in out["classes"]] == ["b", "a", "c"]
    assert policy.filter(result) == out
    assert [c["label"] for c in result["classes"]] == ["a", "b", "c", "d", "e"]  # the runner's result untouched


def test_detections_filtered_the_same_way() -> None:
    policy = ResultPolicy(PolicySettings(on_change=False, max_rate=1000), threshold=0.5)
    result = {"task": "detect", "detections": [{"label": "face", "score": 0.9, "box": [0, 0, 1, 1]},
                                               {"label": "face", "score": 0.2, "box": [0, 0, 1, 1]}]}
    out = policy.apply(result, now=0.0)
    assert out is not None and len(out["detections"]) == 1
    assert len(result["detections"]) == 2  # the runner's result is not modified


def test_on_change_and_heartbeat() -> None:
    policy = ResultPolicy(PolicySettings(on_change=True, heartbeat_s=10, max_rate=1000), threshold=0.5)
    red, green = _classes(("red", 0.9)), _classes(("green", 0.9))
    assert policy.apply(red, now=0.0) is not None
    assert policy.apply(red, now=1.0) is None  # unchanged
    assert policy.apply(green, now=2.0) is not None  # changed
    assert policy.apply(_classes(("green", 0.95)), now=3.0) is None  # same labels, other score
    assert policy.apply(green, now=12.5) is not None  # heartbeat
    nothing = _classes(("green", 0.1))
    out = policy.apply(nothing, now=13.0)
    assert out is not None and out["classes"] == []  # the thing went away: that is a change too
    assert policy.stats.unchanged == 2 and policy.stats.passed == 4


def test_counts_matter_for_detections() -> None:
    policy = ResultPolicy(PolicySettings(max_rate=1000), threshold=0.5)

    def faces(n: int) -> dict[str, Any]:
        return {"task": "detect", "detections": [{"label": "face", "score": 0.9, "box": [0, 0, 1, 1]}] * n}

    assert policy.apply(faces(1), now=0) is not None
    assert policy.apply(faces(1), now=1) is None
    assert policy.apply(faces(2), now=2) is not None


def test_rate_limit_keeps_the_change_for_later() -> None:
    policy = ResultPolicy(PolicySettings(on_change=True, max_rate=1.0), threshold=0.5)
    assert policy.apply(_classes(("red", 0.9)), now=0.0) is not None
    assert policy.apply(_classes(("blue", 0.9)), now=0.5) is None  # too soon
    assert policy.stats.rate_limited == 1
    assert policy.apply(_classes(("blue", 0.9)), now=1.1) is not None  # still a change, now allowed


def test_events_always_count_as_news() -> None:
    policy = ResultPolicy(PolicySettings(on_change=True, max_rate=1000), threshold=0.6)
    event = {"task": "wakeword", "event": "detected", "label": "alexa", "score": 0.9}
    assert policy.apply(event, now=0) is not None
    assert policy.apply(event, now=1) is not None
    assert policy.apply({**event, "score": 0.3}, now=2) is None
    only = ResultPolicy(PolicySettings(labels=("hey_jarvis",), max_rate=1000), threshold=0.6)
    assert only.apply(event, now=0) is None and only.apply({**event, "label": "hey_jarvis"}, now=1) is not None


def test_reconfigure_carries_the_last_state() -> None:
    old = ResultPolicy(PolicySettings(max_rate=1000), threshold=0.5)
    assert old.apply(_classes(("red", 0.9)), now=0) is not None
    new = ResultPolicy(PolicySettings(max_rate=1000, max_results=1), threshold=0.6).carry_over(old)
    assert new.apply(_classes(("red", 0.9)), now=1) is None


def test_holds_back_decides_as_apply_would() -> None:
    # A runner asks `holds_back` with the labels and scores before building a result, and calls `apply` only
    # when it says no: the results that go out and the counts must be those of `apply` on every result.
    import random

    rng = random.Random(3)
    for settings, threshold in ((PolicySettings(max_rate=1000), 0.5),
                                (PolicySettings(on_change=True, heartbeat_s=5, max_rate=2.0), 0.3),
                                (PolicySettings(labels=("cat", "dog"), max_results=2, max_rate=1000), 0.4),
                                (PolicySettings(on_change=False, max_rate=3.0, max_results=1), 0.0),
                                (PolicySettings(max_results=1, max_rate=1000), 0.0)):
        every, gated = ResultPolicy(settings, threshold), ResultPolicy(settings, threshold)
        for step in range(400):
            entries = [(rng.choice(("cat", "dog", "fox")), round(rng.random(), 6)) for _ in range(rng.randrange(6))]
            result = {"task": "detect", "detections": [{"label": label, "score": score, "box": [0, 0, 1, 1]}
                                                       for label, score in entries]}
            now = step * 0.25
            want = every.apply(result, now)
            held = gated.holds_back([e[0] for e in entries], [e[1] for e in entries], now)
            assert held == (want is None), (step, entries)
            if not held:
                assert gated.apply(result, now) == want
        assert gated.stats == every.stats
        assert every.stats.passed and (every.stats.unchanged or every.stats.rate_limited)
