"""Every count-feature figure from one run, each beside its peer from the same run:

[core]  counter updates/s in-process, error against an exact recount and state per entity,
        next to a deque-per-window exact counter (bench/features_core.py);
[store] Redis write throughput through the FeatureStore, get_many latency p50/p99 for 100
        entities next to the naive one-GET-per-feature-key layout, and Redis memory per entity
        (bench/features_store.py);
[fresh] event-to-Redis freshness p50/p99 under a steady produce rate: the generator sends
        impressions in real time (event time = the wall time it sends them at), the join flow
        runs as `ctrstream run join`, and a poller reads the newest event time visible in Redis
        every few ms. An event at T is visible at the first poll that shows T or later. The
        peer is a plain consumer tailing `impressions`: the floor any Kafka-fed pipeline pays.

    python bench/features.py [--quick] [--fresh-only] [--rates 2000,5000] [--seconds 30]
                             [--recovery]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import redis
from confluent_kafka import Consumer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
# This file's name would shadow the `features` package: the project comes first on the path,
# the other bench scripts last.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p).resolve() != ROOT / "bench"]
sys.path.append(str(ROOT / "bench"))

import features_core  # noqa: E402
import features_store  # noqa: E402

from bench.procstat import cpu_s, machine_busy_s, rss_mb, written_mb  # noqa: E402
from ctrstream.produce import produce  # noqa: E402
from ctrstream.simulator import StreamSpec  # noqa: E402
from ctrstream.stack import LocalStack, create_topics, free_port  # noqa: E402
from flows.build import feature_store  # noqa: E402
from flows.config import Config  # noqa: E402

POLL_S = 0.005
# Skipped at the start of each run: until clicks flow on every partition, the join
# watermark cannot move (clicks arrive a median 30 s after their impressions).
WARMUP_S = 15.0


def _tail_impressions(cfg: Config, stop: threading.Event, lags: list) -> None:
    """The peer: wall time at which each impression is readable, minus its event time."""
    consumer = Consumer(cfg.kafka_client(**{"group.id": "bench-tail", "fetch.wait.max.ms": 5}))
    parts = [TopicPartition(cfg.kafka.impressions_topic, p, -1)  # -1: from the end
             for p in range(cfg.kafka.partitions)]
    consumer.assign(parts)
    while not stop.is_set():
        for msg in consumer.consume(1000, timeout=0.05):
            if msg.error() is None:
                now = time.time() * 1000
                lags.append(now - orjson.loads(msg.value())["ts"])
    consumer.close()


def _poll_visible(cfg: Config, stop: threading.Event, obs: list) -> None:
    """(wall ms, newest event ts visible in Redis) every POLL_S. Every written row carries the
    ts of the newest event its counters shard had applied, so the hottest keys (the
    categories, spread over the shards) show how far Redis has got."""
    client = redis.Redis.from_url(cfg.redis.url)
    store, ids = None, []
    head = f"{cfg.features.store_prefix}:{{category:"
    next_scan = 0.0
    while not stop.is_set():
        if time.monotonic() >= next_scan:
            ids = [k.decode()[len(head):-1]
                   for k in client.scan_iter(match=f"{head}*", count=1000)]
            next_scan = time.monotonic() + 1.0
            if ids and store is None:
                store = feature_store(cfg)  # its names from the meta key, written by now
        if ids and store is not None:
            seen = [r["_ts"] for r in store.get_many("category", ids) if r["_ts"] is not None]
            if seen:
                obs.append((time.time() * 1000, max(seen)))
        time.sleep(POLL_S)


def freshness(rate: float, seconds: float, tmp: Path, recovery: bool = False
              ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-event Redis visibility lag and the tailing consumer's lag, in ms, and the flow's
    figures: the impressions/s the generator reached, the flow's CPU share of one core, its
    RSS at a third, two thirds and the end of the run (MB), and whether it caught up within 30 s."""
    stack = LocalStack(tmp / "stack", free_port(), free_port())
    pids = stack.up()
    flow = None
    stop = threading.Event()
    try:
        cfg = stack.config(Config()).replace(
            data_dir=str(tmp / "data"), recovery_dir=str(tmp / "recovery"),
            generator={"impressions_per_s": rate})
        create_topics(cfg)
        cfg_path = tmp / "bench.toml"
        cfg_path.write_text(cfg.to_toml())
        flow = subprocess.Popen([sys.executable, "-m", "ctrstream.cli", "--config", str(cfg_path),
                                 "run", "join", *([] if recovery else ["--no-recovery"])],
                                cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        obs: list = []
        tail_lags: list = []
        threads = [threading.Thread(target=_poll_visible, args=(cfg, stop, obs)),
                   threading.Thread(target=_tail_impressions, args=(cfg, stop, tail_lags))]
        for t in threads:
            t.start()
        start_ms = int(time.time() * 1000)
        rss = []
        for k in (1, 2):
            threading.Timer(seconds * k / 3, lambda: rss.append(rss_mb(flow.pid))).start()
        # CPU-seconds per wall second while the generator sends: of the flow, the broker,
        # Redis, this process (the generator and the pollers) and the whole machine
        procs = {"flow": flow.pid, "broker": pids["kafka"], "redis": pids["redis"],
                 "generator": os.getpid()}
        cpu0, busy0, disk0 = ({k: cpu_s(p) for k, p in procs.items()}, machine_busy_s(),
                              written_mb(flow.pid))
        t0 = time.monotonic()
        sent = produce(cfg, StreamSpec(seed=11, duration_s=seconds, start_ms=start_ms),
                       speed=1.0)
        elapsed = time.monotonic() - t0
        cpu = {k: (cpu_s(p) - cpu0[k]) / elapsed for k, p in procs.items()}
        cpu["machine"] = (machine_busy_s() - busy0) / elapsed
        disk = (written_mb(flow.pid) - disk0) / elapsed
        rss.append(rss_mb(flow.pid))
        end_ms = start_ms + seconds * 1000
        deadline = time.monotonic() + 30
        while (not obs or obs[-1][1] < end_ms - 2000) and time.monotonic() < deadline:
            if flow.poll() is not None:
                raise RuntimeError(f"join flow exited: {flow.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        caught_up = bool(obs) and obs[-1][1] >= end_ms - 2000
        stop.set()
        for t in threads:
            t.join()
    finally:
        stop.set()
        if flow is not None:
            flow.terminate()
            flow.wait(30)
        stack.down()
    if not obs:
        raise RuntimeError("nothing became visible in Redis")
    wall = np.array([o[0] for o in obs])
    visible = np.maximum.accumulate(np.array([o[1] for o in obs]))
    # events sampled every ms over the steady part (after warm-up, before the tail)
    events = np.arange(start_ms + WARMUP_S * 1000, end_ms - 2000, 1.0)
    at = np.searchsorted(visible, events, side="left")
    seen = at < len(wall)
    lag = wall[at[seen]] - events[seen]
    tail = np.array(tail_lags[int(len(tail_lags) * WARMUP_S / seconds):])
    c = sent["counts"]
    return lag, tail, {"imp_per_s": c["impression_messages"] / seconds, "cpu": cpu,
                       "disk_mb_s": disk, "rss_mb": rss, "caught_up": caught_up}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    ap.add_argument("--rates", default="2000,5000", help="impressions/s for the freshness runs")
    ap.add_argument("--fresh-only", action="store_true", help="only the freshness runs")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each freshness run")
    ap.add_argument("--recovery", action="store_true",
                    help="run the flow with bytewax recovery, as deployed (its state is "
                         "snapshotted every 5 s); default off: the flow alone")
    args = ap.parse_args()
    if not args.fresh_only:
        quick = ["--impressions", "20000", "--repeat", "1"] if args.quick else []
        print("=" * 30, "[core] python bench/features_core.py", " ".join(quick))
        features_core.main(quick)
        quick = ["--entities", "10000", "--trials", "200"] if args.quick else []
        print("\n" + "=" * 30, "[store] python bench/features_store.py", " ".join(quick))
        features_store.main(quick)
    seconds = 25.0 if args.quick else args.seconds
    print("\n" + "=" * 30, f"[fresh] event-to-Redis freshness, {seconds:.0f} s per rate "
          f"(first {WARMUP_S:.0f} s skipped), store_flush_interval_s "
          f"{Config().features.store_flush_interval_s}, 4 partitions, 1 process, "
          f"{Config().features.shards} counter shards, recovery "
          f"{'on' if args.recovery else 'off'}; event time runs at wall-clock speed")
    print("    ms from an event's ts (its send time plus the generator's start-up offset, the "
          "same for both) to\n    visible in Redis, next to readable by a consumer tailing "
          "`impressions`; 'added' is the difference")
    print("    flow CPU: its CPU-seconds per wall second while the generator sent; RSS MB at a "
          "third -> two thirds -> the end of the run")
    print(f"    {'imp/s':>7} {'sent/s':>7} {'Redis p50':>10} {'p99':>6} {'max':>6}   "
          f"{'Kafka tail p50':>14} {'p99':>6}   {'added p50':>9} {'p99':>6}   {'flow CPU':>8}"
          f" {'RSS MB':>11} {'caught up':>9}")
    for rate in (float(r) for r in args.rates.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-fresh-") as tmp:
            lag, tail, f = freshness(rate, seconds, Path(tmp), args.recovery)
        (r50, r99), (k50, k99) = np.percentile(lag, [50, 99]), np.percentile(tail, [50, 99])
        rss = " -> ".join(f"{m:,.0f}" for m in f["rss_mb"])
        print(f"    {rate:>7,.0f} {f['imp_per_s']:>7,.0f} {r50:>10,.0f} {r99:>6,.0f} "
              f"{lag.max():>6,.0f}   {k50:>14,.0f} {k99:>6,.0f}   {r50 - k50:>9,.0f} "
              f"{r99 - k99:>6,.0f}   {f['cpu']['flow']:>8.2f} {rss:>11} {str(f['caught_up']):>9}")
        print(f"    {'':>7} CPU cores while sending: "
              + ", ".join(f"{k} {v:.2f}" for k, v in f["cpu"].items())
              + f" of {os.cpu_count()}; the flow wrote {f['disk_mb_s']:.1f} MB/s to disk")
        p99s = [np.percentile(t, 99) for t in np.array_split(lag, 3)]
        growing = p99s[2] > 2 * max(p99s[0], 1000.0)  # the last third's tail doubled, past 1 s
        print(f"    {'':>7} Redis p99 by third of the run: "
              f"{' / '.join(f'{p:,.0f}' for p in p99s)} ms: "
              f"{'GROWING (not keeping up)' if growing else 'bounded'}")


if __name__ == "__main__":
    main()
