"""The learn dataflow: labeled examples -> FTRL, BOPR and the embedding model, kept in Redis.

Every partition of `examples` feeds one stateful step holding the models (one model learns
from all examples). It drops duplicate examples (the join's output is at-least-once),
archives examples and late-click corrections by event day for the daily retrain, learns in
batches, pushes what changed to the current model version every ``push_interval_s`` and
publishes a whole new version every ``snapshot_interval_s`` and at the end. The models, the
duplicate filter and the topic offsets are in bytewax's recovery state, so after a crash the
flow resumes from its last snapshot and learns each example once. When another publisher
(the daily retrain) makes a version current, the flow continues from that version.

    ctrstream run learn [--until-eof]
"""

from __future__ import annotations

import logging
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bytewax.operators as op
import orjson
import redis
import torch
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from flows import metrics
from flows.config import Config, load_config
from flows.kafka import KafkaRecordSink, TopicSource, dead_letter
from learners.archive import ExampleArchive
from learners.model import Models
from learners.publish import ModelStoreError, PublishConflict
from learners.publish import from_config as model_store

log = logging.getLogger(__name__)


class RecentIds:
    """Ids seen within ``horizon_ms`` of event time before the newest: a duplicate filter
    whose memory is bounded by the stream's rate times the horizon (~100 B an id)."""

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


def _check(ex) -> str | None:
    """Why an example cannot be learned, or None."""
    if not isinstance(ex, dict):
        return "not a JSON object"
    if not isinstance(ex.get("impression_id"), str) or not ex["impression_id"]:
        return "impression_id missing or not a string"
    if type(ex.get("ts")) is not int:
        return "ts missing or not an integer"
    if ex.get("kind", "example") == "example" and ex.get("label") not in (0, 1):
        return "label missing or not 0/1"
    return None


