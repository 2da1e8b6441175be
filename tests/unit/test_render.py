"""Rendered bodies: a long value is referenced, never changed, by the bodies it is in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kms_agent import render
from kms_agent.model import SecretRecord, SecretValue

SHAPES = ["raw", "native", "aws", "kms", "vault"]
WHOLE = {"native": render.native, **render.COMPAT}


def record(value: bytes, data_type: str = "text", name: str = "db") -> SecretRecord:
    return SecretRecord(name, SecretValue(value), data_type, "v1", ("ACSCurrent",), 1.5e9, "local")  # type: ignore[arg-type]


@given(
    value=st.text(min_size=0, max_size=400).map(str.encode)
    | st.binary(max_size=400).filter(lambda b: b),
    name=st.sampled_from(["db", "a" * 130, "k" * 200]),
)
def test_a_rendered_body_is_exactly_the_whole_body(value, name):
    """For any value and shape, before + value + after is byte for byte the shape's body."""
    try:
        value.decode()
        data_type = "text"
    except UnicodeDecodeError:
        data_type = "binary"
    rec = record(value, data_type, name)
    for shape in SHAPES:
        got = render.rendered(rec, shape)
        want = value if shape == "raw" else WHOLE[shape](rec)
        assert got.body(value) == want
        assert got.length(value) == len(want)


@pytest.mark.parametrize("shape", ["native", "aws", "kms"])
def test_long_plain_values_are_not_copied_into_their_bodies(shape):
    """A 1 KiB plain value is held once: the body keeps only what surrounds it."""
    value = b"v" * 1024
    got = render.rendered(record(value), shape)
    assert got.after is not None
    assert (
        len(got.before) + len(got.after) + len(value)
        == got.length(value)
        == len(WHOLE[shape](record(value)))
    )
    assert value not in got.before + got.after


def test_a_common_tail_is_held_once_for_all_entries():
    """What follows the value in a shape (``"}`` for native; the stages and date for aws)
    is one object for every entry that has the same."""
    one = render.rendered(record(b"a" * 200, name="one"), "native")
    two = render.rendered(record(b"b" * 300, name="two"), "native")
    assert one.after == two.after == b'"}'
    assert one.after is two.after
    one = render.rendered(record(b"a" * 200, name="one"), "aws")
    two = render.rendered(record(b"b" * 300, name="two"), "aws")
    assert one.after == two.after == b'","VersionStages":["AWSCURRENT"],"CreatedDate":"1500000000"}'
    assert one.after is two.after
