"""The learn dataflow: labeled examples -> FTRL, BOPR and the embedding model, kept in Redis.

Every partition of `examples` feeds one stateful step holding the online trainer
(learners/trainer.py: one model learns from all examples; dedup, validation, the archive,
pushes, versions and following the daily retrain's version live there). This module builds
it from the config, turns its dead letters into Kafka records, and logs, writes the stats
file and reports metrics. The trainer's state and the topic offsets are in bytewax's
recovery state, so after a crash the flow resumes from its last snapshot and learns each
example once.

    ctrstream run learn [--until-eof]
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bytewax.operators as op
import torch
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from features.store import until_done
from flows import metrics
from flows.build import feature_spec, model_settings, model_store
from flows.config import Config, load_config
from flows.kafka import KafkaRecordSink, TopicSource, dead_letter
from learners.archive import ExampleArchive
from learners.metrics import slice_range
from learners.model import Models, check_counted
from learners.trainer import OnlineTrainer

log = logging.getLogger(__name__)


def trainer(cfg: Config, resume: dict | None = None) -> OnlineTrainer:
    """The learn flow's online trainer, from ``cfg`` (``resume``: its recovery state)."""
    lc, settings, spec = cfg.learn, model_settings(cfg), feature_spec(cfg)
    store = model_store(cfg)
    return OnlineTrainer(
        store, ExampleArchive(Path(cfg.data_dir) / "archive"),
        # A version or state that reads counts the spec does not count raises NotCounted.
        new_models=lambda: Models(settings, spec),
        load_models=lambda version: Models.load(settings, spec, store, version),
        models_from_bytes=lambda data: Models.from_bytes(settings, spec, data),
        dedup_horizon_ms=lc.dedup_horizon_ms, push_interval_s=lc.push_interval_s,
        snapshot_interval_s=lc.snapshot_interval_s, online_keep_hours=lc.online_keep_hours,
        resume=resume, on_redis_error=_redis_error,
        on_written=lambda kind, seconds: metrics.PUSH_SECONDS.labels(kind).observe(seconds))


def _redis_error() -> None:
    metrics.redis_error("learn")


class LearnLogic(StatefulBatchLogic):
    def __init__(self, cfg: Config, resume: dict | None) -> None:
        # One torch thread: on a busy machine two trained the embedding model 5-8x slower
        # (learners/retrain.py measured it); the flow is one thread anyway.
        torch.set_num_threads(1)
        self.cfg, self.trainer = cfg, trainer(cfg, resume)
        now = time.monotonic()
        self.next_log = now + cfg.learn.log_interval_s
        self.last_log = (now, self.trainer.counts["in"])

    def on_batch(self, values: list) -> tuple[list, bool]:
        topic = self.cfg.kafka.examples_topic
        out = [dead_letter(self.cfg, topic, *d) for d in self.trainer.on_batch(values)]
        self._maybe_log(time.monotonic())
        return out, StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime:
        # Pushes and versions are due even when no example arrives.
        wait = self.trainer.next_due() - time.monotonic()
        return datetime.now(UTC) + timedelta(seconds=max(wait, 0.0))

    def on_notify(self) -> tuple[list, bool]:
        now = time.monotonic()
        self.trainer.on_time(now)
        self._maybe_log(now)
        return [], StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list, bool]:
        self.trainer.end_of_input()
        self._log(time.monotonic())
        return [], StatefulBatchLogic.RETAIN

    def snapshot(self) -> dict:
        return self.trainer.state()

    def _maybe_log(self, now: float) -> None:
        if now >= self.next_log:
            self._log(now)

    def _log(self, now: float) -> None:
        t, (then, n_then) = self.trainer, self.last_log
        counts, version = t.counts, t.version
        rate = (counts["in"] - n_then) / max(now - then, 1e-9)
        parts, summary = [], t.models.summary()  # once: its window AUC sorts the window
        for name, s in summary.items():
            (p0, p1), (h0, h1) = slice_range(s, "position"), slice_range(s, "hour")
            parts.append(f"{name} NE {s['window_ne']:.4f} calib {s['window_calibration']:.3f} "
                         f"(by position {p0:.2f}-{p1:.2f}, by hour {h0:.2f}-{h1:.2f}) "
                         f"AUC {s['window_auc']:.3f}")
        log.info("learn: %s in, %s learned, %s duplicates, %s dead letters, %.0f ex/s; %s",
                 f"{counts['in']:,}", f"{counts['learned']:,}", f"{counts['duplicates']:,}",
                 f"{counts['dead_letters']:,}", rate, "; ".join(parts))
        write_stats(self.cfg, {"counts": counts, "version": version, "metrics": summary})
        behind = metrics.learn_report(self.cfg, counts, summary, version, t.offsets, now)
        metrics.append_history(history_path(self.cfg), {
            "counts": counts, "version": version, "metrics": summary, "input_behind": behind})
        self.next_log, self.last_log = now + self.cfg.learn.log_interval_s, (now, counts["in"])


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
    store = model_store(cfg)
    current = until_done("learn: read the model pointer", store.current, client=store.client,
                         on_error=_redis_error)
    meta = None if current is None else store.get_meta(current)
    if meta is not None:  # at start-up, not at the first example
        check_counted(meta, feature_spec(cfg), f"model version {current}")
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
