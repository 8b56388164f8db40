"""Embedding learner and example archive benchmarks, ours beside a plain peer from the same run,
in-process, on a synthetic stream (Zipf users and items, full count features):

[1] online updates: ``EmbeddingLearner.learn_batch`` on micro-batches (examples/s, and rows/s:
    distinct user+item rows updated), alone and with a push (``evict`` + ``pop_dirty``) every
    ``--push-every`` batches; peer: a plain torch model on the same features, a hashed
    ``nn.Embedding(sparse=True)`` per side with ``torch.optim.Adagrad`` (no ID map, no
    frequency filter, no dirty tracking);
[2] daily retrain: ``train_epoch`` examples/s; peer: the same plain torch model, dense part
    trained too;
[3] archive: ``ExampleArchive.append`` examples/s (fsync on and off) and ``read_day``
    examples/s; peer: ``pyarrow.parquet.write_table`` of the same rows with no id check,
    no rename, no fsync.

    python bench/embeddings_core.py [--examples 200000] [--batch 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learners.archive import ExampleArchive  # noqa: E402
from learners.embeddings import (  # noqa: E402
    COUNT_ENTITIES,
    COUNT_NAMES,
    DENSE_DIM,
    EmbeddingLearner,
    dense_features,
)

T0 = 1_700_006_400_000


def stream(n: int, users: int, items: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def zipf(k: int, size: int) -> np.ndarray:
        p = 1.0 / np.arange(1, k + 1) ** 1.1
        return rng.choice(k, size, p=p / p.sum())

    u, i = zipf(users, n), zipf(items, n)
    uvec, ivec = rng.normal(0, 0.5, (users, 4)), rng.normal(0, 0.5, (items, 4))
    pos = rng.integers(0, 10, n)
    z = -3.3 + 2 * (uvec[u] * ivec[i]).sum(1) - 0.2 * pos
    y = rng.random(n) < 1 / (1 + np.exp(-z))
    counts = rng.integers(0, 50, (n, len(COUNT_ENTITIES), len(COUNT_NAMES))).tolist()
    return [{"impression_id": f"x{k:08x}", "ts": T0 + 40 * k, "user_id": f"u{u[k]}",
             "item_id": f"i{i[k]}", "kind": "example", "label": int(y[k]),
             "click_ts": None, "delay_ms": None, "window_ms": 900_000,
             "features": {"category": f"c{i[k] % 40}", "device": ("mobile", "desktop")[k % 2],
                          "position": int(pos[k]), "hour": (k // 10_000) % 24},
             "counts": {e: dict(zip(COUNT_NAMES, counts[k][j], strict=True))
                        for j, e in enumerate(COUNT_ENTITIES)}} for k in range(n)]


class PlainTorch(nn.Module):
    """The peer: hashed sparse embeddings and a linear dense part, torch.optim only."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.rows = rows
        self.user = nn.Embedding(rows, dim + 1, sparse=True)
        self.item = nn.Embedding(rows, dim + 1, sparse=True)
        self.dense = nn.Linear(DENSE_DIM, 1)
        for e in (self.user, self.item):
            nn.init.normal_(e.weight, 0, 0.05)

    def forward(self, x, u_idx, i_idx):
        u, v = self.user(u_idx), self.item(i_idx)
        return (self.dense(x).squeeze(-1) + (u[:, :-1] * v[:, :-1]).sum(-1)
                + u[:, -1] + v[:, -1])

    def batch(self, examples):
        x = torch.from_numpy(dense_features(examples))
        # hash() is fine here: the peer's rows never leave this process.
        u = torch.tensor([hash(e["user_id"]) % self.rows for e in examples])
        i = torch.tensor([hash(e["item_id"]) % self.rows for e in examples])
        y = torch.tensor([float(e["label"]) for e in examples])
        return x, u, i, y


def run_peer(examples, batch: int, train_dense: bool, rows: int = 1 << 17) -> float:
    torch.manual_seed(0)
    m = PlainTorch(rows, 16)
    sparse = torch.optim.Adagrad([m.user.weight, m.item.weight], lr=0.2)
    dense = torch.optim.Adagrad(m.dense.parameters(), lr=0.05)
    m.dense.requires_grad_(train_dense)
    t = time.perf_counter()
    for s in range(0, len(examples), batch):
        x, u, i, y = m.batch(examples[s:s + batch])
        sparse.zero_grad()
        dense.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(m(x, u, i), y, reduction="sum")
        loss.backward()
        sparse.step()
        if train_dense:
            dense.step()
    return len(examples) / (time.perf_counter() - t)


