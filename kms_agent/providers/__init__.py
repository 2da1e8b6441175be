"""Sources of secrets. One module per backend, each exporting ``Provider``.

A provider reads one store. It maps everything the store can answer onto the error
vocabulary of :mod:`kms_agent.errors` and returns :class:`~kms_agent.model.SecretRecord`.
It never writes upstream.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kms_agent.credentials import Refreshing
from kms_agent.errors import BadRequest, RoleNotAllowed
from kms_agent.model import NameRule, SecretMetadata, SecretRecord, Stages
from kms_agent.upstream import UpstreamStats

if TYPE_CHECKING:  # kms_agent.config imports this package (for providers.options)
    from kms_agent.config import Config, SourceConfig

#: A predicate over secret names: which cached names a change upstream touched.
Changed = Callable[[str], bool]


@runtime_checkable
class Provider(Protocol):
    """What every source implements."""

    #: The source's configured name: the cache key's first part and the metrics label.
    name: str
    #: Which names the store accepts (checked before anything is keyed).
    name_rule: NameRule
    #: How the store spells the current and previous stages.
    stages: Stages
    #: Roles a caller may ask the agent to read as (the AWS agent's ``roleArn``); empty:
    #: none, the request is refused.
    assume_roles: frozenset[str]
    #: Counters the metrics collector reads at scrape time.
    stats: UpstreamStats

    @property
    def credentials(self) -> Refreshing | None:
        """The credentials the source holds (None: it needs none, like the local store).
        Read-only here, so a cloud source may declare them never None."""

    @property
    def sensitive_files(self) -> Sequence[tuple[str, Path, int]]:
        """Files whose mode is checked at start and reload: (kind, path, the most allowed)."""

    def credentials_expiry(self) -> float | None:
        """When the current temporary credentials expire (epoch seconds), if they do."""

    async def open(self) -> None:
        """Prepare sessions and credentials. Called once before the first request."""

    async def get(
        self, name: str, *, version_id: str | None = None, version_stage: str | None = None
    ) -> SecretRecord:
        """One version: by id, by stage, or the current one when neither is given."""

    async def get_as(
        self,
        role_arn: str,
        name: str,
        *,
        version_id: str | None = None,
        version_stage: str | None = None,
    ) -> SecretRecord:
        """:meth:`get` with the credentials of ``role_arn`` (one of :attr:`assume_roles`)."""

    async def describe(self, name: str) -> SecretMetadata:
        """Everything but the value."""

    async def list_names(self, prefix: str) -> list[str]:
        """Names that start with ``prefix``, as far as the identity may list them."""

    async def check(self) -> None:
        """Prove the source is usable (credentials, reachability); raise an AgentError if not."""

    def changes(self) -> AsyncIterator[Changed] | None:
        """An iterator of change notifications, for stores that can push them; else None."""

    async def close(self) -> None:
        """Release sessions. Idempotent."""


def create(
    source: SourceConfig, config: Config, environ: Mapping[str, str] | None = None
) -> Provider:
    """Instantiate the provider module named by ``source.provider``."""
    module = importlib.import_module(f"kms_agent.providers.{source.provider}")
    provider: Provider = module.Provider(source, config, environ)
    return provider


class ProviderBase:
    """What a provider has unless it says otherwise: no roles to read as (requests for one
    are refused), no credentials, no sensitive files, counters of its own."""

    assume_roles: frozenset[str] = frozenset()
    credentials: Refreshing | None = None
    sensitive_files: Sequence[tuple[str, Path, int]] = ()
    name: str

    def __init__(self) -> None:
        self.stats = UpstreamStats()

    def credentials_expiry(self) -> float | None:
        return self.credentials.expiration if self.credentials is not None else None

    async def get_as(
        self,
        role_arn: str,
        name: str,
        *,
        version_id: str | None = None,
        version_stage: str | None = None,
    ) -> SecretRecord:
        raise RoleNotAllowed(f"source {self.name!r} reads with its own identity only")


class Router:
    """First source whose ``match`` globs accept the name wins."""

    #: Names whose route is remembered (routing is glob matching: too slow per request).
    MEMO_SIZE = 10_000

    def __init__(self, sources: list[tuple[tuple[str, ...], Provider]]) -> None:
        self._sources = sources
        self.providers = {provider.name: provider for _, provider in sources}
        self._memo: dict[str, Provider] = {}
        #: The first source, when it takes every name (the usual case): no glob, no memo,
        #: so a cache of many secrets holds no second copy of their names here.
        self._all = sources[0][1] if sources and "*" in sources[0][0] else None

    def route(self, name: str) -> Provider:
        if self._all is not None:
            return self._all
        provider = self._memo.get(name)
        if provider is None:
            provider = self._route(name)
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            self._memo[name] = provider
        return provider

    def _route(self, name: str) -> Provider:
        for globs, provider in self._sources:
            for glob in globs:
                if fnmatchcase(name, glob):
                    return provider
        raise BadRequest(
            f"no source serves the name {name!r}",
            hint="add a [[sources]] entry whose match globs accept it, "
            'or a catch-all match = ["*"]',
        )

    def route_prefix(self, prefix: str) -> list[Provider]:
        """Sources that may hold names starting with ``prefix`` (for listing)."""
        out: list[Provider] = []
        for globs, provider in self._sources:
            if provider in out:
                continue
            if any(_glob_may_match_prefix(glob, prefix) for glob in globs):
                out.append(provider)
        return out


def _glob_may_match_prefix(glob: str, prefix: str) -> bool:
    """Whether some name starting with ``prefix`` can match ``glob`` (conservative)."""
    literal = glob
    for i, ch in enumerate(glob):
        if ch in "*?[":
            literal = glob[:i]
            break
    else:
        return glob.startswith(prefix)
    n = min(len(literal), len(prefix))
    return literal[:n] == prefix[:n]
