"""How the commands write times for people.

>>> age(4000)
'1 h 6 min ago'
>>> iso(1_700_000_000_000)
'2023-11-14T22:13:20.000+00:00'
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts_ms: int) -> str:
    """Epoch milliseconds as an ISO 8601 UTC time."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds")


def age(seconds: float) -> str:
    """How long ago, in the two largest units: '2 d 3 h ago', '12.5 s ago', '5 min 0 s in the
    future' for a negative age."""
    s = int(abs(seconds))
    d, h, m = s // 86_400, s // 3600 % 24, s // 60 % 60
    text = (f"{d} d {h} h" if d else f"{h} h {m} min" if h else f"{m} min {s % 60} s" if m
            else f"{abs(seconds):.1f} s")
    return f"{text} ago" if seconds >= 0 else f"{text} in the future"
