"""Online learners side by side on one simulated stream, progressive validation (each example is
scored before it is learned): examples/s, normalized entropy (NE), calibration and AUC.

Ours: learners.ftrl.FTRLProximal (learn_many, micro-batches of 256) and learners.bopr.BOPR
(learn_many, sequential). Peers in the same run, on the same hashed features: river's
LogisticRegression + optim.FTRLProximal (on the first --river examples only: it is slow) and
Vowpal Wabbit's --ftrl through its Python bindings (examples fed as text, `index:1`). The
floor: the NE of the true click probability (Bayes-optimal).

The stream is ctrstream.simulator's World (its true p per impression) without Kafka: impressions
in event-time order, label = clicked (no wait window), count features point-in-time from
features.counters.EntityCounters with clicks counted at their own event time, hashed by
features.hashing.FeatureHasher. Learners' rates are learning only (features pre-hashed); the
hashing rate is printed on its own.

    python bench/learners.py [--examples 1000000] [--river 100000] [--quick] [--no-counts]
"""

from __future__ import annotations

import argparse
import heapq
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctrstream.simulator import DEVICES, MS_PER_DAY, World  # noqa: E402
from features.counters import EntityCounters  # noqa: E402
from features.hashing import FeatureHasher  # noqa: E402
from features.spec import FeatureSpec  # noqa: E402
from flows.config import GeneratorConfig, LearnConfig  # noqa: E402
from joiner.events import Impression  # noqa: E402
from learners.bopr import BOPR  # noqa: E402
from learners.ftrl import FTRLProximal  # noqa: E402
from learners.metrics import ProgressiveMetrics  # noqa: E402

VW = "Vowpal Wabbit 9.11.9 pyvw --ftrl"
START_MS = 1_700_000_000_000 - 1_700_000_000_000 % MS_PER_DAY  # a midnight, fixed


