"""Routing names to sources by their match globs."""

from __future__ import annotations

from dataclasses import replace

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


def test_a_crossed_answer_is_never_taken_for_the_secret_asked():
    """The fetcher checks that what a source answered is what was asked: the name (or the
    ARN it gave, AWS full or partial, Alibaba's), and the version when asked by id."""
    from kms_agent.fetcher import answers
    from tests.conftest import make_record

    rec = make_record("prod/db", "x", version="v2")
    assert answers(("s", "prod/db", None, None), rec)
    assert answers(("s", "prod/db", "v2", None), rec)
    assert not answers(("s", "prod/db", "v1", None), rec)
    assert not answers(("s", "prod/other", None, None), rec)
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-AbCdEf"
    aws = replace(rec, extra={"arn": arn})
    assert answers(("s", arn, None, None), aws)
    assert answers(("s", arn[:-7], None, None), aws)  # partial ARN
    assert not answers(
        ("s", "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/dbx", None, None), aws
    )
    assert answers(("s", "acs:kms:cn-hangzhou:1234:secret/prod/db", None, None), rec)
    assert not answers(("s", "acs:kms:cn-hangzhou:1234:secret/prod/dbx", None, None), rec)


async def test_a_crossed_answer_is_an_upstream_error_and_the_good_value_stays(clock):
    """A source that answers secret A's request with B's value: the caller gets 503-class
    Unavailable (stale A if cached), never B's value as A."""
    from kms_agent.cache import Cache, Outcome
    from kms_agent.config import CacheConfig
    from kms_agent.errors import Unavailable
    from kms_agent.fetcher import Fetcher
    from kms_agent.metrics import Metrics
    from kms_agent.providers import Router
    from tests.conftest import ScriptedProvider

    provider = ScriptedProvider()
    provider.values.update({"a": "value-a", "b": "value-b"})
    crossed = {"on": False}
    real_get = provider.get

    async def get(name, *, version_id=None, version_stage=None):
        asked = "b" if crossed["on"] and name == "a" else name
        return await real_get(asked, version_id=version_id, version_stage=version_stage)

    provider.get = get  # type: ignore[method-assign]
    cache = Cache(
        Fetcher(Router([(("*",), provider)]), Metrics()), CacheConfig(jitter=0, ttl=10), clock=clock
    )
    entry, _ = await cache.load(("scripted", "a", None, None))
    assert entry.record.value.reveal() == b"value-a"
    crossed["on"] = True
    clock.advance(11)
    entry, outcome = await cache.load(("scripted", "a", None, None))
    assert (entry.record.value.reveal(), outcome) == (b"value-a", Outcome.STALE)
    with pytest.raises(Unavailable, match="another secret"):
        await cache.load(("scripted", "a", "v1", None))