class LearnLogic(StatefulBatchLogic):
    def __init__(self, cfg: Config, resume: dict | None) -> None:
        # One torch thread: on a busy machine two trained the embedding model 5-8x slower
        # (learners/retrain.py measured it); the flow is one thread anyway.
        torch.set_num_threads(1)
        self.cfg, lc = cfg, cfg.learn
        self.store = model_store(cfg, name=lc.store_name, keep_days=lc.keep_days)
        self.archive = ExampleArchive(Path(cfg.data_dir) / "archive")
        self.to_archive: list[dict] = []
        self.counts = {"in": 0, "learned": 0, "duplicates": 0, "corrections": 0,
                       "dead_letters": 0, "skipped": 0}
        # next offset per partition of `examples`: recorded in every version we publish, so
        # a flow started without recovery state reads on from the version it continues.
        self.offsets: dict[int, int] = {}
        if resume is not None:
            self.models = Models.from_bytes(lc, resume["models"])
            self.version, self.dedup = resume["version"], RecentIds(lc.dedup_horizon_ms,
                                                                    resume["dedup"])
            self.counts, self.offsets = resume["counts"], resume["offsets"]
        else:
            self.dedup = RecentIds(lc.dedup_horizon_ms)
            self.version = _until_done("read the model pointer", self.store.current)
            if self.version is None:
                self.models = Models(lc)
                self._publish_new("first start: nothing published", expected=None)
            else:
                self.models = _until_done("load version " + self.version,
                                          lambda: Models.load(lc, self.store, self.version))
                # Counts go on with the model: the source reads on from the version's offsets.
                meta = self.store.get_meta(self.version) or {}
                self.counts.update(meta.get("counts") or {})
                self.offsets = {int(p): o for p, o in (meta.get("offsets") or {}).items()}
                log.info("learn: continuing from model version %s", self.version)
        now = time.monotonic()
        self.next_push, self.next_version = now + lc.push_interval_s, now + lc.snapshot_interval_s
        self.next_log, self.last_log = now + lc.log_interval_s, (now, self.counts["in"])

    def on_batch(self, values: list) -> tuple[list, bool]:
        cfg, out, examples = self.cfg, [], []
        topic = cfg.kafka.examples_topic
        for part, offset, raw in values:
            self.counts["in"] += 1
            if offset is None:  # a consumer error: raw is the KafkaError
                out.append(dead_letter(cfg, topic, part, None, f"kafka error: {raw}", None))
                continue
            self.offsets[part] = offset + 1
            try:
                ex = orjson.loads(raw)
                why = _check(ex)
            except orjson.JSONDecodeError as e:
                ex, why = None, f"bad JSON: {e}"
            if why is not None:
                out.append(dead_letter(cfg, topic, part, offset, why, raw))
                continue
            if ex.get("kind", "example") != "example":
                self.counts["corrections"] += 1  # late clicks: for the retrain's labels
                self.to_archive.append(ex)
            elif self.dedup.seen(ex["impression_id"], ex["ts"]):
                self.counts["duplicates"] += 1
            else:
                examples.append(ex)
        self.counts["dead_letters"] += len(out)
        if examples:
            self.to_archive += examples
            got = self.models.learn(examples, annotate=True)
            self.counts["learned"] += got["examples"]
            self.counts["skipped"] += len(examples) - got["examples"]
        self._on_time(time.monotonic())
        return out, StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime:
        # Pushes and versions are due even when no example arrives.
        wait = min(self.next_push, self.next_version) - time.monotonic()
        return datetime.now(UTC) + timedelta(seconds=max(wait, 0.0))

    def on_notify(self) -> tuple[list, bool]:
        self._on_time(time.monotonic())
        return [], StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list, bool]:
        self._flush_archive()
        current = _until_done("read the model pointer", self.store.current)
        if current != self.version:
            self._on_other_version(current)
        self._publish_new("end of input")
        self._log(time.monotonic())
        return [], StatefulBatchLogic.RETAIN

    def snapshot(self) -> dict:
        # The archive is written before the epoch is committed: a replay after a crash
        # appends the same examples again, which the archive ignores.
        self._flush_archive()
        return {"models": self.models.to_bytes(), "version": self.version,
                "dedup": self.dedup.state(), "counts": dict(self.counts),
                "offsets": dict(self.offsets)}

    # -- internals ----------------------------------------------------------------------------

    def _on_time(self, now: float) -> None:
        lc = self.cfg.learn
        if now >= self.next_version:
            self._publish_new("periodic")
            self.next_version = now + lc.snapshot_interval_s
            self.next_push = now + lc.push_interval_s
        elif now >= self.next_push:
            self._follow_or_push()
            self.next_push = now + lc.push_interval_s
        if now >= self.next_log:
            self._log(now)

    def _follow_or_push(self) -> None:
        current = _until_done("read the model pointer", self.store.current)
        if current != self.version:
            self._on_other_version(current)
            return
        changes = self.models.changes()
        t0 = time.monotonic()
        try:
            n = _until_done("push", lambda: self.models.write(self.store, self.version, changes))
            metrics.PUSH_SECONDS.labels("push").observe(time.monotonic() - t0)
        except ModelStoreError as e:  # our version is gone: Redis lost it
            log.warning("learn: %s; publishing everything as a new version", e)
            self._publish_new("version lost", expected=_until_done(
                "read the model pointer", self.store.current))
            return
        log.debug("learn: pushed %s to version %s", n, self.version)

    def _on_other_version(self, current: str | None) -> None:
        """The pointer names a version this flow did not publish last. A daily retrain's:
        continue from it. What was learned here since the retrained day ended (the hour or two
        before the retrain ran) is left behind: neither the retrain nor the new version saw
        it (replaying it from the archive would close that gap; not done yet). One of ours
        that is newer than the state resumed after a crash, or none (Redis lost it): publish
        ours over it; the examples since our snapshot are replayed into it, so none is
        learned twice."""
        meta = None if current is None else _until_done(
            "read a version's meta", lambda: self.store.get_meta(current))
        if meta is None or meta.get("source") == "online":
            self._publish_new("pointer missing" if current is None else "resumed",
                              expected=current)
            return
        log.info("learn: version %s was published by the %s; continuing from it (was %s)",
                 current, meta.get("source"), self.version)
        self.models = _until_done("load version " + current,
                                  lambda: Models.load(self.cfg.learn, self.store, current))
        self.version = current

    def _publish_new(self, why: str, expected: str | None | type = ...) -> None:
        """Write the models as a new version and make it current, if the pointer still names
        ``expected`` (default: the version this flow last published)."""
        lc, parent = self.cfg.learn, self.version
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
                               keep_days=lc.online_keep_hours / 24 if online else None)
            return version

        try:
            version = _until_done("publish a version", write_and_publish)
        except PublishConflict as e:
            self._on_other_version(e.found)
            return
        self.version = version
        metrics.PUSH_SECONDS.labels("version").observe(time.monotonic() - t0)
        log.info("learn: published model version %s (%s, %d examples learned) in %.1f s",
                 version, why, self.models.examples, time.monotonic() - t0)

    def _flush_archive(self) -> None:
        if self.to_archive:
            self.archive.append(self.to_archive)
            self.to_archive = []

    def _log(self, now: float) -> None:
        then, n_then = self.last_log
        rate = (self.counts["in"] - n_then) / max(now - then, 1e-9)
        parts, summary = [], self.models.summary()  # once: its window AUC sorts the window
        for name, s in summary.items():
            parts.append(f"{name} NE {s['window_ne']:.4f} calib {s['window_calibration']:.3f} "
                         f"AUC {s['window_auc']:.3f}")
        log.info("learn: %s in, %s learned, %s duplicates, %s dead letters, %.0f ex/s; %s",
                 f"{self.counts['in']:,}", f"{self.counts['learned']:,}",
                 f"{self.counts['duplicates']:,}", f"{self.counts['dead_letters']:,}", rate,
                 "; ".join(parts))
        write_stats(self.cfg, {"counts": self.counts, "version": self.version,
                               "metrics": summary})
        behind = metrics.learn_report(self.cfg, self.counts, summary, self.version,
                                      self.offsets, now)
        metrics.append_history(history_path(self.cfg), {
            "counts": self.counts, "version": self.version, "metrics": summary,
            "input_behind": behind})
        self.next_log, self.last_log = now + self.cfg.learn.log_interval_s, (now, self.counts["in"])


