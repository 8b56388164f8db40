"""bytewax glue for the real-time count features: the counters step, attaching the
point-in-time counts to each example, and the Redis sink. The logic lives in features/."""

from __future__ import annotations

import heapq
import logging
import time

import orjson
import redis
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from features.counters import EntityCounters
from features.spec import FeatureSpec
from features.store import connect, from_config, writer_from_config
from flows import metrics
from flows.config import Config
from joiner.join import EXAMPLE, SEEN

log = logging.getLogger(__name__)

REDIS_CHECK_S = 5.0  # how often the counters check that Redis still holds what they wrote
WATERMARK = "watermark"  # (partition, ts): that partition has joined everything before ts
DONE = 2**62  # the watermark of a partition that has reached the end of its input
PIT = "pit"  # (impression_id, JSON of {entity: {feature: count}}) as of the impression's ts
ROWS = "rows"  # [(entity, id, values, ts)] changed since the last batch, for Redis


class CountersLogic(StatefulBatchLogic):
    """All entities' counters under one key.

    Signals from the join partitions interleave in arrival order, which can run far from
    event time (a partition catching up reads impressions ahead of the clicks before them).
    They wait in a heap and are counted in event-time order up to ``allowed_lateness_ms -
    pit_delay_ms`` past the lowest partition's join watermark, and the changed entities go to
    Redis: in steady state that is as soon as they arrive, which keeps the store fresh. An
    impression's point-in-time snapshot waits until the watermark is ``pit_delay_ms`` past
    it: everything before its ts has been counted by then, even an impression that arrived
    that much out of order, and the query as of ts leaves out what came after (exactly, since
    nothing more than the lateness after it has been counted)."""

    def __init__(self, cfg: Config, spec: FeatureSpec, partitions: int, resume) -> None:
        allowed_lateness_ms = cfg.features.allowed_lateness_ms
        self.counters = EntityCounters(spec, allowed_lateness_ms)
        self.redis = connect(cfg)
        self.marker = f"{cfg.features.store_prefix}:counters-alive"
        self.marker_set = False  # set once: its absence later means Redis lost our writes
        self.next_check = 0.0
        self.pit_delay_ms = cfg.features.pit_delay_ms
        self.lead_ms = allowed_lateness_ms - self.pit_delay_ms
        if self.lead_ms < 0:
            raise ValueError("features.pit_delay_ms must not exceed features.allowed_lateness_ms")
        self.partitions = partitions
        self.watermarks: dict[int, int] = {}
        self.waiting: list[tuple] = []  # heap of (ts, seq, kind, value), not yet counted
        # heap of (ts, seq, impression id, its entities): counted, no snapshot yet. At a real
        # time rate it holds pit_delay_ms of impressions (180k at 2,000/s), so it is kept
        # small and snapshotted as JSON: a pickle of 180k entries holding the impressions
        # took 1,942 ms an epoch, JSON of the ids 92 ms (bench/features_core.py [4]).
        self.snapshots: list[tuple] = []
        self.seq = 0
        self.newest = 0
        if resume is not None:
            self.counters.restore(resume["counters"])
            for name in ("watermarks", "waiting", "seq", "newest", "marker_set"):
                setattr(self, name, resume[name])
            self.snapshots = [tuple(s) for s in orjson.loads(resume["snapshots"])]

    def on_batch(self, values: list) -> tuple[list, bool]:
        waiting, snapshots, c = self.waiting, self.snapshots, self.counters
        for kind, value in values:
            if kind == WATERMARK:
                part, wm = value
                self.watermarks[part] = max(wm, self.watermarks.get(part, wm))
                continue
            ts = value.ts if kind == SEEN else value[1]
            heapq.heappush(waiting, (ts, self.seq, kind, value))
            self.seq += 1
        if len(self.watermarks) < self.partitions:
            return [], StatefulBatchLogic.RETAIN
        low = min(self.watermarks.values())
        limit, out = low + self.lead_ms, []
        low -= self.pit_delay_ms  # the snapshots' watermark
        while True:
            next_ts = waiting[0][0] if waiting and waiting[0][0] <= limit else None
            while snapshots and snapshots[0][0] <= low and (
                    next_ts is None or snapshots[0][0] <= next_ts):
                ts, _, impression_id, ids = heapq.heappop(snapshots)
                # as JSON bytes: bytewax deep-copies keyed state, and bytes copy for free
                out.append((PIT, (impression_id, orjson.dumps(c.snapshot_at(ts, ids)))))
            if next_ts is None:
                break
            ts, seq, kind, value = heapq.heappop(waiting)
            if kind == SEEN:
                heapq.heappush(snapshots, (ts, seq, value.impression_id, c.count(value)))
            else:
                c.clicked(*value)
            self.newest = max(self.newest, ts)
        newest = self.newest
        changed = c.touched().union(c.stale(newest))
        if self._redis_lost(time.monotonic()):
            changed |= set(c.keys())
            log.warning("feature store: Redis lost what was written (restarted empty?): "
                        "writing all %d entities again", len(changed))
        if changed:
            out.append((ROWS, [(e, i, c.values(e, i, newest), newest) for e, i in changed]))
        metrics.features_report(entities=len(c))
        return out, StatefulBatchLogic.RETAIN

    def _redis_lost(self, now: float) -> bool:
        """Every REDIS_CHECK_S: is the marker this step set in Redis gone?"""
        if now < self.next_check:
            return False
        self.next_check = now + REDIS_CHECK_S
        try:
            missing = self.redis.set(self.marker, 1, nx=True)
        except redis.RedisError:
            metrics.redis_error("join")
            return False  # an outage: the store's writer waits it out
        lost, self.marker_set = bool(missing) and self.marker_set, True
        return lost

    def snapshot(self) -> dict:
        return {"counters": self.counters.state(), "watermarks": self.watermarks,
                "waiting": self.waiting, "snapshots": orjson.dumps(self.snapshots), "seq": self.seq,
                "newest": self.newest, "marker_set": self.marker_set}


