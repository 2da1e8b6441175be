"""The ``local`` provider: the embedded encrypted store, watched for changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import structlog
import watchfiles

from kms_agent.config import Config, SourceConfig
from kms_agent.model import ALIBABA_STAGES, LOCAL_NAMES, SecretMetadata, SecretRecord
from kms_agent.providers import Changed, ProviderBase
from kms_agent.providers.options import LocalOptions
from kms_agent.store import LocalStore, secret_file_stem

log = structlog.get_logger("kms_agent.providers.local")


class Provider(ProviderBase):
    name_rule = LOCAL_NAMES
    stages = ALIBABA_STAGES
    """Serves one store directory: the agent's data dir, or ``path`` in the source table."""

    def __init__(
        self, source: SourceConfig, config: Config, environ: Mapping[str, str] | None = None
    ) -> None:
        super().__init__()
        opts = LocalOptions.of(source.options)
        path = opts.directory(config.data_dir, f"sources.{source.name}")
        self.name = source.name
        self.store = LocalStore(Path(path), source=source.name)
        #: (kind, path, widest allowed mode): checked and warned about by the agent.
        self.sensitive_files = [("store_key", self.store.key_path, 0o600)]

    def __repr__(self) -> str:
        return f"local.Provider({self.name!r}, {str(self.store.root)!r})"

    async def open(self) -> None:
        info = await asyncio.to_thread(self.store.init)
        # Secret files others may write, or cannot be read, are logged now, not at first use.
        await asyncio.to_thread(self.store.check_files)
        log.info(
            "local_store_opened", source=self.name, path=str(self.store.root), key_id=info.key_id
        )

    async def get(
        self, name: str, *, version_id: str | None = None, version_stage: str | None = None
    ) -> SecretRecord:
        return await asyncio.to_thread(
            self.store.get, name, version_id=version_id, version_stage=version_stage
        )

    async def describe(self, name: str) -> SecretMetadata:
        return await asyncio.to_thread(self.store.describe, name)

    async def list_names(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self.store.list_names, prefix)

    async def check(self) -> None:
        await asyncio.to_thread(self.store.key_info)

    def changes(self) -> AsyncIterator[Changed]:
        return self._watch()

    async def _watch(self) -> AsyncIterator[Changed]:
        """Yield, per batch of file changes, a predicate matching the names they touched."""
        directory = self.store.secrets_dir
        async for batch in watchfiles.awatch(directory, recursive=False, debounce=50, step=10):
            # The file's own name only: a dot anywhere above it (~/.local/share) is no temp file.
            stems = {
                file.stem
                for file in (Path(path) for _, path in batch)
                if file.suffix == ".json" and not file.name.startswith(".")
            }
            if stems:
                yield _NamesIn(frozenset(stems))

    async def close(self) -> None:
        return None


class _NamesIn:
    """True for a name whose store file is among the changed ones."""

    __slots__ = ("stems",)

    def __init__(self, stems: frozenset[str]) -> None:
        self.stems = stems

    def __call__(self, name: str) -> bool:
        return secret_file_stem(name) in self.stems
