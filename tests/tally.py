"""What the reliability tests counted, one row per test, printed as one table at the end of
the session (conftest's ``pytest_terminal_summary``), whether or not output is captured.

A test takes its row with ``row(name)`` and fills it as it goes; the figures are the test's
own measurements (its asserts decide pass or fail, the table only reports them).
``PeakRss`` samples the peak resident memory of the flow processes a test starts."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class Row:
    test: str
    kills: int = 0
    outages: int = 0
    malformed: int = 0
    events_in: int = 0
    accounted: int = 0
    lost: int = 0
    duplicates: int = 0  # after dedup: an id learned, archived or labelled twice
    peak_rss_mb: float = 0.0


HEADERS = ("test", "kills survived", "outages survived", "malformed inputs tried", "events in",
           "events accounted for", "events lost", "duplicates after dedup", "peak RSS MB")
ROWS: list[Row] = []


def row(test: str) -> Row:
    r = Row(test)
    ROWS.append(r)
    return r


def table() -> str:
    """The rows as a Markdown table, with a total line."""
    total = Row("total", *(sum(getattr(r, f.name) for r in ROWS) for f in fields(Row)[1:-1]),
                max((r.peak_rss_mb for r in ROWS), default=0.0))

    def cells(r: Row) -> list[str]:
        return [r.test] + [f"{getattr(r, f.name):,}" for f in fields(Row)[1:-1]] + [
            f"{r.peak_rss_mb:,.0f}" if r.peak_rss_mb else "-"]

    lines = [HEADERS, ("---",) * len(HEADERS)] + [cells(r) for r in ROWS + [total]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _vm_hwm_kb(pid: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:  # gone meanwhile
        pass
    return 0


class PeakRss:
    """Samples, every ``interval_s``, the peak RSS (VmHWM) of each live process whose command
    line contains ``marker`` (e.g. the test's config path); ``mb`` is the largest seen. VmHWM
    is the kernel's own high-water mark, so a peak between samples is not missed unless the
    process dies before the next sample."""

    def __init__(self, marker: str, interval_s: float = 0.25) -> None:
        self.marker, self.interval_s = marker.encode(), interval_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if self.marker in cmdline:
                self.peak_kb = max(self.peak_kb, _vm_hwm_kb(proc.name))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @property
    def mb(self) -> float:
        return self.peak_kb / 1024

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
