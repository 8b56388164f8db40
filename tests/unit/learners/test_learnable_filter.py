"""The retrain's column filter (learners/retrain.py `learnable`) decides as the one rule,
``joiner.events.why_not_learnable``, does on the same archived rows decoded (`to_examples`):
on a corpus of edge cases, and on random records."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from joiner.events import why_not_learnable
from learners.archive import ExampleArchive, to_examples
from learners.retrain import learnable

TS = 1_700_000_000_000  # 2023-11-14
DAY = "2023-11-14"
COUNTS = {"user": {"imp_5m": 3, "clk_5m": 0}, "item": {"imp_1h": 7.5}}


def ex(k: int, **over) -> dict:
    e = {"impression_id": f"i{k}", "ts": TS + k, "user_id": "u1", "item_id": "v1",
         "features": {"device": "mobile", "position": 2}, "counts": COUNTS, "label": k % 2}
    e.update(over)
    return {key: v for key, v in e.items() if v is not DROP}


DROP = object()

EDGE_CASES = [
    {}, {"quarantined": True}, {"quarantined": False}, {"label": None}, {"label": DROP},
    {"impression_id": ""}, {"user_id": None}, {"item_id": 42}, {"user_id": ""},
    {"features": DROP}, {"features": {}}, {"features": None}, {"features": "x"},
    {"features": [1, 2]}, {"features": {"a": True}}, {"features": {"a": None}},
    {"features": {"a": {"b": 1}}}, {"features": {"a": [1]}}, {"features": {"a": math.nan}},
    {"features": {"a": -0.0, "b": -3, "c": 1e300, "d": -1.5e-7, "e": 0}},
    {"features": {'q"uote': 'back\\slash "x"', "nl\n": "\u00e9\u4e2d\U0001f600", "": ""}},
    {"counts": DROP}, {"counts": {}}, {"counts": None}, {"counts": {"user": {}}},
    {"counts": {"user": {"imp_5m": -1}}}, {"counts": {"user": {"imp_5m": -0.0}}},
    {"counts": {"user": {"imp_5m": 0}}}, {"counts": {"user": {"imp_5m": 1e300}}},
    {"counts": {"user": {"imp_5m": 2.5e-300}}}, {"counts": {"user": {"imp_5m": True}}},
    {"counts": {"user": {"imp_5m": "3"}}}, {"counts": {"user": {"imp_5m": None}}},
    {"counts": {"user": {"imp_5m": math.inf}}}, {"counts": {"user": {"imp_5m": {"x": 1}}}},
    {"counts": {"user": [1]}}, {"counts": {"user": 3}}, {"counts": [1]}, {"counts": "x"},
    {"counts": {'e"n\\t': {"n\u00e9": 1}, "other": {"a": 0.5, "b": 2}}},
    {"label": 1, "quarantined": True, "counts": {"user": {"imp_5m": -2}}},
]


def agree(archive: ExampleArchive) -> int:
    t = archive.read_day(DAY)
    mask = learnable(t).to_pylist()
    rule = [why_not_learnable(e) is None for e in to_examples(t)]
    assert mask == rule, [(e, m) for e, m, r in zip(to_examples(t), mask, rule, strict=True)
                          if m != r]
    return sum(mask)


def test_filter_and_rule_agree_on_edge_cases(tmp_path):
    a = ExampleArchive(tmp_path, fsync=False)
    a.append([ex(k, **over) for k, over in enumerate(EDGE_CASES)])
    a.append_corrections([{"kind": "late_click", "impression_id": "i0", "ts": TS,
                           "click_ts": TS + 10}])  # a negative made positive
    assert a.read_day(DAY).num_rows == len(EDGE_CASES)
    kept = agree(a)
    assert 0 < kept < len(EDGE_CASES)


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=2), st.dictionaries(st.text(max_size=3), inner, max_size=2)),
    max_leaves=4)
good_features = st.dictionaries(st.text(max_size=3), st.one_of(
    st.text(max_size=4), st.integers(-5, 2**40), st.floats(allow_nan=False,
                                                           allow_infinity=False)), max_size=3)
good_counts = st.dictionaries(st.text(max_size=3), st.dictionaries(st.text(max_size=3), st.one_of(
    st.integers(0, 2**40), st.floats(min_value=0, allow_infinity=False), st.just(-0.0)),
    max_size=3), max_size=3)
any_counts = st.dictionaries(st.text(max_size=3), st.one_of(json_value, st.dictionaries(
    st.text(max_size=3), json_value, max_size=3)), max_size=3)
some_id = st.one_of(*[st.text(max_size=3)] * 4, st.none())


def often(good, bad):
    return st.one_of(*[good] * 4, bad)


# Mostly well-formed, each field sometimes not: both answers come up.
records = st.fixed_dictionaries({
    "impression_id": st.sampled_from(["unique"] * 8 + ["", None]),
    "user_id": some_id, "item_id": some_id,
    "features": often(good_features, json_value),
    "counts": often(good_counts, st.one_of(any_counts, json_value)),
    "label": often(st.sampled_from([0, 1]), st.one_of(st.none(), st.integers(-1, 2))),
    "quarantined": often(st.just(False), st.one_of(st.booleans(), st.none(),
                                                   st.integers(0, 1)))})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(records, min_size=1, max_size=30))
def test_filter_and_rule_agree_on_random_records(tmp_path_factory, batch):
    a = ExampleArchive(tmp_path_factory.mktemp("a"), fsync=False)
    # ts is what puts a record in a day: the archive refuses a record without one.
    a.append([{**r, "ts": TS + k, "impression_id": f"r{k}" if r["impression_id"] == "unique"
               else r["impression_id"]} for k, r in enumerate(batch)])
    if DAY in a.days():
        agree(a)
