"""Scale-out: the join flow on two processes gives the same examples and Redis contents as on
one, from the same input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from ctrstream.produce import produce
from ctrstream.simulator import Faults, StreamSpec, read_truth
from ctrstream.stack import create_topics
from flows.kafka import read_topics
from tests.integration.test_join_flow import (
    check_against_truth,
    check_counts_against_recount,
    join_config,
)

pytestmark = pytest.mark.integration


def run_join(cfg, tmp_path: Path, name: str, processes: int, shards: int = 16):
    """The config of one run into its own topics and Redis prefix, and its example records."""
    cfg = cfg.replace(kafka={"examples_topic": f"{cfg.kafka.examples_topic}-{name}",
                             "dead_letters_topic": f"{cfg.kafka.dead_letters_topic}-{name}"},
                      features={"store_prefix": f"{cfg.features.store_prefix}{name}",
                                "shards": shards},
                      data_dir=str(tmp_path / name / "data"),
                      recovery_dir=str(tmp_path / name / "recovery"))
    create_topics(cfg)
    path = tmp_path / f"{name}.toml"
    path.write_text(cfg.to_toml())
    out = subprocess.run([sys.executable, "-m", "ctrstream.cli", "--config", str(path), "run",
                          "join", "--until-eof", "-p", str(processes)],
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return cfg, read_topics(cfg, [cfg.kafka.examples_topic])


def counter_signals(cfg) -> list[int]:
    """The counter signals each process of a run handled (ProcessCounters' files)."""
    return [orjson.loads(f.read_bytes())["signals"]
            for f in (Path(cfg.data_dir) / "join").glob("counters-*.json")]


def test_two_processes_give_what_one_gives(fresh_topics, tmp_path):
    """Labels and every field but the counts are equal, with the counters in 16 shards on
    one process, and in 1, 4 and 16 on two. The counts of every run are checked against the
    ground truth: a window's oldest tile is interpolated, and where that tile's boundary
    falls depends on the order events were counted in, which the interleaving of the
    processes changes, so a count may differ by the bound the recount check allows. With 16
    shards both processes count: neither handles more than 60 % of the signals."""
    cfg = join_config(fresh_topics, tmp_path)
    produce(cfg, StreamSpec(seed=31, impressions=20_000, faults=Faults.preset(20_000, 0.03)),
            truth_dir=tmp_path / "truth")
    truth = read_truth(tmp_path / "truth")
    runs, shares = {}, {}
    for name, processes, shards in (("one", 1, 16), ("two", 2, 16), ("two1", 2, 1),
                                    ("two4", 2, 4)):
        run_cfg, records = run_join(cfg, tmp_path, name, processes, shards)
        check_against_truth(run_cfg, records, truth)
        check_counts_against_recount(run_cfg, records, truth)
        runs[name] = {ex["impression_id"]: ex for ex in map(orjson.loads, (m.value() for m in
                      records)) if ex["kind"] == "example"}
        signals = counter_signals(run_cfg)
        shares[name] = max(signals) / sum(signals)
    one = runs["one"]
    assert len(one) == len(truth)
    strip = lambda ex: {k: v for k, v in ex.items() if k != "counts"}  # noqa: E731
    for name in ("two", "two1", "two4"):
        two = runs[name]
        assert one.keys() == two.keys()
        assert all(strip(one[i]) == strip(two[i]) for i in one)
    assert shares["one"] == 1.0 and shares["two1"] == 1.0  # one shard: one process counts
    assert shares["two"] <= 0.6 and shares["two4"] <= 0.6, shares
    same = sum(one[i]["counts"] == runs["two"][i]["counts"] for i in one)
    print(f"scale-out: {len(one):,} examples equal on 1 and 2 processes; counts identical on "
          f"{same / len(one):.1%}, the rest within the oldest-tile bound of the truth; "
          f"largest process's share of the counter signals: {shares}")
