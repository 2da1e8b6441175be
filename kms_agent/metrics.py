"""Prometheus metrics: one registry per agent, bounded labels only (never a secret name).

Label children are resolved once and kept in dicts, so the request path does a dict lookup
and an increment. Cache size is read at scrape time by a collector, not on the hot path.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kms_agent import __version__

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
CACHE_OUTCOMES = ("hit", "miss", "stale", "coalesced", "refresh_forced", "refresh_coalesced")
EVICTION_REASONS = ("capacity", "bytes", "expired", "revoked", "invalidated")
AUTH_FAILURE_REASONS = ("missing_token", "invalid_token", "forwarded")
POLICY_DENIAL_REASONS = ("explicit_deny", "no_allow")
#: Why a connection was closed or refused by the agent (``kms_agent_connections_closed``).
CLOSE_REASONS = ("limit", "evicted", "head_timeout", "idle", "bad_request", "upgrade")

if TYPE_CHECKING:
    from kms_agent.providers import Provider


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
    def __init__(self, providers: Mapping[str, Provider]) -> None:
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
        answered = CounterMetricFamily(
            "kms_agent_upstream_answers",
            "Calls a source answered, by the endpoint (host) that answered (failover).",
            labels=["source", "endpoint"],
        )
        for name, provider in self._providers.items():
            stats = provider.stats
            throttled.add_metric([name], stats.throttled)
            limited.add_metric([name], stats.rate_limited)
            for host, count in stats.answered_by.items():
                answered.add_metric([name, host], count)
            when = provider.credentials_expiry()
            if when is not None:
                expiry.add_metric([name], when)
        yield throttled
        yield limited
        yield expiry
        yield answered


class _HotPathCollector(Collector):
    """Per-request counters kept as plain ints by the event-loop thread (no locks on the
    hot path), turned into metric families at scrape time, which runs on the same loop."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.durations: dict[str, list[Any]] = {}  # route -> [bucket counts, sum]
        self.cache: dict[str, int] = dict.fromkeys(CACHE_OUTCOMES, 0)

    def hit(self, route: str, seconds: float) -> None:
        """A 200 answered from the cache: :meth:`observe` and the hit count in one call."""
        key = (route, 200)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        hist = self.durations.get(route)
        if hist is None:
            hist = self.durations[route] = [[0] * (len(_LATENCY_BUCKETS) + 1), 0.0]
        hist[0][bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        hist[1] += seconds
        self.cache["hit"] += 1

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.durations.get(route)
        if hist is None:
            hist = self.durations[route] = [[0] * (len(_LATENCY_BUCKETS) + 1), 0.0]
        hist[0][bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        hist[1] += seconds

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "kms_agent_requests", "Requests answered, by route template and status code.",
            labels=["route", "code"],
        )  # fmt: skip
        for (route, status), count in sorted(self.requests.items()):
            requests.add_metric([route, str(status)], count)
        yield requests
        durations = HistogramMetricFamily(
            "kms_agent_request_duration_seconds", "Time to answer a request, by route template.",
            labels=["route"],
        )  # fmt: skip
        for route, (counts, total) in sorted(self.durations.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*_LATENCY_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(
                    ("+Inf" if bound == float("inf") else repr(float(bound)), cumulative)
                )
            durations.add_metric([route], buckets, total)
        yield durations
        cache = CounterMetricFamily(
            "kms_agent_cache_requests", "Secret reads by how the cache served them.",
            labels=["outcome"],
        )  # fmt: skip
        for outcome, count in self.cache.items():
            cache.add_metric([outcome], count)
        yield cache


class Metrics:
    """Every metric of one agent, registered on its own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._hot = _HotPathCollector()
        r.register(self._hot)
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
        self.policy_denials = Counter(
            "kms_agent_policy_denials", "Requests a policy refused, by reason "
            "(explicit_deny: a Deny matched; no_allow: no Allow did).",
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
        self.connections_closed = Counter(
            "kms_agent_connections_closed",
            "Connections the agent refused or closed itself, by reason.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.log_lines_suppressed = Counter(
            "kms_agent_access_lines_suppressed",
            "Access lines of refused requests not written one by one (summarised instead).",
            registry=r,
        )  # fmt: skip
        build = Gauge(
            "kms_agent_build_info", "Version of kms-agent and of Python.",
            ["version", "python"], registry=r,
        )  # fmt: skip
        build.labels(__version__, platform.python_version()).set(1)

        for reason in EVICTION_REASONS:
            self.cache_evictions.labels(reason)
        for result in ("success", "error"):
            self.cache_refreshes.labels(result)
            self.config_reloads.labels(result)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        for reason in POLICY_DENIAL_REASONS:
            self.policy_denials.labels(reason)
        for reason in CLOSE_REASONS:
            self.connections_closed.labels(reason)

    def track_sources(self, providers: Mapping[str, Provider]) -> None:
        """Per-source counters the providers keep, read at scrape time."""
        self.registry.register(_SourceCollector(providers))

    def track_cache(self, size: Callable[[], tuple[int, int]]) -> None:
        self.registry.register(_CacheCollector(size))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._hot.observe(route, status, seconds)

    def observe_hit(self, route: str, seconds: float) -> None:
        self._hot.hit(route, seconds)

    def cache_outcome(self, outcome: str) -> None:
        self._hot.cache[outcome] += 1

    def eviction(self, reason: str, count: int) -> None:
        self.cache_evictions.labels(reason).inc(count)

    def refresh(self, result: str) -> None:
        self.cache_refreshes.labels(result).inc()
