"""The local provider's file watcher: which store changes it reports."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from kms_agent.config import Config, source_config
from kms_agent.providers.local import Provider, _NamesIn
from kms_agent.store import LocalStore

WAIT = 10.0


@pytest.mark.parametrize("parent", ["plain", ".local/share", "a/.hidden/b"])
async def test_changes_are_seen_under_a_dot_directory(tmp_path: Path, parent: str):
    """A put is reported as a change of that name whatever the data dir's path holds: the
    default data dir is under ~/.local, and a dot in a parent directory's name hid every
    change (the filter looked for '/.' in the whole path, not in the file's own name)."""
    data_dir = tmp_path / parent / "kms-agent"
    provider = Provider(source_config("local", "local"), Config(data_dir=str(data_dir)))
    await provider.open()
    changes = provider.changes()
    assert isinstance(changes, AsyncGenerator)  # closed at the end
    first = asyncio.ensure_future(anext(changes))
    writer = LocalStore(data_dir)
    try:
        # The watcher starts inside the first anext(); write until it reports (an event,
        # not a sleep: each write is a change it must see once it is watching).
        for attempt in range(int(WAIT / 0.2)):
            await asyncio.to_thread(writer.put, "db/password", f"v{attempt}".encode())
            done, _ = await asyncio.wait({first}, timeout=0.2)
            if done:
                break
        assert first.done(), "no change reported for a put in the watched store"
        predicate = first.result()
        assert predicate("db/password")
        assert not predicate("other")
    finally:
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await first
        await changes.aclose()
        await provider.close()


async def test_dot_files_in_the_store_are_not_changes(tmp_path: Path):
    """A dot-file in the secrets directory (a write's temp file) is not a change; only the
    file's own name is looked at."""
    data_dir = tmp_path / ".dot" / "kms-agent"
    provider = Provider(source_config("local", "local"), Config(data_dir=str(data_dir)))
    await provider.open()
    changes = provider.changes()
    assert isinstance(changes, AsyncGenerator)  # closed at the end
    first = asyncio.ensure_future(anext(changes))
    secrets_dir = provider.store.secrets_dir
    try:
        for attempt in range(int(WAIT / 0.2)):
            (secrets_dir / ".abc.json.x1.tmp").write_text(str(attempt))
            (secrets_dir / ".hidden.json").write_text(str(attempt))
            (secrets_dir / "abc.json").write_text(str(attempt))
            done, _ = await asyncio.wait({first}, timeout=0.2)
            if done:
                break
        assert first.done(), "no change reported for a store file"
        changed = first.result()
        assert isinstance(changed, _NamesIn)
        assert changed.stems == frozenset({"abc"})
    finally:
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await first
        await changes.aclose()
