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
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from flows.config import Config, load_config
from flows.kafka import KafkaRecordSink, TopicSource, dead_letter
from learners.archive import ExampleArchive
from learners.model import Models
from learners.publish import PublishConflict
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
        self.cfg, lc = cfg, cfg.learn
        self.store = model_store(cfg, name=lc.store_name, keep_days=lc.keep_days)
        self.archive = ExampleArchive(Path(cfg.data_dir) / "archive")
        self.to_archive: list[dict] = []
        self.counts = {"in": 0, "learned": 0, "duplicates": 0, "corrections": 0,
                       "dead_letters": 0, "skipped": 0}
        if resume is not None:
            self.models = Models.from_bytes(lc, resume["models"])
            self.version, self.dedup = resume["version"], RecentIds(lc.dedup_horizon_ms,
                                                                    resume["dedup"])
            self.counts = resume["counts"]
        else:
            self.dedup = RecentIds(lc.dedup_horizon_ms)
            self.version = self.store.current()
            if self.version is None:
                self.models = Models(lc)
                self._publish_new("first start: nothing published")
            else:
                self.models = Models.load(lc, self.store, self.version)
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
        self._publish_new("end of input")
        self._log(time.monotonic())
        return [], StatefulBatchLogic.RETAIN

    def snapshot(self) -> dict:
        # The archive is written before the epoch is committed: a replay after a crash
        # appends the same examples again, which the archive ignores.
        self._flush_archive()
        return {"models": self.models.to_bytes(), "version": self.version,
                "dedup": self.dedup.state(), "counts": dict(self.counts)}

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
        current = self.store.current()
        if current != self.version:
            self._follow(current)
            return
        t0 = time.monotonic()
        n = self.models.push(self.store, self.version)
        log.debug("learn: pushed %s to version %s in %.0f ms", n, self.version,
                  (time.monotonic() - t0) * 1000)

    def _follow(self, current: str | None) -> None:
        """Another publisher (the daily retrain) made ``current`` the version: continue from
        it. What was learned here since then is left behind; the retrain saw those days."""
        if current is None:
            log.warning("learn: the model pointer is gone (Redis emptied?): publishing anew")
            self._publish_new("pointer missing")
            return
        log.info("learn: version %s was published by another publisher; continuing from it "
                 "(was %s)", current, self.version)
        self.models = Models.load(self.cfg.learn, self.store, current)
        self.version = current

    def _publish_new(self, why: str) -> None:
        lc, previous = self.cfg.learn, self.version
        t0 = time.monotonic()
        version = self.models.write_version(self.store, "online", previous)
        prev_meta = self.store.get_meta(previous) if previous is not None else None
        # Our own periodic versions are superseded within minutes; a retrain's is kept longer.
        online = prev_meta is not None and prev_meta.get("source") == "online"
        try:
            self.store.publish(version, expected_current=previous,
                               keep_days=lc.online_keep_hours / 24 if online else None)
        except PublishConflict as e:
            self._follow(e.found)
            return
        self.version = version
        log.info("learn: published model version %s (%s, %d examples learned) in %.1f s",
                 version, why, self.models.examples, time.monotonic() - t0)

    def _flush_archive(self) -> None:
        if self.to_archive:
            self.archive.append(self.to_archive)
            self.to_archive = []

    def _log(self, now: float) -> None:
        then, n_then = self.last_log
        rate = (self.counts["in"] - n_then) / max(now - then, 1e-9)
        parts = []
        for name, s in self.models.summary().items():
            parts.append(f"{name} NE {s['window_ne']:.4f} calib {s['window_calibration']:.3f} "
                         f"AUC {s['window_auc']:.3f}")
        log.info("learn: %s in, %s learned, %s duplicates, %s dead letters, %.0f ex/s; %s",
                 f"{self.counts['in']:,}", f"{self.counts['learned']:,}",
                 f"{self.counts['duplicates']:,}", f"{self.counts['dead_letters']:,}", rate,
                 "; ".join(parts))
        write_stats(self.cfg, {"counts": self.counts, "version": self.version,
                               "metrics": self.models.summary()})
        self.next_log, self.last_log = now + self.cfg.learn.log_interval_s, (now, self.counts["in"])


def stats_path(cfg: Config) -> Path:
    return Path(cfg.data_dir) / "learn" / "stats.json"


def write_stats(cfg: Config, stats: dict) -> None:
    path = stats_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(stats, option=orjson.OPT_SERIALIZE_NUMPY))
    tmp.replace(path)


def build(cfg: Config | str | None = None, until_eof: bool = False) -> Dataflow:
    """The learn dataflow; ``cfg`` is a Config or a config file path (None: the default)."""
    cfg = cfg if isinstance(cfg, Config) else load_config(cfg)
    flow = Dataflow("learn")
    msgs = op.input("examples", flow, TopicSource(cfg, cfg.kafka.examples_topic, until_eof))
    learned = op.stateful_batch("learn", op.key_on("one_model", msgs, lambda _: "model"),
                                lambda resume: LearnLogic(cfg, resume))
    op.output("dead_letters", op.map("untag", learned, lambda kv: kv[1]), KafkaRecordSink(cfg))
    return flow

