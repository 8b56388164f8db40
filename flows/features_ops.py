"""bytewax glue for the real-time count features: the counters step, one key per shard of the
entities, which also writes their rows to Redis; and attaching the point-in-time counts to each
example. The logic lives in features/."""

from __future__ import annotations

import functools
import logging
import os
import time
import zlib
from pathlib import Path

import redis
from bytewax.operators import StatefulBatchLogic

from features.scheduler import DONE, Part, PointInTimeScheduler, merge_parts
from features.spec import FeatureSpec
from features.store import BufferedWriter
from flows import metrics
from flows.build import feature_store, feature_writer, redis_client
from flows.config import Config
from joiner.join import EXAMPLE

log = logging.getLogger(__name__)

# The shards' bytewax keys are chosen so that shard k lands on worker k % W for every worker
# count W dividing this (1 to 6 workers, 10, 12, 15, ...): plain keys "0".."15" hash to
# wherever they do, and "0".."3" all land on the same one of two workers.
BALANCED_FOR = 60
REDIS_CHECK_S = 5.0  # how often a shard checks that Redis still holds what it wrote
# How entities are placed in shards (features.scheduler.entity_shard); a recovery store's
# counters placed otherwise cannot be resumed. 2: by the value of the entity's first field.
PLACEMENT = 2
PIT = "pit"  # (shard, parts, JSON of {entity: {feature: count}}): a shard's part of the counts


# The attach step's keys: an impression's example and parts meet under the key of its cell,
# (ts // ATTACH_BUCKET_MS, a hash of its id % ATTACH_SPREAD): a key holds many impressions
# (bytewax's cost is per key), an epoch's snapshots cover only the few cells it touched (each
# impression's parts come pit_delay_ms after its ts, its example the wait window after), and a
# cell is discarded once all its impressions are attached. Cells are placed like the shards,
# exactly even for any worker count dividing ATTACH_BALANCED_FOR (by hash for the others: with
# hundreds of cells alive that is close to even too); each cell's key takes about that many
# SipHashes in Python (~14 us each) to find: 12 was 2.4 % of the flow's CPU on a backlog.
ATTACH_BUCKET_MS = 5_000
ATTACH_SPREAD = 4
ATTACH_BALANCED_FOR = 4
# The attach step's state format; a recovery store holding another (1: a key per impression)
# cannot be resumed.
ATTACH_FORMAT = 2


def _balanced_key(base: str, slot: int, balanced_for: int) -> str:
    """``base``, or ``base.j`` for the first j, that bytewax sends to worker ``slot % W`` for
    every worker count W dividing ``balanced_for``."""
    key, j = base, 0
    while _worker_hash(key) % balanced_for != slot % balanced_for:
        key, j = f"{base}.{j}", j + 1
    return key


@functools.lru_cache(maxsize=4096)
def _cell_key(bucket: int, spread: int) -> str:
    return _balanced_key(f"a{bucket}.{spread}", bucket * ATTACH_SPREAD + spread,
                         ATTACH_BALANCED_FOR)


def attach_key(ts: int, impression_id: str) -> str:
    """The attach step's key of an impression (the same in every process and run).

    >>> attach_key(12_345, "i1") == attach_key(14_999, "i1") != attach_key(15_000, "i1")
    True
    >>> sorted({_worker_hash(attach_key(7_000, f"i{n}")) % 2 for n in range(20)})
    [0, 1]
    """
    return _cell_key(ts // ATTACH_BUCKET_MS,
                     zlib.crc32(impression_id.encode("utf-8", "surrogatepass")) % ATTACH_SPREAD)


@functools.cache
def shard_keys(shards: int) -> list[str]:
    """The bytewax key of each shard: ``"k"`` or ``"k.j"``, the first whose worker is k % W.

    bytewax 0.21 sends a key to worker ``hash % W`` (in its sorted list of workers), the
    hash being Rust's ``DefaultHasher`` (SipHash-1-3, zero keys) of the string
    (src/operators.rs, stateful_batch; src/timely.rs, partition).

    >>> shard_keys(4)
    ['0.76', '1.55', '2.31', '3.59']
    >>> [_worker_hash(k) % 2 for k in shard_keys(4)], [_worker_hash(k) % 3 for k in shard_keys(4)]
    ([0, 1, 0, 1], [0, 1, 2, 0])
    """
    return [_balanced_key(str(k), k, BALANCED_FOR) for k in range(shards)]


