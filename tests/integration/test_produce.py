"""`ctrstream produce` through a real broker: what was generated is what a consumer reads."""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict

import pytest

from ctrstream.cli import main
from ctrstream.produce import produce
from ctrstream.simulator import EventStream, Faults, StreamSpec, read_manifest, read_truth
from flows.kafka import DeliveryError, KafkaRecordSink, read_topics

pytestmark = pytest.mark.integration

FAULTS = Faults(duplicate_impressions=40, duplicate_clicks=15, early_clicks=12,
                orphan_clicks=10, malformed_impressions=7, malformed_clicks=9)


def test_round_trip_no_loss_no_duplicates(fresh_topics, tmp_path):
    cfg = fresh_topics
    spec = StreamSpec(seed=9, impressions=20_000, faults=FAULTS)
    manifest = produce(cfg, spec, truth_dir=tmp_path)

    sent = [(t, k, v) for c in EventStream(cfg.generator, spec)
            for t, k, v in zip(c.topic.tolist(), c.keys, c.values, strict=True)]
    topics = [cfg.kafka.impressions_topic, cfg.kafka.clicks_topic]
    got = read_topics(cfg, topics)
    assert Counter((topics.index(m.topic()), m.key(), m.value()) for m in got) == Counter(sent)

    counts = manifest["counts"]
    per_topic = Counter(m.topic() for m in got)
    assert per_topic[cfg.kafka.impressions_topic] == counts["impression_messages"]
    assert per_topic[cfg.kafka.clicks_topic] == counts["click_messages"]
    assert counts["impression_messages"] == (counts["impressions"] + 40 + 7)
    assert counts["click_messages"] == counts["clicks"] + 15 + 10 + 9
    assert manifest["delivery"] == {"sent": len(sent), "failed": 0, "undelivered": 0,
                                    "first_error": None}
    assert read_manifest(tmp_path)["counts"] == counts
    assert read_truth(tmp_path).num_rows == counts["impressions"] == 20_000

    # Same key, same partition count: an impression and its clicks share a partition, and
    # each partition holds its messages in the order they were generated.
    partition = {}
    for m in got:
        assert partition.setdefault(m.key(), m.partition()) == m.partition()
    by_partition = defaultdict(list)
    for t, k, v in sent:
        by_partition[(topics[t], partition[k])].append(v)
    for m in sorted(got, key=lambda m: (m.topic(), m.partition(), m.offset())):
        assert by_partition[(m.topic(), m.partition())].pop(0) == m.value()


def test_cli_produce_with_pacing_and_faults(fresh_topics, tmp_path, capsys):
    cfg = fresh_topics.replace(data_dir=str(tmp_path))
    toml = tmp_path / "ctrstream.toml"
    toml.write_text(cfg.to_toml())
    t0 = time.monotonic()
    code = main(["--config", str(toml), "produce", "--impressions", "3000", "--faults",
                 "--orphan-clicks", "4", "--rate", "3000", "--seed", "3", "--no-progress"])
    took = time.monotonic() - t0
    assert code == 0
    out = capsys.readouterr().out
    assert "produced 3000 impressions" in out and "orphan_clicks=4" in out
    manifest = read_manifest(tmp_path / "truth")
    n = manifest["delivery"]["sent"]
    assert 0.8 * n / 3000 <= took  # paced at 3000 messages per second
    preset = Faults.preset(3000, cfg.generator.base_ctr)
    assert manifest["counts"]["duplicate_impressions"] == preset.duplicate_impressions
    assert manifest["counts"]["orphan_clicks"] == 4
    got = read_topics(cfg, [cfg.kafka.impressions_topic, cfg.kafka.clicks_topic])
    assert len(got) == n


def test_missing_topics_fail_before_producing(stack_cfg, tmp_path):
    cfg = stack_cfg.replace(kafka={"impressions_topic": f"nope-{uuid.uuid4().hex[:8]}"})
    with pytest.raises(RuntimeError, match="not found"):
        produce(cfg, StreamSpec(impressions=10), truth_dir=tmp_path)


def test_delivery_failures_are_raised_not_dropped(fresh_topics, tmp_path):
    # Messages that expire in the local queue before a broker could take them.
    with pytest.raises(DeliveryError, match="failed"):
        produce(fresh_topics, StreamSpec(impressions=50_000), truth_dir=tmp_path,
                **{"message.timeout.ms": 1, "linger.ms": 0})
    manifest = read_manifest(tmp_path)
    assert manifest["delivery"]["failed"] > 0


def test_flow_record_sink_delivers_and_raises_on_failed_deliveries(fresh_topics):
    topic = fresh_topics.kafka.examples_topic
    records = [(topic, str(i), b"x" * 100) for i in range(50_000)]
    sink = KafkaRecordSink(fresh_topics).build("out", 0, 1)
    sink.write_batch(records[:1000])
    assert len(read_topics(fresh_topics, [topic])) == 1000
    # Records that expire in the local queue before the broker could take them.
    doomed = KafkaRecordSink(fresh_topics.replace(
        kafka={"client": {"message.timeout.ms": 6}})).build("out", 0, 1)
    with pytest.raises(DeliveryError, match="not delivered"):
        doomed.write_batch(records)


def test_speed_paces_event_time_but_not_the_click_tail(fresh_topics, tmp_path):
    t0 = time.monotonic()
    manifest = produce(fresh_topics, StreamSpec(seed=1, duration_s=40), truth_dir=tmp_path,
                       speed=40)
    took = time.monotonic() - t0
    span_s = (manifest["end_ms"] - manifest["start_ms"]) / 1000
    assert span_s / 40 * 0.9 <= took < span_s / 40 + 5  # clicks up to 3 h later do not wait
    assert manifest["delivery"]["sent"] == (manifest["counts"]["impression_messages"]
                                            + manifest["counts"]["click_messages"])