def _until_done(what: str, fn):
    """``fn()``, tried again while Redis is unreachable: an outage holds the flow back (and
    so the reading of its input), never crashes it."""
    attempt, t0 = 0, time.monotonic()
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
            metrics.redis_error("learn")
            attempt += 1
            delay = min(0.05 * 2 ** attempt, 2.0)
            log.warning("learn: %s failed (attempt %d, Redis down %.1f s): %s; retrying in "
                        "%.1f s", what, attempt, time.monotonic() - t0, e, delay)
            time.sleep(delay)


def stats_path(cfg: Config) -> Path:
    return Path(cfg.data_dir) / "learn" / "stats.json"


def history_path(cfg: Config) -> Path:
    """One JSON line per log interval: counts, version and every model's metrics."""
    return Path(cfg.data_dir) / "learn" / "history.jsonl"


def write_stats(cfg: Config, stats: dict) -> None:
    metrics.write_json(stats_path(cfg), stats)


def start_offsets(cfg: Config) -> dict[int, int]:
    """Where the current model version's learning stopped in `examples` (none published:
    nothing, so from the beginning)."""
    store = model_store(cfg, name=cfg.learn.store_name)
    current = _until_done("read the model pointer", store.current)
    meta = None if current is None else store.get_meta(current)
    return {int(p): o for p, o in ((meta or {}).get("offsets") or {}).items()}


def build(cfg: Config | str | None = None, until_eof: bool = False) -> Dataflow:
    """The learn dataflow; ``cfg`` is a Config or a config file path (None: the default)."""
    cfg = cfg if isinstance(cfg, Config) else load_config(cfg)
    flow = Dataflow("learn")
    msgs = op.input("examples", flow, TopicSource(cfg, cfg.kafka.examples_topic, until_eof,
                                                  lambda: start_offsets(cfg)))
    learned = op.stateful_batch("learn", op.key_on("one_model", msgs, lambda _: "model"),
                                lambda resume: LearnLogic(cfg, resume))
    op.output("dead_letters", op.map("untag", learned, lambda kv: kv[1]), KafkaRecordSink(cfg))
    return flow