def attach(state: dict | None, value: tuple) -> tuple[dict | None, list]:
    """Joins an example with its point-in-time counts, whichever arrives first."""
    state = state or {}
    kind, payload = value
    state[kind] = payload
    if PIT in state and EXAMPLE in state:
        example = state[EXAMPLE]
        # example bytes are a compact JSON object: splice the counts in before its '}'
        return None, [example[:-1] + b',"counts":' + state[PIT] + b"}"]
    return state, []


def signal_key(value: tuple) -> str:
    return "counters"  # one key: the counters need every entity's events (see the README)


class _StorePartition(StatefulSinkPartition):
    def __init__(self, cfg: Config, spec: FeatureSpec) -> None:
        store = from_config(cfg, spec.feature_names())
        self.writer = writer_from_config(store, cfg)
        write_many = store.write_many

        def counted_write_many(*args, **kwargs):
            # The writer retries failed writes inside its flush: count each failed attempt
            # here, where it happens.
            try:
                return write_many(*args, **kwargs)
            except redis.RedisError:
                metrics.redis_error("join")
                raise

        store.write_many = counted_write_many

    def write_batch(self, items: list) -> None:
        for rows in items:
            for entity, id, values, ts in rows:
                self.writer.put(entity, id, values, ts)
        self.writer.maybe_flush(time.monotonic())
        metrics.features_report(writes=self.writer.written)

    def snapshot(self) -> None:
        # End of an epoch: once it is committed, recovery will not replay what fed these
        # rows, so they must be in Redis before it is.
        self.writer.flush()
        metrics.features_report(writes=self.writer.written)

    def close(self) -> None:
        self.writer.flush()
        metrics.features_report(writes=self.writer.written)


class FeatureStoreSink(FixedPartitionedSink):
    """Writes changed entities to Redis, coalesced, within store_flush_interval_s and at
    every epoch's end. Items are ``(key, rows)``; one partition."""

    def __init__(self, cfg: Config, spec: FeatureSpec) -> None:
        self.cfg, self.spec = cfg, spec

    def list_parts(self) -> list[str]:
        return ["redis"]

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state) -> _StorePartition:
        return _StorePartition(self.cfg, self.spec)
