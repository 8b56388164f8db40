"""The daily retrain over simulated days: does it improve the next day, and is it refused when
it does not? Beside it, the online models alone, from the same run.

The stream is tests/integration/test_retrain.py's simulator (ctrstream/simulator.py's World,
labels as the joiner gives them, late-click corrections, point-in-time counts), ``--days``
days from 2023-11-15. Three tracks, each scored by its progressive NE (each example predicted
before it is learned, labels as joined) day by day:

- **online only**: ``Models.learn`` over every day in event-time order, never retrained;
- **pipeline**: as the learn flow and the daily retrain run: learned online, archived with
  its progressive predictions; at each day's end ``retrain`` (learners/retrain.py, on a
  private redis-server) publishes the day's retrained version unless its rule refuses, and
  the pipeline continues from what is published (the learn flow replays what it learned
  since the boundary into it; here the switch is at the boundary, so there is nothing to
  replay);
- **candidate**: the retrain's models continued online on the next day whether published or
  not: for a refused one, what publishing it would have done (the rule's check).

Printed: next-day NE per model for the three tracks, each retrain's status, holdout NE and,
when refused, its reason; examples/s of online learning and of the retrain.

    python bench/retrain.py [--days 3] [--rate 1.0] [--seed 0] [--emb-order time|shuffled]
                            [--linear-epochs N] [--max-ne-regression X]
                            [--min-gain-se Z|MODEL=Z,...] [--emb-row-pass X] [--quick]
                            [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctrstream.simulator import MS_PER_DAY  # noqa: E402
from ctrstream.stack import Component, free_port  # noqa: E402
from learners.archive import ExampleArchive, day_of  # noqa: E402
from learners.metrics import normalized_entropy  # noqa: E402
from learners.model import MODELS, Models  # noqa: E402
from learners.publish import ModelStore  # noqa: E402
from learners.retrain import (  # noqa: E402
    EMB_ORDERS,
    RetrainSettings,
    learn_holdout,
    load_day,
    normalized_entropies,
    online_predictions,
    parse_min_gain_se,
    refusal,
    retrain,
    split_holdout,
    train_epoch,
)
from tests.integration.test_retrain import MIDNIGHT, simulate  # noqa: E402


def learn(models: Models, examples: list[dict]) -> tuple[list[dict], dict[str, float], float]:
    """Copies of ``examples`` learned progressively (annotated with ``online_p``), the NE of
    each model on them, and examples/s."""
    copies = [dict(e) for e in examples]
    t = time.perf_counter()
    models.learn(copies, annotate=True)
    eps = len(copies) / max(time.perf_counter() - t, 1e-9)
    y = np.fromiter((e["label"] for e in copies), np.float64, len(copies))
    ne = {m: normalized_entropy(np.array([e["online_p"][m] for e in copies]), y)
          for m in MODELS}
    return copies, ne, eps


def copy(models: Models, settings: RetrainSettings) -> Models:
    return Models.from_bytes(settings.models, settings.spec, models.to_bytes())


def from_online(models: Models, archive: ExampleArchive, date: str,
                settings: RetrainSettings, seed: int) -> dict:
    """The issue's simplified retrain: ``models`` (the online state at the day's end, which
    learned the day already) one more shuffled epoch over the day's training part, every
    parameter, then the holdout as `retrain` learns it; judged by the same rule."""
    day = load_day(archive, date)
    cut = split_holdout(day.examples, settings.holdout_fraction)
    train, holdout = day.table.slice(0, cut), day.table.slice(cut)
    train_epoch(models, train, seed, emb_order="shuffled")
    y = holdout["label"].to_numpy(zero_copy_only=False).astype(np.float64)
    online = online_predictions(holdout)
    mask = np.all([np.isfinite(online[m]) for m in MODELS], axis=0)
    _, progressive = learn_holdout(models, holdout)
    ne_online = normalized_entropies(online, y, mask)
    ne_new = normalized_entropies(progressive, y, mask)
    return {"date": date, "ne_online": ne_online, "ne_retrained": ne_new,
            "reason": refusal(ne_online, ne_new, settings.max_ne_regression)}


def run(days: int, rate: float, seed: int, emb_order: str = "time",
        max_ne_regression: float | None = None, linear_epochs: int | None = None,
        min_gain_se: dict[str, float] | None = None, emb_row_pass: float | None = None,
        log=print) -> dict:
    settings = RetrainSettings(emb_order=emb_order)  # else the default config's
    if emb_row_pass is not None:
        settings = dataclasses.replace(settings, emb_row_pass=emb_row_pass)
    if min_gain_se is not None:
        settings = dataclasses.replace(settings, min_gain_se=min_gain_se)
    if linear_epochs is not None:
        settings = dataclasses.replace(settings, linear_epochs=linear_epochs)
    if max_ne_regression is not None:
        settings = dataclasses.replace(settings, max_ne_regression=max_ne_regression)
    t = time.perf_counter()
    sim = simulate(MIDNIGHT, days * 86_400, rate, seed=seed)
    by_day: list[list[dict]] = [[] for _ in range(days)]
    for e in sim.examples:
        by_day[(e["ts"] - MIDNIGHT) // MS_PER_DAY].append(e)
    corrections: list[list[dict]] = [[] for _ in range(days)]
    for c in sim.corrections:
        corrections[(c["ts"] - MIDNIGHT) // MS_PER_DAY].append(c)
    log(f"{days} days from {day_of(MIDNIGHT)}: {len(sim.examples):,} examples "
        f"({', '.join(f'{len(d):,}' for d in by_day)} a day), "
        f"{sum(e['label'] for e in sim.examples):,} positive in the window, "
        f"{len(sim.corrections):,} late clicks; simulated in {time.perf_counter() - t:.1f} s")

    online, pipeline = Models(settings.models, settings.spec), Models(settings.models,
                                                                       settings.spec)
    candidate = simplified = None
    out: dict = {"days": [], "retrains": [], "simplified": [], "rate": rate, "seed": seed,
                 "emb_order": emb_order, "linear_epochs": settings.linear_epochs,
                 "max_ne_regression": settings.max_ne_regression,
                 "min_gain_se": settings.min_gain_se, "emb_row_pass": settings.emb_row_pass,
                 "examples": len(sim.examples)}
    root = tempfile.mkdtemp(prefix="bench-retrain-")
    archive = ExampleArchive(Path(root) / "archive", fsync=False)
    server = Component("redis", free_port(), Path(root))
    server.start(20)
    try:
        store = ModelStore(redis.Redis(port=server.port), keep_days=1)
        for d, examples in enumerate(by_day):
            date = day_of(MIDNIGHT + d * MS_PER_DAY)
            row = {"date": date, "examples": len(examples),
                   "positives": sum(e["label"] for e in examples)}
            _, row["online"], row["online_eps"] = learn(online, examples)
            archived, row["pipeline"], _ = learn(pipeline, examples)
            if candidate is not None:
                row["candidate"] = (row["pipeline"] if candidate is pipeline
                                    else learn(candidate, examples)[1])
                row["simplified"] = learn(simplified, examples)[1]
            out["days"].append(row)
            if d == days - 1:
                break
            archive.append(archived)
            archive.append_corrections(corrections[d])
            res = retrain(settings, date, store, archive)
            out["retrains"].append({k: v for k, v in res.to_dict().items() if k in (
                "date", "status", "reason", "base", "base_date", "train_examples",
                "holdout_examples", "holdout_positives", "ne_online", "ne_retrained",
                "ne_retrained_frozen", "ne_difference_se", "kept_online",
                "ne_online_replayed", "train_examples_per_s", "elapsed_s")})
            log(f"retrain {date}: {res.status}" + (f": {res.reason}" if res.reason else "")
                + f" ({res.elapsed_s:.1f} s)")
            for m, why in res.kept_online.items():
                log(f"  {m} keeps its online state: {why}")
            simplified = copy(pipeline, settings)
            out["simplified"].append(from_online(simplified, archive, date, settings, seed))
            why = out["simplified"][-1]["reason"]
            log(f"simplified retrain {date} (from the online state): "
                + (f"refused: {why}" if why else "not refused"))
            if res.status == "published":
                pipeline = res.models
                candidate = pipeline if res.candidates is pipeline else res.candidates
            else:
                candidate = copy(res.candidates, settings)
    finally:
        server.stop()
    return out


def _f(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def report(out: dict) -> None:
    print("\nNext-day progressive NE (labels as joined; lower is better):\n")
    print("| day | model | online only | pipeline (what was published) | pipeline - online "
          "| candidate (retrain of the day before, published or not) | candidate - online | "
          "simplified retrain (from the online state, shuffled; never published) | "
          "simplified - online |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in out["days"][1:]:
        for m in MODELS:
            on, pipe, cand = row["online"][m], row["pipeline"][m], row["candidate"][m]
            simple = row["simplified"][m]
            print(f"| {row['date']} | {m} | {on:.4f} | {pipe:.4f} | {pipe - on:+.4f} | "
                  f"{cand:.4f} | {cand - on:+.4f} | {simple:.4f} | {simple - on:+.4f} |")
    gain = "".join(f"; {m} only when its NE is below the online one by more than {z:g} "
                   "paired se" for m, z in out["min_gain_se"].items())
    print(f"\nRetrains (the rule, model by model on the holdout, the day's last 10 %: a "
          f"retrained model replaces its online state when its NE is not above the online "
          f"one by more than {out['max_ne_regression']:g}, learn.max_ne_regression{gain}; "
          "else the version holds its online state, replayed from the warm start with the "
          "labels as joined):\n")
    for r in out["retrains"]:
        print(f"- {r['date']}: **{r['status']}**"
              + (f" (warm start: retrain of {r['base_date']})" if r["base"] else
                 " (fresh models)")
              + f"; train {r['train_examples']:,}, holdout {r['holdout_examples']:,} "
                f"({r['holdout_positives']:,} positive); {r['train_examples_per_s']:,.0f} "
                f"examples/s training, {r['elapsed_s']:.1f} s in all")
        for m in MODELS:
            print(f"    {m:<5} holdout NE online {_f(r['ne_online'].get(m))}, retrained "
                  f"{_f(r['ne_retrained'].get(m))} (frozen {_f(r['ne_retrained_frozen'].get(m))}"
                  f", 2 se of the difference {_f(2 * r['ne_difference_se'].get(m, math.nan))}"
                  f"; online replayed {_f(r['ne_online_replayed'].get(m))})"
                  + (f": **kept online**: {r['kept_online'][m]}" if m in r["kept_online"]
                     else ""))
        if r["reason"]:
            print(f"    reason: {r['reason']}")
    print("\nThe simplified retrain (the online state at the day's end, one more shuffled "
          "epoch over the day, every parameter), judged by the same rule:\n")
    for r in out["simplified"]:
        ne = ", ".join(f"{m} {r['ne_retrained'][m]:.4f} (online {r['ne_online'][m]:.4f})"
                       for m in MODELS)
        print(f"- {r['date']}: " + (f"**refused**: {r['reason']}" if r["reason"]
                                    else "**not refused**") + f"; holdout NE {ne}")
    eps = [row["online_eps"] for row in out["days"]]
    print(f"\nonline learning (Models.learn, all three): {np.mean(eps):,.0f} examples/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--rate", type=float, default=1.0,
                    help="impressions per second of event time (1.0: ~86k a day)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--emb-order", choices=EMB_ORDERS, default="time",
                    help="the embedding model's order in the retrain's epoch (default: time; "
                         "shuffled: as the retrain did before)")
    ap.add_argument("--linear-epochs", type=int,
                    help="FTRL's and BOPR's passes over the day in the retrain")
    ap.add_argument("--max-ne-regression", type=float,
                    help="the rule's margin (default: learn.max_ne_regression's default)")
    ap.add_argument("--min-gain-se", type=parse_min_gain_se, metavar="Z|MODEL=Z,...",
                    help="paired standard errors a model's retrain must gain on the holdout "
                         "to replace its online state, for every model or by model (default: "
                         "RetrainSettings', emb=2)")
    ap.add_argument("--emb-row-pass", type=float, metavar="X",
                    help="a second time-ordered pass on the embedding model's rows only, at X "
                         "times their step size (default: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="--rate 0.3 (~26k a day)")
    ap.add_argument("--json", action="store_true", help="one JSON object last")
    args = ap.parse_args()
    if args.days < 2:
        ap.error("--days must be at least 2: a retrain is judged on the day after")
    torch.set_num_threads(args.threads)
    rate = 0.3 if args.quick else args.rate
    print("$ python bench/retrain.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(f"{os.cpu_count()} CPUs, torch threads {args.threads}")
    out = run(args.days, rate, args.seed, args.emb_order, args.max_ne_regression,
              args.linear_epochs, args.min_gain_se, args.emb_row_pass)
    report(out)
    if args.json:
        print(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY).decode())


if __name__ == "__main__":
    main()
