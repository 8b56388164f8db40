"""When the counters count a signal and when an impression's point-in-time counts are read,
and which counters shard owns an entity.

The join partitions send their signals (``SEEN`` (impression, its offset), ``CLICKED``
(impression, click_ts)) and, after each batch, a ``WATERMARK`` (partition, ts, replay_from):
that partition has joined everything before ts (``DONE`` once it reached the end of its
input), and a resume would replay its impressions from offset replay_from on. A
`ShardRouter` in each partition splits them by entity: an entity belongs to one of
``shards`` shards (a stable hash of its name and id, the same in every process and run),
each shard gets only the signals of its entities, and every shard gets every watermark. The
signals of the partitions interleave in arrival order, which can run far from event time (a
partition catching up reads impressions ahead of the clicks before them), so in each shard a
`PointInTimeScheduler` holds them and lets them through in event-time order as the lowest
partition's watermark passes them. Each shard then emits its part of an impression's
snapshot; the impression's counts are the union of the parts of the shards that own its
entities.

Recovery: a shard holds the impressions counted but not snapshotted yet (``pit_delay_ms`` of
them at a real-time rate: 180k at 2,000/s, 60 % of its state). Like the join's queue, they
are not in its state: on resume, the join partitions replay their impressions from the
offsets in their own state, and send ``RESEEN`` for those of them after their watermark less
`resend_ms`, from which each shard takes back those it held. Only the held impressions a
replay would not resend (an offset below the partition's ``replay_from``, or a ts that far
behind its watermark: partitions far apart) are in the state.
"""

from __future__ import annotations

import heapq
import zlib
from itertools import chain

import orjson

from features.counters import EntityCounters
from features.spec import ID_SEPARATOR, FeatureSpec
from joiner.join import CLICKED, SEEN

WATERMARK = "watermark"  # (partition, ts, replay_from): see the module's docstring
RESEEN = "reseen"  # (impression, offset): replayed on resume, counted before the crash
DONE = 2**62  # the watermark of a partition that has reached the end of its input

# [(entity, id, {feature: count}, as of ts)] for the feature store
Rows = list[tuple[str, str, dict[str, int], int]]
SHARD_CACHE = 200_000  # entities whose shard a router remembers
# (impression id, parts expected, JSON of {entity: {feature: count}}, the impression's ts): one
# shard's part
Part = tuple[str, int, bytes, int]
# The scheduler's state format: 2 holds only the impressions a replay would not resend.
STATE_FORMAT = 2


def resend_ms(allowed_lateness_ms: int, pit_delay_ms: int) -> int:
    """How far behind its watermark a join partition resends the impressions it replays on
    resume (`RESEEN`), and how far behind it a shard still counts on them being resent: a
    shard holds an impression until the lowest partition's watermark is ``pit_delay_ms``
    past it, so partitions up to ``allowed_lateness_ms`` apart need nothing in the state."""
    return allowed_lateness_ms + pit_delay_ms


def shard_of(entity: str, id: str, shards: int) -> int:
    """A shard from a hash that does not change between processes and runs (Python's own
    ``hash`` of a str does).

    >>> shard_of("user", "u1", 16), shard_of("user", "u1", 16), shard_of("item", "u1", 16)
    (14, 14, 5)
    """
    return zlib.crc32(f"{entity}\x00{id}".encode("utf-8", "surrogatepass")) % shards


def entity_shard(spec: FeatureSpec, entity: str, id: str, shards: int) -> int:
    """The shard owning an entity: that of the value of its first field, so the entities
    sharing a first field share a shard (user and user x category; item and item x
    position): an impression's five entities then touch about 2.8 of 16 shards, not 4.4, and
    every signal and part the router and the attach step handle is one per shard touched.

    >>> spec = FeatureSpec(entities={"user": ("user_id",), "user_category": (
    ...     "user_id", "category")}, windows_ms=(60_000,))
    >>> entity_shard(spec, "user", "u1", 16), entity_shard(spec, "user_category", "u1|c2", 16)
    (4, 4)
    """
    fields = spec.entities[entity]
    value = id.partition(ID_SEPARATOR)[0] if len(fields) > 1 else id
    return shard_of(fields[0], value, shards)


