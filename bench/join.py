"""Join benchmarks, each figure beside its peer from the same run.

[1] events/s through the join flow next to a pass-through flow (same source, parsing and
    sink, no join), with 1 and 2 processes, on a private local broker and Redis; and the join
    flow with the count features on (counters, attached counts, Redis writes);
[2] the joiner core's events/s in-process next to parsing alone;
[3] HashQueue push+close+forget operations/s next to a plain dict;
[4] bytes per buffered impression, HashQueue next to a plain dict-of-dicts buffer;
[5] snapshot time and bytes per epoch at 1M buffered impressions next to pickling the buffer
    (what a stateful operator holding the queue would snapshot every epoch), and the time to
    rebuild that buffer from replayed messages on restart.

    python bench/join.py [--events 400000] [--buffered 1000000]
"""

from __future__ import annotations

import argparse
import gc
import pickle
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import bytewax.operators as op
import orjson
from bytewax.dataflow import Dataflow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.produce import fresh_topics  # noqa: E402
from ctrstream.produce import produce  # noqa: E402
from ctrstream.simulator import StreamSpec  # noqa: E402
from ctrstream.stack import LocalStack, create_topics, free_port  # noqa: E402
from flows.config import Config, load_config  # noqa: E402
from flows.join import JoinSource, _JoinPartition  # noqa: E402
from flows.kafka import KafkaRecordSink  # noqa: E402
from joiner.events import (  # noqa: E402
    BadEvent,
    parse_click,
    parse_impression,
    parse_impression_payload,
)
from joiner.hashqueue import HashQueue  # noqa: E402
from joiner.join import EXAMPLE, IMPRESSIONS, WaitWindowJoiner  # noqa: E402


class _PassThroughPartition(_JoinPartition):
    """Parses like the join and writes every valid message to `examples`; no join state."""

    def on_message(self, stream, raw, offset, now, out, wall_ms, key):
        try:
            ev = (parse_impression if stream == IMPRESSIONS else parse_click)(raw)
        except BadEvent:
            return
        out.append((EXAMPLE, ev.impression_id, raw))


class _PassThroughSource(JoinSource):
    partition_class = _PassThroughPartition


def passthrough_flow(config_path: str) -> Dataflow:
    cfg = load_config(config_path)
    flow = Dataflow("passthrough")
    # with features off the source's records are (topic, key, value), as the sink takes them
    records = op.input("in", flow, _PassThroughSource(cfg, until_eof=True))
    op.output("out", records, KafkaRecordSink(cfg))
    return flow


