"""Kafka wiring shared by the dataflows: a topic source with offsets in the recovery state, a
sink that checks delivery reports, dead-letter records, and the partition layout check."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from flows.config import Config
from joiner.errors import CtrstreamError

log = logging.getLogger(__name__)

# A source partition that found nothing is polled again after this (bytewax's default, 1 ms,
# would spin); consume() itself never blocks, so one idle partition cannot delay the others.
IDLE_POLL = timedelta(milliseconds=10)
# Consumer settings of the flows' sources. A fetch with no data waits at most this long on
# the broker: Tansu answers only when that wait ends, not when data arrives, so librdkafka's
# 500 ms default would add up to half a second to every event at low rates.
LOW_LATENCY_CONSUMER = {"fetch.wait.max.ms": 20, "enable.auto.commit": False,
                        "enable.partition.eof": True, "auto.offset.reset": "earliest"}


def idle_awake(got_items: bool) -> datetime | None:
    """What a source partition's ``next_awake`` returns after a batch."""
    return None if got_items else datetime.now(UTC) + IDLE_POLL


class DeliveryError(CtrstreamError, RuntimeError):
    """Kafka did not acknowledge some records; the flow stops so recovery replays them."""


def make_producer(cfg: Config, **overrides) -> Producer:
    """The project's one way to make a producer; ``on_delivery`` in the overrides is called
    for failed deliveries only."""
    settings = {"linger.ms": 5, "compression.type": "lz4", "enable.idempotence": True,
                "queue.buffering.max.messages": 1_000_000,
                # A Python call per delivered message would halve the rate; failures suffice.
                "delivery.report.only.error": True}
    return Producer(cfg.kafka_client(**{**settings, **overrides}))


class _RecordSinkPartition(StatelessSinkPartition):
    def __init__(self, cfg: Config) -> None:
        # The producer-wide callback: one given to each produce() call is a new bound method
        # per message, a gc-tracked object held until its delivery.
        self._producer = make_producer(cfg, on_delivery=self._on_delivery)
        self._failed: list[str] = []

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._failed.append(f"{msg.topic()}: {err}")

    def write_batch(self, items: list[tuple[str, str | None, bytes]]) -> None:
        produce = self._producer.produce
        for topic, key, value in items:
            while True:
                try:
                    produce(topic, value, key)
                    break
                except BufferError:  # local queue full: wait for deliveries, then retry
                    self._producer.poll(0.1)
        # Flushing per batch makes the batch durable before the epoch that produced it can
        # be snapshotted; bytewax batches are large enough that this costs little. While the
        # broker is away the flow waits here (backpressure); librdkafka fails a record after
        # its message.timeout.ms (5 min by default), and then the flow stops to be replayed.
        t0 = time.monotonic()
        while (left := self._producer.flush(10)) and not self._failed:
            log.warning("%d records waiting for Kafka for %.0f s", left, time.monotonic() - t0)
        if left or self._failed:
            failed, self._failed = self._failed, []
            raise DeliveryError(f"{len(failed) + left} records not delivered "
                                f"(first: {failed[:3] or 'flush timed out'})")

    def close(self) -> None:
        self._producer.flush(60)


