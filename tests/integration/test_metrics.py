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

from ctrstream.produce import produce
from ctrstream.report import read_jsonl
from ctrstream.simulator import Faults, StreamSpec
from ctrstream.stack import free_port
from flows import metrics
from flows.kafka import read_topics
from flows.run import run_flow

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
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
        # The learn flow can learn these 8,000 examples inside one push interval of 0.3 s
        # (no push to count in 4 of 5 runs): pushes often enough that the metrics see some.
        learn={"store_name": f"m{s}", "push_interval_s": 0.05, "log_interval_s": 0.5},
        generator={"max_click_delay_s": 3600.0},
        metrics={"join_port": free_port(), "learn_port": free_port()})
    from ctrstream.stack import create_topics

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
    behind = [v for lab, v in m["ctrstream_input_behind"]
              if lab["flow"] == "join" and lab["topic"] in (imp, clk)]
    assert len(behind) == 2 * cfg.kafka.partitions and not any(behind), behind
    assert m["ctrstream_features_entities"][0][1] > 0
    assert m["ctrstream_features_store_writes_total"][0][1] > 0
    assert total(m, "ctrstream_redis_errors_total", flow="join") == 0

    # The join wrote a history line per log interval and partition, ending where it ended.
    for p in range(cfg.kafka.partitions):
        lines = read_jsonl(Path(cfg.data_dir) / "join" / f"history-p{p}.jsonl")
        stats = orjson.loads((Path(cfg.data_dir) / "join" / f"stats-p{p}.json").read_bytes())
        assert lines and lines[-1]["impressions_in"] == stats["impressions_in"]
        assert lines[-1]["input_behind"] is False
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
    assert lines[-1]["input_behind"] is False


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


def _lag_cfg(window_s: float = 60.0, warn: int = 1000):
    from flows.config import Config

    return Config().replace(metrics={"lag_window_s": window_s, "lag_warn_messages": warn})


def _gauges(topic: str, part: int = 0) -> tuple[float | None, float | None]:
    """ctrstream_input_behind and the lag growth of ("join", topic, part), as scraped."""
    from prometheus_client import REGISTRY

    labels = {"flow": "join", "topic": topic, "partition": str(part)}
    return (REGISTRY.get_sample_value("ctrstream_input_behind", labels),
            REGISTRY.get_sample_value("ctrstream_consumer_lag_growth_per_second", labels))


def _behind_lines(caplog, topic: str, what: str = "behind") -> list[str]:
    return [r.getMessage() for r in caplog.records
            if f"{topic}[0] {what}" in r.getMessage()]


def test_growing_lag_is_behind_once_high_for_a_whole_window(caplog):
    caplog.set_level("INFO", logger="flows.metrics")
    cfg, topic = _lag_cfg(), "lag-growing"
    # +20 messages/s from 600: past the threshold (1000) at t = 20, behind once the window
    # from there on is all above it (t = 80), not before.
    for t in range(0, 80, 10):
        assert metrics.lag_report(cfg, "join", {(topic, 0): 600 + 20 * t}, float(t)) is False
        assert _gauges(topic)[0] == 0
    assert not _behind_lines(caplog, topic, "is behind")
    assert metrics.lag_report(cfg, "join", {(topic, 0): 2200}, 80.0) is True
    assert metrics.lag_report(cfg, "join", {(topic, 0): 2400}, 90.0) is True
    (line,) = _behind_lines(caplog, topic, "is behind")  # once, not at every report
    assert "2,200 messages" in line and "+20 messages/s" in line and "(-p)" in line
    assert _gauges(topic) == (1, 20.0)
    rec = next(r for r in caplog.records if "is behind" in r.getMessage())
    assert rec.levelname == "WARNING"


def test_high_but_falling_lag_is_not_behind(caplog):
    cfg, topic = _lag_cfg(), "lag-falling"
    for t in range(0, 300, 10):  # a backlog worked off: high for minutes, never behind
        assert metrics.lag_report(cfg, "join", {(topic, 0): 50_000 - 100 * t}, float(t)) is False
    assert _gauges(topic) == (0, -100.0)
    assert not _behind_lines(caplog, topic, "is behind")
    # a lag flat at a high level is behind (it is not being worked off)
    for t in range(300, 370, 10):
        metrics.lag_report(cfg, "join", {(topic, 0): 20_000}, float(t))
    assert _gauges(topic) == (1, 0.0)


def test_behind_until_below_half_the_threshold_and_warned_again_every_5_min(caplog):
    caplog.set_level("INFO", logger="flows.metrics")
    topic = "lag-hysteresis"
    w = metrics.LagWatch(window_s=60, warn_messages=1000)
    key = ("join", topic, 0)
    for t in range(0, 70, 10):
        w.update(key, float(t), 1500)
    assert w.behind[key] and len(_behind_lines(caplog, topic, "is behind")) == 1
    # drained below the threshold but not below half of it: still behind, no new warning
    for t, lag in ((70, 900), (80, 600), (90, 501)):
        assert w.update(key, float(t), lag) is True
    assert not _behind_lines(caplog, topic, "still behind")
    # back up and staying: the warning again once 5 minutes after the first (at t = 60)
    for t in range(100, 360, 10):
        assert w.update(key, float(t), 1200) is True
    assert not _behind_lines(caplog, topic, "still behind")
    w.update(key, 360.0, 1200)
    w.update(key, 370.0, 1200)
    assert len(_behind_lines(caplog, topic, "still behind")) == 1
    # below half: caught up, said at INFO
    assert w.update(key, 380.0, 499) is False
    (line,) = _behind_lines(caplog, topic, "caught up")
    assert "499 messages" in line
    assert [r.levelname for r in caplog.records if "caught up" in r.getMessage()] == ["INFO"]
    # and not behind again at the next high report: needs a whole window again
    assert w.update(key, 390.0, 5000) is False


def test_caught_up_sets_the_gauge_back_to_0(caplog):
    caplog.set_level("INFO", logger="flows.metrics")
    cfg, topic = _lag_cfg(window_s=30, warn=100), "lag-caught-up"
    for t in (0, 10, 20, 30):
        metrics.lag_report(cfg, "join", {(topic, 0): 200 + t}, float(t))
    assert _gauges(topic)[0] == 1
    assert metrics.lag_report(cfg, "join", {(topic, 0): 40}, 40.0) is False
    assert _gauges(topic)[0] == 0
    assert _behind_lines(caplog, topic, "caught up")


def test_no_lag_to_watch_is_none(monkeypatch):
    assert metrics.lag_report(_lag_cfg(), "learn", {}, 0.0) is None
    monkeypatch.setattr(metrics.LATEST, "learn", None)  # restored after: a scrape's figures
    monkeypatch.setattr(metrics, "_learn_lag", lambda cfg, offsets: {})  # no broker answer
    assert metrics.learn_report(_lag_cfg(), {"in": 0}, {}, None, {0: 5}, 0.0) is None


def test_learn_lag_is_watched_with_metrics_off(monkeypatch):
    monkeypatch.setattr(metrics.LATEST, "learn", None)
    monkeypatch.setattr(metrics, "_learn_lag", lambda cfg, offsets: {0: 7})
    cfg = _lag_cfg().replace(metrics={"enabled": False})
    assert metrics.learn_report(cfg, {"in": 0}, {}, None, {0: 5}, 0.0) is False
