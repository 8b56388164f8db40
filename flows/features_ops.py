"""bytewax glue for the real-time count features: the counters step, attaching the
point-in-time counts to each example, and the Redis sink. The logic lives in features/."""

from __future__ import annotations

import logging
import time

import redis
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from features.scheduler import PointInTimeScheduler
from features.spec import FeatureSpec
from flows import metrics
from flows.build import feature_store, feature_writer, redis_client
from flows.config import Config
from joiner.join import EXAMPLE

log = logging.getLogger(__name__)

REDIS_CHECK_S = 5.0  # how often the counters check that Redis still holds what they wrote
PIT = "pit"  # (impression_id, JSON of {entity: {feature: count}}) as of the impression's ts
ROWS = "rows"  # [(entity, id, values, ts)] changed since the last batch, for Redis


class CountersLogic(StatefulBatchLogic):
    """All entities' counters under one key: a `PointInTimeScheduler` (features/scheduler.py),
    plus the check that Redis still holds what was written."""

    def __init__(self, cfg: Config, spec: FeatureSpec, partitions: int, resume) -> None:
        f = cfg.features
        self.scheduler = PointInTimeScheduler(spec, partitions, f.allowed_lateness_ms,
                                              f.pit_delay_ms, resume)
        self.redis = redis_client(cfg)
        self.marker = f"{f.store_prefix}:counters-alive"
        self.marker_set = False  # set once: its absence later means Redis lost our writes
        self.next_check = 0.0
        if resume is not None:
            self.marker_set = resume["marker_set"]

    def on_batch(self, values: list) -> tuple[list, bool]:
        s = self.scheduler
        pits, rows = s.push(values)
        out = [(PIT, pit) for pit in pits]
        if self._redis_lost(time.monotonic()):
            rows = s.all_rows()
            log.warning("feature store: Redis lost what was written (restarted empty?): "
                        "writing all %d entities again", len(rows))
        if rows:
            out.append((ROWS, rows))
        metrics.features_report(entities=len(s.counters))
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
        return {**self.scheduler.state(), "marker_set": self.marker_set}


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
        store = feature_store(cfg, spec.feature_names())
        self.writer = feature_writer(cfg, store)
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
