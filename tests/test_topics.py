"""Topic segments every broker keeps as one level (DESIGN §5): names with dots encoded, the rest unchanged."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.mqtt.topics import FleetTopics, Topics, segment, unsegment
from agent.names import encode_name
from agent.version import parse_version

NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)


def test_names_without_dots_keep_their_topics() -> None:
    """Backward compatible: every topic of a dot-free fleet is what it was."""
    t = Topics("lepton", "Cam-1_a")
    assert t.status == "lepton/Cam-1_a/status" and t.results("front_door") == "lepton/Cam-1_a/results/front_door"
    assert t.group_cmd("porch") == "lepton/group/porch/cmd"
    assert FleetTopics().manifest("colors", parse_version("3")) == "lepton/models/colors/3/manifest"
    assert Topics("lepton", "+").results("#") == "lepton/+/results/#"


def test_dots_become_the_home_assistant_id() -> None:
    assert FleetTopics().chunk("colors", parse_version("2.0.1"), 0) == "lepton/models/colors/x--2-2e0-2e1/chunk/0"
    assert Topics("lepton", "cam.a").reply == f"lepton/{encode_name('cam.a')}/reply" == "lepton/x--cam-2ea/reply"
    assert FleetTopics().cmd("group:floor.1") == "lepton/group/x--floor-2e1/cmd"
    assert FleetTopics().device_of("lepton/x--cam-2ea/deploy") == "cam.a"
    assert FleetTopics().device_of("other/cam/deploy") is None


@given(NAMES, NAMES)
def test_segment_is_injective_and_reversible(a: str, b: str) -> None:
    assert "." not in segment(a) and "/" not in segment(a)
    assert unsegment(segment(a)) == a
    assert (segment(a) == segment(b)) == (a == b)


def test_a_name_that_looks_encoded_is_encoded_too() -> None:
    assert segment("x--cam-2ea") != segment("cam.a")
    assert unsegment(segment("x--cam-2ea")) == "x--cam-2ea"