_M = (1 << 64) - 1


def _worker_hash(key: str) -> int:
    """Rust's ``DefaultHasher`` of a ``String``: SipHash-1-3 with zero keys over its UTF-8
    bytes and a 0xff."""
    data = key.encode() + b"\xff"

    def rounds(n, v0, v1, v2, v3):
        for _ in range(n):
            v0 = (v0 + v1) & _M
            v1 = ((v1 << 13 | v1 >> 51) & _M) ^ v0
            v0 = (v0 << 32 | v0 >> 32) & _M
            v2 = (v2 + v3) & _M
            v3 = ((v3 << 16 | v3 >> 48) & _M) ^ v2
            v0 = (v0 + v3) & _M
            v3 = ((v3 << 21 | v3 >> 43) & _M) ^ v0
            v2 = (v2 + v1) & _M
            v1 = ((v1 << 17 | v1 >> 47) & _M) ^ v2
            v2 = (v2 << 32 | v2 >> 32) & _M
        return v0, v1, v2, v3

    v = [0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573]
    n, end = len(data), len(data) - len(data) % 8
    blocks = [int.from_bytes(data[i:i + 8], "little") for i in range(0, end, 8)]
    blocks.append((n & 0xFF) << 56 | int.from_bytes(data[end:], "little"))
    for m in blocks:
        v[3] ^= m
        v = list(rounds(1, *v))
        v[0] ^= m
    v[2] ^= 0xFF
    v = rounds(3, *v)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


class ProcessCounters:
    """What the counter shards of one flow process share: one Redis writer (rows of every
    shard coalesced into the same flushes), the entity count per shard for the metrics, and
    the signals counted here (``counters-<pid>.json`` in the join's data dir, for
    bench/pipeline.py). Made by the flow's build in each process; its writer on first use."""

    def __init__(self, cfg: Config, spec: FeatureSpec) -> None:
        self.cfg, self.spec = cfg, spec
        self._writer: BufferedWriter | None = None
        self.entities: dict[int, int] = {}
        self.signals = 0
        self.reported = (-1, -1)  # (signals, rows written) when last reported
        self.stats_path = Path(cfg.data_dir) / "join" / f"counters-{os.getpid()}.json"

    @property
    def writer(self) -> BufferedWriter:
        if self._writer is None:
            store = feature_store(self.cfg, self.spec.feature_names())
            write_many = store.write_many

            def counted_write_many(*args, **kwargs):
                # The writer retries failed writes inside its flush: count each failed
                # attempt here, where it happens.
                try:
                    return write_many(*args, **kwargs)
                except redis.RedisError:
                    metrics.redis_error("join")
                    raise

            store.write_many = counted_write_many
            self._writer = feature_writer(self.cfg, store)
        return self._writer

    def report(self) -> None:
        """Once per epoch's end, whichever shard's snapshot comes first (and at the end)."""
        now = (self.signals, self.writer.written)
        if now == self.reported:
            return
        self.reported = now
        metrics.features_report(entities=sum(self.entities.values()),
                                writes=self.writer.written)
        metrics.write_json(self.stats_path, {"signals": self.signals,
                                             "shards": sorted(self.entities)})


