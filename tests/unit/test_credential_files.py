"""The two readers every credential source shares: :func:`read_secret_file` (token and
credentials files) and :func:`parse_time` (the expirations the clouds send)."""

from __future__ import annotations

import calendar

import pytest

from kms_agent.credentials import parse_time, read_secret_file
from kms_agent.errors import BadCredentials
from tests.conftest import PLANTED

#: 2024-05-01 12:00:00 UTC, computed without datetime.
NOON = float(calendar.timegm((2024, 5, 1, 12, 0, 0, 0, 0, 0)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", NOON),  # Alibaba STS and ECS metadata, AWS STS and IMDS
        ("2024-05-01T12:00:00.000000Z", NOON),  # Huawei ECS metadata
        ("2024-05-01T12:00:00.5Z", NOON + 0.5),
        ("2024-05-01T12:00:00+00:00", NOON),
        ("2024-05-01T20:00:00+08:00", NOON),
        ("2024-05-01T07:00:00-05:00", NOON),
    ],
    ids=["z", "huawei-micro", "fraction", "utc-offset", "east", "west"],
)
def test_parse_time_reads_the_clouds_expirations(text, expected):
    """ISO 8601 with Z or a UTC offset, whole or fractional seconds, is the instant meant."""
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    "junk",
    [
        "2024-05-01T12:00:00",  # no zone: local time would be a guess
        "2024-05-01",
        "tomorrow",
        f"{PLANTED}-2024",
        "",
        None,
        1714564800,
    ],
    ids=["naive", "date-only", "word", "planted", "empty", "none", "number"],
)
def test_parse_time_refuses_anything_else_without_quoting_it(junk):
    """A time without a zone, a date, a word or a non-string is BadCredentials saying
    what was wrong and whose it was, and never quoting the text."""
    with pytest.raises(BadCredentials) as caught:
        parse_time(junk, "imds credentials")
    message = caught.value.message
    assert message == (
        "the expiration of the imds credentials is not an ISO 8601 time with Z or a UTC offset"
    )
    assert PLANTED not in message


def test_read_secret_file_strips_and_rereads(tmp_path):
    """Surrounding whitespace (a trailing newline) is not part of the value, and each call
    reads the file as it is now (a rotated token is seen at once)."""
    path = tmp_path / "token"
    path.write_text(f"\n  {PLANTED}-one \n", encoding="utf-8")
    assert read_secret_file(path) == f"{PLANTED}-one"
    path.write_text(f"{PLANTED}-two\n", encoding="utf-8")
    assert read_secret_file(str(path)) == f"{PLANTED}-two"


def test_a_missing_file_names_what_and_where(tmp_path):
    """A missing file is BadCredentials naming what the file is, its path and the error's
    type, with the caller's hint."""
    path = tmp_path / "absent"
    with pytest.raises(BadCredentials) as caught:
        read_secret_file(path, "RRSA token file", hint="is the volume mounted?")
    assert caught.value.message == f"RRSA token file {path} cannot be read (FileNotFoundError)"
    assert caught.value.hint == "is the volume mounted?"


def test_a_directory_is_refused_by_its_error_type(tmp_path):
    """A directory where a file should be is named by its error type."""
    with pytest.raises(BadCredentials, match=r"cannot be read \(IsADirectoryError\)"):
        read_secret_file(tmp_path)


def test_a_file_that_is_not_utf8_is_refused_without_its_bytes(tmp_path):
    """A file that is not UTF-8 is refused as such; the message carries neither the
    decodable content nor the offending byte (UnicodeDecodeError's own text would), and
    no chained exception does."""
    path = tmp_path / "token"
    path.write_bytes(PLANTED.encode() + b"\xff\xfe-rest")
    with pytest.raises(BadCredentials) as caught:
        read_secret_file(path, "token file")
    message = caught.value.message
    assert message == f"token file {path} cannot be read (not UTF-8 text)"
    assert PLANTED not in message
    assert "0xff" not in message
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None  # no chained error to print the bytes either
