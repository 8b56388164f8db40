"""Embedding model benchmarks, each figure beside a peer's from the same run:

[1] online updates, micro-batches of 256: ``EmbeddingLearner.learn_batch`` (examples/s, and
    rows/s: distinct user + item rows updated) and ``Models.learn`` (FTRL + BOPR + embeddings
    with progressive metrics: what the learn flow runs per batch); peer: a plain torch model,
    hashed ``nn.Embedding(sparse=True)`` + ``torch.optim.Adagrad`` (bench/embeddings_core.py);
[2] push latency, a row changed -> visible in Redis: the real learn flow (`ctrstream run learn`,
    a subprocess with recovery on, default snapshot interval) on a private Tansu broker and
    redis-server. This process writes labeled examples to the examples topic at a steady
    rate, two per fresh user (``emb_min_count`` 2: the second sighting gives the user its
    row), and polls the current version's ``emb:user`` hash (``read_consistent``, every
    10 ms) for those users. Latency = first poll that finds the row - when the second
    example was produced. ``push_interval_s`` 5 (the default) and 1. Peer: the transport
    alone, a bare consumer in this process reading the same topic (produce -> consumed);
[3] Redis memory per embedding row, dim 16 and 32: ours, a field of the version's hash
    (``ModelStore.put_rows``: int64 updated_ms + (dim + 1) float32), as used_memory delta /
    rows and MEMORY USAGE / rows; peer: one string key per row holding the same bytes;
[4] daily retrain: ``EmbeddingLearner.train_epoch`` examples/s (the whole retrain, all three
    models, is bench/retrain.py); peer: the plain torch model, dense part trained too.

    python bench/embeddings.py [--quick] [--examples 200000] [--rate 200] [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import orjson
import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition  # noqa: E402
from embeddings_core import run_online, run_peer, stream  # noqa: E402

from ctrstream.stack import LocalStack, create_topics, free_port  # noqa: E402
from features.spec import FeatureSpec  # noqa: E402
from flows.build import model_store  # noqa: E402
from flows.config import Config  # noqa: E402
from flows.kafka import make_producer  # noqa: E402
from learners.embeddings import EmbeddingLearner  # noqa: E402
from learners.model import MICRO_BATCH, Models, ModelSettings  # noqa: E402
from learners.publish import ModelStore, ModelStoreError  # noqa: E402

# The peer's torch.optim.Adagrad on sparse grads warns once about invariant checks.
warnings.filterwarnings("ignore", message="Sparse invariant checks")


def median_of(repeat: int, fn) -> float:
    return statistics.median(fn() for _ in range(repeat))


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if len(values) else float("nan")


# -- [1] and [4]: in-process learning rates ------------------------------------------------------

def online(ex: list[dict], repeat: int) -> None:
    print(f"[1] online updates, micro-batches of {MICRO_BATCH}")
    runs = [run_online(ex, MICRO_BATCH, None) for _ in range(repeat)]
    eps = statistics.median(r[0] for r in runs)
    rps = statistics.median(r[1] for r in runs)
    learner = runs[-1][2]
    print(f"    ours EmbeddingLearner.learn_batch  {eps:>9,.0f} examples/s {rps:>9,.0f} rows/s "
          f" ({len(learner.users):,} user, {len(learner.items):,} item rows at the end)")

    def models() -> float:
        m = Models(ModelSettings(), FeatureSpec())
        t = time.perf_counter()
        m.learn(ex)
        return len(ex) / (time.perf_counter() - t)

    print(f"    ours Models.learn (FTRL+BOPR+emb)  {median_of(repeat, models):>9,.0f} examples/s")
    peer = median_of(repeat, lambda: run_peer(ex, MICRO_BATCH, train_dense=False))
    print(f"    peer plain torch sparse Adagrad    {peer:>9,.0f} examples/s")


def retrain(ex: list[dict], repeat: int, batch: int) -> None:
    print(f"[4] daily retrain, one epoch, batches of {batch}")

    def emb() -> float:
        learner = EmbeddingLearner()
        t = time.perf_counter()
        learner.train_epoch(ex, batch_size=batch, shuffle_seed=0)
        return len(ex) / (time.perf_counter() - t)

    print(f"    ours EmbeddingLearner.train_epoch  {median_of(repeat, emb):>9,.0f} examples/s")
    peer = median_of(repeat, lambda: run_peer(ex, batch, train_dense=True))
    print(f"    peer plain torch, dense trained    {peer:>9,.0f} examples/s")


# -- [2] push latency ------------------------------------------------------------------------------

class Floor(threading.Thread):
    """A bare consumer of the examples topic: when each probe example arrives here."""

    def __init__(self, cfg: Config, topic: str, partitions: int) -> None:
        super().__init__(daemon=True)
        self.consumer = Consumer(cfg.kafka_client(**{
            "group.id": f"bench-floor-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}))
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                              for p in range(partitions)])
        self.seen: dict[bytes, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            msg = self.consumer.poll(0.05)  # returns as soon as a message is there
            if msg is not None and msg.error() is None:
                self.seen.setdefault(msg.key(), time.monotonic())
        self.consumer.close()


def push_latency(base: Config, tmp: Path, push_s: float, rate: float, seconds: float,
                 template: list[dict], flow_args: list[str]) -> dict:
    tag = uuid.uuid4().hex[:8]
    cfg = base.replace(
        data_dir=str(tmp / f"data-{tag}"), recovery_dir=str(tmp / f"recovery-{tag}"),
        kafka={"impressions_topic": f"imp-{tag}", "clicks_topic": f"clk-{tag}",
               "examples_topic": f"ex-{tag}", "dead_letters_topic": f"dl-{tag}"},
        learn={"store_name": f"b{tag}", "push_interval_s": push_s, "log_interval_s": 5.0})
    create_topics(cfg)
    path = tmp / f"{tag}.toml"
    path.write_text(cfg.to_toml())
    log_path = tmp / f"learn-{tag}.log"
    store = model_store(cfg)
    floor = Floor(cfg, cfg.kafka.examples_topic, cfg.kafka.partitions)
    floor.start()
    producer = make_producer(cfg)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctrstream.cli", "--config", str(path), "run", "learn",
             *flow_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pending: dict[str, tuple[float, bytes, bool]] = {}  # user -> (t produced, key, measured)
    lat, kafka_lat = [], []
    n = 0
    t_first = t_measure = t_stop = t_measure_at = None
    interval = 2.0 / rate  # a pair of examples per fresh user
    next_t = last_poll = time.monotonic()
    deadline = next_t + 120  # for the flow to start and push a first row
    try:
        while True:
            now = time.monotonic()
            if proc.poll() is not None:
                raise RuntimeError(f"the learn flow exited with {proc.returncode}:\n"
                                   + log_path.read_text()[-3000:])
            producing = t_stop is None or now < t_stop
            while producing and next_t <= now:
                user = f"bench-{tag}-{n}"
                for j in range(2):
                    e = template[(2 * n + j) % len(template)]
                    key = f"{tag}-{n}-{j}".encode()
                    producer.produce(cfg.kafka.examples_topic, orjson.dumps(
                        {**e, "impression_id": key.decode(), "user_id": user,
                         "ts": int(time.time() * 1000)}), key)
                pending[user] = (time.monotonic(), key, t_measure is not None)
                n, next_t = n + 1, next_t + interval
            producer.poll(0)
            if now - last_poll >= 0.01 and pending:
                last_poll = now
                ids = list(pending)
                try:
                    found = store.read_consistent(rows={"user": ids}).rows["user"].found
                except ModelStoreError:  # nothing published yet
                    found = np.zeros(len(ids), bool)
                t_seen = time.monotonic()
                for user, f in zip(ids, found, strict=True):
                    if f:
                        t0, key, measured = pending.pop(user)
                        if measured:
                            lat.append(t_seen - t0)
                            if key in floor.seen:
                                kafka_lat.append(floor.seen[key] - t0)
                if t_first is None and found.any():
                    # The flow runs: measure from the next push interval on.
                    t_first = t_seen
                    t_measure_at = t_seen + push_s
            if t_first is None and now > deadline:
                raise RuntimeError("the learn flow pushed no row within 120 s:\n"
                                   + log_path.read_text()[-3000:])
            if t_first is not None and t_measure is None and now >= t_measure_at:
                t_measure, t_stop = now, now + seconds
            if t_stop is not None and now >= t_stop:
                if not any(m for _, _, m in pending.values()) or now > t_stop + 3 * push_s + 10:
                    break
            time.sleep(0.002)
    finally:
        producer.flush(10)
        proc.send_signal(signal.SIGINT)  #: the flow stops like on Ctrl-C
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        floor.stop.set()
        floor.join(5)
    lost = sum(1 for _, _, m in pending.values() if m)
    return {"n": len(lat), "lost": lost, "p50": pct(lat, 50), "p99": pct(lat, 99),
            "max": max(lat, default=float("nan")) * 1000, "kafka_p50": pct(kafka_lat, 50),
            "kafka_p99": pct(kafka_lat, 99), "kafka_n": len(kafka_lat)}


# -- [3] Redis bytes per row -----------------------------------------------------------------------

def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def row_bytes(client: redis.Redis, rows: int) -> None:
    print(f"[3] Redis memory per embedding row, {rows:,} rows, ids u<n> "
          "(used_memory delta / rows; MEMORY USAGE / rows)")
    rng = np.random.default_rng(0)
    ids = [f"u{i}" for i in range(rows)]
    store = ModelStore(client, name=f"mem{uuid.uuid4().hex[:6]}")
    version = store.new_version()
    for dim in (16, 32):
        vecs = rng.normal(size=(rows, dim + 1)).astype(np.float32)  # + the bias
        ms = np.full(rows, 1_700_000_000_000)
        client.execute_command("MEMORY PURGE")
        m0 = used_memory(client)
        store.put_rows(version, f"d{dim}", ids, vecs, ms)
        key = store.key(version, f"emb:d{dim}")
        ours = (used_memory(client) - m0) / rows
        usage = client.memory_usage(key, samples=0) / rows
        enc = client.object("encoding", key).decode()
        payload = [v for _, v in client.hscan_iter(key, count=10_000)]
        client.delete(key)

        client.execute_command("MEMORY PURGE")
        m0 = used_memory(client)
        for s in range(0, rows, 10_000):
            pipe = client.pipeline(transaction=False)
            for i, v in zip(ids[s:s + 10_000], payload[s:s + 10_000], strict=True):
                pipe.set(f"e:{i}", v)
            pipe.execute()
        peer = (used_memory(client) - m0) / rows
        sample = client.memory_usage(f"e:{ids[0]}", samples=0)
        for s in range(0, rows, 10_000):
            client.delete(*[f"e:{i}" for i in ids[s:s + 10_000]])
        value = 8 + 4 * (dim + 1)
        print(f"    dim {dim}: ours hash field ({enc}) {ours:6.1f} B  {usage:6.1f} B   peer "
              f"string key per row (e:u<n>) {peer:6.1f} B  {sample} B   (value {value} B)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller stream, fewer rows, shorter latency runs, one repeat")
    ap.add_argument("--examples", type=int, help="stream for [1] and [4] (200,000; quick 40,000)")
    ap.add_argument("--rows", type=int, help="rows for [3] (200,000; quick 20,000)")
    ap.add_argument("--rate", type=float, default=200.0,
                    help="examples/s written to the learn flow in [2] (default 200)")
    ap.add_argument("--seconds", type=float,
                    help="measured seconds per push interval in [2] (60; quick 15)")
    ap.add_argument("--push-intervals", default="5,1", help="push_interval_s values for [2]")
    ap.add_argument("--flow-args", default="", help="more `run learn` arguments for [2], e.g. "
                    "'--no-recovery' or '--snapshot-interval 30'")
    ap.add_argument("--parts", default="1234", help="which parts to run (default 1234)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for [1] and [4]")
    ap.add_argument("--repeat", type=int, help="median of this many runs (3; quick 1)")
    args = ap.parse_args(argv)
    q = args.quick
    n_ex = args.examples or (40_000 if q else 200_000)
    rows = args.rows or (20_000 if q else 200_000)
    seconds = args.seconds or (15.0 if q else 60.0)
    repeat = args.repeat or (1 if q else 3)
    torch.set_num_threads(args.threads)

    print("$ python bench/embeddings.py " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:])))
    ex = stream(n_ex, 100_000, 20_000)
    print(f"{os.cpu_count()} CPUs; torch {torch.__version__}, {args.threads} thread(s) in this "
          f"process; stream for [1] and [4]: {len(ex):,} examples, 100,000 users, 20,000 items "
          f"(Zipf 1.1, bench/embeddings_core.py); median of {repeat} run(s)")
    if "1" in args.parts:
        online(ex, repeat)
    if "2" in args.parts or "3" in args.parts:
        on_stack(args, seconds, rows, ex[:10_000])
    if "4" in args.parts:
        retrain(ex, repeat, ModelSettings().retrain_batch_size)


def on_stack(args: argparse.Namespace, seconds: float, rows: int, template: list[dict]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-emb-") as tmp:
        tmp = Path(tmp)
        stack = LocalStack(tmp / "stack", free_port(), free_port())
        try:
            stack.up()
            cfg = stack.config(Config())
            client = redis.Redis.from_url(cfg.redis.url)
            info = client.info("server")
            if "2" in args.parts:
                push_figures(args, cfg, info, seconds, template, tmp)
            if "3" in args.parts:
                row_bytes(client, rows)
            client.close()
        finally:
            stack.down()


def push_figures(args: argparse.Namespace, cfg: Config, info: dict, seconds: float,
                 template: list[dict], tmp: Path) -> None:
    print(f"[2] push latency, row changed -> visible in Redis (learn flow subprocess, "
          f"Tansu + redis-server {info['redis_version']} on loopback); "
          f"{args.rate:,.0f} examples/s, 2 per new user, {seconds:.0f} s measured")
    for push_s in (float(x) for x in args.push_intervals.split(",")):
        r = push_latency(cfg, tmp, push_s, args.rate, seconds, template,
                         shlex.split(args.flow_args))
        print(f"    push_interval_s {push_s:g}: ours p50 {r['p50']:7.0f} ms  p99 "
              f"{r['p99']:7.0f} ms  max {r['max']:7.0f} ms  ({r['n']:,} users"
              + (f", {r['lost']} never seen" if r['lost'] else "")
              + f")   peer Kafka alone p50 {r['kafka_p50']:5.0f} ms  p99 "
              f"{r['kafka_p99']:5.0f} ms")


if __name__ == "__main__":
    main()
