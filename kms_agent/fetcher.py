"""The cache's fetch: a cache key to the source that serves it, timed and counted."""

from __future__ import annotations

import time

from kms_agent.cache import Key
from kms_agent.errors import AgentError
from kms_agent.metrics import Metrics
from kms_agent.model import SecretRecord
from kms_agent.providers import Router


class Fetcher:
    """Owns routing for the cache: ``await fetcher(key)`` reads one version upstream."""

    def __init__(self, router: Router, metrics: Metrics) -> None:
        self.router = router
        self.metrics = metrics

    async def __call__(self, key: Key) -> SecretRecord:
        source, name, version_id, version_stage = key
        provider = self.router.providers[source]
        metrics = self.metrics
        start = time.perf_counter()
        outcome = "success"
        try:
            return await provider.get(name, version_id=version_id, version_stage=version_stage)
        except AgentError as exc:
            outcome = exc.code
            raise
        finally:
            metrics.upstream_requests.labels(source, "get", outcome).inc()
            metrics.upstream_duration.labels(source, "get").observe(time.perf_counter() - start)