class CountersLogic(StatefulBatchLogic):
    """One shard of the counters: a `PointInTimeScheduler` (features/scheduler.py) over the
    entities of the shard, writing their rows through the process's writer, plus the check
    that Redis still holds what was written. Values are ``(shard, signals)``."""

    def __init__(self, cfg: Config, spec: FeatureSpec, partitions: int, shared: ProcessCounters,
                 resume) -> None:
        f = cfg.features
        if resume is not None and (resume["shards"], resume.get("placement")) != (
                f.shards, PLACEMENT):
            raise ValueError(f"the recovery store holds counters split in {resume['shards']} "
                             f"shards (placement {resume.get('placement')}), the config asks "
                             f"for {f.shards} (placement {PLACEMENT}): start from a new "
                             "recovery store (and an empty feature store prefix)")
        self.scheduler = PointInTimeScheduler(spec, partitions, f.allowed_lateness_ms,
                                              f.pit_delay_ms, None if resume is None else
                                              resume["scheduler"])
        self.shards, self.shared = f.shards, shared
        self.redis = redis_client(cfg)
        self.shard: int | None = None if resume is None else resume["shard"]
        self.marker_set = False  # set once: its absence later means Redis lost our writes
        self.next_check = 0.0
        self.flush_interval_s = f.store_flush_interval_s
        self.next_rows = 0.0
        if resume is not None:
            self.marker_set = resume["marker_set"]

    def on_batch(self, values: list) -> tuple[list, bool]:
        s, shared = self.scheduler, self.shared
        self.shard = values[0][0]  # the same in every value: the router's shard index
        batches = [signals for _, signals in values]
        parts = s.push(*batches)
        shared.signals += sum(map(len, batches))
        now = time.monotonic()
        if self._redis_lost(now):
            rows = s.all_rows()
            log.warning("feature store: Redis lost what was written (restarted empty?): "
                        "writing all %d entities of shard %d again", len(rows), self.shard)
            self._put(rows)
        if now >= self.next_rows:  # rows built at most once a flush interval
            self._put(s.rows())
            self.next_rows = now + self.flush_interval_s
            shared.writer.maybe_flush(now)
        shared.entities[self.shard] = len(s.counters)
        return ([(self.shard, parts)] if parts else []), StatefulBatchLogic.RETAIN

    def _put(self, rows) -> None:
        put = self.shared.writer.put
        for entity, id, values, ts in rows:
            put(entity, id, values, ts)

    def _redis_lost(self, now: float) -> bool:
        """Every REDIS_CHECK_S: is the marker this shard set in Redis gone?"""
        if now < self.next_check:
            return False
        self.next_check = now + REDIS_CHECK_S
        try:
            missing = self.redis.set(f"{self.shared.cfg.features.store_prefix}:counters-alive:"
                                     f"{self.shard}", 1, nx=True)
        except redis.RedisError:
            metrics.redis_error("join")
            return False  # an outage: the store's writer waits it out
        lost, self.marker_set = bool(missing) and self.marker_set, True
        return lost

    def _write(self) -> None:
        # End of an epoch (or of the input): once it is committed, recovery will not replay
        # what fed these rows, so they must be in Redis before it is.
        self._put(self.scheduler.rows())
        self.shared.writer.flush()
        self.shared.report()

    def on_eof(self) -> tuple[list, bool]:
        self._write()
        return [], StatefulBatchLogic.RETAIN

    def snapshot(self) -> dict:
        self._write()
        return {"scheduler": self.scheduler.state(), "marker_set": self.marker_set,
                "shard": self.shard, "shards": self.shards, "placement": PLACEMENT}


def parts(kv: tuple[str, tuple[int, list[Part]]]) -> list[tuple[str, tuple]]:
    """A shard's parts for `attach`: ``(attach_key, (PIT, [(impression id, ts, (shard,
    parts expected, JSON))]))``, a record per cell (bytewax's cost is per record too)."""
    k, out = kv[1]
    return _by_cell(PIT, [(iid, ts, (k, n, counts)) for iid, n, counts, ts in out])


def examples(out: list[tuple[str, int, bytes]]) -> list[tuple[str, tuple]]:
    """Examples ``(impression id, ts, JSON)`` for `attach`, a record per cell like `parts`."""
    return _by_cell(EXAMPLE, out)


def _by_cell(kind: str, items: list[tuple]) -> list[tuple[str, tuple]]:
    cells: dict[str, list] = {}
    for item in items:
        key = attach_key(item[1], item[0])
        got = cells.get(key)
        if got is None:
            cells[key] = [item]
        else:
            got.append(item)
    return [(key, (kind, got)) for key, got in cells.items()]


