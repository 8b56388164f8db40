"""Feature store benchmarks, each figure beside its peer from the same run, on a private
redis-server (loopback, started on a free port and stopped at the end):

[1] write throughput through FeatureStore.write_many (one hash per entity, HSET + EXPIRE,
    pipelined), next to the same hashes written by a bare redis-py pipeline (the store's own
    overhead) and to the naive layout (one string key per entity-feature, SET ... EX);
[2] read latency p50/p99 for a batch of entities: FeatureStore.get_many (one pipeline of
    HMGETs) next to the naive layout read with a pipeline of GETs and with one GET at a time,
    each turned into the same list of dicts of numbers; and one entity via FeatureStore.get;
[3] Redis memory per entity (INFO used_memory delta / entities), hash next to naive,
    both with a TTL on every key.

    python bench/features_store.py [--entities 100000] [--features 30] [--trials 1000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctrstream.stack import REDIS_SERVER, Component, free_port  # noqa: E402
from features.store import FeatureStore, _num  # noqa: E402

TTL_S = 2 * 86_400


def feature_names(n: int) -> list[str]:
    kinds = ["imps", "clicks", "ctr", "cat_imps", "cat_clicks", "cat_ctr", "dev_imps",
             "dev_clicks", "dev_ctr", "pos_clicks"]
    names = [f"{k}_{w}" for k in kinds for w in ("5m", "1h", "1d")]
    while len(names) < n:
        names.append(f"extra_{len(names)}_1h")
    return names[:n]


def make_rows(n_entities: int, names: list[str], seed: int = 0) -> dict:
    """Counts as ints; CTRs as smoothed ratios, full float precision (what a writer sends)."""
    rng = random.Random(seed)
    rows = {}
    for i in range(n_entities):
        imps = rng.randint(0, 5000)
        rows[("user", str(i))] = {
            name: ((rng.randint(0, imps // 10) + 1) / (imps + 30) if "ctr" in name
                   else rng.randint(0, imps))
            for name in names
        }
    return rows


def naive_key(entity: str, id_: str, name: str) -> str:
    return f"n:{{{entity}:{id_}}}:{name}"


def write_naive(client: redis.Redis, rows: dict, batch: int = 1000) -> None:
    pipe = client.pipeline(transaction=False)
    for (entity, id_), values in rows.items():
        for name, v in values.items():
            pipe.execute_command("SET", naive_key(entity, id_, name), v, "EX", TTL_S)
        if len(pipe) >= batch:
            pipe.execute()
    pipe.execute()


def write_bare(client: redis.Redis, rows: dict, batch: int = 1000) -> None:
    """The same commands as write_many, without its validation and meta check."""
    pipe = client.pipeline(transaction=False)
    for (entity, id_), values in rows.items():
        key = f"f:{{{entity}:{id_}}}"
        args: list = ["HSET", key]
        for item in values.items():
            args += item
        pipe.execute_command(*args, "_ts", 1, "_v", 1)
        pipe.execute_command("EXPIRE", key, TTL_S)
        if len(pipe) >= batch:
            pipe.execute()
    pipe.execute()


def read_naive_pipelined(client, entity, ids, names) -> list[dict]:
    pipe = client.pipeline(transaction=False)
    for id_ in ids:
        for name in names:
            pipe.execute_command("GET", naive_key(entity, id_, name))
    flat = pipe.execute()
    n = len(names)
    return [{name: 0 if v is None else _num(v) for name, v in zip(names, flat[i:i + n],
                                                                   strict=True)}
            for i in range(0, len(flat), n)]


def read_naive_one_by_one(client, entity, ids, names) -> list[dict]:
    out = []
    for id_ in ids:
        row = {}
        for name in names:
            v = client.get(naive_key(entity, id_, name))
            row[name] = 0 if v is None else _num(v)
        out.append(row)
    return out


def latency(fn, trials: int, n_ids: int, n_entities: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    fn([str(rng.randrange(n_entities)) for _ in range(n_ids)])  # warm up the connection
    times = []
    for _ in range(trials):
        ids = [str(rng.randrange(n_entities)) for _ in range(n_ids)]
        t0 = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - t0)
    p50, p99 = np.percentile(np.array(times) * 1000, [50, 99])
    return f"p50 {p50:8.3f} ms   p99 {p99:8.3f} ms   ({trials} trials)"


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, default=100_000)
    ap.add_argument("--features", type=int, default=30)
    ap.add_argument("--batch", type=int, default=100, help="entities per read (default 100)")
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--naive-serial-trials", type=int, default=50,
                    help="trials of the one-GET-at-a-time read (each is slow; default 50)")
    args = ap.parse_args(argv)
    names = feature_names(args.features)
    n, nf = args.entities, len(names)

    state = Path(tempfile.mkdtemp(prefix="bench-features-"))
    server = Component("redis", free_port(), state)
    server.start(20)
    client = redis.Redis(port=server.port)
    try:
        version = client.info("server")["redis_version"]
        print(f"redis-server {version} ({REDIS_SERVER}, loopback, port {server.port}); "
              f"redis-py {redis.__version__}, hiredis "
              f"{'on' if redis.utils.HIREDIS_AVAILABLE else 'off'}; {os.cpu_count()} CPUs")
        print(f"{n:,} entities x {nf} features ({sum('ctr' in x for x in names)} of them float "
              f"CTRs at full precision, the rest int counts), TTL {TTL_S} s on every key\n")
        rows = make_rows(n, names)
        store = FeatureStore(client, feature_names=names, ttl_s=TTL_S)
        read = f"{args.batch} entities x {nf} features"

        def timed(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        # The hash layout first (written, measured, read), then the naive one on an empty db.
        client.flushall()
        bare_s = timed(lambda: write_bare(client, rows))
        client.flushall()
        mem0 = used_memory(client)
        store_s = timed(lambda: store.write_many(rows, 1_700_000_000_000))
        hash_bytes = (used_memory(client) - mem0) / n
        get_many = latency(lambda ids: store.get_many("user", ids), args.trials, args.batch, n)
        get_one = latency(lambda ids: store.get("user", ids[0]), args.trials, 1, n)
        client.flushall()
        mem0 = used_memory(client)
        naive_s = timed(lambda: write_naive(client, rows))
        naive_bytes = (used_memory(client) - mem0) / n
        naive_pipe = latency(lambda ids: read_naive_pipelined(client, "user", ids, names),
                             args.trials, args.batch, n)
        naive_serial = latency(lambda ids: read_naive_one_by_one(client, "user", ids, names),
                               args.naive_serial_trials, args.batch, n)

        print("[1] writes, pipelines of 1000 commands")
        for label, secs in (("FeatureStore.write_many (HSET+EXPIRE)", store_s),
                            ("bare redis-py pipeline, same commands", bare_s),
                            ("naive: SET key value EX ttl", naive_s)):
            print(f"  {label:40} {n / secs:>8,.0f} entities/s {n * nf / secs:>10,.0f} "
                  f"features/s  ({secs:.2f} s)")
        print(f"\n[2] reads of {read}, random ids, into dicts of numbers")
        for label, figure in (("FeatureStore.get_many (1 pipeline of HMGET)", get_many),
                              (f"naive: 1 pipeline of {args.batch * nf} GETs", naive_pipe),
                              (f"naive: {args.batch * nf} GETs, one at a time", naive_serial),
                              ("FeatureStore.get (1 entity)", get_one)):
            print(f"  {label:44} {figure}")
        print("\n[3] Redis memory per entity (used_memory delta / entities)")
        print(f"  {f'hash per entity ({nf} fields + _ts, _v)':44} {hash_bytes:6,.0f} B")
        print(f"  {f'naive: {nf} string keys per entity':44} {naive_bytes:6,.0f} B  "
              f"({naive_bytes / hash_bytes:.1f}x)")
    finally:
        client.close()
        server.stop()


if __name__ == "__main__":
    main()
