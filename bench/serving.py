"""Serving benchmarks, on a private redis-server (loopback, a free port, stopped at the end) with
a small published model and count features for every user and item:

[0] `FeatureStore.get_many` of 100 entities (one MGET of packed rows, decoded) beside a bare
    redis-py MGET of the same keys (the floor) and the hash-per-entity layout of earlier
    versions read with a pipeline of HMGETs, on the same random ids in turn; and the Redis
    bytes per entity of both layouts;
[1] `Scorer.score(user, 100 items)` in process, p50/p99: the floor for [2];
[2] HTTP `POST /score` of the same requests to `ctrstream serve` (a subprocess), from wrk
    (Debian's package; closed loop: each connection sends its next request when the last one
    is answered) at 1 and 16 concurrent connections: p50/p99 and requests/s, beside
    `GET /healthz` (one Redis PING and GET: the framework's and the thread pool's own cost)
    under the same load. Without wrk, a Python load generator (httpx, asyncio) stands in
    and says so;
[3] with a learner pushing into the served version every ``--push-interval`` s (this process,
    learning ``--push-records`` more records before each push, as the learn flow does):
    (a) the CPU a scorer's process spends to bring its copy up to date after each push, whole
    (`ModelStore.load` and the weight tables: what every push cost before incremental
    refresh) against `ModelStore.refresh` (only what the push wrote), alternated on the same
    pushes; (b) HTTP `POST /score` at 16 connections for ``--push-seconds`` while the pusher
    pushes, beside the same without pushes, and the server's CPU per request in both (its
    processes' CPU-seconds over the run: robust to a loaded machine).

    python bench/serving.py [--seconds 5] [--items 100] [--workers 2] [--json]
    python bench/serving.py --demo   # the model after a demo-sized stream (180,000 records,
                                     # 10,000 users, 2,000 items), the default config

The load generator runs on the same machine and competes with the server for CPU: the HTTP
figures are an upper bound of what the server alone costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.features_store import make_rows, read_peers, used_memory, write_hash  # noqa: E402
from bench.procstat import tree_cpu_s  # noqa: E402
from ctrstream.stack import Component, free_port, terminate  # noqa: E402
from flows.build import (  # noqa: E402
    feature_spec,
    feature_store,
    model_store,
    scorer,
)
from flows.config import Config  # noqa: E402
from learners.model import Models  # noqa: E402
from learners.scorer import Weights  # noqa: E402
from tests.integration.test_embeddings_cli import (  # noqa: E402
    CONTEXT,
    published_synthetic,
    synthetic,
)

USERS, ITEMS = 40, 400
DEMO = (180_000, 10_000, 2_000)  # records, users, items: an hour at 50 impressions/s


def pcts(times_s: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.array(times_s) * 1000, [50, 99])
    return float(p50), float(p99)


def setup(cfg: Config, records: list[dict], users: int, items: int) -> tuple[Models, str]:
    models, version = published_synthetic(cfg, records)
    writer = feature_store(cfg, feature_spec(cfg).feature_names())
    names, now = writer.feature_names, int(time.time() * 1000)
    for entity, n in (("user", users), ("item", items)):
        for k0 in range(0, n, 5000):
            writer.write_many({(entity, f"{entity[0]}{k}"): {f: (k * 7 + j) % 50
                                                              for j, f in enumerate(names)}
                               for k in range(k0, min(n, k0 + 5000))}, now)
    return models, version


def refresh_cpu(cfg: Config, models: Models, version: str, chunks: list[list[dict]]) -> dict:
    """[3a]: after each push of a chunk, the CPU-seconds of this process to load the version
    whole (and make its weight tables) and to refresh the copy kept; in turn, first one then
    the other, on the same pushes."""
    store = model_store(cfg)
    copy = store.load(version)
    weights = Weights(copy)
    full, incr, written = [], [], []
    for k, chunk in enumerate(chunks):
        models.learn(chunk)
        written.append(models.push(store, version))

        def whole() -> None:
            t0 = time.process_time()
            Weights(store.load(version))
            full.append(time.process_time() - t0)

        def refresh() -> None:
            nonlocal copy, weights
            t0 = time.process_time()
            copy, changed = store.refresh(copy)
            weights = weights.refreshed(copy, changed) if changed is not None else \
                Weights(copy)
            incr.append(time.process_time() - t0)
            assert changed is not None, "the copy kept was loaded whole"

        for step in (whole, refresh) if k % 2 == 0 else (refresh, whole):
            step()
    w = {m: np.median([c[m] for c in written]) for m in written[0]}
    print(f"[3a] CPU to bring a copy up to date after a push ({len(chunks)} pushes of "
          f"{len(chunks[0])} records: median {w['ftrl']:,.0f} FTRL, {w['bopr']:,.0f} BOPR "
          f"weights, {w['rows']:,.0f} rows written; in turn, this process's CPU)")
    for label, t in (("load whole + weight tables", full), ("refresh (what the push wrote)",
                                                              incr)):
        print(f"    {label:32} median {np.median(t) * 1000:7.1f} ms  "
              f"min {min(t) * 1000:7.1f}  max {max(t) * 1000:7.1f} ms of CPU")
    return {"push_full_cpu_ms": float(np.median(full)) * 1000,
            "push_refresh_cpu_ms": float(np.median(incr)) * 1000}


class Pusher(threading.Thread):
    """Learns a chunk and pushes it into the served version every ``interval`` s."""

    def __init__(self, cfg: Config, models: Models, version: str, chunks: list[list[dict]],
                 interval: float) -> None:
        super().__init__(daemon=True)
        self.store, self.models, self.version = model_store(cfg), models, version
        self.chunks, self.interval = chunks, interval
        self.stop, self.pushes = threading.Event(), 0

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.models.learn(self.chunks[self.pushes % len(self.chunks)])
            self.models.push(self.store, self.version)
            self.pushes += 1


def store_reads(cfg: Config, entities: int, trials: int) -> dict:
    """[0]: get_many(100) beside its peers, and bytes per entity of both layouts."""
    store = feature_store(cfg, feature_spec(cfg).feature_names())
    client = store.client
    rows = make_rows(entities, store.feature_names)
    mem0 = used_memory(client)
    store.write_many(rows, int(time.time() * 1000))
    mem1 = used_memory(client)
    write_hash(client, rows)
    packed_b, hash_b = (mem1 - mem0) / entities, (used_memory(client) - mem1) / entities
    r = read_peers(client, store, "user", entities, 100, trials)
    print(f"[0] 100 of {entities:,} entities x {len(store.feature_names)} features, random ids "
          f"({trials} trials, in turn on the same ids)")
    for label, key in (("FeatureStore.get_many (1 MGET, decoded)", "get_many"),
                       ("bare redis-py MGET, same keys, undecoded", "mget"),
                       ("hash per entity: 1 pipeline of HMGET", "hmget")):
        print(f"    {label:42} p50 {r[key][0]:6.3f} ms  p99 {r[key][1]:6.3f} ms")
    print(f"    get_many is {r['hmget'][0] / r['get_many'][0]:.1f}x faster than the HMGET "
          f"pipeline and {r['get_many'][0] / r['mget'][0]:.2f}x the bare MGET (p50); Redis "
          f"bytes per entity: packed {packed_b:,.0f} B, hash {hash_b:,.0f} B")
    return {"get_many_p50_ms": r["get_many"][0], "get_many_p99_ms": r["get_many"][1],
            "mget_p50_ms": r["mget"][0], "hmget_p50_ms": r["hmget"][0],
            "packed_bytes_per_entity": packed_b, "hash_bytes_per_entity": hash_b}


def requests_for(n: int, items: int, users: int, catalog: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"user": f"u{rng.integers(users)}",
             "items": [f"i{k}" for k in rng.choice(catalog, items, replace=False)],
             "context": CONTEXT} for _ in range(n)]


async def load(base: str, method: str, path: str, bodies: list[dict] | None, clients: int,
               seconds: float) -> dict:
    times: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as http:
        stop = time.perf_counter() + seconds

        async def client(c: int) -> None:
            nonlocal errors
            k = c
            while time.perf_counter() < stop:
                content = orjson.dumps(bodies[k % len(bodies)]) if bodies else None
                k += clients
                t0 = time.perf_counter()
                r = await http.request(method, path, content=content,
                                       headers={"content-type": "application/json"})
                times.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        for c in range(clients):  # warm up: connections and the scorers' caches
            await http.request(method, path, content=orjson.dumps(bodies[c]) if bodies else None)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    p50, p99 = pcts(times)
    return {"p50_ms": p50, "p99_ms": p99, "rps": len(times) / wall, "n": len(times),
            "errors": errors}


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, bodies[(i %% #bodies) + 1])
end
"""


