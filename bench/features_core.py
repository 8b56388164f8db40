"""Real-time counter benchmarks, ours (features.counters.EntityCounters) beside the naive exact
method (a deque of timestamps per entity, kind and window) from the same run, in-process:

[1] counter updates/s (an update = one entity's seen() query and count of an impression, or
    its count of a click), for the 5 default entities and for one (user);
[2] error of each window against the exact recount: the peer, which is exact here because the
    stream arrives in event-time order (checked);
[3] bytes of state per entity (tracemalloc, after the run) and of a pickled state() snapshot;
[4] the counters step's work at each epoch's end: state() + pickle with the entities changed by
    the last 10,000 events re-encoded, beside encoding every entity (a first call); and its
    heap of waiting point-in-time snapshots (one per impression of the last pit_delay_ms: 180k
    at a real-time 2,000/s) as JSON of ids, beside a pickle holding the impressions.

    python bench/features_core.py [--impressions 200000]
"""

from __future__ import annotations

import argparse
import gc
import pickle
import sys
import time
import tracemalloc
from collections import deque
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctrstream.simulator import CLICKS, EventStream, StreamSpec  # noqa: E402
from features.counters import EntityCounters  # noqa: E402
from features.spec import FeatureSpec  # noqa: E402
from flows.config import GeneratorConfig  # noqa: E402
from joiner.events import parse_click, parse_impression  # noqa: E402


class DequeCounters:
    """The naive exact method: a deque of timestamps per (entity, id), kind and window,
    popped from the left as windows move. Exact only for an event-time ordered stream.
    Same calls as ours, including the touched set the store drains."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.names = spec.feature_names()
        self.n = 2 * len(spec.windows_ms)
        self.state: dict[tuple[str, str], list[deque]] = {}
        self._touched: set[tuple[str, str]] = set()

    def seen(self, imp) -> dict[str, dict[str, int]]:
        ts, out = imp.ts, {}
        for key in self.spec.entity_ids(imp):
            dqs = self.state.get(key)
            if dqs is None:
                dqs = self.state[key] = [deque() for _ in range(self.n)]
            vals = {}
            for i, w in enumerate(self.spec.windows_ms):
                for k in (0, 1):
                    d, lo = dqs[2 * i + k], ts - w
                    while d and d[0] < lo:
                        d.popleft()
                    j = len(d)
                    while j and d[j - 1] >= ts:  # same-millisecond events are not before ts
                        j -= 1
                    vals[self.names[2 * i + k]] = j
            out[key[0]] = vals
            for i in range(0, self.n, 2):
                dqs[i].append(ts)
            self._touched.add(key)
        return out

    def clicked(self, imp, click_ts: int) -> None:
        for key in self.spec.entity_ids(imp):
            dqs = self.state.get(key)
            if dqs is None:
                dqs = self.state[key] = [deque() for _ in range(self.n)]
            for i in range(1, self.n, 2):
                dqs[i].append(click_ts)
            self._touched.add(key)

    def touched(self) -> set[tuple[str, str]]:
        out, self._touched = self._touched, set()
        return out

    def __len__(self) -> int:
        return len(self.state)


def load_ops(impressions: int, per_s: float) -> tuple[list, int]:
    """(0, impression) and (1, impression, click_ts) in arrival order; backward steps seen."""
    gen = GeneratorConfig(impressions_per_s=per_s)
    stream = EventStream(gen, StreamSpec(seed=1, impressions=impressions))
    ops, by_id, last, backward = [], {}, 0, 0
    for chunk in stream:
        for topic, raw in zip(chunk.topic.tolist(), chunk.values, strict=True):
            if topic == CLICKS:
                click = parse_click(raw)
                imp = by_id.get(click.impression_id)
                if imp is None:
                    continue
                ops.append((1, imp, click.ts))
                ts = click.ts
            else:
                imp = parse_impression(raw)
                by_id[imp.impression_id] = imp
                ops.append((0, imp))
                ts = imp.ts
            backward += ts < last
            last = max(last, ts)
    return ops, backward


def rate(make, ops, repeat: int) -> tuple[float, int]:
    """Median counter updates/s over ``repeat`` fresh runs, and the updates in one run."""
    rates = []
    for _ in range(repeat):
        counters = make()
        seen, clicked, entity_ids = counters.seen, counters.clicked, counters.spec.entity_ids
        updates = 0
        gc.collect()
        t0 = time.perf_counter()
        for op in ops:
            if op[0] == 0:
                updates += len(seen(op[1]))
            else:
                clicked(op[1], op[2])
                updates += len(entity_ids(op[1]))
        rates.append(updates / (time.perf_counter() - t0))
    return float(np.median(rates)), updates


def play(counters, ops) -> None:
    for op in ops:
        counters.seen(op[1]) if op[0] == 0 else counters.clicked(op[1], op[2])


def memory(make, ops) -> tuple[int, object]:
    """Bytes traced for the counters after playing all of ops (and one state()), and the
    counters."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    counters = make()
    play(counters, ops)
    counters.touched()  # the pending-writes set is the store's to drain, not state
    if isinstance(counters, EntityCounters):
        counters.state()  # taken every epoch in the flow: its cache of encoded entities stays
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used, counters


def _stats(err: np.ndarray, exact: np.ndarray) -> str:
    if not err.size:
        return f"{'-':>8} {'-':>9} {'-':>8} {'-':>9} {'-':>8}"
    pos = exact > 0
    rel = err[pos] / exact[pos] if pos.any() else np.zeros(1)
    return (f"{100 * (err == 0).mean():8.2f} {err.mean():9.4f} {np.percentile(err, 99):8.1f} "
            f"{rel.mean():9.5f} {np.percentile(rel, 99):8.4f}")


