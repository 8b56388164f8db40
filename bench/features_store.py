"""Feature store benchmarks, each figure beside its peers from the same run, on a private
redis-server (loopback, started on a free port and stopped at the end):

[1] write throughput through FeatureStore.write_many (one packed string per entity, SET with
    its TTL, pipelined), next to the hash per entity of earlier versions written by a bare
    redis-py pipeline (HSET + EXPIRE) and to the naive layout (one string key per
    entity-feature, SET ... EX);
[2] read latency p50/p99 for a batch of entities into dicts of numbers: FeatureStore.get_many
    (one MGET, decoded in bulk by struct.iter_unpack) next to a bare redis-py MGET of the
    same keys (bytes, not decoded: the floor), a pipeline of HMGETs of the hash layout, and
    the naive layout read with a pipeline of GETs and one GET at a time; and one entity via
    FeatureStore.get;
[3] Redis memory per entity (INFO used_memory delta / entities) of the three layouts, each
    with a TTL on every key.

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
from features.store import FeatureStore  # noqa: E402

TTL_S = 2 * 86_400


def feature_names(n: int) -> list[str]:
    kinds = ["imps", "clicks", "ctr", "cat_imps", "cat_clicks", "cat_ctr", "dev_imps",
             "dev_clicks", "dev_ctr", "pos_clicks"]
    names = [f"{k}_{w}" for k in kinds for w in ("5m", "1h", "1d")]
    while len(names) < n:
        names.append(f"extra_{len(names)}_1h")
    return names[:n]


def make_rows(n_entities: int, names: list[str], seed: int = 0) -> dict:
    """Counts of impressions, and clicks as a few per cent of them."""
    rng = random.Random(seed)
    rows = {}
    for i in range(n_entities):
        imps = rng.randint(0, 5000)
        rows[("user", str(i))] = {name: rng.randint(0, imps // 10) if "click" in name
                                  else rng.randint(0, imps) for name in names}
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


def hash_key(entity: str, id_: str) -> str:
    return f"h:{{{entity}:{id_}}}"


def write_hash(client: redis.Redis, rows: dict, batch: int = 1000) -> None:
    """The hash per entity of earlier versions: HSET of every feature, _ts and _v, and EXPIRE."""
    pipe = client.pipeline(transaction=False)
    for (entity, id_), values in rows.items():
        key = hash_key(entity, id_)
        args: list = ["HSET", key]
        for item in values.items():
            args += item
        pipe.execute_command(*args, "_ts", 1, "_v", 1)
        pipe.execute_command("EXPIRE", key, TTL_S)
        if len(pipe) >= batch:
            pipe.execute()
    pipe.execute()


def read_hash(client, entity, ids, names) -> list[dict]:
    """A pipeline of HMGETs, as the store read the hash layout, into the same dicts."""
    pipe = client.pipeline(transaction=False)
    fields = [*names, "_ts"]
    for id_ in ids:
        pipe.execute_command("HMGET", hash_key(entity, id_), *fields)
    out = []
    for raw in pipe.execute():
        values = [0 if v is None else int(v) for v in raw]
        row = dict(zip(names, values, strict=False))
        row["_ts"] = values[-1] if raw[-1] is not None else None
        row["_missing"] = raw[-1] is None
        out.append(row)
    return out


def read_naive_pipelined(client, entity, ids, names) -> list[dict]:
    pipe = client.pipeline(transaction=False)
    for id_ in ids:
        for name in names:
            pipe.execute_command("GET", naive_key(entity, id_, name))
    flat = pipe.execute()
    n = len(names)
    return [{name: 0 if v is None else int(v) for name, v in zip(names, flat[i:i + n],
                                                                  strict=True)}
            for i in range(0, len(flat), n)]


def read_naive_one_by_one(client, entity, ids, names) -> list[dict]:
    out = []
    for id_ in ids:
        row = {}
        for name in names:
            v = client.get(naive_key(entity, id_, name))
            row[name] = 0 if v is None else int(v)
        out.append(row)
    return out


def latency(fn, trials: int, n_ids: int, n_entities: int, seed: int = 1) -> tuple[float, float]:
    """p50, p99 in ms of ``fn(ids)`` for random batches of ``n_ids`` ids."""
    rng = random.Random(seed)
    fn([str(rng.randrange(n_entities)) for _ in range(n_ids)])  # warm up the connection
    times = []
    for _ in range(trials):
        ids = [str(rng.randrange(n_entities)) for _ in range(n_ids)]
        t0 = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - t0)
    p50, p99 = np.percentile(np.array(times) * 1000, [50, 99])
    return float(p50), float(p99)


def read_peers(client: redis.Redis, store: FeatureStore, entity: str, n: int, batch: int,
               trials: int, seed: int = 1) -> dict[str, tuple[float, float]]:
    """p50, p99 (ms) of get_many beside a bare MGET of the same keys and the hash layout's
    HMGET pipeline (which ``write_hash`` wrote for the same ``n`` entities), on the same random
    ids, in turn within each trial (each first in turn) so a busy moment of the machine falls
    on all alike."""
    names = store.feature_names
    fns = {"get_many": lambda ids: store.get_many(entity, ids),
           "mget": lambda ids: client.mget([store.key(entity, i) for i in ids]),
           "hmget": lambda ids: read_hash(client, entity, ids, names)}
    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for t in range(trials + 1):
        ids = [str(rng.randrange(n)) for _ in range(batch)]
        order.append(order.pop(0))  # each goes first in turn
        for name, fn in order:
            t0 = time.perf_counter()
            fn(ids)
            if t:  # the first is a warm-up
                times[name].append(time.perf_counter() - t0)
    return {k: tuple(float(x) for x in np.percentile(np.array(v) * 1000, [50, 99]))
            for k, v in times.items()}


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def ms(p: tuple[float, float]) -> str:
    return f"p50 {p[0]:8.3f} ms   p99 {p[1]:8.3f} ms"


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
        print(f"{n:,} entities x {nf} int features, TTL {TTL_S} s on every key\n")
        rows = make_rows(n, names)
        store = FeatureStore(client, feature_names=names, ttl_s=TTL_S)

        def written(write) -> tuple[float, float]:
            """(seconds, bytes per entity) of one layout written into an empty db."""
            client.flushall()
            mem0 = used_memory(client)
            t0 = time.perf_counter()
            write()
            secs = time.perf_counter() - t0
            return secs, (used_memory(client) - mem0) / n

        naive_s, naive_bytes = written(lambda: write_naive(client, rows))
        naive_pipe = latency(lambda ids: read_naive_pipelined(client, "user", ids, names),
                             args.trials, args.batch, n)
        naive_serial = latency(lambda ids: read_naive_one_by_one(client, "user", ids, names),
                               args.naive_serial_trials, args.batch, n)
        hash_s, hash_bytes = written(lambda: write_hash(client, rows))
        mem0 = used_memory(client)
        t0 = time.perf_counter()
        store.write_many(rows, 1_700_000_000_000)  # beside the hashes: read in turn below
        store_s, packed_bytes = time.perf_counter() - t0, (used_memory(client) - mem0) / n
        reads = read_peers(client, store, "user", n, args.batch, args.trials)
        get_one = latency(lambda ids: store.get("user", ids[0]), args.trials, 1, n)

        print("[1] writes, pipelines of 1000 commands")
        for label, secs in (("FeatureStore.write_many (SET ... EX)", store_s),
                            ("hash per entity: HSET + EXPIRE", hash_s),
                            ("naive: SET key value EX ttl", naive_s)):
            print(f"  {label:40} {n / secs:>8,.0f} entities/s {n * nf / secs:>10,.0f} "
                  f"features/s  ({secs:.2f} s)")
        print(f"\n[2] reads of {args.batch} entities x {nf} features, random ids, into dicts "
              f"of numbers ({args.trials} trials; the first three in turn on the same ids)")
        for label, figure in (("FeatureStore.get_many (1 MGET, decoded)", reads["get_many"]),
                              ("bare redis-py MGET, same keys, undecoded", reads["mget"]),
                              ("hash per entity: 1 pipeline of HMGET", reads["hmget"]),
                              (f"naive: 1 pipeline of {args.batch * nf} GETs", naive_pipe),
                              (f"naive: {args.batch * nf} GETs, one at a time", naive_serial),
                              ("FeatureStore.get (1 entity)", get_one)):
            print(f"  {label:44} {ms(figure)}")
        print(f"  get_many is {reads['hmget'][0] / reads['get_many'][0]:.1f}x faster than the "
              f"HMGET pipeline and {reads['get_many'][0] / reads['mget'][0]:.2f}x the bare "
              "MGET (p50)")
        print("\n[3] Redis memory per entity (used_memory delta / entities)")
        for label, b in ((f"packed string ({nf} + 2 int64)", packed_bytes),
                         (f"hash per entity ({nf} fields + _ts, _v)", hash_bytes),
                         (f"naive: {nf} string keys per entity", naive_bytes)):
            print(f"  {label:44} {b:6,.0f} B  ({b / packed_bytes:.1f}x)")
    finally:
        client.close()
        server.stop()


if __name__ == "__main__":
    main()