class ShardRouter:
    """Splits one join partition's signals by shard, for the shards' schedulers.

    ``route`` returns, for each shard with something to do, ``(shard, signals)`` (tuples
    all the way down: the garbage collector stops scanning a tuple of strings and ints, and the
    schedulers hold these for minutes): for an impression ``(SEEN, (ts, impression id, its
    entities in this shard, parts, partition, offset))``, ``parts`` being how many shards own
    its entities (an impression with no entity is sent, with none, to the shard of its id:
    every impression gets at least one part), and the same for a ``RESEEN``; for a click
    ``(CLICKED, (click_ts, its entities in this shard))``; a watermark goes to every shard,
    and only when it moved.

    >>> from joiner.events import Impression
    >>> spec = FeatureSpec(entities={"user": ("user_id",), "item": ("item_id",)},
    ...                    windows_ms=(60_000,))
    >>> r = ShardRouter(spec, shards=16, partition=3)
    >>> imp = Impression("a", 1_000, "u1", "x", {})
    >>> r.route([(SEEN, (imp, 7)), (CLICKED, (imp, 2_000)), (WATERMARK, (3, 500, 7))])[:2]
    [(0, [('watermark', (3, 500, 7))]), (1, [('watermark', (3, 500, 7))])]
    >>> for shard, signals in r.route([(SEEN, (imp, 7)), (WATERMARK, (3, 500, 7))]):
    ...     print(shard, signals)
    4 [('seen', (1000, 'a', (('user', 'u1'),), 2, 3, 7))]
    12 [('seen', (1000, 'a', (('item', 'x'),), 2, 3, 7))]
    """

    def __init__(self, spec: FeatureSpec, shards: int, partition: int = 0) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.spec, self.shards, self.partition = spec, shards, partition
        self.sent: dict[int, tuple] = {}  # partition -> the watermark last sent to every shard
        # (entity, id) -> shard, for the busy entities: hashing showed in the profile. Cleared
        # when full, so it holds the recently seen ones.
        self._shard_of: dict[tuple[str, str], int] = {}

    def split(self, ids: list[tuple[str, str]]) -> dict[int, list[tuple[str, str]]]:
        """The entities ``ids`` by the shard owning each."""
        out: dict[int, list] = {}
        n, known = self.shards, self._shard_of
        for key in ids:
            k = known.get(key)
            if k is None:
                if len(known) >= SHARD_CACHE:
                    known.clear()
                k = known[key] = entity_shard(self.spec, key[0], key[1], n) if n > 1 else 0
            part = out.get(k)
            if part is None:
                out[k] = [key]
            else:
                part.append(key)
        return out

    def route(self, signals: list) -> list[tuple[int, list]]:
        by_shard: dict[int, list] = {}
        entity_ids = self.spec.entity_ids
        for kind, value in signals:
            if kind == SEEN or kind == RESEEN:
                imp, offset = value
                split = self.split(entity_ids(imp))
                if not split:
                    split = {shard_of("", imp.impression_id, self.shards): []}
                n, ts, iid, part = len(split), imp.ts, imp.impression_id, self.partition
                for k, ids in split.items():
                    by_shard.setdefault(k, []).append((kind, (ts, iid, tuple(ids), n, part,
                                                              offset)))
            elif kind == CLICKED:
                imp, click_ts = value
                for k, ids in self.split(entity_ids(imp)).items():
                    by_shard.setdefault(k, []).append((CLICKED, (click_ts, tuple(ids))))
            else:
                part = value[0]
                if self.sent.get(part) != value:
                    self.sent[part] = value
                    for k in range(self.shards):
                        by_shard.setdefault(k, []).append((kind, value))
        return sorted(by_shard.items())


def _signal(kind: str, value: list) -> tuple:
    """A waiting signal's value back from JSON: entities as (entity, id) tuples."""
    if kind == SEEN:
        ts, impression_id, ids, n, part, offset = value
        return ts, impression_id, tuple(map(tuple, ids)), n, part, offset
    return value[0], tuple(map(tuple, value[1]))


def merge_parts(parts: list[tuple[int, bytes]]) -> bytes:
    """One impression's counts from its shards' parts ((shard, JSON)): the entities of each,
    in the order of the shards, so a replay gives the same bytes.

    >>> merge_parts([(3, b'{"item":{"imp_1m":2}}'), (1, b'{"user":{"imp_1m":0}}'), (2, b"{}")])
    b'{"user":{"imp_1m":0},"item":{"imp_1m":2}}'
    """
    bodies = [json[1:-1] for _, json in sorted(parts) if len(json) > 2]
    return b"{" + b",".join(bodies) + b"}"


