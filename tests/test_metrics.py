"""Prometheus metrics: scraped from the endpoints of a real join and learn run, checked against
what was produced, and the Grafana dashboard checked against what the code exports."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flows import metrics
from flows.kafka import read_topics
from flows.produce import produce
from flows.report import read_jsonl
from flows.run import run_flow
from flows.simulator import Faults, StreamSpec
from flows.stack import free_port

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json"
IMPRESSIONS = 8000


def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    """Every sample on the endpoint: name -> [(labels, value)]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())


@pytest.fixture(scope="module")
def run(tmp_path_factory, stack_cfg):
    """Both flows run to the end of a small stream with every fault on, each serving its
    metrics on a free port; the servers outlive the runs (daemon threads)."""
    import uuid

    tmp = tmp_path_factory.mktemp("metrics")
    s = uuid.uuid4().hex[:8]
    cfg = stack_cfg.replace(
        data_dir=str(tmp / "data"), recovery_dir=str(tmp / "recovery"),
        kafka={"impressions_topic": f"impressions-{s}", "clicks_topic": f"clicks-{s}",
               "examples_topic": f"examples-{s}", "dead_letters_topic": f"dead-letters-{s}"},
        join={"wait_window_ms": 10 * 60_000, "idle_timeout_s": 600.0, "log_interval_s": 0.5},
        features={"store_prefix": f"f{s}"},
        learn={"store_name": f"m{s}", "push_interval_s": 0.3, "log_interval_s": 0.5},
        generator={"max_click_delay_s": 3600.0},
        metrics={"join_port": free_port(), "learn_port": free_port()})
    from flows.stack import create_topics

    create_topics(cfg)
    spec = StreamSpec(seed=3, impressions=IMPRESSIONS, faults=Faults.preset(IMPRESSIONS, 0.03))
    manifest = produce(cfg, spec)
    run_flow(cfg, "join", until_eof=True, recovery=False)
    join = scrape(cfg.metrics.join_port)
    run_flow(cfg, "learn", until_eof=True, recovery=False)
    learn = scrape(cfg.metrics.learn_port)
    records = read_topics(cfg, [cfg.kafka.examples_topic])
    return cfg, manifest, join, learn, records


@pytest.mark.integration
def test_join_metrics_equal_what_was_produced(run):
    cfg, manifest, m, _, records = run
    c = manifest["counts"]
    ev = "ctrstream_join_events_total"
    imp, clk = cfg.kafka.impressions_topic, cfg.kafka.clicks_topic
    assert total(m, ev, topic=imp, outcome="in") == c["impression_messages"]
    assert total(m, ev, topic=clk, outcome="in") == c["click_messages"]
    assert total(m, ev, topic=imp, outcome="emitted") == IMPRESSIONS
    assert total(m, ev, topic=imp, outcome="duplicate") == c["duplicate_impressions"]
    assert total(m, ev, topic=imp, outcome="dead") == c["malformed_impressions"]
    assert total(m, ev, topic=clk, outcome="orphan") == c["orphan_clicks"]
    late = sum(1 for r in records if b'"kind":"late_click"' in r.value())
    assert total(m, ev, topic=clk, outcome="late") == late
    partitions = {lab["partition"] for lab, _ in m[ev] if lab["topic"] == imp}
    assert len(partitions) == cfg.kafka.partitions
    for name in ("ctrstream_join_pending", "ctrstream_join_held_clicks",
                 "ctrstream_join_conservation_errors", "ctrstream_join_quarantined"):
        got = {lab["partition"]: v for lab, v in m[name]}
        assert set(got) >= partitions and all(got[p] == 0 for p in partitions), (name, got)
    for lab, v in m["ctrstream_join_rate"]:
        assert 0.5 < v <= 1.0, lab
    for lab, v in m["ctrstream_join_watermark_lag_seconds"]:
        assert v >= 0, lab
    lags = [(lab, v) for lab, v in m["ctrstream_consumer_lag"]
            if lab["flow"] == "join" and lab["topic"] in (imp, clk)]
    assert len(lags) == 2 * cfg.kafka.partitions and all(v == 0 for _, v in lags), lags
    assert m["ctrstream_features_entities"][0][1] > 0
    assert m["ctrstream_features_store_writes_total"][0][1] > 0
    assert total(m, "ctrstream_redis_errors_total", flow="join") == 0

    # The join wrote a history line per log interval and partition, ending where it ended.
    for p in range(cfg.kafka.partitions):
        lines = read_jsonl(Path(cfg.data_dir) / "join" / f"history-p{p}.jsonl")
        stats = orjson.loads((Path(cfg.data_dir) / "join" / f"stats-p{p}.json").read_bytes())
        assert lines and lines[-1]["impressions_in"] == stats["impressions_in"]
        assert all(b["ts"] >= a["ts"] for a, b in zip(lines, lines[1:], strict=False))


