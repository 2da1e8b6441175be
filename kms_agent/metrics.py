"""Prometheus metrics: one registry per agent, bounded labels only (never a secret name).

Label children are resolved once and kept in dicts, so the request path does a dict lookup
and an increment. Cache size is read at scrape time by a collector, not on the hot path.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kms_agent import __version__

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
CACHE_OUTCOMES = ("hit", "miss", "stale", "coalesced", "refresh_forced")
EVICTION_REASONS = ("capacity", "bytes", "expired", "revoked", "invalidated")
AUTH_FAILURE_REASONS = ("missing_token", "invalid_token", "forwarded")


class _CacheCollector(Collector):
    def __init__(self, size: Callable[[], tuple[int, int]]) -> None:
        self._size = size

    def collect(self) -> Iterable[Metric]:
        entries, nbytes = self._size()
        yield GaugeMetricFamily("kms_agent_cache_entries", "Secrets held in the cache.", entries)
        yield GaugeMetricFamily(
            "kms_agent_cache_bytes", "Estimated bytes held by the cache.", nbytes
        )


class _SourceCollector(Collector):
    def __init__(self, providers: Mapping[str, object]) -> None:
        self._providers = providers

    def collect(self) -> Iterable[Metric]:
        throttled = CounterMetricFamily(
            "kms_agent_upstream_throttled", "Throttling answers received from a source.",
            labels=["source"],
        )  # fmt: skip
        limited = CounterMetricFamily(
            "kms_agent_upstream_rate_limited",
            "Calls held back by the agent's own limiter to stay under a source's quota.",
            labels=["source"],
        )  # fmt: skip
        expiry = GaugeMetricFamily(
            "kms_agent_credentials_expiry_timestamp_seconds",
            "When a source's current temporary credentials expire (Unix time).",
            labels=["source"],
        )  # fmt: skip
        for name, provider in self._providers.items():
            stats = getattr(provider, "stats", None)
            throttled.add_metric([name], getattr(stats, "throttled", 0))
            limited.add_metric([name], getattr(stats, "rate_limited", 0))
            expires = getattr(provider, "credentials_expiry", None)
            when = expires() if callable(expires) else None
            if when is not None:
                expiry.add_metric([name], when)
        yield throttled
        yield limited
        yield expiry


class Metrics:
    """Every metric of one agent, registered on its own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kms_agent_requests", "Requests answered, by route template and status code.",
            ["route", "code"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "kms_agent_request_duration_seconds", "Time to answer a request, by route template.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.cache_requests = Counter(
            "kms_agent_cache_requests", "Secret reads by how the cache served them.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.cache_evictions = Counter(
            "kms_agent_cache_evictions", "Entries removed from the cache, by reason.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.cache_refreshes = Counter(
            "kms_agent_cache_refreshes", "Background refresh-ahead fetches, by result.",
            ["result"], registry=r,
        )  # fmt: skip
        self.upstream_requests = Counter(
            "kms_agent_upstream_requests",
            "Calls to a source, by operation and outcome (success or the error code).",
            ["source", "operation", "outcome"], registry=r,
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "kms_agent_upstream_duration_seconds", "Time a source took to answer.",
            ["source", "operation"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.auth_failures = Counter(
            "kms_agent_auth_failures", "Requests refused before reaching a secret, by reason.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.config_reloads = Counter(
            "kms_agent_config_reloads", "Configuration reloads, by result.",
            ["result"], registry=r,
        )  # fmt: skip
        self.file_warnings = Counter(
            "kms_agent_file_permission_warnings",
            "Token, key or credentials files found readable beyond what they should be.",
            ["kind"], registry=r,
        )  # fmt: skip
        self.ready = Gauge("kms_agent_ready", "1 when the agent reports ready, else 0.", registry=r)
        build = Gauge(
            "kms_agent_build_info", "Version of kms-agent and of Python.",
            ["version", "python"], registry=r,
        )  # fmt: skip
        build.labels(__version__, platform.python_version()).set(1)

        # Children resolved once: the request path only looks them up.
        self._cache_children = {o: self.cache_requests.labels(o) for o in CACHE_OUTCOMES}
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        for outcome in CACHE_OUTCOMES:
            self._cache_children[outcome].inc(0)
        for reason in EVICTION_REASONS:
            self.cache_evictions.labels(reason)
        for result in ("success", "error"):
            self.cache_refreshes.labels(result)
            self.config_reloads.labels(result)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)

    def track_sources(self, providers: Mapping[str, object]) -> None:
        """Per-source counters the providers keep, read at scrape time."""
        self.registry.register(_SourceCollector(providers))

    def track_cache(self, size: Callable[[], tuple[int, int]]) -> None:
        self.registry.register(_CacheCollector(size))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        children = self._request_children.get((route, status))
        if children is None:
            children = (
                self.requests.labels(route, str(status)),
                self.request_duration.labels(route),
            )
            self._request_children[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def cache_outcome(self, outcome: str) -> None:
        self._cache_children[outcome].inc()

    def eviction(self, reason: str, count: int) -> None:
        self.cache_evictions.labels(reason).inc(count)

    def refresh(self, result: str) -> None:
        self.cache_refreshes.labels(result).inc()
