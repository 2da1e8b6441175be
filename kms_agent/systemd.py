"""systemd integration without a dependency: sd_notify over a datagram socket, the process
hardening done at start (no core dumps, not dumpable), and handing start-up's freed heap
back to the OS once ready."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import resource
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("kms_agent.systemd")

_PR_SET_DUMPABLE = 4


class Notifier:
    """Sends sd_notify messages when ``$NOTIFY_SOCKET`` is set; otherwise does nothing."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + path[1:] if path.startswith("@") else path
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: Seconds between WATCHDOG=1 pings (half the watchdog timeout), or None.
        self.watchdog_interval = int(usec) / 2e6 if wanted else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *lines: str) -> bool:
        if not self._address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=type(exc).__name__)
            return False
        return True

    def ready(self) -> None:
        self.notify("READY=1", "STATUS=serving")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=draining")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")


def harden() -> dict[str, bool]:
    """Turn off core dumps and make the process non-dumpable (no ptrace, no /proc/PID/mem
    by other users). Returns what succeeded; failures are logged, never fatal."""
    done = {"core_dumps_off": False, "not_dumpable": False}
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        done["core_dumps_off"] = True
    except (ValueError, OSError) as exc:
        log.warning("hardening_failed", step="rlimit_core", error=type(exc).__name__)
    libc = _libc()
    if libc is not None:
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
            done["not_dumpable"] = True
        else:
            log.warning("hardening_failed", step="pr_set_dumpable", errno=ctypes.get_errno())
    return done


def release_free_memory() -> bool:
    """Collect start-up's garbage (config parsing, imports) and hand the heap it freed back
    to the OS, which glibc's allocator would otherwise keep (~0.5 MB of idle RSS). Returns
    whether the C library could (glibc's ``malloc_trim``; absent on musl and macOS)."""
    gc.collect()
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None
