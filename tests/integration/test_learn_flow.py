"""The learn flow on the real broker and Redis: generator -> join flow -> learn flow -> scores
read back from Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest

from ctrstream.produce import produce
from ctrstream.simulator import Faults, StreamSpec
from flows.build import feature_spec, model_settings, model_store
from flows.build import scorer as make_scorer
from flows.kafka import read_topics
from flows.learn import stats_path
from flows.run import run_flow
from joiner.events import why_not_learnable
from learners.archive import ExampleArchive
from learners.model import Models
from tests.integration.test_join_flow import flow_log, flow_process, run_to_end

pytestmark = pytest.mark.integration

IMPRESSIONS = 60_000


def learn_config(cfg, tmp_path: Path):
    tag = uuid.uuid4().hex[:8]
    return cfg.replace(
        data_dir=str(tmp_path / "data"), recovery_dir=str(tmp_path / "recovery"),
        join={"wait_window_ms": 10 * 60_000, "idle_timeout_s": 600.0},
        features={"store_prefix": f"f{tag}"},
        learn={"store_name": f"t{tag}", "push_interval_s": 0.5, "log_interval_s": 0.5},
        generator={"max_click_delay_s": 3600.0})


def join_examples(cfg, tmp_path: Path, seed: int) -> list[dict]:
    """Produce a generator stream with every fault on, run the join flow to its end and
    return the example records it wrote to `examples`."""
    spec = StreamSpec(seed=seed, impressions=IMPRESSIONS,
                      faults=Faults.preset(IMPRESSIONS, 0.03))
    produce(cfg, spec, truth_dir=tmp_path / "truth")
    run_flow(cfg, "join", until_eof=True, recovery=False)
    return [orjson.loads(m.value()) for m in read_topics(cfg, [cfg.kafka.examples_topic])]


@pytest.fixture
def joined(fresh_topics, tmp_path):
    """A config whose `examples` topic holds the join flow's output, and those records."""
    cfg = learn_config(fresh_topics, tmp_path)
    return cfg, join_examples(cfg, tmp_path, seed=9)


def expected_counts(records: list[dict]) -> dict:
    examples = [r for r in records if r["kind"] == "example"]
    ids = {r["impression_id"] for r in examples}
    return {"in": len(records), "learned": len({r["impression_id"] for r in examples
                                                 if why_not_learnable(r) is None}),
            "duplicates": len(examples) - len(ids),
            "corrections": len(records) - len(examples), "dead_letters": 0}


def check_learned_once(cfg, records: list[dict]) -> dict:
    stats = orjson.loads(stats_path(cfg).read_bytes())
    want = expected_counts(records)
    assert {k: stats["counts"][k] for k in want} == want
    archive = ExampleArchive(Path(cfg.data_dir) / "archive")
    archived = [r["impression_id"] for d in archive.days() for r in archive.read_examples(d)]
    assert len(archived) == len(set(archived)) == len(
        {r["impression_id"] for r in records if r["kind"] == "example"})
    return stats


def test_learn_flow_learns_publishes_and_scores_from_redis(joined):
    cfg, records = joined
    run_flow(cfg, "learn", until_eof=True, recovery=True)
    stats = check_learned_once(cfg, records)
    for name, m in stats["metrics"].items():
        assert m["ne"] < 1.0, (name, m)  # better than the best constant prediction
        assert 0.85 < m["calibration"] < 1.15, (name, m)
        # Calibration by slice is in the stats (each slice here has few clicks: loose).
        assert len(m["calibration_by"]["position"]) == 10, (name, m)
        assert len(m["calibration_by"]["hour"]) == 24, (name, m)

    # The scores read from Redis are the learner's own predictions for the same input.
    store = model_store(cfg)
    version = store.current()
    assert store.get_meta(version)["examples"] == stats["counts"]["learned"]
    models = Models.load(model_settings(cfg), feature_spec(cfg), store, version)
    scorer = make_scorer(cfg)
    rng = np.random.default_rng(0)
    sample = [records[i] for i in rng.choice(len(records), 30, replace=False)]
    items = sorted({r["item_id"] for r in sample if "item_id" in r})[:10] + ["never-seen"]
    context = {"device": "mobile", "position": 2, "hour": 20}
    for user in sorted({r["user_id"] for r in sample if "user_id" in r})[:5] + ["nobody"]:
        _, examples = scorer.examples(user, items, context)
        want = models.predict(examples)
        got = scorer.score(user, items, context)
        assert scorer.version == version
        for name in ("ftrl", "bopr", "emb"):
            np.testing.assert_allclose([g[name] for g in got], want[name], rtol=0, atol=1e-6)

    # ... and `ctrstream score` prints them, ranked.
    cfg_path = Path(cfg.data_dir) / "ctrstream.toml"
    cfg_path.write_text(cfg.to_toml())
    out = subprocess.run(
        [sys.executable, "-m", "ctrstream.cli", "--config", str(cfg_path), "score", "--user", user,
         "--items", ",".join(items), "--device", "mobile", "--position", "2", "--hour", "20",
         "--by", "bopr", "--json"], capture_output=True, check=True)
    printed = orjson.loads(out.stdout)
    assert printed["version"] == version
    assert [s["bopr"] for s in printed["scores"]] == sorted((g["bopr"] for g in got),
                                                            reverse=True)


def learned(cfg) -> int:
    """Examples the learn flow has learned, from its stats file (0 before the first)."""
    path = stats_path(cfg)
    return orjson.loads(path.read_bytes())["counts"]["learned"] if path.exists() else 0


def test_sigkill_mid_stream_then_resume_learns_each_example_once(joined, tmp_path):
    cfg, records = joined
    cfg_path = tmp_path / "ctrstream.toml"
    cfg_path.write_text(cfg.to_toml())
    proc = flow_process(cfg_path, "learn")
    deadline = time.monotonic() + 60
    while not learned(cfg) > 2000:
        assert proc.poll() is None, flow_log(proc)[-2000:]
        assert time.monotonic() < deadline, "the learn flow made no progress"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = learned(cfg)
    assert killed_at < expected_counts(records)["learned"]  # the kill landed mid-stream
    proc = flow_process(cfg_path, "learn", "--until-eof")
    run_to_end(proc, 120)
    stats = check_learned_once(cfg, records)
    store = model_store(cfg)
    assert store.get_meta(store.current())["examples"] == stats["counts"]["learned"]
