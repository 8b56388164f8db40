"""`make demo`: start the local stack, produce a simulated hour of events with every fault on,
run the join flow and then the learn flow to the end of the input, and show what came out next
to the ground truth: join coverage, model quality, a feature and a score read back from Redis.

Each run uses fresh topic names, so it can be repeated on a running stack.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import orjson

from ctrstream.produce import produce, summary
from ctrstream.report import write_report
from ctrstream.simulator import (
    Faults,
    StreamSpec,
    bayes_log_loss,
    coverage,
    expected_labels,
    read_truth,
)
from ctrstream.stack import LocalStack, create_topics
from flows.build import feature_store, scorer
from flows.config import load_config
from flows.kafka import read_topics
from flows.learn import stats_path
from flows.run import run_flow
from learners.metrics import entropy, slice_range


def show_features(cfg, examples: list[dict]) -> None:
    """The busiest user's counts as the last example carried them and as Redis holds them."""
    users = {}
    for e in examples:
        users[e["user_id"]] = users.get(e["user_id"], 0) + 1
    user = max(users, key=users.get)
    last = next(e for e in reversed(examples) if e["user_id"] == user)
    row = feature_store(cfg).get("user", user)
    names = [n for n in row if not n.startswith("_")]
    print(f"== real-time counts of user {user} ({users[user]} impressions in the hour)")
    print(f"   {'feature':10} {'on its last example':>20} {'in Redis':>10}  (Redis: as of the "
          f"stream's newest event, {(row['_ts'] - last['ts']) / 60000:.0f} min later)")
    for n in names:
        print(f"   {n:10} {last['counts']['user'][n]:>20} {row[n]:>10}")
    print(f"   read back with: ctrstream features get user {user}")
    return user