def errors(spec: FeatureSpec, ops) -> None:
    """Ours against the peer, value by value: over all values, and over those answered by an
    entity on tiles (the others are exact by construction). Relative: where the count > 0."""
    ours, peer = EntityCounters(spec), DequeCounters(spec)
    got, want, tiled = [], [], []
    for op in ops:
        if op[0] == 1:
            ours.clicked(op[1], op[2])
            peer.clicked(op[1], op[2])
            continue
        keys = spec.entity_ids(op[1])
        tiled += [i in ours._entities[n] and ours._entities[n][i][4] is not None
                  for n, i in keys]
        a, b = ours.seen(op[1]), peer.seen(op[1])
        got += [a[n] for n, _ in keys]
        want += [b[n] for n, _ in keys]
    tiled = np.array(tiled)
    print(f"[2] error vs the exact recount: {len(got):,} (impression, entity) values a feature, "
          f"{100 * tiled.mean():.1f} % of them from entities on tiles")
    head = f"{'exact %':>8} {'mean abs':>9} {'p99 abs':>8} {'mean rel':>9} {'p99 rel':>8}"
    print(f"    {'':<9} {'all values':^46} | {'values from tiles':^46}")
    print(f"    {'feature':<9} {head} | {head} {'max abs':>8}")
    for name in spec.feature_names():
        a = np.array([v[name] for v in got], dtype=np.int64)
        b = np.array([v[name] for v in want], dtype=np.int64)
        err = np.abs(a - b)
        print(f"    {name:<9} {_stats(err, b)} | {_stats(err[tiled], b[tiled])} "
              f"{err.max():8d}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impressions", type=int, default=200_000)
    ap.add_argument("--impressions-per-s", type=float, default=GeneratorConfig().impressions_per_s,
                    help="event-time rate; lower it to make the stream outlast the 24 h window")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the median is printed")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    ops, backward = load_ops(args.impressions, args.impressions_per_s)
    n_imp = sum(op[0] == 0 for op in ops)
    imp_ts = [op[1].ts for op in ops if op[0] == 0]
    span_h = (max(imp_ts) - min(imp_ts)) / 3.6e6 if imp_ts else 0.0
    print(f"stream: {n_imp:,} impressions over {span_h:.2f} h of event time, "
          f"{len(ops) - n_imp:,} clicks; {backward} arrivals behind event time; parsed in "
          f"{time.perf_counter() - t0:.1f} s")
    if backward:
        print("    (the peer is not exact on an out-of-order stream: errors below are off)")

    spec = FeatureSpec()
    print(f"[1] counter updates/s, median of {args.repeat} runs (an update: one entity's "
          f"seen() query + count, or its clicked() count)")
    for label, s in (("5 entities", spec), ("1 entity (user)", FeatureSpec(
            entities={"user": ("user_id",)})), ("1 entity (category)", FeatureSpec(
            entities={"category": ("category",)}))):
        for name, make in (("ours", lambda s=s: EntityCounters(s)),
                           ("deque peer", lambda s=s: DequeCounters(s))):
            r, updates = rate(make, ops, args.repeat)
            print(f"    {label:<20} {name:<11} {r:>10,.0f} updates/s ({updates:,} a run)")
    errors(spec, ops)

    print("[3] state per entity, 5 entities")
    for name, make in (("ours", lambda: EntityCounters(spec)),
                       ("deque peer", lambda: DequeCounters(spec))):
        used, counters = memory(make, ops)
        snap = len(pickle.dumps(counters.state() if name == "ours" else counters.state, 5))
        extra = ""
        if name == "ours":
            extra = "; on tiles: " + ", ".join(
                f"{n} {sum(e[4] is not None for e in ents.values()):,}/{len(ents):,}"
                for n, ents in counters._entities.items())
        print(f"    {name:<11} {used / len(counters):7.0f} B/entity in memory, "
              f"{snap / len(counters):5.0f} B/entity pickled ({len(counters):,} entities){extra}")

    print("[4] at an epoch's end (the counters step's snapshot), 5 entities")
    epoch_end(spec, ops, min(180_000, n_imp))


def epoch_end(spec: FeatureSpec, ops: list, waiting: int) -> None:
    c = EntityCounters(spec)
    play(c, ops[:-10_000])
    c.touched()
    t0 = time.perf_counter()
    full = len(pickle.dumps(c.state(), 5))
    t1 = time.perf_counter()
    play(c, ops[-10_000:])
    c.touched()
    t2 = time.perf_counter()
    size = len(pickle.dumps(c.state(), 5))
    t3 = time.perf_counter()
    print(f"    counters, {len(c):,} entities: {(t3 - t2) * 1000:,.0f} ms after 10,000 events "
          f"({size / 1e6:.1f} MB) | every entity encoded {(t1 - t0) * 1000:,.0f} ms "
          f"({full / 1e6:.1f} MB)")
    imps = [op[1] for op in ops if op[0] == 0][:waiting]
    ids = [spec.entity_ids(m) for m in imps]
    slim = [(m.ts, i, m.impression_id, ids[i]) for i, m in enumerate(imps)]
    full = [(m.ts, i, m, ids[i]) for i, m in enumerate(imps)]
    t0 = time.perf_counter()
    ours = orjson.dumps(slim)
    t1 = time.perf_counter()
    peer = pickle.dumps(full, 5)
    t2 = time.perf_counter()
    print(f"    {len(imps):,} waiting snapshots: JSON of ids {(t1 - t0) * 1000:,.0f} ms "
          f"({len(ours) / 1e6:.1f} MB) | pickle of impressions {(t2 - t1) * 1000:,.0f} ms "
          f"({len(peer) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
