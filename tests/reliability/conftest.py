"""Collects the fault table's rows and prints the table at the end of the run (and keeps
it in pytest's cache directory, ``.pytest_cache/d/fault-table/table.md``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest


@dataclass
class Row:
    fault: str
    source: str
    keys: str
    answers: int
    fresh: int
    stale: int
    errors: Counter[str]
    wrong: int
    unmarked: int
    burst_calls: int
    calls_per_s: float
    recovery_s: float

    def line(self) -> str:
        errors = " ".join(f"{k}:{v}" for k, v in sorted(self.errors.items())) or "-"
        return (
            f"| {self.fault} | {self.source} | {self.keys} | {self.answers} | {self.fresh} | "
            f"{self.stale} | {errors} | {self.wrong} | {self.unmarked} | "
            f"{self.burst_calls} | {self.calls_per_s:.1f} | {self.recovery_s:.1f} |"
        )


TABLE: list[Row] = []

HEADER = (
    "| fault | source | keys | answers during | fresh | stale | errors | wrong | unmarked "
    "| upstream calls in the burst | then calls/s | recovery s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TABLE:
        return
    text = "\n".join([HEADER, *(row.line() for row in TABLE)])
    terminalreporter.write_sep("=", "fault table")
    terminalreporter.write_line(text)
    cache = getattr(terminalreporter.config, "cache", None)  # absent with -p no:cacheprovider
    if cache is not None:
        (cache.mkdir("fault-table") / "table.md").write_text(text + "\n")
