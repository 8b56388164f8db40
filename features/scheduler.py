"""When the counters count a signal and when an impression's point-in-time counts are read.

The join partitions send their signals (``SEEN`` impression, ``CLICKED`` (impression,
click_ts)) and, after each batch, a ``WATERMARK`` (partition, ts): that partition has joined
everything before ts (``DONE`` once it reached the end of its input). The signals of the
partitions interleave in arrival order, which can run far from event time (a partition catching
up reads impressions ahead of the clicks before them), so they wait here and are let through in
event-time order as the lowest partition's watermark passes them.
"""

from __future__ import annotations

import heapq

import orjson

from features.counters import EntityCounters
from features.spec import FeatureSpec
from joiner.join import SEEN

WATERMARK = "watermark"  # (partition, ts): that partition has joined everything before ts
DONE = 2**62  # the watermark of a partition that has reached the end of its input

# [(entity, id, {feature: count}, as of ts)] for the feature store
Rows = list[tuple[str, str, dict[str, int], int]]


class PointInTimeScheduler:
    """Counts signals in event-time order and takes each impression's snapshot once nothing
    before it can still arrive.

    Signals wait in a heap and are counted up to ``allowed_lateness_ms - pit_delay_ms`` past
    the lowest partition's watermark, and the changed entities become rows for the store: in
    steady state that is as soon as they arrive, which keeps the store fresh. An impression's
    snapshot waits until the watermark is ``pit_delay_ms`` past it: everything before its ts
    has been counted by then, even an impression that arrived that much out of order, and the
    query as of ts leaves out what came after (exactly, since nothing more than the lateness
    after it has been counted).

    >>> from joiner.events import Impression
    >>> from joiner.join import CLICKED
    >>> spec = FeatureSpec(entities={"user": ("user_id",)}, windows_ms=(60_000,))
    >>> s = PointInTimeScheduler(spec, partitions=1, allowed_lateness_ms=2_000,
    ...                          pit_delay_ms=1_000)
    >>> a, b = (Impression(i, ts, "u1", "x", {}) for i, ts in (("a", 1_000), ("b", 3_000)))
    >>> pits, rows = s.push([(SEEN, b), (CLICKED, (a, 2_000)), (SEEN, a), (WATERMARK, (0, 2_000))])
    >>> pits  # a's: the watermark is pit_delay_ms past it (b arrived first, but is later)
    [('a', b'{"user":{"imp_1m":0,"clk_1m":0}}')]
    >>> rows  # counted up to lateness - delay past the watermark: all three, rows as of 3 s
    [('user', 'u1', {'imp_1m': 1, 'clk_1m': 1}, 3000)]
    >>> s.push([(WATERMARK, (0, DONE))])[0]  # the end: every snapshot; b's leaves b out
    [('b', b'{"user":{"imp_1m":1,"clk_1m":1}}')]
    """

    def __init__(self, spec: FeatureSpec, partitions: int, allowed_lateness_ms: int,
                 pit_delay_ms: int, resume: dict | None = None) -> None:
        if not 0 <= pit_delay_ms <= allowed_lateness_ms:
            raise ValueError("pit_delay_ms must be between 0 and allowed_lateness_ms")
        self.counters = EntityCounters(spec, allowed_lateness_ms)
        self.partitions = partitions
        self.pit_delay_ms = pit_delay_ms
        self.lead_ms = allowed_lateness_ms - pit_delay_ms
        self.watermarks: dict[int, int] = {}
        self.waiting: list[tuple] = []  # heap of (ts, seq, kind, value), not yet counted
        # heap of (ts, seq, impression id, its entities): counted, no snapshot yet. At a real
        # time rate it holds pit_delay_ms of impressions (180k at 2,000/s), so it is kept
        # small and its state is JSON: a pickle of 180k entries holding the impressions
        # took 1,942 ms an epoch, JSON of the ids 92 ms (bench/features_core.py [4]).
        self.snapshots: list[tuple] = []
        self.seq = 0
        self.newest = 0  # the newest event time counted: rows are as of it
        if resume is not None:
            self.counters.restore(resume["counters"])
            for name in ("watermarks", "waiting", "seq", "newest"):
                setattr(self, name, resume[name])
            self.snapshots = [tuple(s) for s in orjson.loads(resume["snapshots"])]

    def push(self, signals: list) -> tuple[list[tuple[str, bytes]], Rows]:
        """Take a batch of ``(kind, value)`` signals; returns the snapshots now due, in
        event-time order, as ``(impression_id, JSON of {entity: {feature: count}})``, and the
        rows of the entities changed (or gone stale) since the last call."""
        waiting, snapshots, c = self.waiting, self.snapshots, self.counters
        for kind, value in signals:
            if kind == WATERMARK:
                part, wm = value
                self.watermarks[part] = max(wm, self.watermarks.get(part, wm))
                continue
            ts = value.ts if kind == SEEN else value[1]
            heapq.heappush(waiting, (ts, self.seq, kind, value))
            self.seq += 1
        if len(self.watermarks) < self.partitions:
            return [], []
        low = min(self.watermarks.values())
        limit, out = low + self.lead_ms, []
        low -= self.pit_delay_ms  # the snapshots' watermark
        while True:
            next_ts = waiting[0][0] if waiting and waiting[0][0] <= limit else None
            while snapshots and snapshots[0][0] <= low and (
                    next_ts is None or snapshots[0][0] <= next_ts):
                ts, _, impression_id, ids = heapq.heappop(snapshots)
                # as JSON bytes: bytewax deep-copies keyed state, and bytes copy for free
                out.append((impression_id, orjson.dumps(c.snapshot_at(ts, ids))))
            if next_ts is None:
                break
            ts, seq, kind, value = heapq.heappop(waiting)
            if kind == SEEN:
                heapq.heappush(snapshots, (ts, seq, value.impression_id, c.count(value)))
            else:
                c.clicked(*value)
            self.newest = max(self.newest, ts)
        return out, self._rows(c.touched().union(c.stale(self.newest)))

    def all_rows(self) -> Rows:
        """Every entity's row, for a store that lost what was written."""
        return self._rows(self.counters.keys())

    def _rows(self, keys) -> Rows:
        c, newest = self.counters, self.newest
        return [(e, i, c.values(e, i, newest), newest) for e, i in keys]

    def state(self) -> dict:
        """A picklable copy to pass back as ``resume``."""
        return {"counters": self.counters.state(), "watermarks": self.watermarks,
                "waiting": self.waiting, "snapshots": orjson.dumps(self.snapshots),
                "seq": self.seq, "newest": self.newest}