class HeldImpressions:
    """The attach step's keys in one process, to find impressions held past their time: once
    a part for ts T has come, every impression before ``T + pit_delay_ms - wait_window_ms``
    has had its example emitted and all its parts (parts come in ts order, once every join
    partition's watermark is ``pit_delay_ms`` past them; an example once its partition's is the
    wait window past), so one still held then lost its example or a part. It is logged and
    dropped (``dropped``), not kept forever. Checked at most once a bucket of parts' ts."""

    def __init__(self, cfg: Config) -> None:
        # an extra wait window of margin: dropping loses an example
        self.lag_ms = (max(cfg.join.wait_window_ms - cfg.features.pit_delay_ms, 0)
                       + cfg.join.wait_window_ms + ATTACH_BUCKET_MS)
        self.live: set[AttachLogic] = set()
        self.newest_part = -DONE  # the ts of the newest part seen
        self.checked_to = -DONE
        self.dropped = 0
        metrics.features_report(dropped=0)  # exported from the start: a counter at 0

    def check(self) -> None:
        limit = self.newest_part - self.lag_ms  # impressions before it should all be done
        if limit < self.checked_to + ATTACH_BUCKET_MS:
            return
        self.checked_to = limit
        for logic in list(self.live):
            if (logic.bucket + 1) * ATTACH_BUCKET_MS > limit:
                continue
            self.live.discard(logic)  # a key that gets something again comes back
            if logic.pending:
                ids = sorted(logic.pending)
                self.dropped += len(ids)
                log.warning("attach_counts: %d impressions of ts %d..%d never got their example "
                            "or all their parts (the newest part is of ts %d): dropped, e.g. %s",
                            len(ids), logic.bucket * ATTACH_BUCKET_MS,
                            (logic.bucket + 1) * ATTACH_BUCKET_MS - 1, self.newest_part,
                            ids[:3])
                logic.pending = {}
                metrics.features_report(dropped=self.dropped)


class AttachLogic(StatefulBatchLogic):
    """Joins examples with the parts of their point-in-time counts, in whatever order they
    arrive: an example is written once it and all the parts its impression's shards announced
    are in. A key per cell of impressions (`attach_key`); its state is a dict of immutable
    tuples (example or None, parts), so a snapshot is a shallow copy."""

    def __init__(self, held: HeldImpressions, resume: tuple | None) -> None:
        if resume is not None and (len(resume) != 3 or resume[0] != ATTACH_FORMAT):
            raise ValueError("the recovery store holds the attach step's state in another "
                             f"format (format {ATTACH_FORMAT} is a key per cell of "
                             "impressions, not per impression): let the join flow that wrote "
                             "it finish, or start from a new recovery store")
        self.held = held
        self.bucket, self.pending = (resume[1], dict(resume[2])) if resume else (0, {})
        if self.pending:
            held.live.add(self)

    def on_batch(self, values: list) -> tuple[list, bool]:
        pending, out, newest = self.pending, [], self.held.newest_part
        for kind, items in values:
            is_part = kind == PIT
            for iid, _, payload in items:
                ex, got = pending.pop(iid, (None, ()))
                if is_part:
                    got += (payload,)
                else:
                    ex = payload
                if ex is not None and got and len(got) == got[0][1]:
                    counts = merge_parts([(k, c) for k, _, c in got])
                    # example bytes are a compact JSON object: splice the counts in before '}'
                    out.append((iid, ex[:-1] + b',"counts":' + counts + b"}"))
                else:
                    pending[iid] = (ex, got)
            ts = items[-1][1]  # the newest: parts come in ts order
            if is_part and ts > newest:
                newest = ts
        self.bucket = ts // ATTACH_BUCKET_MS
        held = self.held
        held.newest_part = newest
        if pending:
            held.live.add(self)
            return out, StatefulBatchLogic.RETAIN
        held.live.discard(self)
        return out, StatefulBatchLogic.DISCARD

    def on_eof(self) -> tuple[list, bool]:
        if self.pending:
            log.warning("attach_counts: %d impressions of ts %d..%d held at the end of the "
                        "input without their example or all their parts, e.g. %s",
                        len(self.pending), self.bucket * ATTACH_BUCKET_MS,
                        (self.bucket + 1) * ATTACH_BUCKET_MS - 1, sorted(self.pending)[:3])
        return [], StatefulBatchLogic.RETAIN

    def snapshot(self) -> tuple:
        self.held.check()
        return ATTACH_FORMAT, self.bucket, dict(self.pending)
