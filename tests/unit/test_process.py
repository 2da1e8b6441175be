"""Process-level helpers: handing start-up's freed heap back to the OS."""

from __future__ import annotations

import gc
import platform
from pathlib import Path

import pytest

from kms_agent.systemd import release_free_memory


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_goes_back_to_the_os():
    """Garbage freed in many small pieces stays in the process until trimmed."""
    junk = [bytes(700) for _ in range(40_000)]  # ~28 MB in glibc chunks, not pymalloc's
    keep = junk[::50]  # a few survivors pin nothing but their own chunks
    del junk
    gc.collect()
    before = rss_kib()
    assert release_free_memory() is True
    after = rss_kib()
    assert after < before - 4096, (before, after)
    assert all(len(b) == 700 for b in keep)
