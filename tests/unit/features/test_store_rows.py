"""The packed row layout, without Redis: what `FeatureStore.pack` writes, its readers decode
to the same values, and rows of other versions or lengths read as documented."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from features.store import FeatureStore, SchemaMismatch, row_ts

NAMES = ["imp_5m", "clk_5m", "imp_1h"]
INT64 = st.integers(-(2**63), 2**63 - 1)


def store(version: int = 2, names: list[str] = NAMES) -> FeatureStore:
    # a client that is never connected: these tests only pack and decode bytes
    return FeatureStore(redis.Redis(port=1), feature_names=names, schema_version=version)


@given(st.lists(st.tuples(st.fixed_dictionaries({}, optional=dict.fromkeys(NAMES, INT64)),
                          INT64), max_size=50))
def test_what_is_packed_decodes_to_the_same_values(rows):
    s = store()
    raw = [s.pack(values, ts) for values, ts in rows]
    assert all(len(r) == 8 * (len(NAMES) + 2) for r in raw)
    assert [row_ts(r) for r in raw] == [ts for _, ts in rows]
    assert s._rows(raw) == [{"_ts": ts, **{n: values.get(n, 0) for n in NAMES},
                             "_missing": False} for values, ts in rows]


def test_the_layout_is_version_ts_then_features_in_order():
    raw = store().pack({"imp_1h": 9, "imp_5m": 4}, 1_700_000_000_000)
    assert struct.unpack("<5q", raw) == (2, 1_700_000_000_000, 4, 0, 9)


def test_absent_older_and_malformed_rows_read_as_missing():
    s = store()
    missing = {"_ts": None, **dict.fromkeys(NAMES, 0), "_missing": True}
    good = s.pack({"clk_5m": 1}, 5)
    rows = s._rows([None, good, store(version=1).pack({"clk_5m": 1}, 5), b"", b"xyz",
                    struct.pack("<3q", 1, 5, 1)])
    assert rows == [missing, {**missing, "_ts": 5, "clk_5m": 1, "_missing": False},
                    missing, missing, missing, missing]
    rows[0]["imp_5m"] = 3  # each missing row is its own dict
    assert s._rows([None])[0]["imp_5m"] == 0


def test_newer_rows_and_rows_of_other_names_raise():
    s = store()
    with pytest.raises(SchemaMismatch, match="a row has schema version 3"):
        s._rows([s.pack({}, 1), store(version=3).pack({}, 1)])
    with pytest.raises(SchemaMismatch, match="has 1 values, this reader expects 3"):
        s._rows([store(names=["imp_5m"]).pack({}, 1)])


@pytest.mark.parametrize("value", [0.5, 1.0, "1", None, True])
def test_values_that_are_not_ints_are_refused(value):
    with pytest.raises(ValueError, match="imp_5m"):
        store().validate("user", {"imp_5m": value})


def test_ints_outside_int64_are_refused():
    with pytest.raises(ValueError, match="imp_5m"):
        store().pack({"imp_5m": 2**63}, 1)


def test_feature_names_need_not_be_identifiers():
    s = store(names=["it's", 'a "b"', "c\\d"])
    assert s._rows([s.pack({"it's": 1, 'a "b"': 2, "c\\d": 3}, 7)]) == [
        {"_ts": 7, "it's": 1, 'a "b"': 2, "c\\d": 3, "_missing": False}]


def test_decode_counts_is_decode_pairs_as_an_array():
    s = store()
    meta = [b"2", b'["imp_5m", "clk_5m", "imp_1h"]', b"i64le"]
    raw = [s.pack({"imp_5m": 4, "imp_1h": 2**40}, 5), None,
           store(version=1).pack({"clk_5m": 1}, 5), b"xyz", s.pack({"clk_5m": -3}, 7)]
    counts = s.decode_counts([meta, raw])
    assert counts.dtype == np.int64 and counts.tolist() == [
        [r[n] for n in NAMES] for r in s.decode_pairs([meta, raw])]
    assert counts.tolist() == [[4, 0, 2**40], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, -3, 0]]
    assert s.decode_counts([meta]).shape == (0, 3)
    with pytest.raises(SchemaMismatch, match="a row has schema version 3"):
        s.decode_counts([meta, [store(version=3).pack({}, 1)]])
    with pytest.raises(SchemaMismatch, match="schema version 1, this reader expects 2"):
        s.decode_counts([[b"1", meta[1], meta[2]], []])