def _run(flow_ref: str, processes: int, cfg_path: Path) -> float:
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    cmd = [sys.executable, "-m", "bytewax.run", flow_ref]
    if processes > 1:
        cmd += ["-a", addresses]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd + (["-i", str(i)] if processes > 1 else []),
                              cwd=Path(__file__).resolve().parents[1],
                              env={"CTRSTREAM_CONFIG": str(cfg_path), "PATH": "/usr/bin:/bin"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(processes)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(err.decode()[-2000:])
    return time.perf_counter() - t0


def bench_flows(cfg: Config, n_events: int, tmp: Path) -> None:
    spec = StreamSpec(seed=3, impressions=int(n_events / 1.033))
    manifest = produce(cfg, spec, truth_dir=tmp / "truth")
    n = manifest["counts"]["impression_messages"] + manifest["counts"]["click_messages"]
    print(f"\n[1] flows over {n:,} input messages, {cfg.kafka.partitions} partitions "
          "(wall time of the whole run, start-up included)")
    print(f"    {'processes':>9} {'pass-through ev/s':>18} {'join ev/s':>12} {'join/pass':>10}"
          f" {'join+features ev/s':>19}")
    for procs in (1, 2):
        rates = []
        for name in ("passthrough", "join", "features"):
            run_cfg = cfg.replace(kafka={"examples_topic": f"bench-out-{uuid.uuid4().hex[:6]}"},
                                  data_dir=str(tmp / f"data-{name}-{procs}"),
                                  features={"enabled": name == "features"})
            create_topics(run_cfg)
            cfg_path = tmp / f"{name}-{procs}.toml"
            cfg_path.write_text(run_cfg.to_toml())
            ref = (f"bench.join:passthrough_flow('{cfg_path}')" if name == "passthrough"
                   else f"flows.join:build('{cfg_path}', until_eof=True)")
            rates.append(n / _run(ref, procs, cfg_path))
        print(f"    {procs:>9} {rates[0]:>18,.0f} {rates[1]:>12,.0f} {rates[1] / rates[0]:>10.2f}"
              f" {rates[2]:>19,.0f}")


def _impressions(n: int, start_ms: int):
    """Messages as a Kafka consumer hands them over: exact-size bytes (orjson's own result
    keeps a larger allocation)."""
    for i in range(n):
        yield bytes(memoryview(orjson.dumps({"impression_id": f"{i:016x}", "ts": start_ms + i,
                            "user_id": f"u{i % 10_000}", "item_id": f"i{i % 2000}",
                            "features": {"category": f"c{i % 20}", "device": "mobile",
                                         "position": i % 10, "hour": 13}})))


def bench_core(n_impressions: int) -> None:
    """The joiner core in-process over generator messages, next to parsing them alone."""
    from ctrstream.simulator import EventStream
    from flows.config import GeneratorConfig

    msgs = []
    for c in EventStream(GeneratorConfig(), StreamSpec(seed=1, impressions=n_impressions)):
        msgs += zip(c.topic.tolist(), c.values, strict=True)
    t0 = time.perf_counter()
    for topic, raw in msgs:
        (parse_impression if topic == 0 else parse_click)(raw)
    parse_rate = len(msgs) / (time.perf_counter() - t0)
    j = WaitWindowJoiner(window_ms=15 * 60_000, idle_timeout_s=1e9)
    offsets, out = [0, 0], []
    t0 = time.perf_counter()
    for i, (topic, raw) in enumerate(msgs):
        offset, offsets[topic] = offsets[topic], offsets[topic] + 1
        (j.on_impression if topic == 0 else j.on_click)(raw, offset, 0.0, out)
        if i % 1000 == 0:
            j.advance(0.0, out)
            out.clear()
    j.flush(out)
    join_rate = len(msgs) / (time.perf_counter() - t0)
    print(f"\n[2] joiner core in-process, {len(msgs):,} generator messages")
    print(f"    join {join_rate:>10,.0f} ev/s   parse only {parse_rate:>10,.0f} ev/s   "
          f"ratio {join_rate / parse_rate:.2f}")


def bench_hashqueue(n: int) -> None:
    payload = next(_impressions(1, 0))
    keys = [f"{i:016x}" for i in range(n)]
    q = HashQueue()
    t0 = time.perf_counter()
    for i, k in enumerate(keys):
        q.push(k, i, payload, i, 0)
    for _ in range(n):
        q.pop_pending()
    for _ in range(n):
        q.forget_oldest()
    dt = time.perf_counter() - t0
    d: dict = {}
    t0 = time.perf_counter()
    for i, k in enumerate(keys):
        d[k] = (i, payload)
    for k in keys:
        del d[k]
    dt_dict = time.perf_counter() - t0
    print(f"\n[3] HashQueue push + close + forget, {n:,} impressions")
    print(f"    HashQueue {n / dt:>12,.0f} impressions/s   plain dict insert+delete "
          f"{n / dt_dict:>12,.0f}/s")


def bench_memory(n: int) -> None:
    """Messages are made inside the traced window, so each buffer pays for what it keeps."""
    gc.collect()
    tracemalloc.start()
    q = HashQueue()
    for i, raw in enumerate(_impressions(n, 1_700_000_000_000)):
        imp, payload = parse_impression_payload(raw)
        q.push(imp.impression_id, imp.ts, payload, i, 0)
    hq = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del q
    gc.collect()
    tracemalloc.start()
    buf = {}
    for raw in _impressions(n, 1_700_000_000_000):
        obj = orjson.loads(raw)
        buf[obj["impression_id"]] = obj
    plain = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del buf
    print(f"\n[4] memory per buffered impression ({n:,} buffered, tracemalloc)")
    print(f"    HashQueue pending {hq / n:>6.0f} B   dict of parsed dicts {plain / n:>6.0f} B   "
          f"ratio {plain / hq:.1f}x")


def bench_snapshot(n: int) -> None:
    j = WaitWindowJoiner(window_ms=15 * 60_000, idle_timeout_s=1e9, capacity=n + 1)
    out: list = []
    for i, raw in enumerate(_impressions(n, 1_700_000_000_000)):
        j.on_impression(raw, i, 0.0, out)
    assert j.q.pending_count == n
    t0 = time.perf_counter()
    snap = pickle.dumps(j.snapshot())
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    whole = pickle.dumps(j.q)  # what snapshotting the buffer itself would cost
    dt_whole = time.perf_counter() - t0
    # The price of the small snapshot: on resume the buffered range is replayed.
    rebuilt = WaitWindowJoiner(window_ms=15 * 60_000, idle_timeout_s=1e9, capacity=n + 1)
    rebuilt.start_rebuild(pickle.loads(snap))
    t0 = time.perf_counter()
    for i, raw in enumerate(_impressions(n, 1_700_000_000_000)):
        rebuilt.rebuild_impression(raw, i)
    rebuilt.finish_rebuild()
    dt_replay = time.perf_counter() - t0
    assert rebuilt.q.pending_count == n
    print(f"\n[5] snapshot per epoch with {n:,} buffered impressions")
    print(f"    replay-state snapshot {dt * 1000:>8.2f} ms {len(snap):>12,} B   "
          f"pickled buffer {dt_whole * 1000:>8.0f} ms {len(whole):>12,} B")
    print(f"    once per restart: rebuilding the buffer from the replayed messages "
          f"{dt_replay:.1f} s ({n / dt_replay:,.0f} impressions/s, Kafka fetch not included)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--buffered", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stack = LocalStack(tmp / "stack", free_port(), free_port())
        stack.up()
        try:
            cfg = fresh_topics(stack.config(Config()), "bench")
            bench_flows(cfg, args.events, tmp)
        finally:
            stack.down()
    bench_core(200_000)
    bench_hashqueue(args.buffered)
    bench_memory(min(args.buffered, 200_000))
    bench_snapshot(args.buffered)


if __name__ == "__main__":
    main()
