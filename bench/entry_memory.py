"""Bytes one cache entry holds, by allocation site (tracemalloc), for a 1 KiB secret.

    python bench/entry_memory.py [--count 2000] [--shape aws]

Stores COUNT secrets of 1 KiB in a fresh embedded store, reads each through the cache as
the agent does, renders one response shape, and prints the live
bytes per entry with the allocation sites that hold them. Deterministic, unlike RSS: use it
to see what a change to the entry layout buys.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kms_agent import providers  # noqa: E402
from kms_agent.cache import Cache, Key  # noqa: E402
from kms_agent.config import load  # noqa: E402
from kms_agent.model import SecretRecord  # noqa: E402
from kms_agent.respond import rendered  # noqa: E402
from kms_agent.store import LocalStore  # noqa: E402


async def measure(count: int, shape: str) -> None:
    root = Path(
        tempfile.mkdtemp(prefix="kms-entry-", dir="/dev/shm" if Path("/dev/shm").exists() else None)
    )
    store = LocalStore(root)
    store.init()
    for i in range(count + 1):
        store.put(f"fill/s{i}", os.urandom(512).hex().encode())
    cfg = load(
        None,
        environ={"KMS_AGENT_DATA_DIR": str(root), "KMS_AGENT_CACHE_MAX_ENTRIES": str(count * 2)},
    )
    provider = providers.create(cfg.sources[0], cfg, {})
    await provider.open()

    async def fetch(key: Key) -> SecretRecord:
        return await provider.get(key[1])

    cache = Cache(fetch, cfg.cache)
    await cache.get(("local", "fill/s0", None, None))  # imports and first-use costs out of the way
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    for i in range(1, count + 1):
        entry, _ = await cache.get(("local", f"fill/s{i}", None, None))
        rendered(entry, shape)
    gc.collect()
    after = tracemalloc.take_snapshot()
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"{total / count:.0f} bytes per entry ({count} entries of 1 KiB, shape {shape})")
    for stat in stats[:12]:
        if stat.size_diff / count >= 8:
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / count:7.0f} B  {Path(frame.filename).name}:{frame.lineno}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--shape", default="aws", choices=["aws", "kms", "vault", "native", "raw"])
    args = parser.parse_args()
    asyncio.run(measure(args.count, args.shape))


if __name__ == "__main__":
    main()
