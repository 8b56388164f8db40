"""Daily retrain throughput (learners/retrain.py), beside the online learning of the same
examples from the same run, on a private redis-server (loopback, free port, stopped at the
end):

[1] online (the peer): ``Models.learn(annotate=True)`` over the day in event-time order, as
    the learn flow learns (each micro-batch predicted, then learned);
[2] ``retrain`` of that day from the archive, phase by phase: read (Parquet, late clicks,
    sort), train (one shuffled epoch of FTRL, BOPR and the embedding model, all parameters),
    holdout (predict, then learn the last 10 % as the learn flow would), publish (write the
    version to Redis, flip the pointer); and the whole retrain in examples/s.

The day is tests/integration/test_retrain.py's simulator (ctrstream/simulator.py's World,
labels as the joiner gives them, late-click corrections, point-in-time counts).

    python bench/retrain.py [--rate 2.3] [--threads 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctrstream.stack import Component, free_port  # noqa: E402
from learners.archive import ExampleArchive  # noqa: E402
from learners.model import Models  # noqa: E402
from learners.publish import ModelStore  # noqa: E402
from learners.retrain import RetrainSettings, retrain  # noqa: E402
from tests.integration.test_retrain import DAY, MIDNIGHT, simulate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=2.3,
                    help="impressions per second of event time (2.3: ~200k in the day)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("$ python bench/retrain.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    t = time.perf_counter()
    sim = simulate(MIDNIGHT, 86_400, args.rate, seed=args.seed)
    n = len(sim.examples)
    print(f"day {DAY}: {n:,} examples, {sum(e['label'] for e in sim.examples):,} positive "
          f"in the window, {len(sim.corrections):,} late clicks; simulated in "
          f"{time.perf_counter() - t:.1f} s; {os.cpu_count()} CPUs, torch threads "
          f"{args.threads}\n")
    settings = RetrainSettings()  # the default config's

    online = Models(settings.models, settings.spec)
    t = time.perf_counter()
    online.learn(sim.examples, annotate=True)
    online_s = time.perf_counter() - t

    root = tempfile.mkdtemp(prefix="bench-retrain-")
    archive = ExampleArchive(Path(root) / "archive")
    archive.append(sim.examples)
    archive.append_corrections(sim.corrections)
    server = Component("redis", free_port(), Path(root))
    server.start(20)
    try:
        store = ModelStore(redis.Redis(port=server.port), keep_days=1)
        res = retrain(settings, DAY, store, archive, force=True)
    finally:
        server.stop()


    print("| what | examples | seconds | examples/s |\n|---|---|---|---|")
    print(f"| [1] online: Models.learn, in order (peer) | {n:,} | {online_s:.1f} | "
          f"{n / online_s:,.0f} |")
    t = res.timings_s
    for phase, k in (("read", res.examples), ("train", res.train_examples),
                     ("holdout", res.holdout_examples), ("publish", res.examples)):
        print(f"| [2] retrain: {phase} | {k:,} | {t[phase]:.1f} | {k / t[phase]:,.0f} |")
    print(f"| [2] retrain: whole (status {res.status}) | {res.examples:,} | "
          f"{res.elapsed_s:.1f} | {res.examples / res.elapsed_s:,.0f} |")
    print(f"\nretrain / online learning, examples/s: "
          f"{(res.examples / res.elapsed_s) / (n / online_s):.2f}x")
    print("holdout NE (the last 10 % of the day), online models' progressive predictions | "
          "retrained, progressive (the rule's) | retrained, frozen (before learning any of "
          "the holdout):")
    for m in res.ne_online:
        print(f"  {m:<5} {res.ne_online[m]:.4f} | {res.ne_retrained_progressive[m]:.4f} | "
              f"{res.ne_retrained_frozen[m]:.4f}")


if __name__ == "__main__":
    main()
