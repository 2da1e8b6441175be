"""Routing names to sources by their match globs."""

from __future__ import annotations

import pytest

from kms_agent.errors import BadRequest
from kms_agent.providers import Router
from tests.conftest import ScriptedProvider


def provider(name: str) -> ScriptedProvider:
    return ScriptedProvider(name=name)


def test_first_matching_source_wins_and_unmatched_names_are_refused():
    aliyun, huawei, aws = provider("alibaba"), provider("huawei"), provider("aws")
    router = Router([(("aigw!*", "rds!*"), aliyun), (("csms/*",), huawei), (("prod/*",), aws)])
    for _ in range(2):  # the remembered route answers as the globs did
        assert router.route("rds!db") is aliyun
        assert router.route("csms/default") is huawei
        assert router.route("prod/db") is aws
    with pytest.raises(BadRequest, match="no source serves"):
        router.route("other")


def test_a_catch_all_first_source_takes_every_name_and_remembers_none():
    local, aws = provider("local"), provider("aws")
    router = Router([(("*",), local), (("prod/*",), aws)])
    assert router.route("prod/db") is local
    assert router.route("anything") is local
    assert router._memo == {}
    later = Router([(("prod/*",), aws), (("*",), local)])  # a catch-all after others
    assert later.route("prod/db") is aws
    assert later.route("anything") is local
