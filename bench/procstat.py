"""What /proc says about a process and the machine: the benchmarks' CPU, memory and disk."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (utime is [11])."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process and its waited-for children."""
    return sum(int(x) for x in _stat(pid)[11:15]) / TICK


def tree_cpu_s(pid: int) -> float:
    """CPU-seconds (user + system) of a process and of its descendants alive; 0 once gone."""
    try:
        fields = _stat(pid)
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK + sum(tree_cpu_s(int(k)) for k in kids)


def machine_busy_s() -> float:
    """CPU-seconds the whole machine spent busy (not idle or waiting on I/O) so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def _field(path: str, name: str) -> int:
    """The number after ``name`` in a /proc file of ``name: value`` lines; 0 if absent."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    return 0


def written_mb(pid: int) -> float:
    """Bytes a process has had written to storage (its recovery store), MB."""
    return _field(f"/proc/{pid}/io", "write_bytes:") / 1e6


def rss_mb(pid: int) -> float:
    return _field(f"/proc/{pid}/status", "VmRSS:") / 1024
