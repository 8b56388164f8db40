"""The join dataflow: impressions + clicks -> labeled examples, late-click corrections and
dead letters.

Partition i of `impressions` and partition i of `clicks` hold the same impression ids, so each
input partition is joined where it is read, by a ``WaitWindowJoiner`` inside the source: no
shuffle, and bytewax's snapshot of a partition is a few offsets, not the buffered impressions
(on resume the partition replays the retained range from Kafka; see joiner/join.py).

    ctrstream run join [--until-eof]
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from features.scheduler import DONE, RESEEN, WATERMARK, ShardRouter, resend_ms
from flows import features_ops as fo
from flows import metrics
from flows.build import feature_spec, wait_window_joiner
from flows.config import Config, load_config
from flows.kafka import (
    LOW_LATENCY_CONSUMER,
    KafkaRecordSink,
    dead_letter,
    idle_awake,
    input_partitions,
)
from joiner.join import (
    CLICKED,
    CLICKS,
    DEAD_LETTER,
    EXAMPLE,
    IMPRESSIONS,
    SEEN,
)

log = logging.getLogger(__name__)

# The source's records come in the shape their first step takes, so no step re-shapes every
# record: (topic, key, value) goes to Kafka as it is; with features on, the examples of a batch
# go to the attach step as (attach_key, (EXAMPLE, [(impression id, ts, bytes)])), a record per
# cell (off, an example is a (topic, key, value) like the rest);
# (shard key, (shard, signals)) feeds the counters. One `branch` sends each example on (three
# filter_maps and a map each cost a Python call and a bytewax hop per record).


class _JoinPartition(StatefulSourcePartition):
    def __init__(self, cfg: Config, part: int, resume: dict | None, until_eof: bool) -> None:
        self.cfg, self.part, self.until_eof = cfg, part, until_eof
        self.topics = {cfg.kafka.impressions_topic: IMPRESSIONS, cfg.kafka.clicks_topic: CLICKS}
        self.topic_of = {stream: topic for topic, stream in self.topics.items()}
        self.joiner = wait_window_joiner(cfg, f"p{part}", signals=cfg.features.enabled)
        self.router = (ShardRouter(feature_spec(cfg), cfg.features.shards, part)
                       if cfg.features.enabled else None)
        self.resent: list = []  # RESEEN signals of the replay on resume, sent with the first batch
        self.shard_keys = fo.shard_keys(cfg.features.shards)
        self.consumer = Consumer(cfg.kafka_client(**{
            "group.id": f"ctrstream-join-{part}", **LOW_LATENCY_CONSUMER}))
        self.awake: datetime | None = None
        self.eof: set[str] = set()
        self.done = False
        self.stats_path = Path(cfg.data_dir) / "join" / f"stats-p{part}.json"
        self.history_path = self.stats_path.with_name(f"history-p{part}.jsonl")
        self.last_log = time.monotonic()
        self.events_since_log = 0
        imp_at = clk_at = OFFSET_BEGINNING
        if resume is not None:
            self._rebuild(resume)
            imp_at, clk_at = resume["next_offset"][IMPRESSIONS], resume["next_offset"][CLICKS]
        self.consumer.assign([TopicPartition(cfg.kafka.impressions_topic, part, imp_at),
                              TopicPartition(cfg.kafka.clicks_topic, part, clk_at)])
        self.held: str | None = None  # the input stream paused to keep the two in step
        self.pauses = 0

    def _replay(self, topic: str, start: int, stop: int, apply) -> int:
        """Feed messages [start, stop) of one topic-partition to ``apply(raw, offset)``."""
        if start >= stop:
            return 0
        self.consumer.assign([TopicPartition(topic, self.part, start)])
        n, pos, last_progress = 0, start, time.monotonic()
        while pos < stop:
            msgs = self.consumer.consume(1000, timeout=1.0)
            if not msgs and time.monotonic() - last_progress > 60:
                raise RuntimeError(f"replay of {topic}[{self.part}] stalled at offset {pos} "
                                   f"of {start}..{stop}")
            for msg in msgs:
                if msg.error() is not None:
                    continue
                if msg.offset() >= stop:  # also ends a range whose last offsets are gone
                    pos = stop
                    break
                if n == 0 and msg.offset() > start:
                    log.warning("join p%d: %s offsets %d..%d are gone (retention shorter than "
                                "the late-click horizon?): state rebuilt without them",
                                self.part, topic, start, msg.offset())
                apply(msg.value(), msg.offset())
                n, pos, last_progress = n + 1, msg.offset() + 1, time.monotonic()
        return n

    def _rebuild(self, snap: dict) -> None:
        t0 = time.monotonic()
        (imp_lo, clk_lo), hi = snap["replay_from"], snap["next_offset"]
        self.joiner.start_rebuild(snap)
        # The counters shards left out of their state the impressions they held that this
        # replay resends: those after the watermark less resend_ms (features/scheduler.py).
        f = self.cfg.features
        after = snap["watermark"] - resend_ms(f.allowed_lateness_ms, f.pit_delay_ms)

        def rebuild_impression(raw: bytes, offset: int) -> None:
            imp = self.joiner.rebuild_impression(raw, offset)
            if imp is not None and self.router is not None and imp.ts > after:
                self.resent.append((RESEEN, (imp, offset)))

        n_imp = self._replay(self.cfg.kafka.impressions_topic, imp_lo, hi[IMPRESSIONS],
                             rebuild_impression)
        n_clk = self._replay(self.cfg.kafka.clicks_topic, clk_lo, hi[CLICKS],
                             self.joiner.rebuild_click)
        self.joiner.finish_rebuild()
        log.info("join p%d: resumed from snapshot, replayed %d impressions and %d clicks in "
                 "%.1f s (%d pending, %d remembered, %d resent to the counters)", self.part,
                 n_imp, n_clk, time.monotonic() - t0, self.joiner.q.pending_count,
                 len(self.joiner.q) - self.joiner.q.pending_count, len(self.resent))

    def next_batch(self) -> list:
        if self.done:
            raise StopIteration()
        cfg, j, out = self.cfg, self.joiner, []
        errors = []  # records for Kafka as they are: not the joiner's output
        msgs = self.consumer.consume(cfg.join.batch_size, timeout=0)
        self.awake = idle_awake(bool(msgs))
        now, wall_ms = time.monotonic(), int(time.time() * 1000)
        for msg in msgs:
            topic = msg.topic()
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.eof.add(topic)
                    j.caught_up(self.topics[topic], now)
                    continue
                log.error("join p%d: kafka error on %s: %s", self.part, topic, err)
                errors.append(dead_letter(cfg, topic or "", self.part, None,
                                          f"kafka error: {err}", None))
                continue
            self.eof.discard(topic)
            self.on_message(self.topics[topic], msg.value(), msg.offset(), now, out, wall_ms,
                            msg.key())
        self.events_since_log += len(msgs)
        self._align()
        j.advance(now, out)
        if self.until_eof and len(self.eof) == 2:
            j.flush(out)
            self.done = True
        records = errors
        if j.signals:
            # Everything before the watermark has been joined here: the counters may apply
            # this partition's signals up to it (all of them once it is done).
            signals = self.resent + [(kind, value) for kind, _, value in out
                                     if kind in (SEEN, CLICKED)]
            self.resent = []
            signals.append((WATERMARK, (self.part, DONE if self.done else j.watermark,
                                        j.impressions_replay_from())))
            keys = self.shard_keys
            records += [(keys[k], (k, sig)) for k, sig in self.router.route(signals)]
            # examples: one record per attach cell (key: (impression id, ts)), not per example
            records += fo.examples([(*key, value) for kind, key, value in out if kind == EXAMPLE])
            out = [r for r in out if r[0] not in (SEEN, CLICKED, EXAMPLE)]
        if self.done or now - self.last_log >= cfg.join.log_interval_s:
            self._report(now)
        return records + [self._record(r) for r in out]

    def _align(self) -> None:
        """Pause (or resume) an input stream as the joiner's `held_back` says. librdkafka
        drops what it fetched ahead for a paused partition and fetches on from the next
        offset not consumed when it resumes: nothing is skipped or read twice."""
        held = self.joiner.held_back(self.cfg.join.align_ms, self.held)
        if held == self.held:
            return
        if self.held is not None:
            self.consumer.resume([TopicPartition(self.topic_of[self.held], self.part)])
        if held is not None:
            self.consumer.pause([TopicPartition(self.topic_of[held], self.part)])
            self.pauses += 1
        self.held = held

    def next_awake(self) -> datetime | None:
        return self.awake

    def on_message(self, stream: str, raw: bytes, offset: int, now: float, out: list,
                   wall_ms: int, key: bytes | None) -> None:
        # The key must be the impression_id: else the message was routed by something else
        # and its impression and clicks may sit in different partitions.
        if stream == IMPRESSIONS:
            self.joiner.on_impression(raw, offset, now, out, wall_ms, key)
        else:
            self.joiner.on_click(raw, offset, now, out, wall_ms, key)

    def _record(self, r: tuple) -> tuple:
        """The joiner's output as a (topic, key, value) record for Kafka."""
        kind, key, value = r
        if kind == DEAD_LETTER:
            topic = (self.cfg.kafka.impressions_topic if value["stream"] == IMPRESSIONS
                     else self.cfg.kafka.clicks_topic)
            return dead_letter(self.cfg, topic, self.part, value["offset"],
                               value["reason"], value["raw"])
        return self.cfg.kafka.examples_topic, key, value

    def _report(self, now: float) -> None:
        j = self.joiner
        stats = {**j.stats(), "partition": self.part, "input_pauses": self.pauses,
                 "watermark_lag_ms": max(j.max_ts.values()) - j.watermark,
                 "reconcile_errors": j.reconcile()}
        rate = self.events_since_log / max(now - self.last_log, 1e-9)
        log.info("join p%d: %.0f ev/s, pending %d, held %d, watermark lag %.1f s, "
                 "emitted %d, joined %d, late %d, orphan %d, dup %d/%d, dead %d/%d%s%s",
                 self.part, rate, stats["pending"], stats["held"],
                 stats["watermark_lag_ms"] / 1000, stats["impressions_emitted"],
                 stats["clicks_joined"], stats["clicks_late"], stats["clicks_orphan"],
                 stats["impressions_duplicate"], stats["clicks_duplicate"],
                 stats["impressions_dead"], stats["clicks_dead"],
                 ", QUARANTINED" if stats["quarantined"] else "",
                 f", {self.held} paused (ahead in event time)" if self.held else "")
        metrics.write_json(self.stats_path, stats)
        lag = {}
        for topic, stream in self.topics.items():
            n = metrics.consumer_lag(self.consumer, topic, self.part, j.next_offset[stream])
            if n is not None:
                lag[topic] = n
        behind = metrics.join_report(self.cfg, self.part, self.topic_of,
                                     stats, lag, now)
        metrics.append_history(self.history_path,
                               {**stats, "consumer_lag": lag, "input_behind": behind})
        self.last_log, self.events_since_log = now, 0

    def snapshot(self) -> dict:
        return self.joiner.snapshot()

    def close(self) -> None:
        self.consumer.close()


