"""The attach step: an example meets the parts of its point-in-time counts under the key of
its impression's cell (ts bucket x id hash), in any order, and a cell is discarded once done."""

from __future__ import annotations

import logging
import pickle
import random

import orjson
import pytest
from bytewax.operators import StatefulBatchLogic

from flows import features_ops as fo
from flows import metrics
from flows.config import Config

CFG = Config()


def records(n=300, seed=0):
    """n impressions' example and parts (1 to 3 shards each) as the flow keys them, shuffled."""
    rng, out, want = random.Random(seed), [], {}
    for i in range(n):
        iid, ts = f"i{i}", 1_000_000 + rng.randrange(60_000)
        shards = rng.sample(range(16), rng.randint(1, 3))
        ex = orjson.dumps({"impression_id": iid, "ts": ts, "label": 0})
        parts = [(k, len(shards), orjson.dumps({f"e{k}": {"imp_1m": i}})) for k in shards]
        out += fo.examples([(iid, ts, ex)])
        for k, n, c in parts:
            out += fo.parts(("shard", (k, [(iid, n, c, ts)])))
        want[iid] = {**orjson.loads(ex), "counts": {
            f"e{k}": {"imp_1m": i} for k in sorted(shards)}}
    rng.shuffle(out)
    return out, want


def drive(recs, batches=7, resume=None):
    """Feeds the records per key in ``batches`` slices, as bytewax would; returns the examples
    written, the logic per key, and which keys were discarded."""
    held, logics, written, discarded = fo.HeldImpressions(CFG), {}, {}, set()
    for key, state in (resume or {}).items():
        logics[key] = fo.AttachLogic(held, state)
    step = max(1, len(recs) // batches)
    for lo in range(0, len(recs), step):
        by_key: dict = {}
        for key, value in recs[lo:lo + step]:
            by_key.setdefault(key, []).append(value)
        for key, values in by_key.items():
            logic = logics.get(key) or logics.setdefault(key, fo.AttachLogic(held, None))
            out, keep = logic.on_batch(values)
            for iid, ex in out:
                assert iid not in written, f"{iid} written twice"
                written[iid] = orjson.loads(ex)
            if keep == StatefulBatchLogic.DISCARD:
                del logics[key]
                discarded.add(key)
    return written, logics, discarded, held


def test_every_example_gets_exactly_its_parts_in_any_order():
    recs, want = records()
    written, logics, discarded, _ = drive(recs)
    assert written == want
    assert logics == {}  # every cell discarded once done
    # many impressions per key, and the example and parts of one impression share it
    assert len(discarded) <= 13 * fo.ATTACH_SPREAD < len(want) / 4
    by_id: dict = {}
    for key, (_, items) in recs:
        for iid, _, _ in items:
            by_id.setdefault(iid, set()).add(key)
    assert all(len(keys) == 1 for keys in by_id.values())


def test_resumed_from_snapshots_midway_gives_the_same_examples():
    recs, want = records(seed=1)
    half = len(recs) // 2
    before, logics, _, _ = drive(recs[:half])
    assert 0 < len(before) < len(want)
    states = {k: pickle.loads(pickle.dumps(lg.snapshot())) for k, lg in logics.items()}
    after, logics, _, _ = drive(recs[half:], resume=states)
    assert before.keys().isdisjoint(after.keys())
    assert {**before, **after} == want and logics == {}


def test_a_snapshot_is_not_changed_by_what_comes_after():
    """bytewax may pickle a snapshot after the key has taken more values."""
    recs, _ = records(n=200, seed=2)
    by_key: dict = {}
    for key, value in recs:
        by_key.setdefault(key, []).append(value)
    values = max(by_key.values(), key=len)
    logic = fo.AttachLogic(fo.HeldImpressions(CFG), None)
    logic.on_batch(values[:3])
    snap = logic.snapshot()
    frozen = pickle.dumps(snap)
    logic.on_batch(values[3:])
    assert pickle.dumps(snap) == frozen != pickle.dumps(logic.snapshot())


def test_cells_spread_evenly_over_two_workers():
    keys = [fo.attach_key(ts, f"imp-{ts}") for ts in range(0, 3_600_000, 97)]
    on_first = sum(fo._worker_hash(k) % 2 == 0 for k in keys)
    assert abs(on_first / len(keys) - 0.5) < 0.05
    cells = set(keys)
    assert abs(sum(fo._worker_hash(k) % 2 == 0 for k in cells) / len(cells) - 0.5) < 0.01


def test_a_state_kept_per_impression_is_refused():
    with pytest.raises(ValueError, match="new recovery store"):
        fo.AttachLogic(fo.HeldImpressions(CFG), (b'{"impression_id":"a"}', ()))


def test_an_impression_whose_part_never_comes_is_reported_and_dropped(caplog):
    """Parts come in ts order once the watermark is past: when parts are far past an
    impression still waiting, its part is lost; it is logged and dropped, not kept."""
    held = fo.HeldImpressions(CFG)
    t0 = 10 * 3_600_000
    lost = fo.AttachLogic(held, None)
    lost.on_batch([fo.examples([("lost", t0, b'{"impression_id":"lost"}')])[0][1]])
    assert lost.snapshot()[2].keys() == {"lost"}
    recent = fo.AttachLogic(held, None)
    t1 = t0 + held.lag_ms  # not yet past: kept
    recent.on_batch([fo.examples([("recent", t1, b"{}")])[0][1]])
    later = fo.AttachLogic(held, None)
    later.on_batch([fo.parts(("s", (0, [("x", 2, b"{}", t1 + fo.ATTACH_BUCKET_MS)])))[0][1]])
    with caplog.at_level(logging.WARNING):
        later.snapshot()
    assert lost.pending == {} and held.dropped == 1 and "lost" in caplog.text
    assert recent.pending.keys() == {"recent"}
    assert lost not in held.live and recent in held.live
    assert metrics.LATEST.features["dropped"] == 1  # ctrstream_features_examples_dropped


def test_a_batch_is_one_record_per_cell():
    """bytewax's cost is per record: a shard's parts, and a join partition's examples, go to
    the attach step as one record per cell of impressions, whatever their number."""
    items = [(f"i{n}", 40_000 + 10 * n, b"{}") for n in range(1000)]  # 10 s: 2 buckets
    recs = fo.examples(items)
    assert len(recs) == 2 * fo.ATTACH_SPREAD
    assert sorted(i for _, (_, got) in recs for i in got) == sorted(items)
    assert all(fo.attach_key(ts, iid) == key for key, (_, got) in recs for iid, ts, _ in got)
    parts = fo.parts(("s", (3, [(iid, 2, b"{}", ts) for iid, ts, _ in items])))
    assert {k for k, _ in parts} == {k for k, _ in recs}