def run_online(examples, batch: int, push_every: int | None):
    learner = EmbeddingLearner()
    rows = pushed = 0
    t = time.perf_counter()
    for n, s in enumerate(range(0, len(examples), batch), 1):
        rows += learner.learn_batch(examples[s:s + batch])["rows"]
        if push_every and n % push_every == 0:
            learner.evict()
            out = learner.pop_dirty()
            pushed += len(out["user"].ids) + len(out["item"].ids)
    dt = time.perf_counter() - t
    return len(examples) / dt, rows / dt, learner, pushed


def median_of(repeat: int, fn):
    runs = [fn() for _ in range(repeat)]
    return statistics.median(r if isinstance(r, float) else r[0] for r in runs), runs[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--retrain-batch", type=int, default=512)
    ap.add_argument("--push-every", type=int, default=40, help="batches between pushes")
    ap.add_argument("--archive-batch", type=int, default=5_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ex = stream(args.examples, args.users, args.items)
    print(f"stream: {len(ex):,} examples, {args.users:,} users, {args.items:,} items (Zipf 1.1), "
          f"CTR {np.mean([e['label'] for e in ex]):.3f}; torch threads {args.threads}; "
          f"median of {args.repeat} runs")

    t = time.perf_counter()
    for s in range(0, len(ex), args.batch):
        dense_features(ex[s:s + args.batch])
    feat = len(ex) / (time.perf_counter() - t)
    print(f"    dense_features alone: {feat:,.0f} examples/s")

    print(f"[1] online, micro-batches of {args.batch}")
    eps, (_, rps, learner, _) = median_of(
        args.repeat, lambda: run_online(ex, args.batch, None))
    print(f"    ours learn_batch          {eps:>10,.0f} examples/s {rps:>10,.0f} rows/s  "
          f"(own rows: {len(learner.users):,} users, {len(learner.items):,} items)")
    eps2, (_, _, _, pushed) = median_of(
        args.repeat, lambda: run_online(ex, args.batch, args.push_every))
    print(f"    ours + push every {args.push_every:<3}     {eps2:>10,.0f} examples/s "
          f"({pushed:,} rows pushed a run)")
    peer, _ = median_of(args.repeat, lambda: run_peer(ex, args.batch, train_dense=False))
    print(f"    peer plain torch sparse   {peer:>10,.0f} examples/s")

    print(f"[2] retrain, batches of {args.retrain_batch}")

    def retrain():
        learner = EmbeddingLearner()
        t = time.perf_counter()
        learner.train_epoch(ex, batch_size=args.retrain_batch, shuffle_seed=0)
        return len(ex) / (time.perf_counter() - t)

    ours, _ = median_of(args.repeat, retrain)
    peer, _ = median_of(args.repeat, lambda: run_peer(ex, args.retrain_batch, True))
    print(f"    ours train_epoch          {ours:>10,.0f} examples/s")
    print(f"    peer plain torch          {peer:>10,.0f} examples/s")

    print(f"[3] archive, appends of {args.archive_batch:,}")
    for fsync in (True, False):
        def append(fsync=fsync):
            with tempfile.TemporaryDirectory() as root:
                a = ExampleArchive(root, fsync=fsync)
                t = time.perf_counter()
                for s in range(0, len(ex), args.archive_batch):
                    a.append(ex[s:s + args.archive_batch])
                return len(ex) / (time.perf_counter() - t)
        r, _ = median_of(args.repeat, append)
        print(f"    ours append, fsync {'on ' if fsync else 'off'}    {r:>10,.0f} examples/s")

    def peer_write():
        with tempfile.TemporaryDirectory() as root:
            t = time.perf_counter()
            for n, s in enumerate(range(0, len(ex), args.archive_batch)):
                pq.write_table(ExampleArchive._table(ex[s:s + args.archive_batch]),
                               f"{root}/{n}.parquet")
            return len(ex) / (time.perf_counter() - t)

    r, _ = median_of(args.repeat, peer_write)
    print(f"    peer write_table only     {r:>10,.0f} examples/s")
    with tempfile.TemporaryDirectory() as root:
        a = ExampleArchive(root, fsync=False)
        for s in range(0, len(ex), args.archive_batch):
            a.append(ex[s:s + args.archive_batch])
        rows = sum(a.read_day(d).num_rows for d in a.days())
        t = time.perf_counter()
        for d in a.days():
            a.read_day(d)
        r_read = rows / (time.perf_counter() - t)
        t = time.perf_counter()
        for d in a.days():
            a.read_examples(d)
        r_ex = rows / (time.perf_counter() - t)
        print(f"    ours read_day             {r_read:>10,.0f} examples/s; read_examples "
              f"(dicts) {r_ex:,.0f} examples/s")


if __name__ == "__main__":
    main()
