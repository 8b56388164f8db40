"""features/hashing.py: stable across processes, the same vector for training and scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.derived import log_bucket
from features.hashing import FeatureHasher, canonical

ROOT = Path(__file__).resolve().parents[3]
COUNTS = {
    "user": {"imp_5m": 3, "clk_5m": 0, "imp_1h": 10, "clk_1h": 1, "imp_24h": 40, "clk_24h": 2},
    "item": {"imp_5m": 120, "clk_5m": 4, "imp_1h": 900, "clk_1h": 30},
    "category": {"imp_24h": 100_000},
}
TRAINING = {
    "impression_id": "ab12",
    "ts": 1_700_000_000_000,
    "user_id": "u17",
    "item_id": "i42",
    "features": {"category": "c3", "device": "mobile", "position": 2, "hour": 20},
    "kind": "example",
    "label": 1,
    "click_ts": 1_700_000_030_000,
    "delay_ms": 30_000,
    "window_ms": 900_000,
    "sample_rate": 0.5,
    "some_future_field": [1, 2],
    "counts": COUNTS,
}


def scoring_request() -> dict:
    """What a scorer builds: no label, other ids, values as Redis or Parquet may give them."""
    counts = {
        e: {k: str(v) if k.startswith("imp") else float(v) for k, v in c.items()}
        for e, c in COUNTS.items()
    }
    return {
        "user_id": "u17",
        "item_id": "i42",
        "counts": counts,
        "features": {"hour": 20.0, "position": "2", "device": "mobile", "category": "c3"},
    }


def test_same_indices_in_another_process():
    script = (
        "import json, sys; from features.hashing import FeatureHasher; "
        "ex = json.loads(sys.stdin.read()); "
        "print(json.dumps(FeatureHasher(bits=22).indices(ex).tolist()))"
    )
    expected = FeatureHasher(bits=22).indices(TRAINING).tolist()
    for seed in ("1", "2"):  # str hashes differ between these interpreters
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(TRAINING),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            check=True,
        )
        assert json.loads(out.stdout) == expected


def test_training_and_scoring_dicts_give_the_same_vector():
    h = FeatureHasher()
    x = h.indices(TRAINING)
    assert np.array_equal(h.indices(scoring_request()), x)
    # ...and a real difference in a value changes it
    other = scoring_request()
    other["features"]["position"] = 3
    assert not np.array_equal(h.indices(other), x)


def test_shape_bias_first_sorted_unique_in_range():
    h = FeatureHasher(bits=16)
    x = h.indices(TRAINING)
    assert x.dtype == np.int64 and x[0] == 0
    assert (np.diff(x) > 0).all() and x[-1] < 2**16 and (x[1:] >= 1).all()
    # 2 ids + 4 features + 3 crosses + 5 entities x 6 counts, and the bias
    assert len(x) == 1 + 2 + 4 + 3 + 30


def test_missing_counts_are_zero_counts():
    h = FeatureHasher()
    bare = {k: v for k, v in TRAINING.items() if k != "counts"}
    zeros = {**bare, "counts": {e: dict.fromkeys(n, 0) for e, n in h.count_features.items()}}
    partial = {**bare, "counts": {"user": {}, "item": None}}
    x = h.indices(bare)
    assert np.array_equal(h.indices(zeros), x)
    assert np.array_equal(h.indices(partial), x)
    assert np.array_equal(h.indices({**bare, "counts": None}), x)
    assert not np.array_equal(h.indices(TRAINING), x)


def test_counts_hash_by_log_bucket():
    h = FeatureHasher()

    def with_count(n):
        return h.indices({"user_id": "u1", "counts": {"user": {"imp_5m": n}}})

    for a, b in ((2, 3), (4, 7), (0, 0.0), (5, "5"), (-3, 0)):
        assert log_bucket(int(float(a))) == log_bucket(int(float(b)))
        assert np.array_equal(with_count(a), with_count(b)), (a, b)
    assert not np.array_equal(with_count(3), with_count(4))
    assert np.array_equal(with_count(2**70), with_count(2**80))  # capped, not an IndexError
    for bad in ("x", float("nan")):  # not a count: the caller dead-letters the example
        with pytest.raises(ValueError):
            with_count(bad)


def test_canonical_values():
    assert canonical(2) == canonical(2.0) == canonical("2") == "2"
    assert canonical(True) == "1" and canonical(2.5) == "2.5"
    h = FeatureHasher(count_features=False, crosses=())
    assert np.array_equal(h.indices({"features": {"a": 1}}), h.indices({"features": {"a": True}}))
    assert not np.array_equal(
        h.indices({"features": {"a": 2.5}}), h.indices({"features": {"a": 2}})
    )


def test_cache_does_not_change_answers():
    # 2 and 2.0 share a cache entry (equal dict keys); the order seen must not matter.
    a, b = FeatureHasher(), FeatureHasher()
    ex_int = {"features": {"position": 2}}
    ex_float = {"features": {"position": 2.0}}
    first = a.indices(ex_int), a.indices(ex_float)
    second = b.indices(ex_float), b.indices(ex_int)
    assert np.array_equal(first[0], second[1]) and np.array_equal(first[1], second[0])


def test_crosses_are_config():
    ex = {"user_id": "u1", "features": {"category": "c1", "device": "mobile", "hour": 3}}
    none = FeatureHasher(count_features=False, crosses=())
    one = FeatureHasher(count_features=False, crosses=[("user_id", "category")])
    three = FeatureHasher(
        count_features=False,
        crosses=[("user_id", "category"), ("device", "hour", "category"), ("item_id", "device")],
    )
    base = set(none.indices(ex).tolist())
    assert len(set(one.indices(ex).tolist()) - base) == 1
    # item_id is missing: that cross is left out, the 3-way one is in
    assert len(set(three.indices(ex).tolist()) - base) == 2
    # a cross is not the same as its parts
    swapped = {"user_id": "c1", "features": {"category": "u1"}}
    assert set(one.indices(ex).tolist()) != set(one.indices(swapped).tolist())
    with pytest.raises(ValueError):
        FeatureHasher(crosses=[("user_id",)])


def test_batch_is_rows_of_indices():
    h = FeatureHasher(bits=18)
    examples = [TRAINING, scoring_request(), {"user_id": "u2"}, {}]
    indptr, indices = h.batch(examples)
    assert indptr.tolist()[0] == 0 and len(indptr) == len(examples) + 1
    for k, ex in enumerate(examples):
        assert np.array_equal(indices[indptr[k] : indptr[k + 1]], h.indices(ex))
    empty_ptr, empty = h.batch([])
    assert empty_ptr.tolist() == [0] and len(empty) == 0


def test_batch_vector_path_gives_each_example_its_own_indices():
    # Counts all ints take the vector path; any float, string, None or negative count sends
    # the batch through the per-example one. Either way a row is indices() of its example.
    rng = np.random.default_rng(3)
    h = FeatureHasher(bits=12)  # small: collisions between fields and counts happen
    names = ["imp_5m", "clk_5m", "imp_1h", "clk_1h", "imp_1d", "clk_1d"]

    def ex(k, **odd):
        c = {e: {n: int(rng.integers(0, 1 << int(rng.integers(0, 40)))) for n in names}
             for e in ("user", "item", "category", "user_category")}
        del c["item"]["clk_1d"]  # a missing count
        if k % 3 == 0:
            del c["category"]  # a missing entity
        c["user"].update(odd)
        return {"user_id": f"u{k % 7}", "item_id": f"i{k % 5}", "counts": c,
                "features": {"category": f"c{k % 3}", "position": k % 10, "hour": 2.0}}

    ints = [ex(k) for k in range(300)] + [ex(300, imp_5m=(1 << 53) - 1), ex(301, imp_5m=True)]
    assert h.count_values(ints) is not None
    for odd in ({}, {"imp_5m": 3.0}, {"imp_5m": "7"}, {"imp_5m": -1}, {"imp_5m": 1 << 60}):
        batch = ints + [ex(400, **odd)]
        assert (h.count_values(batch) is None) == bool(odd)
        indptr, indices = h.batch(batch)
        for k, e in enumerate(batch):
            assert np.array_equal(indices[indptr[k]:indptr[k + 1]], h.indices(e)), (k, odd)


def test_bits_and_ctr_buckets():
    from features.derived import BetaPrior

    with pytest.raises(ValueError):
        FeatureHasher(bits=33)
    h = FeatureHasher(ctr_prior=BetaPrior.from_ctr(0.03))
    plain = FeatureHasher()
    x = h.indices(TRAINING)
    assert len(x) == len(plain.indices(TRAINING)) + 5 * 3  # a bucket per entity and window
    hot = {"counts": {"item": {"imp_1h": 1000, "clk_1h": 300}}}
    cold = {"counts": {"item": {"imp_1h": 1000, "clk_1h": 1}}}
    assert not np.array_equal(h.indices(hot), h.indices(cold))


@pytest.mark.parametrize("context", [
    {"device": "mobile", "position": 2, "hour": 20},
    {"device": "tv", "position": 2.0, "category": "c-ctx"},  # the context's category wins
    {"device": None, "hour": "7"},  # a None field: no feature, no cross, the item's unread
    {},
])
def test_request_batch_is_batch_of_the_requests_examples(context):
    crosses = [("user_id", "category"), ("item_id", "position"), ("device", "hour"),
               ("user_id", "device"), ("category", "item_id", "hour")]
    h = FeatureHasher(bits=10, crosses=crosses)  # small: collisions happen
    names = ["imp_5m", "clk_5m", "imp_1h", "clk_1h", "imp_24h", "clk_24h"]
    rng = np.random.default_rng(len(context))
    items = [f"i{k}" for k in range(40)]
    attrs = [{"category": f"c{k % 3}", "brand": k % 4} if k % 5 else
             {"device": "desktop"} if k % 2 else {} for k in range(40)]
    attrs[7] = {"category": None, "position": 9}
    examples = [{"user_id": "u3", "item_id": i, "features": {**a, **context},
                 "counts": {e: {n: int(rng.integers(0, 1 << 20)) for n in names}
                            for e in ("user", "item", "category", "user_category",
                                      "item_position")}}
                for i, a in zip(items, attrs, strict=True)]
    uniform = [k for k in range(40) if k % 5 and k != 7]  # every item every attribute
    for ks in (range(40), uniform):
        batch = [examples[k] for k in ks]
        want = h.batch(batch)
        got = h.request_batch("u3", [items[k] for k in ks], [attrs[k] for k in ks], context,
                              h.count_values(batch))
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    counts = h.count_values(examples)
    with pytest.raises(ValueError, match="ctr_prior"):
        from features.derived import BetaPrior
        FeatureHasher(ctr_prior=BetaPrior(1, 30)).request_batch("u", [], [], {}, counts[:0])
