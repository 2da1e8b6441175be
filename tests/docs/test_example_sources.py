"""config.example.toml shows every setting each provider takes, and only those: the
options dataclasses (kms_agent.providers.options) are the one list, and this keeps the
example in step with them, defaults included where the example states one."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from kms_agent.providers.options import PROVIDERS

EXAMPLE = (Path(__file__).parents[2] / "config.example.toml").read_text()
#: Keys of every [[sources]] table, not of one provider.
COMMON = {"name", "provider", "match"}


def example_keys() -> dict[str, dict[str, str]]:
    """Per provider, the ``# key = value`` lines of its [[sources]] examples (before its
    [sources.credentials] part)."""
    out: dict[str, dict[str, str]] = {}
    for block in re.split(r"^# \[\[sources\]\]\n", EXAMPLE, flags=re.MULTILINE)[1:]:
        provider = re.search(r'^# provider = "(\w+)"', block, re.MULTILINE)
        assert provider, block[:80]
        own = block.split("# [sources.credentials]")[0]
        lines = re.findall(r"^# (\w+) = (.*?)(?:[ \t]+#.*)?$", own, re.MULTILINE)
        out.setdefault(provider.group(1), {}).update(lines)
    return out


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_example_shows_each_option_of_the_provider(provider: str) -> None:
    """Each field of the provider's options class has a line in its example, and the
    example names no setting the provider does not take."""
    fields = {f.name for f in dataclasses.fields(PROVIDERS[provider])} - {"credentials"}
    shown = set(example_keys().get(provider, {})) - COMMON
    assert sorted(fields - shown) == [], f"{provider}: not in config.example.toml"
    assert sorted(shown - fields) == [], f"{provider}: not a setting of the provider"


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_example_defaults_are_the_defaults(provider: str) -> None:
    """Where the example shows a plain value for a setting with a plain default (a
    number, a boolean, a non-empty string), it is that default."""
    shown = example_keys()[provider]
    for f in dataclasses.fields(PROVIDERS[provider]):
        default = f.default
        if f.name not in shown or default is dataclasses.MISSING or default in (None, ""):
            continue
        if not isinstance(default, str | int | float | bool):
            continue
        value = tomllib.loads(f"x = {shown[f.name]}")["x"]
        assert value == default, f"{provider}.{f.name}: example {value!r}, default {default!r}"