class PointInTimeScheduler:
    """Counts one shard's signals in event-time order and takes each impression's part of the
    snapshot once nothing before it can still arrive.

    Signals (as a `ShardRouter` sends them) wait in a heap and are counted up to
    ``allowed_lateness_ms - pit_delay_ms`` past the lowest partition's watermark, and the
    changed entities become rows for the store: in steady state that is as soon as they
    arrive, which keeps the store fresh. An impression's snapshot waits until the watermark is
    ``pit_delay_ms`` past it: everything before its ts has been counted by then, even an
    impression that arrived that much out of order, and the query as of ts leaves out what came
    after (exactly, since nothing more than the lateness after it has been counted).

    >>> from joiner.events import Impression
    >>> spec = FeatureSpec(entities={"user": ("user_id",)}, windows_ms=(60_000,))
    >>> s = PointInTimeScheduler(spec, partitions=1, allowed_lateness_ms=2_000,
    ...                          pit_delay_ms=1_000)
    >>> a, b = (Impression(i, ts, "u1", "x", {}) for i, ts in (("a", 1_000), ("b", 3_000)))
    >>> [(_, signals)] = ShardRouter(spec, 1).route(
    ...     [(SEEN, (b, 0)), (CLICKED, (a, 2_000)), (SEEN, (a, 1)), (WATERMARK, (0, 2_000))])
    >>> s.push(signals)  # a's part (of 1): the watermark is pit_delay_ms past it
    [('a', 1, b'{"user":{"imp_1m":0,"clk_1m":0}}', 1000)]
    >>> s.rows()  # counted up to lateness - delay past the watermark: all three, as of 3 s
    [('user', 'u1', {'imp_1m': 1, 'clk_1m': 1}, 3000)]
    >>> s.push([(WATERMARK, (0, DONE))])  # the end: every snapshot; b's leaves b out
    [('b', 1, b'{"user":{"imp_1m":1,"clk_1m":1}}', 3000)]
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
        self.replay_from: dict[int, int] = {}  # partition -> where its replay would start
        self.resend_ms = resend_ms(allowed_lateness_ms, pit_delay_ms)
        self.waiting: list[tuple] = []  # heap of (ts, seq, kind, value), not yet counted
        # heap of (ts, seq, impression id, its entities, parts, partition, offset): counted,
        # no snapshot yet. At a real time rate it holds pit_delay_ms of impressions (180k at
        # 2,000/s), so it is kept small, and only those a replay would not resend are in the
        # state, as JSON (see `_keep`).
        self.snapshots: list[tuple] = []
        # partition -> (offset, ts): its held impressions with an offset below or a ts at or
        # below these are in the state (from the last state() on); the others are resent
        self.kept_below: dict[int, tuple[int, int]] = {}
        # partition -> (offset, ts) at most the least of its held impressions not kept
        self._floor: dict[int, tuple[int, int]] = {}
        self._resumed: tuple | None = None  # (snapped_to, counted_to, kept_below) resumed
        # After a resume, the partitions whose first batch (their RESEEN, then a watermark)
        # has not come yet: until it has, nothing is counted or snapshotted, or another
        # partition's watermark could take a resent impression's snapshot late (from tiles).
        self._awaiting: set[int] = set()
        self.seq = 0
        self.newest = 0  # the newest event time counted: rows are as of it
        self.changed: set[tuple[str, str]] = set()  # entities whose row is not written yet
        # After a push, `waiting` holds exactly the signals after counted_to, `snapshots` the
        # impressions after snapped_to (both only go up). So `state` encodes each entry once,
        # in the chunk of the epoch it came in, keeps a chunk while it has an entry still
        # held, and a resume drops the entries a chunk holds that were done since.
        self.counted_to = self.snapped_to = -DONE
        self._chunks: dict[str, list[tuple[int, bytes]]] = {"waiting": [], "snapshots": []}
        self._new: dict[str, list[tuple]] = {"waiting": [], "snapshots": []}
        if resume is not None:
            if resume.get("format") != STATE_FORMAT:
                raise ValueError("the recovery store holds the counters' scheduler in another "
                                 f"format (format {STATE_FORMAT} leaves out the impressions a "
                                 "replay resends): let the join flow that wrote it finish, or "
                                 "start from a new recovery store")
            self.counters.restore(resume["counters"])
            for name in ("watermarks", "seq", "newest", "counted_to", "snapped_to"):
                setattr(self, name, resume[name])
            for blob in resume["waiting"]:
                entries = orjson.loads(blob)
                self._chunks["waiting"].append((max(e[0] for e in entries), blob))
                self.waiting += [(ts, seq, kind, _signal(kind, value))
                                 for ts, seq, kind, value in entries if ts > self.counted_to]
            for blob in resume["snapshots"]:
                entries = orjson.loads(blob)
                self._chunks["snapshots"].append((max(e[0] for e in entries), blob))
                self.snapshots += [(ts, seq, iid, tuple(map(tuple, ids)), *rest)
                                   for ts, seq, iid, ids, *rest in entries
                                   if ts > self.snapped_to]
            heapq.heapify(self.waiting)
            heapq.heapify(self.snapshots)
            self.changed = set(map(tuple, resume["changed"]))
            self.replay_from = {int(k): v for k, v in resume["replay_from"].items()}
            self.kept_below = {int(k): tuple(v) for k, v in resume["kept_below"].items()}
            self._resumed = (self.snapped_to, self.counted_to, dict(self.kept_below))
            self._awaiting = {p for p, rf in self.replay_from.items()  # those that resend
                              if rf < DONE and self.watermarks.get(p, DONE) < DONE}

    def push(self, *batches: list) -> list[Part]:
        """Take batches of ``(kind, value)`` signals (see `ShardRouter`); returns this shard's
        parts of the snapshots now due, in event-time order. The entities changed (or gone
        stale) pile up for `rows`."""
        waiting, snapshots, c = self.waiting, self.snapshots, self.counters
        seq, watermarks = self.seq, self.watermarks
        new_waiting = self._new["waiting"]
        for kind, value in chain.from_iterable(batches):
            if kind == WATERMARK:
                # (partition, ts, replay_from); without replay_from, the partition will not
                # resend: all its held impressions go in the state
                part, wm, *rf = value
                if wm > watermarks.get(part, wm - 1):
                    watermarks[part] = wm
                self.replay_from[part] = rf[0] if rf else DONE
                self._awaiting.discard(part)
                continue
            if kind == RESEEN:
                self._take_back(value, seq)
                seq += 1
                continue
            entry = (value[0], seq, kind, value)
            heapq.heappush(waiting, entry)
            new_waiting.append(entry)
            seq += 1
        self.seq = seq
        if len(watermarks) < self.partitions or self._awaiting:
            return []
        low = min(watermarks.values())
        limit, out = low + self.lead_ms, []
        low -= self.pit_delay_ms  # the snapshots' watermark
        newest = self.newest
        while True:
            next_ts = waiting[0][0] if waiting and waiting[0][0] <= limit else None
            while snapshots and snapshots[0][0] <= low and (
                    next_ts is None or snapshots[0][0] <= next_ts):
                ts, _, impression_id, ids, n, _, _ = heapq.heappop(snapshots)
                # as JSON bytes: bytewax deep-copies keyed state, and bytes copy for free.
                # Copied to its size: orjson's result keeps a 4 KB buffer for ~200 bytes, and
                # at real time a part waits a wait window (15 min) for its example: RSS grew
                # ~24 MB/s at 2,000 impressions/s (/tmp/wb/mem.py, tracemalloc).
                out.append((impression_id, n,
                            bytes(memoryview(orjson.dumps(c.snapshot_at(ts, ids)))), ts))
            if next_ts is None:
                break
            ts, seq, kind, value = heapq.heappop(waiting)
            if kind == SEEN:
                _, impression_id, ids, n, part, offset = value
                c.count_ids(ts, ids)
                self._hold((ts, seq, impression_id, ids, n, part, offset))
            else:
                c.click_ids(ts, value[1])
            if ts > newest:
                newest = ts
        self.newest = newest
        self.counted_to, self.snapped_to = limit, low
        self.changed |= c.touched()
        return out

    def _hold(self, entry: tuple) -> None:
        """Hold a counted impression until its snapshot: in the next state() if a replay would
        not resend it (see `kept_below`), else only here."""
        heapq.heappush(self.snapshots, entry)
        ts, part, offset = entry[0], entry[5], entry[6]
        below, at_or_before = self.kept_below.get(part, (-DONE, -DONE))
        if offset < below or ts <= at_or_before:
            self._new["snapshots"].append(entry)
        else:
            low_offset, low_ts = self._floor.get(part, (DONE, DONE))
            self._floor[part] = (min(low_offset, offset), min(low_ts, ts))

    def _take_back(self, value: tuple, seq: int) -> None:
        """A `RESEEN` impression: held again if it was held and left out of the state."""
        if self._resumed is None:
            return
        ts, impression_id, ids, n, part, offset = value
        snapped_to, counted_to, kept_below = self._resumed
        below, at_or_before = kept_below.get(part, (DONE, DONE))
        if snapped_to < ts <= counted_to and offset >= below and ts > at_or_before:
            self._hold((ts, seq, impression_id, ids, n, part, offset))

    def _keep(self) -> None:
        """Bring `kept_below` up to each partition's replay_from and watermark less
        `resend_ms`: the held impressions this leaves out of a replay go in the state (a
        pass over them only when `_floor` says there may be one)."""
        moved = {}
        for part, wm in self.watermarks.items():
            now = (self.replay_from.get(part, DONE), wm - self.resend_ms)
            if now != self.kept_below.get(part):
                moved[part] = now
        low = {p: self._floor.get(p, (DONE, DONE)) for p in moved}
        scan = {p: now for p, now in moved.items()
                if low[p][0] < now[0] or low[p][1] <= now[1]}
        if scan:
            new, floor = self._new["snapshots"], {p: (DONE, DONE) for p in scan}
            for e in self.snapshots:
                part = e[5]
                if part not in scan:
                    continue
                below, at_or_before = scan[part]
                if e[6] < below or e[0] <= at_or_before:  # not resent now
                    was = self.kept_below.get(part, (-DONE, -DONE))
                    if not (e[6] < was[0] or e[0] <= was[1]):  # and not kept yet
                        new.append(e)
                else:
                    f = floor[part]
                    floor[part] = (min(f[0], e[6]), min(f[1], e[0]))
            self._floor.update(floor)
        self.kept_below.update(moved)

    def rows(self) -> Rows:
        """The rows of the entities changed (or gone stale) since the last call, as of the
        newest event counted: built once per write, however many batches changed them."""
        c = self.counters
        keys, self.changed = self.changed.union(c.stale(self.newest)), set()
        return self._rows(keys)

    def all_rows(self) -> Rows:
        """Every entity's row, for a store that lost what was written."""
        self.changed = set()
        return self._rows(self.counters.keys())

    def _rows(self, keys) -> Rows:
        c, newest = self.counters, self.newest
        return [(e, i, c.values(e, i, newest), newest) for e, i in keys]

    def state(self) -> dict:
        """A picklable copy to pass back as ``resume``. It is taken every epoch: the held
        signals and the held impressions a replay would not resend (on a backlog, most of the
        input, waiting for the slowest partition) are JSON chunks, each encoded once (see
        ``counted_to``)."""
        self._keep()
        return {"format": STATE_FORMAT, "counters": self.counters.state(),
                "watermarks": self.watermarks, "replay_from": self.replay_from,
                "kept_below": self.kept_below,
                "waiting": self._encoded("waiting", self.counted_to),
                "snapshots": self._encoded("snapshots", self.snapped_to),
                "counted_to": self.counted_to, "snapped_to": self.snapped_to,
                "seq": self.seq, "newest": self.newest, "changed": list(self.changed)}

    def _encoded(self, name: str, done_to: int) -> list[bytes]:
        """The chunks still holding an entry after ``done_to``, with one more for the entries
        added since the last call that are."""
        chunks = [c for c in self._chunks[name] if c[0] > done_to]
        new = [e for e in self._new[name] if e[0] > done_to]
        if new:
            chunks.append((max(e[0] for e in new), orjson.dumps(new)))
        self._chunks[name], self._new[name] = chunks, []
        return [blob for _, blob in chunks]
