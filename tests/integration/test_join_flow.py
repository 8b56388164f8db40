"""The join dataflow on the real broker, checked against the generator's ground truth."""

from __future__ import annotations

import bisect
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from ctrstream.produce import produce
from ctrstream.report import read_jsonl
from ctrstream.simulator import Faults, StreamSpec, expected_labels, read_truth
from features.spec import window_label
from flows.build import feature_store
from flows.kafka import read_topics
from flows.run import run_flow

pytestmark = pytest.mark.integration

WINDOW_MS = 10 * 60_000
MAX_DELAY_S = 3600.0


def join_config(cfg, tmp_path: Path):
    return cfg.replace(
        data_dir=str(tmp_path / "data"), recovery_dir=str(tmp_path / "recovery"),
        join={"wait_window_ms": WINDOW_MS, "late_click_horizon_ms": int(MAX_DELAY_S * 2000),
              "idle_timeout_s": 600.0, "log_interval_s": 0.5},
        features={"store_prefix": f"f{tmp_path.name[-12:]}".replace("_", "")},
        generator={"max_click_delay_s": MAX_DELAY_S, "impressions_per_s": 20.0})


def join_stats(cfg) -> dict:
    total: dict = {}
    for f in (Path(cfg.data_dir) / "join").glob("stats-p*.json"):
        for k, v in orjson.loads(f.read_bytes()).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
            elif k == "reconcile_errors":
                assert v == [], v
    return total


def check_against_truth(cfg, examples: list, truth) -> dict:
    """Distinct emitted ids == valid impressions, each label == ground truth for the window."""
    labels = {}
    for m in examples:
        ex = orjson.loads(m.value())
        if ex["kind"] == "example":
            assert labels.setdefault(ex["impression_id"], ex["label"]) == ex["label"]
    ids = truth.column("impression_id").to_pylist()
    assert set(labels) == set(ids)
    expected = expected_labels(truth, WINDOW_MS)
    got = np.array([labels[i] for i in ids])
    assert (got == expected).all(), f"{int((got != expected).sum())} labels differ"
    return labels


@pytest.mark.parametrize("shards", [1, 4, 16])
def test_join_flow_labels_and_counters_match_ground_truth(fresh_topics, tmp_path, shards):
    cfg = join_config(fresh_topics, tmp_path).replace(features={"shards": shards})
    spec = StreamSpec(seed=11, impressions=20_000, faults=Faults.preset(20_000, 0.03))
    manifest = produce(cfg, spec, truth_dir=tmp_path / "truth")
    run_flow(cfg, "join", until_eof=True, recovery=False)

    examples = read_topics(cfg, [cfg.kafka.examples_topic])
    truth = read_truth(tmp_path / "truth")
    labels = check_against_truth(cfg, examples, truth)
    assert len([m for m in examples if b'"kind":"example"' in m.value()]) == len(labels)

    faults, s = manifest["counts"], join_stats(cfg)
    delay = truth.column("delay_ms").to_numpy(zero_copy_only=False)
    clicked = truth.column("clicked").to_numpy(zero_copy_only=False)
    late = int((clicked & (delay > WINDOW_MS)).sum())
    assert s["impressions_emitted"] == len(truth)
    assert s["impressions_duplicate"] == faults["duplicate_impressions"]
    assert s["impressions_dead"] == faults["malformed_impressions"]
    assert s["clicks_dead"] == faults["malformed_clicks"]
    assert s["clicks_orphan"] == faults["orphan_clicks"]
    assert s["clicks_duplicate"] == faults["duplicate_clicks"]
    assert s["clicks_late"] == late
    assert s["clicks_joined"] == int(clicked.sum()) - late
    assert s["pending"] == s["held"] == 0
    corrections = [m for m in examples if b'"kind":"late_click"' in m.value()]
    assert len(corrections) == late

    dead = read_topics(cfg, [cfg.kafka.dead_letters_topic])
    assert len(dead) == faults["malformed_impressions"] + faults["malformed_clicks"]
    assert all(orjson.loads(m.value())["reason"] for m in dead)
    check_counts_against_recount(cfg, examples, truth)


def test_a_backlog_beyond_the_joiners_capacity_is_read_in_step_and_joined_exactly(
        fresh_topics, tmp_path):
    # The consumer fetches a partition's impressions in bulk: read one stream first, the
    # watermark (the lower of the two) would stay put while the whole backlog of impressions
    # waits for its clicks, past `capacity`, and be closed early with wrong labels. Paused
    # while it is join.align_ms ahead, a partition holds about a wait window (10 min here,
    # ~3,000 impressions at 20/s over 4 partitions) plus align_ms.
    cfg = join_config(fresh_topics, tmp_path).replace(
        features={"enabled": False}, join={"capacity": 6_000, "align_ms": 60_000})
    produce(cfg, StreamSpec(seed=5, impressions=40_000), truth_dir=tmp_path / "truth")
    run_flow(cfg, "join", until_eof=True, recovery=False)

    check_against_truth(cfg, read_topics(cfg, [cfg.kafka.examples_topic]),
                        read_truth(tmp_path / "truth"))
    s = join_stats(cfg)
    assert s["impressions_closed_early"] == s["clicks_held_evicted"] == 0
    assert s["input_pauses"] > 0  # this broker hands out a backlog one stream first
    peak = max(line["pending"] for p in range(cfg.kafka.partitions)
               for line in read_jsonl(Path(cfg.data_dir) / "join" / f"history-p{p}.jsonl"))
    assert peak < 6_000, peak