@pytest.mark.integration
def test_learn_metrics_are_sane(run):
    cfg, _, _, m, records = run
    counts = orjson.loads((Path(cfg.data_dir) / "learn" / "stats.json").read_bytes())["counts"]
    assert total(m, "ctrstream_learn_examples_total", outcome="in") == len(records)
    for outcome, n in counts.items():
        assert total(m, "ctrstream_learn_examples_total", outcome=outcome) == n, outcome
    for what in ("ne", "calibration", "auc"):
        got = {(lab["model"], lab["window"]): v for lab, v in m[f"ctrstream_learn_{what}"]}
        assert set(got) == {(mo, w) for mo in metrics.MODELS for w in ("all", "recent")}
        for key, v in got.items():
            assert {"ne": 0 < v < 2, "calibration": 0.3 < v < 3, "auc": 0.5 < v < 1}[what], (
                what, key, v)
    assert total(m, "ctrstream_learn_push_seconds_count", kind="version") >= 2  # first + end
    assert total(m, "ctrstream_learn_push_seconds_count", kind="push") >= 1
    assert m["ctrstream_model_version"][0][1] >= 2
    lags = [v for lab, v in m["ctrstream_consumer_lag"]
            if lab["flow"] == "learn" and lab["topic"] == cfg.kafka.examples_topic]
    assert len(lags) == cfg.kafka.partitions and all(v == 0 for v in lags), lags
    assert total(m, "ctrstream_redis_errors_total", flow="learn") == 0
    lines = read_jsonl(Path(cfg.data_dir) / "learn" / "history.jsonl")
    assert lines[-1]["counts"] == counts and set(lines[-1]["metrics"]) == set(metrics.MODELS)


@pytest.mark.integration
def test_every_dashboard_query_names_an_exported_metric(run):
    _, _, join, learn, _ = run
    exported = set(join) | set(learn)
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    named = set()
    for expr in exprs:
        names = set(re.findall(r"\bctrstream_[a-z_]+", expr))
        assert names, f"a query without a ctrstream metric: {expr}"
        missing = names - exported
        assert not missing, f"{expr}: {sorted(missing)} not exported"
        named |= names
    # ... and every ctrstream series the code exports is on the dashboard.
    base = {re.sub(r"_(bucket|sum|count)$", "", n) for n in named}
    ours = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported
            if n.startswith("ctrstream_") and not n.endswith("_created")}
    assert not ours - base, ours - base


def test_history_file_rotates_and_reads_back_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "HISTORY_MAX_BYTES", 200)
    path = tmp_path / "h.jsonl"
    for i in range(30):
        metrics.append_history(path, {"i": i})
    with open(path, "ab") as f:
        f.write(b'{"i": 99')  # a line being written while the report reads
    got = [r["i"] for r in read_jsonl(path)]
    assert got == sorted(got) and got[-1] == 29 and len(got) < 30  # older generations dropped
    assert path.with_name("h.jsonl.1").exists()


def test_serve_skips_a_taken_port_without_failing(caplog):
    from flows.config import Config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = Config().replace(metrics={"join_port": port})
        assert metrics.serve(cfg, "join") is None
    assert "cannot serve" in caplog.text
    assert metrics.serve(Config().replace(metrics={"enabled": False}), "join") is None
    # process i of a flow serves on its flow's port + i
    port = free_port()
    cfg = Config().replace(metrics={"learn_port": port - 1})
    assert metrics.serve(cfg, "learn", process_id=1) == port
    assert "ctrstream_redis_errors_total" in scrape(port)