def show_learning(cfg, truth, examples: list[dict], user: str) -> None:
    stats = orjson.loads(stats_path(cfg).read_bytes())
    c = stats["counts"]
    print(f"   {c['learned']:,} examples learned, {c['duplicates']:,} duplicates dropped, "
          f"{c['corrections']:,} late-click corrections archived; model version "
          f"{stats['version']} published")
    print("== model quality, progressive (each example predicted before it is learned)")
    ctr = float(np.mean([e["label"] for e in examples]))
    bayes = bayes_log_loss(truth, cfg.join.wait_window_ms) / entropy(ctr)
    print(f"   {'model (best NE first)':24} {'NE':>7} {'calibration':>12} "
          f"{'by position':>12} {'by hour':>12} {'AUC':>7}")
    names = {"ftrl": "FTRL-Proximal", "bopr": "BOPR", "emb": "ID embeddings (torch)"}
    for name, m in sorted(stats["metrics"].items(), key=lambda nm: nm[1]["ne"]):
        (p0, p1), (h0, h1) = slice_range(m, "position"), slice_range(m, "hour")
        print(f"   {names[name]:24} {m['ne']:7.4f} {m['calibration']:12.3f} "
              f"{f'{p0:.2f}-{p1:.2f}':>12} {f'{h0:.2f}-{h1:.2f}':>12} {m['auc']:7.3f}")
    print(f"   {'Bayes-optimal (true p)':24} {bayes:7.4f}   (the floor: NE of the generator's "
          "own probabilities)")
    items = []
    for e in reversed(examples):
        if e["item_id"] not in items:
            items.append(e["item_id"])
        if len(items) == 5:
            break
    context = {"device": "mobile", "position": 0, "hour": 20}
    scores = scorer(cfg).score(user, items, context)
    scores.sort(key=lambda s: s["emb"], reverse=True)
    print(f"== scores of user {user} for 5 items, read back from Redis ({context})")
    print(f"   {'item':10} {'emb':>8} {'bopr':>8} {'ftrl':>8}")
    for s in scores:
        print(f"   {s['item_id']:10} {s['emb']:8.4f} {s['bopr']:8.4f} {s['ftrl']:8.4f}")
    print(f"   read back with: ctrstream score --user {user} --items {','.join(items)} "
          "--hour 20")


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config()
    stack = LocalStack.from_config(cfg)
    print(f"== local stack ({stack.state_dir})")
    stack.up()
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
    base = Path(cfg.data_dir) / "demo" / run_id
    cfg = stack.config(cfg).replace(
        data_dir=str(base), recovery_dir=str(base / "recovery"),
        features={"enabled": True, "store_prefix": f"f-{run_id}"},
        # a log line (and a point in the report's plots) every second of a short run
        join={"log_interval_s": 1.0},
        learn={"store_name": f"demo-{run_id}", "log_interval_s": 1.0},
        kafka={t: f"{name}-{run_id}" for t, name in [
            ("impressions_topic", "impressions"), ("clicks_topic", "clicks"),
            ("examples_topic", "examples"), ("dead_letters_topic", "dead-letters")]})
    create_topics(cfg)
    print(f"   kafka {cfg.kafka.bootstrap_servers}, redis {cfg.redis.url}, topics *-{run_id}")

    hour = 3600.0
    n_expected = hour * cfg.generator.impressions_per_s
    spec = StreamSpec(seed=42, duration_s=hour,
                      faults=Faults.preset(n_expected, cfg.generator.base_ctr))
    print("== producing one simulated hour of impressions and clicks, every fault on")
    manifest = produce(cfg, spec, truth_dir=base / "truth", progress=True)
    print("   " + summary(manifest))

    print(f"== join flow (wait window {cfg.join.wait_window_ms / 60000:.0f} min), to end of input")
    t0 = time.monotonic()
    run_flow(cfg, "join", until_eof=True, recovery=False)
    took = time.monotonic() - t0

    examples = [orjson.loads(m.value()) for m in read_topics(cfg, [cfg.kafka.examples_topic])]
    dead = [orjson.loads(m.value()) for m in read_topics(cfg, [cfg.kafka.dead_letters_topic])]
    ex = [e for e in examples if e["kind"] == "example"]
    late = [e for e in examples if e["kind"] == "late_click"]
    truth = read_truth(base / "truth")
    window = cfg.join.wait_window_ms
    labels = {e["impression_id"]: e["label"] for e in ex}
    ids = truth.column("impression_id").to_pylist()
    got = np.array([labels.get(i, -1) for i in ids])
    want = expected_labels(truth, window)
    clicks = int(truth.column("clicked").to_numpy(zero_copy_only=False).sum())
    counts = {"impressions": len(ex), "positives": int(sum(labels.values())),
              "late-click corrections": len(late), "dead letters": len(dead)}
    print(f"   {sum(counts.values()) / max(took, 1e-9):,.0f} records/s out, {took:.1f} s")
    print("== what reached each topic")
    for topic, n in [(cfg.kafka.impressions_topic, manifest["counts"]["impression_messages"]),
                     (cfg.kafka.clicks_topic, manifest["counts"]["click_messages"])]:
        print(f"   {topic:34} {n:8,} messages in")
    for name, n in counts.items():
        print(f"   {name:34} {n:8,}")
    print("== join quality against the generator's ground truth")
    print(f"   labels equal to truth             {(got == want).mean():8.2%}  "
          f"({int((got != want).sum())} differ)")
    print(f"   click coverage (joined/all)       {want.sum() / max(clicks, 1):8.2%}  "
          f"(theoretical for this window: {coverage(truth, window):.2%})")
    print(f"   labeled CTR                       {want.mean():8.2%}  "
          f"(true mean p {manifest['mean_p']:.2%})")
    reasons = {}
    for d in dead:
        reasons[d["reason"].split(":")[0]] = reasons.get(d["reason"].split(":")[0], 0) + 1
    print(f"   dead-letter reasons               {reasons}")
    user = show_features(cfg, ex)
    print("== learn flow: FTRL, BOPR and the embedding model, to end of input")
    t0 = time.monotonic()
    run_flow(cfg, "learn", until_eof=True, recovery=False)
    print(f"   {time.monotonic() - t0:.1f} s")
    show_learning(cfg, truth, ex, user)
    cfg_path = base / "ctrstream.toml"
    cfg_path.write_text(cfg.to_toml())
    print(f"== report: {write_report(cfg)}")
    print(f"   made again with: ctrstream --config {cfg_path} report")
    print("== the stack keeps running: `ctrstream stack status`, `ctrstream stack down`")
    return 0 if (got == want).all() else 1


if __name__ == "__main__":
    sys.exit(main())
