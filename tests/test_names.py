"""The name encoding shared by Home Assistant ids and (later) topic segments: injective, narrow alphabet."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.names import decode_name, encode_name

CONFIG_NAMES = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
ANY_TEXT = st.text(max_size=40)


@given(CONFIG_NAMES, CONFIG_NAMES)
def test_distinct_config_names_get_distinct_ids(a: str, b: str) -> None:
    assert (encode_name(a) == encode_name(b)) == (a == b)


@given(ANY_TEXT)
def test_the_encoding_is_inverted_and_narrow(name: str) -> None:
    encoded = encode_name(name)
    assert re.fullmatch(r"[a-z0-9_-]*", encoded)
    assert decode_name(encoded) == name  # an inverse exists: no two names share an id


@given(st.from_regex(r"\A[a-z0-9_-]*\Z"))
def test_plain_names_keep_their_ids(name: str) -> None:
    # Ids of ordinary names do not change (Home Assistant would see new entities); only the x-- ones do.
    assert (encode_name(name) == name) == (not name.startswith("x--"))


@pytest.mark.parametrize(("a", "b"), [("cam.a", "cam_a"), ("a.b", "a_b"), ("Cam", "cam"), ("x--cam-2ea", "cam.a")])
def test_the_collisions_of_issue_18(a: str, b: str) -> None:
    assert encode_name(a) != encode_name(b)


def test_examples() -> None:
    assert encode_name("d-tel") == "d-tel" and encode_name("cam_a") == "cam_a"
    assert encode_name("cam.a") == "x--cam-2ea" and encode_name("Cam") == "x---43am"


@pytest.mark.parametrize("bad", ["Cam", "x--a-zz", "x--a-2", "x--A", "x---ff"])
def test_decode_refuses_what_encode_never_makes(bad: str) -> None:
    with pytest.raises(ValueError, match="not an encoded name"):
        decode_name(bad)