def simulate(n: int, seed: int, counts: bool) -> tuple[list[dict], np.ndarray]:
    """``n`` example dicts in event-time order and the true p of each."""
    gen = GeneratorConfig()
    world = World(gen, seed)
    rng = np.random.default_rng([seed, 7])
    ts = START_MS + np.cumsum(rng.exponential(1000 / gen.impressions_per_s, n)).astype(np.int64)
    s = world.sample(rng, ts)
    p = 1.0 / (1.0 + np.exp(-world.logit(**s)))
    clicked = rng.random(n) < p
    delay = np.zeros(n, np.int64)
    delay[clicked] = world.delays_ms(rng, int(clicked.sum()))
    users = world.user_names[s["user"]].tolist()
    items = world.item_names[s["item"]].tolist()
    cats = world.category_names[world.item_category[s["item"]]].tolist()
    devices = np.array(DEVICES, dtype=object)[s["device"]].tolist()
    hours = ((ts % MS_PER_DAY) // 3_600_000).tolist()
    counters = EntityCounters(FeatureSpec()) if counts else None
    pending: list[tuple[int, int, Impression]] = []  # clicks by event time
    out = []
    for k, t in enumerate(ts.tolist()):
        feats = {
            "category": cats[k],
            "device": devices[k],
            "position": int(s["position"][k]),
            "hour": hours[k],
        }
        ex = {
            "impression_id": f"{k:016x}",
            "ts": t,
            "user_id": users[k],
            "item_id": items[k],
            "features": feats,
            "kind": "example",
            "label": int(clicked[k]),
        }
        if counters is not None:
            while pending and pending[0][0] < t:
                click_ts, _, imp = heapq.heappop(pending)
                counters.clicked(imp, click_ts)
            imp = Impression(ex["impression_id"], t, users[k], items[k], feats)
            ex["counts"] = counters.seen(imp)
            if clicked[k]:
                heapq.heappush(pending, (t + int(delay[k]), k, imp))
        out.append(ex)
    return out, p


def run_ftrl(cfg: LearnConfig, bits, indptr, indices, y):
    model = FTRLProximal(cfg.ftrl_alpha, cfg.ftrl_beta, cfg.ftrl_l1, cfg.ftrl_l2, bits)
    t0 = time.perf_counter()
    p = model.learn_many(indptr, indices, y)
    return p, time.perf_counter() - t0, f"nonzero weights {len(model.nonzero()):,}"


def run_ftrl_one(cfg: LearnConfig, bits, indptr, indices, y):
    model = FTRLProximal(cfg.ftrl_alpha, cfg.ftrl_beta, cfg.ftrl_l1, cfg.ftrl_l2, bits)
    rows = np.split(indices, indptr[1:-1])
    p = np.empty(len(rows))
    t0 = time.perf_counter()
    for k, (x, label) in enumerate(zip(rows, y.tolist(), strict=True)):
        p[k] = model.learn_one(x, label)
    return p, time.perf_counter() - t0, "one example at a time"


def run_bopr(cfg: LearnConfig, bits, indptr, indices, y):
    model = BOPR(cfg.bopr_beta, cfg.bopr_prior_variance, bits)
    t0 = time.perf_counter()
    p = model.learn_many(indptr, indices, y)
    return p, time.perf_counter() - t0, ""


def run_river(cfg: LearnConfig, indptr, indices, y):
    from river import linear_model, optim

    # The bias is feature "0" through the optimizer, as in ours; river's own SGD intercept off.
    model = linear_model.LogisticRegression(
        optimizer=optim.FTRLProximal(cfg.ftrl_alpha, cfg.ftrl_beta, cfg.ftrl_l1, cfg.ftrl_l2),
        intercept_lr=0.0,
    )
    rows = np.split(indices, indptr[1:-1])
    xs = [dict.fromkeys(map(str, r.tolist()), 1.0) for r in rows]
    ys = y.astype(bool).tolist()
    p = np.empty(len(xs))
    t0 = time.perf_counter()
    for k, (x, label) in enumerate(zip(xs, ys, strict=True)):
        p[k] = model.predict_proba_one(x)[True]
        model.learn_one(x, label)
    return p, time.perf_counter() - t0, "unmodified (weights lag one step, NOTES l1 rule)"


def run_vw(cfg: LearnConfig, bits, indptr, indices, y):
    import vowpalwabbit

    args = (
        f"--ftrl --loss_function logistic --link logistic -b {bits} --noconstant "
        f"--ftrl_alpha {cfg.ftrl_alpha} --ftrl_beta {cfg.ftrl_beta} --l1 {cfg.ftrl_l1} "
        f"--l2 {cfg.ftrl_l2} --quiet"
    )
    vw = vowpalwabbit.Workspace(args)
    # Our index 0 is the bias, hence --noconstant. VW takes integer feature names as indices
    # (offset by the namespace hash), so it sees our collisions and no others.
    rows = np.split(indices, indptr[1:-1])
    lines = [
        ("1 | " if label else "-1 | ") + " ".join(map(str, r.tolist()))
        for r, label in zip(rows, y.tolist(), strict=True)
    ]
    p = np.empty(len(lines))
    t0 = time.perf_counter()
    for k, line in enumerate(lines):
        ex = vw.parse(line)
        vw.learn(ex)  # the prediction it leaves on the example is from before the update
        p[k] = ex.get_simplelabel_prediction()
        vw.finish_example(ex)
    elapsed = time.perf_counter() - t0
    vw.finish()
    return p, elapsed, f"`{args}`"


def row(name, n, seconds, p, y, note=""):
    m = ProgressiveMetrics(window=min(100_000, n))
    m.update_many(p, y)
    s = m.summary()
    rate = f"{n / seconds:>11,.0f}" if seconds else f"{'-':>11}"
    return (
        f"| {name:<37} | {n:>9,} | {rate} | {s['ne']:.4f} | {s['log_loss']:.4f} | "
        f"{s['calibration']:.3f} | {s['auc']:.4f} | {s['window_ne']:.4f} | {note}"
    )


HEADER = (
    "| learner                               |  examples |  examples/s |   NE   | logloss | "
    "calib | AUC    | NE last 100k |\n|" + "---|" * 8
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--river", type=int, default=100_000, help="examples for river (slow)")
    ap.add_argument("--quick", action="store_true", help="100k examples, river on 20k")
    ap.add_argument("--no-counts", action="store_true", help="no count features")
    ap.add_argument("--no-vw", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.examples, args.river = min(args.examples, 100_000), min(args.river, 20_000)
    n, n_river = args.examples, min(args.river, args.examples)
    cfg = LearnConfig()
    bits = cfg.hash_bits

    print("$ python bench/learners.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    t0 = time.perf_counter()
    examples, true_p = simulate(n, args.seed, counts=not args.no_counts)
    sim_s = time.perf_counter() - t0
    y = np.array([ex["label"] for ex in examples], dtype=np.float64)
    hasher = FeatureHasher(bits=bits, count_features=not args.no_counts)
    # In batches, as a flow hashes them (one 1M-row Python list would measure the list).
    t0 = time.perf_counter()
    parts = [hasher.batch(examples[a : a + 1000]) for a in range(0, n, 1000)]
    hash_s = time.perf_counter() - t0
    indptr = np.concatenate([[0], np.cumsum(np.concatenate([np.diff(p) for p, _ in parts]))])
    indices = np.concatenate([i for _, i in parts])
    print(
        f"stream: {n:,} examples, CTR {y.mean():.4f}, mean true p {true_p.mean():.4f}, "
        f"{len(indices) / n:.1f} active features/example, {bits} bits; simulated "
        f"{'with' if not args.no_counts else 'without'} counts in {sim_s:.1f} s"
    )
    print(f"hashing (FeatureHasher.batch, batches of 1000): {n / hash_s:,.0f} examples/s")
    print(
        f"hyperparameters (flows.config.LearnConfig): FTRL alpha {cfg.ftrl_alpha} beta "
        f"{cfg.ftrl_beta} l1 {cfg.ftrl_l1} l2 {cfg.ftrl_l2}; BOPR beta {cfg.bopr_beta} "
        f"prior variance {cfg.bopr_prior_variance}\n"
    )

    results = {"Bayes-optimal (true p)": (true_p, 0.0, "")}
    results["ours FTRLProximal.learn_many"] = run_ftrl(cfg, bits, indptr, indices, y)
    results["ours BOPR.learn_many"] = run_bopr(cfg, bits, indptr, indices, y)
    if not args.no_vw:
        results[VW] = run_vw(cfg, bits, indptr, indices, y)
    cut = indptr[: n_river + 1]
    river = run_river(cfg, cut, indices[: cut[-1]], y[:n_river])

    print(f"whole stream ({n:,} examples):\n{HEADER}")
    for name, (p, sec, note) in results.items():
        print(row(name, n, sec, p, y, note))
    print(f"\nfirst {n_river:,} examples (river is slow), the same runs cut:\n{HEADER}")
    for name, (p, _sec, _) in results.items():
        print(row(name, n_river, 0.0, p[:n_river], y[:n_river], "(rate: see above)"))
    p_one, sec, note = run_ftrl_one(cfg, bits, cut, indices[: cut[-1]], y[:n_river])
    print(row("ours FTRLProximal.learn_one", n_river, sec, p_one, y[:n_river], note))
    p, sec, note = river
    print(row("river 0.26.1 LogisticRegression+FTRL", n_river, sec, p, y[:n_river], note))
    if VW in results:  # the same algorithm: equal up to VW's float32 weights
        diff = np.abs(results[VW][0][:n_river] - p_one).max()
        print(f"\nmax |p| difference, ours learn_one vs VW --ftrl, first {n_river:,}: {diff:.1e}")


if __name__ == "__main__":
    main()
