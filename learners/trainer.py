"""The online trainer: records of `examples` in, one set of models learned from each example
once, kept current in the model store (learners/publish.py).

It drops duplicate examples (the join's output is at-least-once), sends malformed records
back as dead letters, archives examples, quarantined examples and late-click corrections by
event day for the daily retrain, learns in batches, pushes what changed into the current
model version every ``push_interval_s`` and publishes a whole new version every
``snapshot_interval_s`` and at the end of input. When another publisher (the daily retrain)
makes a version current, it continues from that version, after learning again what it
archived since the end of the retrained day (`replay_since`); so does a trainer started
without a recovery state from a retrain's version, which reads on from the offsets of the
online version the retrain replaced. Redis outages hold it back (every
Redis call goes through `features.store.until_done`), never crash it.

It knows no stream processor: the caller hands it batches of (partition, offset, raw bytes),
calls `on_time` when a push or version may be due (`next_due`), and keeps `state` for
recovery. It never builds models itself: ``new_models()``, ``load_models(version)`` and
``models_from_bytes(data)`` do (a ``learners.model.Models`` or anything with its methods).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import orjson

from features.store import until_done
from joiner.events import CORRECTION, NOT_LEARNED, why_not_learnable
from learners.archive import DAY_MS, ExampleArchive, day_of, to_examples
from learners.publish import ModelStore, ModelStoreError, PublishConflict

if TYPE_CHECKING:
    from learners.model import Models

log = logging.getLogger(__name__)

COUNTS = ("in", "learned", "duplicates", "corrections", "dead_letters", "skipped")
REPLAY_CHUNK = 10_000  # archived examples decoded and learned at a time on a replay


def day_end_ms(date: str) -> int:
    """The first ms after the UTC day ``date`` ('YYYY-MM-DD').

    >>> day_of(day_end_ms("2023-11-14"))
    '2023-11-15'
    """
    d = dt.date.fromisoformat(date)
    return (d.toordinal() - dt.date(1970, 1, 1).toordinal() + 1) * DAY_MS


class DeadLetter(NamedTuple):
    """A record that cannot be learned or archived; ``offset`` and ``raw`` are None for a
    consumer error."""

    partition: int
    offset: int | None
    reason: str
    raw: bytes | None


class RecentIds:
    """Ids seen within ``horizon_ms`` of event time before the newest: a duplicate filter
    whose memory is bounded by the stream's rate times the horizon (~100 B an id).

    >>> d = RecentIds(horizon_ms=1000)
    >>> d.seen("a", 0), d.seen("a", 10), d.seen("b", 5000), d.seen("a", 5001)
    (False, True, False, False)
    """

    def __init__(self, horizon_ms: int, state: list | None = None) -> None:
        self.horizon_ms = horizon_ms
        self.order: deque = deque(state or ())  # (ts, id) in arrival order
        self.ids = {i for _, i in self.order}
        self.newest = max((t for t, _ in self.order), default=0)

    def seen(self, id_: str, ts: int) -> bool:
        """True if ``id_`` was seen before (within the horizon); else remember it."""
        if id_ in self.ids:
            return True
        self.ids.add(id_)
        self.order.append((ts, id_))
        self.newest = max(self.newest, ts)
        cut = self.newest - self.horizon_ms
        while self.order and self.order[0][0] < cut:
            self.ids.discard(self.order.popleft()[1])
        return False

    def state(self) -> list:
        return list(self.order)


class OnlineTrainer:
    """Learns the records of `examples` into one set of models kept in ``store``; see the
    module docstring.

    Without ``resume`` (a `state`) it continues from the store's current version, or
    publishes fresh models as the first one. ``on_redis_error()`` is called on each failed
    Redis call, ``on_written(kind, seconds)`` after each push (kind "push") or published
    version ("version"): hooks for metrics. ``clock`` is monotonic seconds, the clock of
    `on_time` and `next_due`.
    """

    def __init__(self, store: ModelStore, archive: ExampleArchive, *,
                 new_models: Callable[[], Models], load_models: Callable[[str], Models],
                 models_from_bytes: Callable[[bytes], Models], dedup_horizon_ms: int,
                 push_interval_s: float, snapshot_interval_s: float, online_keep_hours: float,
                 resume: dict | None = None, on_redis_error: Callable[[], None] | None = None,
                 on_written: Callable[[str, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.archive = store, archive
        self.load_models = load_models
        self.push_interval_s, self.snapshot_interval_s = push_interval_s, snapshot_interval_s
        self.online_keep_hours = online_keep_hours
        self.on_redis_error, self.on_written, self.clock = on_redis_error, on_written, clock
        self.to_archive: list[dict] = []
        self.counts = dict.fromkeys(COUNTS, 0)
        # next offset per partition of `examples`: recorded in every version we publish, so
        # a flow started without recovery state reads on from the version it continues.
        self.offsets: dict[int, int] = {}
        if resume is not None:
            self.models = models_from_bytes(resume["models"])
            self.version = resume["version"]
            self.dedup = RecentIds(dedup_horizon_ms, resume["dedup"])
            self.counts, self.offsets = resume["counts"], resume["offsets"]
        else:
            self.dedup = RecentIds(dedup_horizon_ms)
            self.version = self._until_done("read the model pointer", store.current)
            if self.version is None:
                self.models = new_models()
                self._publish_new("first start: nothing published", expected=None)
            else:
                version = self.version
                self.models = self._until_done("load version " + version,
                                               lambda: load_models(version))
                # Counts go on with the model: the source reads on from the version's offsets.
                meta = self._until_done("read a version's meta",
                                        lambda: store.get_meta(version)) or {}
                self.counts.update(meta.get("counts") or {})
                self.offsets = {int(p): o for p, o in (meta.get("offsets") or {}).items()}
                log.info("learn: continuing from model version %s", version)
                if meta.get("source") != "online" and meta.get("date"):
                    # A retrain's: its offsets are the online version's it replaced, which
                    # had learned past the retrained day; learn that part again.
                    self.replay_since(day_end_ms(str(meta["date"])))
        now = clock()
        self.next_push, self.next_version = now + push_interval_s, now + snapshot_interval_s

    def on_batch(self, records: list[tuple]) -> list[DeadLetter]:
        """Learn a batch of (partition, offset, raw bytes) records (offset None: a consumer
        error, raw its description); returns the dead letters. Pushes or publishes when due."""
        dead, examples = [], []
        for part, offset, raw in records:
            self.counts["in"] += 1
            if offset is None:
                dead.append(DeadLetter(part, None, f"kafka error: {raw}", None))
                continue
            self.offsets[part] = offset + 1
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                dead.append(DeadLetter(part, offset, f"bad JSON: {e}", raw))
                continue
            why = why_not_learnable(record)
            if why == CORRECTION:
                self.counts["corrections"] += 1  # late clicks: for the retrain's labels
                self.to_archive.append(record)
            elif why is not None and why not in NOT_LEARNED:
                dead.append(DeadLetter(part, offset, why, raw))
            elif self.dedup.seen(record["impression_id"], record["ts"]):
                self.counts["duplicates"] += 1
            elif why is None:
                examples.append(record)
            else:  # quarantined: the retrain decides about its label, so archive it
                self.counts["skipped"] += 1
                self.to_archive.append(record)
        self.counts["dead_letters"] += len(dead)
        if examples:
            # Written to the archive at the next flush, after learning: each example then
            # carries the predictions made before it was learned.
            self.to_archive += examples
            got = self.models.learn(examples, annotate=True, checked=True)
            self.counts["learned"] += got["examples"]
            self.counts["skipped"] += len(examples) - got["examples"]
        self.on_time(self.clock())
        return dead

    def next_due(self) -> float:
        """When (on ``clock``) the next push or version is due, even with no input."""
        return min(self.next_push, self.next_version)

    def on_time(self, now: float) -> None:
        """Publish a new version or push the changes, if due at ``now``."""
        if now >= self.next_version:
            self._publish_new("periodic")
            self.next_version = now + self.snapshot_interval_s
            self.next_push = now + self.push_interval_s
        elif now >= self.next_push:
            self._follow_or_push()
            self.next_push = now + self.push_interval_s

    def end_of_input(self) -> None:
        """Archive what is left and publish everything as a new version."""
        self._flush_archive()
        current = self._until_done("read the model pointer", self.store.current)
        if current != self.version:
            self._on_other_version(current)
        self._publish_new("end of input")

    def state(self) -> dict:
        """What resumes this trainer after a crash (``resume``). The archive is written first,
        before the caller commits the state: a replay after a crash appends the same
        examples again, which the archive ignores."""
        self._flush_archive()
        return {"models": self.models.to_bytes(), "version": self.version,
                "dedup": self.dedup.state(), "counts": dict(self.counts),
                "offsets": dict(self.offsets)}

    # -- internals ----------------------------------------------------------------------------

    def _until_done(self, what: str, fn):
        return until_done("learn: " + what, fn, client=self.store.client,
                          on_error=self.on_redis_error)

    def _observe(self, kind: str, t0: float) -> None:
        if self.on_written is not None:
            self.on_written(kind, time.monotonic() - t0)

    def _follow_or_push(self) -> None:
        current = self._until_done("read the model pointer", self.store.current)
        if current != self.version:
            self._on_other_version(current)
            return
        changes = self.models.changes()
        t0 = time.monotonic()
        try:
            n = self._until_done("push", lambda: self.models.write(self.store, self.version,
                                                                   changes))
        except ModelStoreError as e:  # our version is gone: Redis lost it
            log.warning("learn: %s; publishing everything as a new version", e)
            self._publish_new("version lost", expected=self._until_done(
                "read the model pointer", self.store.current))
            return
        self._observe("push", t0)
        log.debug("learn: pushed %s to version %s", n, self.version)

    def _on_other_version(self, current: str | None) -> None:
        """The pointer names a version this trainer did not publish last. A daily retrain's:
        continue from it, after learning again what was learned here since the retrained
        day ended (the hour or two before the retrain ran), replayed from the archive
        (`replay_since`): the retrain saw none of it. One of ours that is newer than the
        state resumed after a crash, or none (Redis lost it): publish ours over it; the
        examples since our snapshot are replayed into it, so none is learned twice."""
        meta = None if current is None else self._until_done(
            "read a version's meta", lambda: self.store.get_meta(current))
        if meta is None or meta.get("source") == "online":
            self._publish_new("pointer missing" if current is None else "resumed",
                              expected=current)
            return
        log.info("learn: version %s was published by the %s; continuing from it (was %s)",
                 current, meta.get("source"), self.version)
        self.models = self._until_done("load version " + current,
                                       lambda: self.load_models(current))
        self.version = current
        date = meta.get("date")
        if date is None:
            log.warning("learn: version %s records no retrained day: nothing replayed",
                        current)
            return
        self.replay_since(day_end_ms(str(date)))

    def replay_since(self, ts_ms: int) -> int:
        """Learn again every archived example with ``ts >= ts_ms`` that this trainer learned
        (the learnable rule decides, as in `on_batch`), in event-time order, ``REPLAY_CHUNK``
        at a time. Returns how many."""
        self._flush_archive()  # what the last batches learned is in the archive first
        table = self.archive.read_since(ts_ms)
        n = 0
        for s in range(0, table.num_rows, REPLAY_CHUNK):
            examples = [e for e in to_examples(table.slice(s, REPLAY_CHUNK))
                        if why_not_learnable(e) is None]
            for e in examples:
                e.pop("online_p", None)  # the archive keeps the predictions made the first time
                # Read again from the topic (a start from a retrain's offsets): a duplicate.
                self.dedup.seen(e["impression_id"], e["ts"])
            n += self.models.learn(examples, checked=True)["examples"]
        log.info("learn: replayed %s examples archived since %s into version %s", f"{n:,}",
                 day_of(ts_ms) if ts_ms % DAY_MS == 0 else ts_ms, self.version)
        return n

    def _publish_new(self, why: str, expected: str | None | type = ...) -> None:
        """Write the models as a new version and make it current, if the pointer still names
        ``expected`` (default: the version this trainer last published)."""
        parent = self.version
        expected = self.version if expected is ... else expected
        t0 = time.monotonic()

        # A version records the offsets it has learned through, and a flow started without
        # recovery state reads on from there: what it learned must be archived first.
        self._flush_archive()

        def write_and_publish() -> str:
            offsets = {str(p): o for p, o in self.offsets.items()}  # JSON keys are strings
            version = self.models.write_version(self.store, "online", parent,
                                                {"offsets": offsets, "counts": self.counts})
            prev_meta = self.store.get_meta(expected) if expected is not None else None
            # Our periodic versions are superseded within minutes; a retrain's is kept longer.
            online = prev_meta is not None and prev_meta.get("source") == "online"
            self.store.publish(version, expected_current=expected,
                               keep_days=self.online_keep_hours / 24 if online else None)
            return version

        try:
            version = self._until_done("publish a version", write_and_publish)
        except PublishConflict as e:
            self._on_other_version(e.found)
            return
        self.version = version
        self._observe("version", t0)
        log.info("learn: published model version %s (%s, %d examples learned) in %.1f s",
                 version, why, self.models.examples, time.monotonic() - t0)

    def _flush_archive(self) -> None:
        if self.to_archive:
            self.archive.append(self.to_archive)
            self.to_archive = []