class KafkaRecordSink(DynamicSink):
    """Writes ``(topic, key, value)`` items; a failed delivery raises instead of vanishing."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _RecordSinkPartition:
        return _RecordSinkPartition(self._cfg)


class _TopicPartition(StatefulSourcePartition):
    def __init__(self, cfg: Config, topic: str, part: int, resume: int | None,
                 until_eof: bool) -> None:
        self.topic, self.part, self.until_eof = topic, part, until_eof
        self.batch_size = cfg.join.batch_size
        self.consumer = Consumer(cfg.kafka_client(**{
            "group.id": f"ctrstream-{topic}-{part}", **LOW_LATENCY_CONSUMER}))
        self.next_offset = OFFSET_BEGINNING if resume is None else resume
        self.consumer.assign([TopicPartition(topic, part, self.next_offset)])
        self.done = False
        self.awake: datetime | None = None

    def next_batch(self) -> list:
        if self.done:
            raise StopIteration()
        out = []
        msgs = self.consumer.consume(self.batch_size, timeout=0)
        self.awake = idle_awake(bool(msgs))
        for msg in msgs:
            err = msg.error()
            if err is None:
                out.append((self.part, msg.offset(), msg.value()))
                self.next_offset = msg.offset() + 1
            elif err.code() == KafkaError._PARTITION_EOF:
                self.done = self.until_eof
            else:
                log.error("reading %s[%d]: %s", self.topic, self.part, err)
                out.append((self.part, None, err))
        return out

    def next_awake(self) -> datetime | None:
        return self.awake

    def snapshot(self) -> int | None:
        # Nothing read yet: no state, so a restart asks start_offsets again. (Else a flow that
        # committed only its first epoch, before its stateful step saw an item, would restart
        # "from the beginning" here while that step continues from a published version.)
        return None if self.next_offset == OFFSET_BEGINNING else self.next_offset

    def close(self) -> None:
        self.consumer.close()


class TopicSource(FixedPartitionedSource):
    """Every partition of ``topic``, as ``(partition, offset, value)`` items; a consumer
    error is ``(partition, None, KafkaError)``. Offsets live in the recovery state, so a
    resumed flow reads on from its snapshot; without one, from ``start_offsets()[partition]``
    (when given and it has the partition), else from the beginning. ``until_eof``: stop at
    each partition's end."""

    def __init__(self, cfg: Config, topic: str, until_eof: bool = False,
                 start_offsets: Callable[[], Mapping[int, int]] | None = None) -> None:
        self.cfg, self.topic, self.until_eof = cfg, topic, until_eof
        self.start_offsets = start_offsets

    def list_parts(self) -> list[str]:
        md = AdminClient(self.cfg.kafka_client()).list_topics(self.topic, timeout=10)
        t = md.topics.get(self.topic)
        if t is None or t.error is not None or not t.partitions:
            raise RuntimeError(f"topic {self.topic!r} not found on "
                               f"{self.cfg.kafka.bootstrap_servers} (run `ctrstream topics "
                               "create`)")
        return [str(p) for p in sorted(t.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state) -> _TopicPartition:
        part = int(for_part)
        if resume_state is None and self.start_offsets is not None:
            resume_state = self.start_offsets().get(part)
        return _TopicPartition(self.cfg, self.topic, part, resume_state, self.until_eof)


def dead_letter(cfg: Config, source_topic: str, partition: int, offset: int | None,
                reason: str, raw: bytes | None, key: bytes | str | None = None):
    """A ``dead-letters`` record: the raw message (text, or base64 when not UTF-8),
    where it came from and why it was rejected."""
    rec = {"source_topic": source_topic, "partition": partition, "offset": offset,
           "reason": reason}
    if raw is not None:
        try:
            rec["raw"] = raw.decode()
        except UnicodeDecodeError:
            rec["raw_base64"] = base64.b64encode(raw).decode()
    if isinstance(key, bytes):
        key = key.decode(errors="backslashreplace")
    return (cfg.kafka.dead_letters_topic, key, orjson.dumps(rec))


def read_topics(cfg: Config, topics: list[str], timeout_s: float = 30.0) -> list:
    """Every message now in ``topics``, read from the beginning until each partition reports
    its end (for tests, the demo and benchmarks; not a streaming consumer)."""
    consumer = Consumer(cfg.kafka_client(**{
        "group.id": f"ctrstream-reader-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
        "enable.partition.eof": True}))
    md = consumer.list_topics(timeout=10)
    parts = {(t, p) for t in topics for p in md.topics[t].partitions}
    # Assigned, not subscribed: no group rebalance to wait for.
    consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in sorted(parts)])
    out, at_end = [], set()
    deadline = time.monotonic() + timeout_s
    try:
        while at_end != parts:
            if time.monotonic() > deadline:
                raise TimeoutError(f"partitions not at their end: {sorted(parts - at_end)}")
            for m in consumer.consume(10_000, timeout=0.5):
                if m.error() is None:
                    out.append(m)
                    at_end.discard((m.topic(), m.partition()))
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add((m.topic(), m.partition()))
                else:
                    raise RuntimeError(f"reading {m.topic()}: {m.error()}")
    finally:
        consumer.close()
    return out


def input_partitions(cfg: Config, timeout: float = 10.0) -> int:
    """Partition count of the input topics; they must exist and agree, or the join is wrong."""
    md = AdminClient(cfg.kafka_client()).list_topics(timeout=timeout)
    counts = {}
    for topic in (cfg.kafka.impressions_topic, cfg.kafka.clicks_topic):
        t = md.topics.get(topic)
        if t is None or t.error is not None:
            raise RuntimeError(f"topic {topic!r} not found on {cfg.kafka.bootstrap_servers}"
                               " (run `ctrstream stack up` or create the topics)")
        counts[topic] = len(t.partitions)
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"input topics must have the same partition count so an impression"
                           f" and its clicks share a partition; found {counts}")
    return next(iter(counts.values()))