class JoinSource(FixedPartitionedSource):
    """One partition per input partition pair; each joins its pair in place."""

    partition_class = _JoinPartition

    def __init__(self, cfg: Config, until_eof: bool = False) -> None:
        self.cfg, self.until_eof = cfg, until_eof

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(input_partitions(self.cfg))]

    def build_part(self, step_id: str, for_part: str, resume_state):
        return self.partition_class(self.cfg, int(for_part), resume_state, self.until_eof)


def _is_example(r: tuple) -> bool:
    return len(r) == 2 and r[1][0] == EXAMPLE


def build(cfg: Config | str | None = None, until_eof: bool = False) -> Dataflow:
    """The join dataflow; ``cfg`` is a Config or a config file path (None: the default)."""
    cfg = cfg if isinstance(cfg, Config) else load_config(cfg)
    flow = Dataflow("join")
    records = op.input("join", flow, JoinSource(cfg, until_eof))
    if cfg.features.enabled:
        spec = feature_spec(cfg)
        shared = fo.ProcessCounters(cfg, spec)  # one per process: this runs in each
        split = op.branch("examples", records, _is_example)
        rest = op.branch("signals", split.falses, lambda r: len(r) == 2)
        # (shard key, (shard, signals)): each shard's counters are a key of their own
        counted = op.stateful_batch(
            "counters", rest.trues,
            lambda resume: fo.CountersLogic(cfg, spec, input_partitions(cfg), shared, resume))
        parts = op.flat_map("parts", counted, fo.parts)
        held = fo.HeldImpressions(cfg)  # one per process, like `shared`
        examples = op.stateful_batch("attach_counts",
                                     op.merge("parts_and_examples", parts, split.trues),
                                     lambda resume: fo.AttachLogic(held, resume))
        topic = cfg.kafka.examples_topic
        # (cell key, (impression id, example)) -> (topic, impression id, example)
        records = op.merge("all_out", rest.falses,
                           op.map("to_examples", examples, lambda kv: (topic, *kv[1])))
    op.output("kafka_out", records, KafkaRecordSink(cfg))
    return flow