def _recounter(truth):
    """count(entity, id, kind, lo, hi): ground-truth events in [lo, hi); impressions, and
    clicks joined within the wait window (at their click ts)."""
    t = truth.to_pydict()
    events: dict = {}
    for user, item, ts, clicked, delay in zip(t["user_id"], t["item_id"], t["ts"],
                                              t["clicked"], t["delay_ms"], strict=True):
        for key in (("user", user), ("item", item)):
            events.setdefault((*key, "imp"), []).append(ts)
            if clicked and delay <= WINDOW_MS:
                events.setdefault((*key, "clk"), []).append(ts + delay)
    for v in events.values():
        v.sort()

    def count(entity, id, kind, lo, hi):
        a = events.get((entity, id, kind), [])
        return bisect.bisect_left(a, hi) - bisect.bisect_left(a, lo)

    return count, max(t["ts"]) - min(t["ts"])


def _check_value(cfg, count, span, entity, id, kind, w, ts, got, what) -> None:
    """Exact for windows longer than the stream (a leaked future event would show there);
    otherwise off by at most the events of the window's oldest tile, which is interpolated."""
    want = count(entity, id, kind, ts - w, ts)
    if w > span + WINDOW_MS:
        assert got == want, (what, entity, id, kind, w, got, want)
    else:
        tile = w // cfg.features.tiles_per_window
        start = (ts - w) // tile * tile
        assert abs(got - want) <= count(entity, id, kind, start, start + tile), (
            what, entity, id, kind, w, got, want)


def check_counts_against_recount(cfg, examples: list, truth) -> None:
    """The counts attached to each example, and the ones Redis holds at the end, against a
    recount of the ground truth over [ts - w, ts)."""
    count, span = _recounter(truth)
    checked = 0
    for m in examples:
        ex = orjson.loads(m.value())
        if ex["kind"] != "example":
            continue
        # every entity's part, from whichever shard owns it, and nothing twice
        assert sorted(ex["counts"]) == sorted(cfg.features.entities), ex["counts"].keys()
        assert m.value().count(b'"imp_5m"') == len(cfg.features.entities)
        for entity, id_field in (("user", "user_id"), ("item", "item_id")):
            for w in cfg.features.windows_ms:
                for kind in ("imp", "clk"):
                    got = ex["counts"][entity][f"{kind}_{window_label(w)}"]
                    _check_value(cfg, count, span, entity, ex[id_field], kind, w, ex["ts"], got,
                                 ex["impression_id"])
                    checked += 1
    assert checked > 0
    store = feature_store(cfg)
    t = truth.to_pydict()
    for entity, ids in (("user", t["user_id"][:200]), ("item", t["item_id"][:200])):
        for id, row in zip(ids, store.get_many(entity, ids), strict=True):
            assert not row["_missing"], (entity, id)
            for w in cfg.features.windows_ms:
                for kind in ("imp", "clk"):
                    _check_value(cfg, count, span, entity, id, kind, w, row["_ts"],
                                 row[f"{kind}_{window_label(w)}"], "redis")


def flow_process(cfg_path: Path, flow: str, *extra: str,
                 snapshot_interval_s: float = 0.3) -> subprocess.Popen:
    """`ctrstream run FLOW` in its own process group (so a test can SIGKILL all of it). Its
    log goes to a file (``flow_log``): a pipe nobody reads fills up during a long outage,
    and then the flow blocks on its next log line."""
    log_path = cfg_path.with_name(f"{flow}-{time.time_ns()}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctrstream.cli", "--config", str(cfg_path), "run", flow,
             "--snapshot-interval", str(snapshot_interval_s), *extra],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    proc.log_path = log_path
    return proc


def flow_log(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace")


def run_to_end(proc: subprocess.Popen, timeout_s: float) -> str:
    """Wait for a flow started with ``--until-eof``; its log, once it has exited with 0."""
    proc.wait(timeout_s)
    log = flow_log(proc)
    assert proc.returncode == 0, log[-3000:]
    return log


@pytest.mark.parametrize("shards", [1, 16])
def test_sigkill_mid_stream_then_resume_loses_nothing(fresh_topics, tmp_path, shards):
    cfg = join_config(fresh_topics, tmp_path).replace(features={"shards": shards})
    cfg_path = tmp_path / "ctrstream.toml"
    cfg_path.write_text(cfg.to_toml())
    spec = StreamSpec(seed=5, impressions=30_000, faults=Faults.preset(30_000, 0.03))
    # Produce while the flow runs, so the kill lands mid-stream.
    producer = threading.Thread(target=produce, args=(cfg, spec),
                                kwargs={"truth_dir": tmp_path / "truth", "rate": 10_000})
    producer.start()
    proc = flow_process(cfg_path, "join")
    stats_dir = Path(cfg.data_dir) / "join"
    deadline = time.monotonic() + 60
    while not any(orjson.loads(f.read_bytes()).get("impressions_emitted", 0) > 1000
                  for f in stats_dir.glob("stats-p*.json")):
        assert proc.poll() is None, flow_log(proc)[-2000:]
        assert time.monotonic() < deadline, "flow made no progress"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    producer.join()

    proc = flow_process(cfg_path, "join", "--until-eof")
    log = run_to_end(proc, 120)
    assert "resumed from snapshot" in log
    # the impressions the counters held came back from the replay, not from their state
    assert sum(map(int, re.findall(r"(\d+) resent to the counters", log))) > 0, log[-3000:]

    examples = read_topics(cfg, [cfg.kafka.examples_topic])
    truth = read_truth(tmp_path / "truth")
    check_against_truth(cfg, examples, truth)
    check_counts_against_recount(cfg, examples, truth)
