"""Online learners side by side on one seeded 3-day simulated stream, progressive validation
(each example predicted before it is learned): normalized entropy (NE), calibration, NE of
the last day, examples/s, and the embedding model's calibration by position and hour.

Ours: FTRLProximal.learn_many and BOPR.learn_many on the hashed features (rates: learning
only), EmbeddingLearner alone (predict, then learn_batch, micro-batches as Models), and
Models.learn with all three as the learn flow runs them (rate: from the example dicts,
hashing included). Peers in the same run: Vowpal Wabbit `--ftrl -q ui` (tuned: alpha 0.1,
beta 1, l1 0, l2 1) and `--lrq ui8`, fed the user and item ids as namespaces u and i and our
other hashed features as namespace f; river's FMClassifier on a prefix (it is slow), beside
FTRL's figure on the same prefix. Floors: the simulator's p without its user x item affinity
term (marginalized over the term's distribution: what a model that does not learn the pairs
could reach at best; dropping it leaves p at 0.65 of the CTR) and its true p (Bayes).

The stream is ctrstream.simulator's World over 3 days of event time whatever the number of
examples: impressions in event-time order, label = clicked (no wait window), point-in-time
counts from features.counters.EntityCounters with clicks counted at their own event time.

    python bench/learners.py [--examples 1000000] [--river 100000] [--quick] [--json] [--no-vw]

--quick: 150,000 examples (river FM on 20,000), under 3 minutes. --json: one JSON object with
every figure as the last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctrstream.simulator import DEVICES, MS_PER_DAY, World  # noqa: E402
from features.counters import EntityCounters  # noqa: E402
from features.hashing import FeatureHasher  # noqa: E402
from features.spec import FeatureSpec  # noqa: E402
from flows.config import GeneratorConfig  # noqa: E402
from joiner.events import Impression  # noqa: E402
from learners.bopr import BOPR  # noqa: E402
from learners.embeddings import EmbeddingLearner  # noqa: E402
from learners.ftrl import FTRLProximal  # noqa: E402
from learners.metrics import ProgressiveMetrics, slice_range  # noqa: E402
from learners.model import MICRO_BATCH, SLICES, Models, ModelSettings, slice_keys  # noqa: E402

DAYS = 3
START_MS = 1_700_000_000_000 - 1_700_000_000_000 % MS_PER_DAY  # a midnight, fixed
VW_Q = "--ftrl --ftrl_alpha 0.1 --ftrl_beta 1 --l1 0 --l2 1 -q ui"
VW_LRQ = "--ftrl --ftrl_alpha 0.1 --ftrl_beta 1 --l1 0 --l2 1 --lrq ui8"


def simulate(n: int, seed: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """``n`` example dicts over ``DAYS`` days in event-time order, the true p of each, p with
    the affinity term dropped and p with it marginalized."""
    gen = dataclasses.replace(GeneratorConfig(), impressions_per_s=n / (DAYS * 86_400))
    world = World(gen, seed)
    rng = np.random.default_rng([seed, 7])
    ts = START_MS + np.cumsum(rng.exponential(1000 / gen.impressions_per_s, n)).astype(np.int64)
    s = world.sample(rng, ts)
    logit = world.logit(**s)
    base = world.logit(**s, affinity=False)
    p = 1.0 / (1.0 + np.exp(-logit))
    p_no_affinity = 1.0 / (1.0 + np.exp(-base))
    clicked = rng.random(n) < p
    delay = np.zeros(n, np.int64)
    delay[clicked] = world.delays_ms(rng, int(clicked.sum()))
    users = world.user_names[s["user"]].tolist()
    items = world.item_names[s["item"]].tolist()
    cats = world.category_names[world.item_category[s["item"]]].tolist()
    devices = np.array(DEVICES, dtype=object)[s["device"]].tolist()
    hours = ((ts % MS_PER_DAY) // 3_600_000).tolist()
    counters = EntityCounters(FeatureSpec())
    pending: list[tuple[int, int, Impression]] = []  # clicks by event time
    out = []
    for k, t in enumerate(ts.tolist()):
        feats = {"category": cats[k], "device": devices[k], "position": int(s["position"][k]),
                 "hour": hours[k]}
        ex = {"impression_id": f"{k:016x}", "ts": t, "user_id": users[k], "item_id": items[k],
              "features": feats, "kind": "example", "label": int(clicked[k])}
        while pending and pending[0][0] < t:
            click_ts, _, imp = heapq.heappop(pending)
            counters.clicked(imp, click_ts)
        imp = Impression(ex["impression_id"], t, users[k], items[k], feats)
        ex["counts"] = counters.seen(imp)
        if clicked[k]:
            heapq.heappush(pending, (t + int(delay[k]), k, imp))
        out.append(ex)
    return out, p, p_no_affinity, marginalized(base, logit - base)


def marginalized(base: np.ndarray, pair: np.ndarray, k: int = 32) -> np.ndarray:
    """p knowing everything but the user x item term: the mean of sigmoid(base + a) over
    that term's distribution on the stream (``k`` quantiles); dropping the term instead
    leaves p miscalibrated (sigmoid is not linear)."""
    q = np.quantile(pair, (np.arange(k) + 0.5) / k)
    out = np.empty(len(base))
    for a in range(0, len(base), 100_000):
        z = base[a:a + 100_000, None] + q[None, :]
        out[a:a + 100_000] = (1.0 / (1.0 + np.exp(-z))).mean(axis=1)
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_emb(examples: list[dict]) -> np.ndarray:
    """EmbeddingLearner alone, as Models drives it: predict a micro-batch, then learn it,
    micro-batches doubling from 1 to MICRO_BATCH."""
    learner = EmbeddingLearner(seed=0)
    out, s, b = [], 0, 1
    while s < len(examples):
        batch = examples[s:s + b]
        x = learner.dense_features(batch)
        out.append(learner.predict_batch(batch, x))
        learner.learn_batch(batch, checked=True, x=x)
        s, b = s + b, min(2 * b, MICRO_BATCH)
    return np.concatenate(out)


def run_models(examples: list[dict]) -> Models:
    models = Models(ModelSettings(), FeatureSpec())
    for s in range(0, len(examples), 1000):  # as the learn flow's batches arrive
        models.learn(examples[s:s + 1000], checked=True)
    return models


def vw_lines(examples: list[dict], indptr, indices) -> list[str]:
    # Our index 0 is the bias (hence --noconstant); VW takes integer names in f as indices.
    return [f"{1 if e['label'] else -1} |u {e['user_id']} |i {e['item_id']} |f "
            + " ".join(map(str, indices[indptr[k]:indptr[k + 1]].tolist()))
            for k, e in enumerate(examples)]


def run_vw(args: str, lines: list[str]) -> np.ndarray:
    import vowpalwabbit

    vw = vowpalwabbit.Workspace(f"{args} --loss_function logistic --link logistic -b 22 "
                                "--noconstant --quiet")
    p = np.empty(len(lines))
    for k, line in enumerate(lines):
        ex = vw.parse(line)
        vw.learn(ex)  # the prediction it leaves on the example is from before the update
        p[k] = ex.get_simplelabel_prediction()
        vw.finish_example(ex)
    vw.finish()
    return p


def run_river_fm(examples: list[dict]) -> np.ndarray:
    from river import facto

    model = facto.FMClassifier(n_factors=8, seed=0)
    p = np.empty(len(examples))
    for k, e in enumerate(examples):
        x = {"u=" + e["user_id"]: 1.0, "i=" + e["item_id"]: 1.0,
             **{f"{n}={v}": 1.0 for n, v in e["features"].items()}}
        p[k] = model.predict_proba_one(x)[True]
        model.learn_one(x, bool(e["label"]))
    return p


def figures(p, y, last_day, keys=None) -> dict:
    m = ProgressiveMetrics(window=min(100_000, len(y)), slices=SLICES if keys else None)
    m.update_many(p, y, keys)
    s = m.summary()
    last = ProgressiveMetrics(window=1)
    last.update_many(p[last_day], y[last_day])
    out = {"ne": s["ne"], "calibration": s["calibration"], "auc": s["auc"],
           "ne_last_day": last.summary()["ne"]}
    if keys:
        out["by_position"] = slice_range(s, "position")
        out["by_hour"] = slice_range(s, "hour")
    return out


def row(name: str, f: dict, n: int, seconds: float | None, note: str = "") -> str:
    rate = f"{n / seconds:>11,.0f}" if seconds else f"{'-':>11}"
    last = "-" if np.isnan(f["ne_last_day"]) else f"{f['ne_last_day']:.4f}"
    slices = (f"{f['by_position'][0]:.2f}-{f['by_position'][1]:.2f} / "
              f"{f['by_hour'][0]:.2f}-{f['by_hour'][1]:.2f}" if "by_position" in f else "")
    return (f"| {name:<42} | {n:>9,} | {rate} | {f['ne']:.4f} | {f['calibration']:.3f} | "
            f"{last:>11} | {f['auc']:.4f} | {slices:<23} | {note}")


HEADER = (f"| {'learner':<42} |  examples |  examples/s |   NE   | calib | NE last day | "
          "AUC    | calib by position / hour | |\n|" + "---|" * 9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--river", type=int, default=100_000, help="prefix for river FM (slow)")
    ap.add_argument("--quick", action="store_true", help="150k examples, river FM on 20k")
    ap.add_argument("--json", action="store_true", help="print every figure as JSON, last")
    ap.add_argument("--no-vw", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.examples, args.river = min(args.examples, 150_000), min(args.river, 20_000)
    n, n_river = args.examples, min(args.river, args.examples)
    torch.set_num_threads(1)  # as the learn flow runs
    print("$ python bench/learners.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))

    (examples, true_p, p_no_aff, p_marg), sim_s = timed(lambda: simulate(n, args.seed))
    y = np.array([e["label"] for e in examples], dtype=np.float64)
    ts = np.array([e["ts"] for e in examples])
    last_day = ts >= START_MS + (DAYS - 1) * MS_PER_DAY
    keys = slice_keys(examples)
    s = ModelSettings()
    hasher = FeatureHasher(bits=s.hash_bits, crosses=s.crosses, count_features=FeatureSpec())
    parts, hash_s = timed(lambda: [hasher.batch(examples[a:a + 1000])
                                   for a in range(0, n, 1000)])
    indptr = np.concatenate([[0], np.cumsum(np.concatenate([np.diff(p) for p, _ in parts]))])
    indices = np.concatenate([i for _, i in parts])
    users = len({e["user_id"] for e in examples})
    print(f"stream: {n:,} examples over {DAYS} days (seed {args.seed}), {users:,} users, CTR "
          f"{y.mean():.4f}, {len(indices) / n:.1f} active features/example; simulated in "
          f"{sim_s:.0f} s; hashing {n / hash_s:,.0f} examples/s")
    print(f"ours: FTRL alpha {s.ftrl_alpha} beta {s.ftrl_beta} l1 {s.ftrl_l1} l2 {s.ftrl_l2}; "
          f"BOPR beta {s.bopr_beta} prior variance {s.bopr_prior_variance}; embeddings dim "
          f"{s.emb_dim} lr {s.emb_lr}; torch threads 1\n", flush=True)

    res: dict[str, tuple[dict, float | None, str]] = {}

    def add(name, p, seconds=None, note="", slices=False):
        res[name] = (figures(p, y, last_day, keys if slices else None), seconds, note)

    add("Bayes floor (true p)", true_p)
    add("simulator p without user x item affinity", p_marg, note="the term marginalized")
    add("  same, the term dropped (miscalibrated)", p_no_aff)
    p, sec = timed(lambda: FTRLProximal(s.ftrl_alpha, s.ftrl_beta, s.ftrl_l1, s.ftrl_l2,
                                        s.hash_bits).learn_many(indptr, indices, y))
    add("ours FTRLProximal.learn_many", p, sec, "hashed input", True)
    p_ftrl = p
    p, sec = timed(lambda: BOPR(s.bopr_beta, s.bopr_prior_variance, s.hash_bits)
                   .learn_many(indptr, indices, y))
    add("ours BOPR.learn_many", p, sec, "hashed input", True)
    p, sec = timed(lambda: run_emb(examples))
    add("ours EmbeddingLearner (alone)", p, sec, "example dicts", True)
    cpu = time.process_time()
    models, models_s = timed(lambda: run_models(examples))
    models_cpu = time.process_time() - cpu  # on a shared machine, wall time counts others
    summ = models.summary()
    for name in ("ftrl", "bopr", "emb"):
        m = summ[name]
        res[f"ours Models.learn: {name}"] = (
            {"ne": m["ne"], "calibration": m["calibration"], "auc": m["auc"],
             "ne_last_day": float("nan"), "by_position": slice_range(m, "position"),
             "by_hour": slice_range(m, "hour")},
            models_s if name == "ftrl" else None,
            "all three, dicts in, hashing included" if name == "ftrl" else "")
    if not args.no_vw:
        lines = vw_lines(examples, indptr, indices)
        for label, vw_args in (("VW 9.11.9 --ftrl -q ui (tuned)", VW_Q),
                               ("VW 9.11.9 --ftrl --lrq ui8", VW_LRQ)):
            p, sec = timed(lambda a=vw_args: run_vw(a, lines))
            add(label, p, sec, f"`{vw_args}`", True)
    p_fm, fm_s = timed(lambda: run_river_fm(examples[:n_river]))

    print(f"whole stream ({n:,} examples), best NE first:")
    print(HEADER)
    order = sorted(res, key=lambda k: res[k][0]["ne"])
    for name in order:
        f, sec, note = res[name]
        print(row(name, f, n, sec, note))
    print(f"\nfirst {n_river:,} examples (river FM is slow):\n{HEADER}")
    cut = slice(0, n_river)
    fm = figures(p_fm, y[cut], last_day[cut])
    print(row("river 0.26.1 FMClassifier (8 factors)", fm, n_river, fm_s, "ids + context"))
    print(row("ours FTRLProximal, same prefix", figures(p_ftrl[cut], y[cut], last_day[cut]),
              n_river, None, "cut from the run above"))

    ftrl, no_aff = res["ours FTRLProximal.learn_many"][0]["ne"], res[
        "simulator p without user x item affinity"][0]["ne"]
    emb = res["ours EmbeddingLearner (alone)"][0]
    closed = (ftrl - emb["ne"]) / (ftrl - no_aff) if ftrl != no_aff else float("nan")
    print(f"\nembedding model closes {closed:.0%} of the FTRL -> no-affinity gap "
          f"({ftrl:.4f} -> {no_aff:.4f}); Models.learn {n / models_s:,.0f} examples/s "
          f"({n / models_cpu:,.0f} per CPU-second)")
    if args.json:
        out = {"examples": n, "seed": args.seed,
               "ne_ftrl": ftrl, "ne_bopr": res["ours BOPR.learn_many"][0]["ne"],
               "ne_emb": emb["ne"], "cal_emb": emb["calibration"],
               "cal_emb_by_position": list(emb["by_position"]),
               "cal_emb_by_hour": list(emb["by_hour"]),
               "ne_last_day_emb": emb["ne_last_day"],
               "ne_no_affinity": no_aff,
               "ne_no_affinity_dropped": res["  same, the term dropped (miscalibrated)"][0]["ne"],
               "ne_bayes": res["Bayes floor (true p)"][0]["ne"],
               "gap_closed_emb": closed, "models_eps": n / models_s,
               "models_eps_cpu": n / models_cpu,
               "models_ne": {k: summ[k]["ne"] for k in ("ftrl", "bopr", "emb")},
               "ne_river_fm_prefix": fm["ne"], "ne_ftrl_prefix": float(
                   figures(p_ftrl[cut], y[cut], last_day[cut])["ne"]), "river_prefix": n_river}
        for label, key in (("VW 9.11.9 --ftrl -q ui (tuned)", "vw_q"),
                           ("VW 9.11.9 --ftrl --lrq ui8", "vw_lrq")):
            if label in res:
                out[f"ne_{key}"] = res[label][0]["ne"]
                out[f"cal_{key}"] = res[label][0]["calibration"]
        for name, (f, sec, _) in res.items():
            out.setdefault("rows", {})[name] = {**{k: v for k, v in f.items()},
                                                "eps": n / sec if sec else None}
        print(json.dumps(_json_safe(out)))


def _json_safe(x):
    """NaN (a figure with nothing to measure) as null: strict JSON readers refuse NaN."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float | np.floating):
        return None if np.isnan(x) else float(x)
    return x


if __name__ == "__main__":
    main()
