"""Model store benchmarks (learners/publish.py), each figure beside its peer from the same run,
on a private redis-server (loopback, started on a free port and stopped at the end):

[1] write throughput: ModelStore.put_vectors / put_rows (one Lua call per batch: version check,
    layout check, HSET, TTL) next to the same HSETs sent by a bare redis-py pipeline;
[2] read latency p50/p99 of 100 random keys: get_vectors and read_consistent (pointer + data,
    one pipeline) next to a bare pipeline of the same HMGET and next to the alternative
    design, one Lua script that reads the pointer and the data;
[3] Redis memory per BOPR/FTRL vector and per embedding row of dim 16 and 32 (used_memory
    delta / entries, and MEMORY USAGE of the hash / entries);
[4] publish (pointer flip + TTL on the previous version), and how long Redis blocks when it
    frees a big retired hash synchronously (DEL, what an expiry does without
    lazyfree-lazy-expire) next to UNLINK.

    python bench/publish.py [--vectors 1000000] [--rows 200000] [--trials 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctrstream.stack import REDIS_SERVER, Component, free_port  # noqa: E402
from learners.publish import ModelStore, _fields, _to_bytes  # noqa: E402

# The design not taken for read_consistent: pointer and data in one script.
LUA_READ = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('HMGET', ARGV[1] .. v .. ARGV[2], unpack(ARGV, 3))}
"""


