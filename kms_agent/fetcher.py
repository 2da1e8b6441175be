"""The cache's fetch: a cache key to the source that serves it, timed and counted."""

from __future__ import annotations

import time

from kms_agent.cache import Key
from kms_agent.errors import AgentError, Unavailable
from kms_agent.grammar import source_and_role
from kms_agent.metrics import Metrics
from kms_agent.model import SecretRecord
from kms_agent.providers import Router


class Fetcher:
    """Owns routing for the cache: ``await fetcher(key)`` reads one version upstream."""

    def __init__(self, router: Router, metrics: Metrics) -> None:
        self.router = router
        self.metrics = metrics

    async def __call__(self, key: Key) -> SecretRecord:
        part, name, version_id, version_stage = key
        source, role = source_and_role(part)
        provider = self.router.providers[source]
        metrics = self.metrics
        start = time.perf_counter()
        outcome = "success"
        try:
            if role is None:
                record = await provider.get(
                    name, version_id=version_id, version_stage=version_stage
                )
            else:
                record = await provider.get_as(
                    role, name, version_id=version_id, version_stage=version_stage
                )
            if not answers(key, record):
                raise Unavailable(
                    f"source {source!r} answered with another secret or version than the one "
                    "asked for; the answer was not used",
                    hint="something between the agent and the store crossed answers",
                )
        except AgentError as exc:
            outcome = exc.code
            raise
        finally:
            metrics.upstream_requests.labels(source, "get", outcome).inc()
            metrics.upstream_duration.labels(source, "get").observe(time.perf_counter() - start)
        return record


def answers(key: Key, record: SecretRecord) -> bool:
    """Whether ``record`` is the secret (and version) ``key`` asked for: by name, by the
    store's ARN for names that are ARNs (AWS full or partial, Alibaba's), and by version id
    when one was asked for. A crossed answer is never cached or served as another secret."""
    _, name, version_id, _ = key
    if version_id is not None and record.version_id != version_id:
        return False
    if record.name == name:
        return True
    arn = record.extra.get("arn", "")
    if arn and (arn == name or arn.startswith(name + "-")):
        return True  # an AWS ARN, full or partial (without the random suffix)
    return name.startswith("acs:kms:") and name.endswith(":secret/" + record.name)