def _ms(value: str) -> float:
    num, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(num) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(base: str, path: str, bodies: list[dict] | None, clients: int, seconds: float,
        state: Path) -> dict:
    """GET ``path``, or POST each of ``bodies`` in turn, from wrk's ``clients`` connections."""
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    if bodies:
        script = state / "score.lua"
        script.write_text(WRK_SCRIPT % ", ".join(f"[==[{orjson.dumps(b).decode()}]==]"
                                                  for b in bodies))
        cmd += ["-s", str(script)]
    text = subprocess.run([*cmd, base + path], capture_output=True, text=True,
                          check=True).stdout
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", text, re.M))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = int(bad.group(1)) if bad else 0
    errors += sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    return {"p50_ms": _ms(pct["50"]), "p99_ms": _ms(pct["99"]),
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
            "n": int(re.search(r"(\d+) requests in", text).group(1)), "errors": errors}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per load level")
    ap.add_argument("--items", type=int, default=100, help="items per /score request")
    ap.add_argument("--trials", type=int, default=1000, help="in-process score calls")
    ap.add_argument("--entities", type=int, default=20_000, help="entities for [0]")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="ctrstream serve --workers (default: the CPUs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--demo", action="store_true",
                    help="the model of a demo-sized stream and the default config (emb_dim "
                         "16, 1,024 fallback rows), not a small one")
    ap.add_argument("--push-interval", type=float, default=5.0,
                    help="[3]: seconds between pushes (learn.push_interval_s)")
    ap.add_argument("--push-records", type=int, default=250,
                    help="[3]: records learned before each push (250: 50/s for 5 s)")
    ap.add_argument("--pushes", type=int, default=10, help="[3a]: pushes measured (0: skip [3a])")
    ap.add_argument("--push-seconds", type=float, default=30.0,
                    help="[3b]: seconds of load while pushing (0: skip [3])")
    args = ap.parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    server = Component("redis", free_port(), state)
    server.start(20)
    proc = None
    out: dict = {}
    try:
        n, users, catalog = DEMO if args.demo else (3000, USERS, ITEMS)
        learn = {} if args.demo else {"emb_dim": 16, "emb_fallback_rows": 256}
        cfg = Config().replace(redis={"url": f"redis://127.0.0.1:{server.port}/0"},
                               learn=learn)
        out.update(store_reads(cfg, args.entities, args.trials))
        more = args.push_records * max(args.pushes, 8)
        records = synthetic(n + more, users=users, items=catalog)
        models, version = setup(cfg, records[:n], users, catalog)
        chunks = [records[k:k + args.push_records] for k in range(n, n + more,
                                                                    args.push_records)]
        bodies = requests_for(200, args.items, users, catalog)

        s = scorer(cfg)
        s.score(**{"user_id": bodies[0]["user"], "item_ids": bodies[0]["items"],
                   "context": CONTEXT})
        times = []
        for k in range(args.trials):
            b = bodies[k % len(bodies)]
            t0 = time.perf_counter()
            s.score(b["user"], b["items"], b["context"])
            times.append(time.perf_counter() - t0)
        p50, p99 = pcts(times)
        out.update(score_p50_ms=p50, score_p99_ms=p99)
        print(f"[1] Scorer.score(1 user x {args.items} items), in process: "
              f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  ({args.trials} calls)")

        cfg_path = state / "ctrstream.toml"
        cfg_path.write_text(cfg.to_toml())
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "ctrstream.cli", "--config",
                                 str(cfg_path), "serve", "--port", str(port),
                                 "--workers", str(args.workers)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"ctrstream serve did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.1)

        # the first /score of a worker loads the model (about a second); its scorers share it
        for b in bodies[:4 * args.workers]:
            httpx.post(base + "/score", json=b, timeout=60).raise_for_status()
        out["http_workers"] = args.workers
        use_wrk = shutil.which("wrk") is not None
        print(f"[2] HTTP, {args.workers} server worker(s), closed loop, {args.seconds:.0f} s "
              "per line, load from "
              + ("wrk" if use_wrk else "httpx (no wrk: apt-get install wrk)")
              + " on the same machine")
        def score_load(clients: int, seconds: float) -> dict:
            return wrk(base, "/score", bodies, clients, seconds, state) if use_wrk else \
                asyncio.run(load(base, "POST", "/score", bodies, clients, seconds))

        for clients in (1, 16):
            if use_wrk:  # 1 s first: every scorer of the pool made and its caches warm
                wrk(base, "/score", bodies, clients, 1, state)
            sc = score_load(clients, args.seconds)
            if use_wrk:
                hz = wrk(base, "/healthz", None, clients, args.seconds, state)
            else:
                hz = asyncio.run(load(base, "GET", "/healthz", None, clients, args.seconds))
            for name, r in ((f"POST /score ({args.items} items)", sc), ("GET /healthz", hz)):
                print(f"    c={clients:<2} {name:<24} p50 {r['p50_ms']:6.2f} ms  "
                      f"p99 {r['p99_ms']:6.2f} ms  {r['rps']:7.0f} req/s  "
                      f"({r['n']} requests, {r['errors']} not 200)")
            out.update({f"http_score_p50_ms_c{clients}": sc["p50_ms"],
                        f"http_score_p99_ms_c{clients}": sc["p99_ms"],
                        f"http_rps_c{clients}": sc["rps"],
                        f"http_healthz_p99_ms_c{clients}": hz["p99_ms"],
                        f"http_healthz_rps_c{clients}": hz["rps"]})
        if args.push_seconds > 0:
            print(f"[3b] HTTP POST /score, c=16, {args.push_seconds:.0f} s, without and with a "
                  f"push of {args.push_records} records every {args.push_interval:g} s")
            runs = {}
            for label in ("static", "pushing"):
                pusher = Pusher(cfg, models, version, chunks, args.push_interval)
                if label == "pushing":
                    pusher.start()
                c0 = tree_cpu_s(proc.pid)
                r = score_load(16, args.push_seconds)
                r["cpu_ms"] = (tree_cpu_s(proc.pid) - c0) * 1000 / max(r["n"], 1)
                pusher.stop.set()
                if label == "pushing":
                    pusher.join()
                runs[label] = r
                print(f"    {label:8} p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                      f"{r['rps']:5.0f} req/s  server CPU {r['cpu_ms']:5.2f} ms a request  "
                      f"({r['n']} requests, {r['errors']} not 200"
                      + (f", {pusher.pushes} pushes)" if label == "pushing" else ")"))
                out.update({f"http_{label}_p50_ms_c16": r["p50_ms"],
                            f"http_{label}_p99_ms_c16": r["p99_ms"],
                            f"http_{label}_cpu_ms": r["cpu_ms"]})
            if args.pushes:
                out.update(refresh_cpu(cfg, models, version, chunks[:args.pushes]))
    finally:
        if proc is not None:
            terminate(proc)
        server.stop()
    if args.json:
        print(orjson.dumps({k: round(v, 3) for k, v in out.items()}).decode())


if __name__ == "__main__":
    main()