def latency(fn, trials: int) -> str:
    fn()  # warm up
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    p50, p99 = np.percentile(np.array(times) * 1000, [50, 99])
    return f"p50 {p50:6.3f} ms   p99 {p99:6.3f} ms"


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vectors", type=int, default=1_000_000, help="coordinates written")
    ap.add_argument("--rows", type=int, default=200_000, help="embedding rows per table")
    ap.add_argument("--keys", type=int, default=100, help="keys per read (default 100)")
    ap.add_argument("--trials", type=int, default=2000)
    args = ap.parse_args(argv)
    n, nr = args.vectors, args.rows

    state = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    server = Component("redis", free_port(), state)
    server.start(20)
    client = redis.Redis(port=server.port)
    try:
        info = client.info("server")
        print(f"redis-server {info['redis_version']} ({REDIS_SERVER}, loopback, port "
              f"{server.port}); redis-py {redis.__version__}, hiredis "
              f"{'on' if redis.utils.HIREDIS_AVAILABLE else 'off'}; {os.cpu_count()} CPUs\n")
        rng = np.random.default_rng(0)
        keys = rng.choice(1 << 24, n, replace=False)
        bopr = rng.random((n, 2), dtype=np.float32)
        store = ModelStore(client)
        v = store.new_version()

        # [1] writes
        fields, values = _fields(keys), _to_bytes(bopr)

        def bare() -> None:
            for i in range(0, n, 10_000):
                pipe = client.pipeline(transaction=False)
                pipe.hset("bare", mapping=dict(zip(fields[i:i + 10_000], values[i:i + 10_000],
                                                   strict=True)))
                pipe.execute()

        mem0 = used_memory(client)
        put_s = timed(lambda: store.put_vectors(v, "bopr", keys, bopr))
        bopr_mem = (used_memory(client) - mem0) / n
        bopr_usage = client.memory_usage(store.key(v, "w:bopr"), samples=0) / n
        bare_s = timed(bare)
        client.delete("bare")
        mem0 = used_memory(client)
        ftrl_s = timed(lambda: store.put_vectors(v, "ftrl", keys, bopr[:, 0]))
        ftrl_mem = (used_memory(client) - mem0) / n
        print(f"[1] writes of {n:,} random coordinates (batches of {store.batch_size:,})")
        print(f"  {'put_vectors, BOPR (mu, var) 2 x float32':44} {n / put_s:>10,.0f} vectors/s")
        print(f"  {'bare pipeline HSET, same bytes (no script)':44} {n / bare_s:>10,.0f} vectors/s")
        print(f"  {'put_vectors, FTRL w 1 x float32':44} {n / ftrl_s:>10,.0f} vectors/s")
        ids = [f"u{i}" for i in range(nr)]
        row_fig = {}
        for dim in (16, 32):
            vecs = rng.normal(size=(nr, dim)).astype(np.float32)
            ms = np.full(nr, 1_700_000_000_000)
            mem0 = used_memory(client)
            s = timed(lambda vecs=vecs, ms=ms, dim=dim: store.put_rows(v, f"d{dim}", ids, vecs,
                                                                       ms))
            row_fig[dim] = ((used_memory(client) - mem0) / nr,
                            client.memory_usage(store.key(v, f"emb:d{dim}"), samples=0) / nr,
                            client.object("encoding", store.key(v, f"emb:d{dim}")))
            print(f"  {f'put_rows, dim {dim} (int64 ms + float32 row)':44} {nr / s:>10,.0f} "
                  "rows/s")
            s = timed(lambda vecs=vecs, ms=ms, dim=dim: store.replace_rows(v, f"d{dim}", ids,
                                                                           vecs, ms))
            print(f"  {f'replace_rows, dim {dim} (staged + RENAME)':44} {nr / s:>10,.0f} "
                  "rows/s")

        # [2] reads
        store.put_meta(v, {})
        store.publish(v)
        pick = np.random.default_rng(1)

        def some() -> np.ndarray:
            return keys[pick.integers(0, n, args.keys)]

        def bare_read() -> np.ndarray:
            pipe = client.pipeline(transaction=False)
            pipe.hmget(store.key(v, "w:bopr"), _fields(some()))
            raw = pipe.execute()[0]
            return np.frombuffer(b"".join(bytes(8) if x is None else x for x in raw),
                                 np.float32).reshape(-1, 2)

        lua = client.register_script(LUA_READ)

        def lua_read() -> np.ndarray:
            ver, raw = lua(keys=[store.pointer_key], args=[f"{store.prefix}:v:", ":w:bopr",
                                                           *_fields(some())])
            return np.frombuffer(b"".join(bytes(8) if x is None else x for x in raw),
                                 np.float32).reshape(-1, 2)

        ids_pick = np.random.default_rng(2)
        both = lambda: store.read_consistent(  # noqa: E731
            vectors={"bopr": some(), "ftrl": some()},
            rows={"d16": [ids[i] for i in ids_pick.integers(0, nr, 2)]})
        print(f"\n[2] reads of {args.keys} random keys (p50/p99 over {args.trials} trials)")
        for label, fn in (
                ("get_vectors (1 pipeline: layout + HMGET)", lambda: store.get_vectors(
                    v, "bopr", some())),
                ("read_consistent (+ pointer, same pipeline)", lambda: store.read_consistent(
                    vectors={"bopr": some()})),
                ("bare pipeline HMGET + frombuffer", bare_read),
                ("Lua: pointer + HMGET in one script", lua_read),
                (f"read_consistent: 2 x {args.keys} weights + 2 rows", both)):
            print(f"  {label:46} {latency(fn, args.trials)}")

        # [3] memory
        print("\n[3] Redis memory per entry (used_memory delta / entries; MEMORY USAGE / "
              "entries)")
        print(f"  {'BOPR vector (2 x float32), 1 hash':44} {bopr_mem:6.1f} B  "
              f"{bopr_usage:6.1f} B")
        print(f"  {'FTRL weight (1 x float32), 1 hash':44} {ftrl_mem:6.1f} B")
        for dim, (mem, usage, enc) in row_fig.items():
            print(f"  {f'embedding row dim {dim} ({8 + 4 * dim} B value, id u<n>)':44} "
                  f"{mem:6.1f} B  {usage:6.1f} B  ({enc.decode()}; raw floats {4 * dim} B)")

        # [4] publish and freeing a retired version
        v2 = store.new_version()
        store.put_vectors(v2, "bopr", keys[:10], bopr[:10])
        store.put_meta(v2, {})
        s = timed(lambda: store.publish(v2, expected_current=v))
        print(f"\n[4] publish (flip + PEXPIRE on the {client.scard(store.key(v, 'keys'))} keys "
              f"of the previous version): {s * 1000:.2f} ms")
        big = store.key(v, "w:bopr")
        client.copy(big, "copy")
        t_del = timed(lambda: client.delete(big))
        t_unlink = timed(lambda: client.unlink("copy"))
        print(f"  freeing a {n:,}-field hash: DEL {t_del * 1000:.0f} ms (what an expiry costs "
              f"the server without lazyfree-lazy-expire), UNLINK {t_unlink * 1000:.1f} ms")
    finally:
        client.close()
        server.stop()


if __name__ == "__main__":
    main()
