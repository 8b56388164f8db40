"""Bad input: a named corpus of malformed messages, and fuzzing of the parsers and the joiner.

Every message either has its effect (an example, a joined/late/orphan/duplicate click, a
duplicate impression) or becomes a `dead-letters` record with a reason; nothing raises, and the
joiner's conservation counters balance. The corpus runs twice: through ``WaitWindowJoiner``
in-process, and produced to the real broker and read back after the join flow has run.

Contracts the corpus pins down (beyond the ones in README.md):

* a message is at most ``MAX_MESSAGE_BYTES`` (64 KiB, exactly that is fine); a larger one is a
  dead letter whose record keeps the first ``MAX_DEAD_RAW_BYTES`` (128 KiB) of it, so that the
  record fits a Kafka message after JSON escaping;
* feature values are strings or numbers: a nested object, a list, a bool or null is a dead
  letter (the count features and the learners' hashing expect scalars);
* NaN, Infinity and numbers that overflow a double are not JSON: "invalid JSON";
* ids may be JSON integers (stringified: ``7`` joins ``"7"``); ts must be a JSON integer
  in 1 .. 9999-12-31, and within ``max_future_ms``/``max_past_ms`` of the wall clock;
* unknown top-level fields are accepted and dropped from the example (an input ``"label"``
  cannot leak into the output); ``features`` may be absent (``{}``) but not null;
* duplicate JSON keys: the last wins (orjson), for the id the joiner keys on and for the
  example as any usual parser reads it;
* a repeated impression id is a duplicate whatever its content: the first copy wins;
* the Kafka key must equal the impression_id (it is what co-partitions an impression with its
  clicks). ``WaitWindowJoiner`` checks it when given the key; the flow does not pass it yet
  (see ``_flow_passes_keys``), so there such messages are processed in whatever partition
  their key chose.
"""

from __future__ import annotations

import base64
import inspect
import json
import math
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from joiner.events import (
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_TS_MS,
    BadEvent,
    Click,
    Impression,
    parse_click,
    parse_impression,
    parse_impression_payload,
)
from joiner.join import (
    CLICKS,
    DEAD_LETTER,
    EXAMPLE,
    IMPRESSIONS,
    LATE_CLICK,
    MAX_DEAD_RAW_BYTES,
    NO_KEY,
    WaitWindowJoiner,
)
from tests.tally import row as tally_row

IMP, CLK = IMPRESSIONS, CLICKS
W = 10 * 60_000  # wait window
HOLD = 5 * 60_000  # early-click hold
HORIZON = 2 * 3_600_000  # late-click horizon
MAX_FUTURE = 3_600_000
MAX_PAST = 30 * 86_400_000
DAY = 86_400_000


def _flow_passes_keys() -> bool:
    """Whether the join flow hands the joiner each message's Kafka key (its ``on_message``
    takes a ``key``); if so, the key cases are dead letters on the broker too."""
    from flows.join import _JoinPartition

    return "key" in inspect.signature(_JoinPartition.on_message).parameters

# Outcomes: where a message lands in the joiner's counters.
DEAD = "dead_letter"
EMITTED = "emitted"  # impression -> one example
IMP_DUP = "impression_duplicate"
JOINED = "joined"  # click -> its impression's example has label 1 and this click_ts
LATE = "late"  # click -> a late_click record
ORPHAN = "orphan"
CLK_DUP = "click_duplicate"

COUNTED = {"corpus_unit": 0, "unit_events": 0, "unit_accounted": 0, "fuzzed": 0,
           "crashes": 0, "corpus_flow": 0, "flow_events": 0, "flow_accounted": 0}


@pytest.fixture(scope="module", autouse=True)
def _summary():
    """What this module counted, as rows of the reliability table (tests/tally.py)."""
    yield
    c = COUNTED
    for name, malformed, events, accounted in (
            ("bad input: corpus through the joiner", c["corpus_unit"], c["unit_events"],
             c["unit_accounted"]),
            ("bad input: fuzzed parsers and joiner", c["fuzzed"], c["fuzzed"],
             c["fuzzed"] - c["crashes"]),
            ("bad input: corpus on the broker", c["corpus_flow"], c["flow_events"],
             c["flow_accounted"])):
        if events:
            row = tally_row(name)
            row.malformed, row.events_in, row.accounted = malformed, events, accounted
            row.lost = events - accounted


# -- the corpus -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    topic: str  # IMP or CLK
    raw: bytes | None  # None: a message with a null value (a tombstone)
    expect: str  # one of the outcomes above
    reason: str = ""  # a substring of the dead-letter reason
    key: bytes | None = b""  # the Kafka key
    at: int = 0  # position in event time: each topic is produced in this order
    iid: str | None = None  # the id the joiner sees, for messages that parse
    ts: int | None = None  # their ts
    label: int | None = None  # EMITTED: the expected label
    user_id: str | None = None  # EMITTED: the expected user_id (first copy wins)
    unkeyed: str | None = None  # the outcome when the consumer does not check keys


def _imp(iid="x", ts=0, **kw) -> dict:
    d = {"impression_id": iid, "ts": ts, "user_id": "u1", "item_id": "i1",
         "features": {"category": "c1", "device": "mobile", "position": 2}}
    d.update(kw)
    return d


def _drop(d: dict, name: str) -> dict:
    return {k: v for k, v in d.items() if k != name}


def _j(obj) -> bytes:
    return orjson.dumps(obj)


def _exact_size(iid: str, ts: int, size: int) -> bytes:
    """A valid impression of exactly ``size`` bytes."""
    raw = _j(_imp(iid, ts, features={"pad": ""}))
    raw = _j(_imp(iid, ts, features={"pad": "p" * (size - len(raw))}))
    assert len(raw) == size
    return raw


_AUTO = object()
# Incompressible, so that it is 2 MB on the wire too (the producer compresses).
BLOB_2MB = base64.b64encode(random.Random(0).randbytes(1_500_000)).decode()


def corpus(base_ms: int, now_ms: int) -> list[Case]:
    """The corpus for a stream whose event time starts near ``base_ms``, judged at the wall
    clock ``now_ms`` (max_future/max_past as in the join's default config)."""
    cases: list[Case] = []
    clock = [base_ms]

    def tick() -> int:
        clock[0] += 1000
        return clock[0]

    def add(name, topic, raw, expect, reason="", *, key=_AUTO, iid=None, ts=None, at=None,
            **kw) -> Case:
        at = at if at is not None else (ts if ts is not None else tick())
        if key is _AUTO:  # keyed as a producer would: by the id, if the message has one
            try:
                key = (iid or (parse_impression if topic == IMP else parse_click)(raw)
                       .impression_id).encode()
            except (BadEvent, TypeError):  # TypeError: a null value, on a parser that crashes
                key = f"bad-{name}".encode()
        case = Case(name, topic, raw, expect, reason, key, at, iid, ts, **kw)
        cases.append(case)
        return case

    def bad_imp(name, raw, reason):
        add(f"imp_{name}", IMP, raw, DEAD, reason)

    def bad_clk(name, raw, reason):
        add(f"clk_{name}", CLK, raw, DEAD, reason)

    def good_imp(name, iid, ts=None, raw=None, label=0, user_id="u1", **kw):
        ts = ts if ts is not None else tick()
        raw = raw if raw is not None else _j(_imp(iid, ts))
        return add(f"imp_{name}", IMP, raw, EMITTED, iid=iid, ts=ts, label=label,
                   user_id=user_id, **kw)

    def click(name, iid, ts, expect, raw=None, **kw):
        raw = raw if raw is not None else _j({"impression_id": iid, "ts": ts})
        return add(f"clk_{name}", CLK, raw, expect, iid=iid, ts=ts, **kw)

    t = tick()
    ok = _imp("ok", t)
    okc = {"impression_id": "ok", "ts": t}
    inv = "invalid JSON"

    # Encoding and syntax. orjson rejects NaN, Infinity and numbers beyond a double.
    for add_bad, good in ((bad_imp, ok), (bad_clk, okc)):
        text = _j(good)
        add_bad("invalid_utf8_bytes", b"\xff\xfe\xfd\x80garbage", inv)
        add_bad("invalid_utf8_in_string", text.replace(b'"ok"', b'"o\xffk"'), inv)
        add_bad("overlong_utf8", text.replace(b'"ok"', b'"\xc0\xafk"'), inv)
        add_bad("lone_surrogate_escape", text.replace(b'"ok"', b'"\\ud800"'), inv)
        add_bad("latin1", text.replace(b'"ok"', '"ök"'.encode("latin-1")), inv)
        add_bad("utf16", text.decode().encode("utf-16"), inv)
        add_bad("utf8_bom", b"\xef\xbb\xbf" + text, inv)
        add_bad("truncated", text[:-7], inv)
        add_bad("truncated_to_brace", text[:1], inv)
        add_bad("empty", b"", inv)
        add_bad("whitespace", b" \n\t ", inv)
        add_bad("trailing_garbage", text + b"x", inv)
        add_bad("two_objects", text + text, inv)
        add_bad("single_quotes", text.replace(b'"', b"'"), inv)
        add_bad("nan_ts", text.replace(str(t).encode(), b"NaN"), inv)
        add_bad("infinity_ts", text.replace(str(t).encode(), b"Infinity"), inv)
        add_bad("minus_infinity_ts", text.replace(str(t).encode(), b"-Infinity"), inv)
        add_bad("ts_overflows_double", text.replace(str(t).encode(), b"1" * 400), inv)
        add_bad("ts_1e400", text.replace(str(t).encode(), b"1e400"), inv)
        add_bad("nesting_2000_deep", b'{"deep":' + b"[" * 2000 + b"]" * 2000 + b"}", inv)
        add_bad("null_value", None, "no value")
        # Not an object.
        add_bad("json_list", _j([good]), "expected a JSON object, got list")
        add_bad("json_string", b'"ok"', "expected a JSON object, got str")
        add_bad("json_int", b"17", "expected a JSON object, got int")
        add_bad("json_float", b"1.5", "expected a JSON object, got float")
        add_bad("json_null", b"null", "expected a JSON object, got NoneType")
        add_bad("json_true", b"true", "expected a JSON object, got bool")
        add_bad("json_empty_object", b"{}", "missing field 'impression_id'")
        # ts: missing, mistyped, out of range.
        add_bad("ts_missing", _j(_drop(good, "ts")), "missing field 'ts'")
        add_bad("ts_null", _j({**good, "ts": None}), "missing field 'ts'")
        for what, v in (("str", str(t)), ("float", t + 0.5), ("bool", True), ("list", [t]),
                        ("dict", {"ms": t})):
            add_bad(f"ts_{what}", _j({**good, "ts": v}), "'ts' must be integer milliseconds")
        add_bad("ts_integral_float", f'{{"impression_id": "ok", "ts": {t}.0}}'.encode(),
                "got float")
        add_bad("ts_exponent", b'{"impression_id": "ok", "ts": 1.7e12}', "got float")
        add_bad("ts_zero", _j({**good, "ts": 0}), "must be positive, got 0")
        add_bad("ts_negative", _j({**good, "ts": -t}), "must be positive")
        add_bad("ts_int64_max", _j({**good, "ts": 2**63 - 1}), "at most")
        add_bad("ts_uint64_max", _j({**good, "ts": 2**64 - 1}), "at most")
        add_bad("ts_beyond_uint64", f'{{"impression_id": "ok", "ts": {2**64}}}'.encode(),
                "got float")
        add_bad("ts_year_10000", _j({**good, "ts": MAX_TS_MS + 1}), "at most")
        add_bad("ts_year_3000", _j({**good, "ts": 32_503_680_000_000}), "in the future")
        add_bad("ts_2h_ahead", _j({**good, "ts": now_ms + 2 * 3_600_000}), "in the future")
        add_bad("ts_1970", _j({**good, "ts": 1000}), "days in the past")
        add_bad("ts_1ms", _j({**good, "ts": 1}), "days in the past")
        add_bad("ts_31_days_old", _j({**good, "ts": now_ms - 31 * DAY}), "days in the past")
        # impression_id: missing, mistyped, empty, too long.
        add_bad("id_missing", _j(_drop(good, "impression_id")), "missing field 'impression_id'")
        add_bad("id_null", _j({**good, "impression_id": None}), "missing field 'impression_id'")
        for what, v in (("float", 1.5), ("bool", False), ("list", ["ok"]), ("dict", {"a": 1}),
                        ("big_float", 2.0**70)):
            add_bad(f"id_{what}", _j({**good, "impression_id": v}),
                    "'impression_id' must be a string, got")
        add_bad("id_empty", _j({**good, "impression_id": ""}), "must have 1..128 characters")
        add_bad("id_too_long", _j({**good, "impression_id": "x" * (MAX_ID_CHARS + 1)}),
                "must have 1..128 characters, got 129")
        add_bad("id_huge", _j({**good, "impression_id": "x" * 60_000}), "1..128 characters")
        # Oversized.
        add_bad("oversized_2mb", _j({**good, "features": {"blob": BLOB_2MB}}),
                f"exceeds {MAX_MESSAGE_BYTES}")
        add_bad("oversized_one_byte", _exact_size("ok", t, MAX_MESSAGE_BYTES + 1),
                f"message of {MAX_MESSAGE_BYTES + 1} bytes exceeds")
        # Escapes to 6x its size as JSON text: the dead letter must still fit a Kafka record.
        add_bad("oversized_control_chars", b"\x01" * 900_000, "exceeds")

    # Impressions only: user_id, item_id, features.
    for field_ in ("user_id", "item_id"):
        bad_imp(f"{field_}_missing", _j(_drop(ok, field_)), f"missing field '{field_}'")
        bad_imp(f"{field_}_null", _j({**ok, field_: None}), f"missing field '{field_}'")
        bad_imp(f"{field_}_float", _j({**ok, field_: 3.25}), f"'{field_}' must be a string")
        bad_imp(f"{field_}_bool", _j({**ok, field_: True}), f"'{field_}' must be a string")
        bad_imp(f"{field_}_list", _j({**ok, field_: ["u"]}), f"'{field_}' must be a string")
        bad_imp(f"{field_}_empty", _j({**ok, field_: ""}), f"'{field_}' must have 1..128")
        bad_imp(f"{field_}_too_long", _j({**ok, field_: "u" * 129}),
                f"'{field_}' must have 1..128")
    for what, v in (("list", [1, 2]), ("str", "cat=c1"), ("int", 3), ("null", None)):
        bad_imp(f"features_{what}", _j({**ok, "features": v}), "'features' must be an object")
    for what, v, typ in (("nested_object", {"a": 1}, "dict"), ("list", ["x", "y"], "list"),
                         ("bool", True, "bool"), ("null", None, "NoneType")):
        bad_imp(f"feature_{what}", _j({**ok, "features": {"device": "m", "ctx": v}}),
                f"feature 'ctx' must be a string or number, got {typ}")
    bad_imp("feature_nan", _j(ok).replace(b'"position":2', b'"position":NaN'), inv)
    bad_imp("feature_infinity", _j(ok).replace(b'"position":2', b'"position":Infinity'), inv)
    bad_imp("feature_1e999", _j(ok).replace(b'"position":2', b'"position":1e999'), inv)

    # Processed impressions, each with what the joiner must make of it.
    ts = tick()
    good_imp("features_absent", "p-nofeat", ts=ts,
             raw=_j(_drop(_imp("p-nofeat", ts), "features")))
    good_imp("features_empty", "p-emptyfeat", ts=ts + 1,
             raw=_j(_imp("p-emptyfeat", ts + 1, features={})))
    ts = tick()
    good_imp("feature_scalars", "p-scalars", ts=ts, raw=_j(_imp(
        "p-scalars", ts, features={"s": "x", "i": -3, "f": 0.25, "big": 2**64 - 1,
                                   "neg0": -0.0, "tiny": 5e-324, "unicode": "日本語 ✓"})))
    ts = tick()
    good_imp("feature_many_keys", "p-manykeys", ts=ts,
             raw=_j(_imp("p-manykeys", ts, features={f"f{k}": k for k in range(2000)})))
    ts = tick()
    good_imp("exactly_max_size", "p-maxsize", ts=ts,
             raw=_exact_size("p-maxsize", ts, MAX_MESSAGE_BYTES))
    ts = tick()
    # Unknown fields are dropped; an input "label"/"kind" must not leak into the example.
    good_imp("unknown_fields", "p-unknown", ts=ts, raw=_j(_imp(
        "p-unknown", ts, label=1, kind="late_click", click_ts=ts, campaign="c9",
        meta={"a": [1, {"b": None}], "c": {"d": [True, 1.5, "e"]}})))
    ts = tick()
    good_imp("unknown_field_1000_deep", "p-deep1000", ts=ts, raw=_j(
        _imp("p-deep1000", ts)).replace(b'"features"', b'"deep":' + b"[" * 1000
                                        + b"]" * 1000 + b',"features"'))
    ts = tick()
    good_imp("whitespace_and_order", "p-spaced", ts=ts, raw=json.dumps(
        dict(reversed(list(_imp("p-spaced", ts).items()))), indent=2).encode() + b"\n")
    ts = tick()
    good_imp("unicode_ids", "ü-日本-🎉", ts=ts, user_id="ユーザー",
             raw=_j(_imp("ü-日本-🎉", ts, user_id="ユーザー")))
    ts = tick()
    good_imp("ids_as_integers", "424242", ts=ts, user_id="7",
             raw=_j(_imp(424242, ts, user_id=7, item_id=-3)), label=1)
    click("joins_integer_id", "424242", ts + 5000, JOINED,
          raw=_j({"impression_id": "424242", "ts": ts + 5000}))
    ts = tick()
    # Duplicate JSON keys: orjson keeps the last, for the id and in the example's bytes.
    good_imp("duplicate_json_keys", "p-dupkey-b", ts=ts, user_id="u-last",
             raw=(b'{"impression_id":"p-dupkey-a","ts":%d,"user_id":"u-first","item_id":"i1",'
                  b'"features":{},"impression_id":"p-dupkey-b","user_id":"u-last"}' % ts))
    # Repeated ids with conflicting content: the first copy wins, the rest are duplicates.
    ts = tick()
    good_imp("dup_first", "p-dup", ts=ts, user_id="u-first", label=1,
             raw=_j(_imp("p-dup", ts, user_id="u-first")))
    add("imp_dup_conflicting", IMP, _j(_imp("p-dup", ts + 500, user_id="u-second",
                                            item_id="i9", features={"category": "zz"})),
        IMP_DUP, iid="p-dup", ts=ts + 500)
    add("imp_dup_identical", IMP, _j(_imp("p-dup", ts, user_id="u-first")), IMP_DUP,
        iid="p-dup", ts=ts, at=ts + 501)
    add("imp_dup_unknown_fields", IMP, _j(_imp("p-dup", ts, user_id="u-first", x=1)), IMP_DUP,
        iid="p-dup", ts=ts, at=ts + 502)
    click("joins_first_copy", "p-dup", ts + 2000, JOINED)
    # A bad first copy does not block a good second one.
    ts = tick()
    add("imp_bad_then_good_bad", IMP, _j(_imp("p-2nd", "soon")), DEAD, "'ts' must be integer",
        key=b"p-2nd", at=ts)
    good_imp("bad_then_good_good", "p-2nd", ts=ts + 1)
    # Times: far past and near future, but inside the accepted range.
    ts = tick()
    good_imp("29_days_old", "p-old", ts=now_ms - 29 * DAY, at=ts,
             raw=_j(_imp("p-old", now_ms - 29 * DAY)))
    # Key not the impression_id: a dead letter when the key is checked.
    ts = tick()
    add("imp_key_mismatch", IMP, _j(_imp("p-wrongkey", ts)), DEAD, "does not match impression_id",
        key=b"someone-else", iid="p-wrongkey", ts=ts, label=0, user_id="u1", unkeyed=EMITTED)
    ts = tick()
    add("imp_key_missing", IMP, _j(_imp("p-nokey", ts)), DEAD, "has no key", key=None,
        iid="p-nokey", ts=ts, label=0, user_id="u1", unkeyed=EMITTED)
    ts = tick()
    add("clk_key_mismatch", CLK, _j({"impression_id": "ghost-key", "ts": ts}), DEAD,
        "does not match impression_id", key=b"ghost-other", iid="ghost-key", ts=ts,
        unkeyed=ORPHAN)

    # Clicks that parse: joined, skewed, duplicate, late, orphan, with unknown fields.
    ts = tick()
    good_imp("clicked", "p-click", ts=ts, label=1)
    click("inside_window", "p-click", ts + 60_000, JOINED)
    click("second_click", "p-click", ts + 61_000, CLK_DUP)
    click("same_click_again", "p-click", ts + 60_000, CLK_DUP, at=ts + 61_001)
    ts = tick()
    good_imp("click_at_window_end", "p-edge", ts=ts, label=1)
    click("exactly_window_end", "p-edge", ts + W, JOINED)
    ts = tick()
    good_imp("skewed_click", "p-skew", ts=ts, label=1)
    click("before_impression_ts", "p-skew", ts - 700, JOINED)
    ts = tick()
    good_imp("late_click", "p-late", ts=ts, label=0)
    click("after_window", "p-late", ts + W + 1, LATE)
    click("after_late", "p-late", ts + W + 5000, CLK_DUP)
    ts = tick()
    good_imp("click_extra_fields", "p-xclick", ts=ts, label=1)
    click("extra_fields", "p-xclick", ts + 3000, JOINED,
          raw=_j({"impression_id": "p-xclick", "ts": ts + 3000, "label": 0, "x": [1, {}],
                  "user_id": 5, "features": "whatever"}))
    click("unknown_id", "ghost-1", tick(), ORPHAN)
    click("unknown_id_again", "ghost-1", tick(), ORPHAN)
    click("integer_unknown_id", "99999999", tick(), ORPHAN,
          raw=_j({"impression_id": 99999999, "ts": clock[0]}))
    click("id_unicode", "ghost-ü", tick(), ORPHAN)
    # Kept last in both topics: the near future moves the stream's event time ahead.
    ts = now_ms + 30 * 60_000
    end = tick() + 2 * HORIZON
    good_imp("30_min_ahead", "p-future", ts=ts, at=end, raw=_j(_imp("p-future", ts)))
    click("30_min_ahead", "ghost-future", ts, ORPHAN, at=end)
    return cases


def _accepted(case: Case, keys_checked: bool) -> str:
    return case.unkeyed if (case.unkeyed and not keys_checked) else case.expect


def valid_stream(base_ms: int, n: int = 300) -> list[Case]:
    """A plain stream of good impressions, a fifth of them clicked, a few late."""
    out = []
    for k in range(n):
        iid, ts = f"v{k:04d}", base_ms + 500 * k
        label = int(k % 5 == 0)
        out.append(Case(f"valid_imp_{k}", IMP, _j(_imp(iid, ts, user_id=f"u{k % 17}")),
                        EMITTED, key=iid.encode(), at=ts, iid=iid, ts=ts, label=label))
        if label:
            c_ts = ts + (k * 7919) % W
            out.append(Case(f"valid_clk_{k}", CLK, _j({"impression_id": iid, "ts": c_ts}),
                            JOINED, key=iid.encode(), at=c_ts, iid=iid, ts=c_ts))
        elif k % 50 == 1:
            c_ts = ts + W + 30_000
            out.append(Case(f"valid_late_{k}", CLK, _j({"impression_id": iid, "ts": c_ts}),
                            LATE, key=iid.encode(), at=c_ts, iid=iid, ts=c_ts))
    return out


def ordered(cases: list[Case]) -> list[Case]:
    """Each topic in event-time order, the two interleaved by it (impressions first at a
    tie), as a partition's reader might see them."""
    return sorted(cases, key=lambda c: (c.at, c.topic != IMP))


def test_corpus_covers_every_category_for_both_topics():
    cases = corpus(1_700_000_000_000 - DAY, 1_700_000_000_000)
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    for topic, prefix in ((IMP, "imp_"), (CLK, "clk_")):
        mine = {c.name.removeprefix(prefix) for c in cases if c.topic == topic}
        for category in ("invalid_utf8_bytes", "truncated", "json_list", "json_string",
                         "json_int", "json_null", "ts_missing", "id_missing", "ts_str",
                         "ts_float", "ts_bool", "id_float", "id_empty", "id_too_long",
                         "nan_ts", "infinity_ts", "ts_negative", "ts_year_3000", "ts_1970",
                         "oversized_2mb", "null_value"):
            assert category in mine, (topic, category)
    outcomes = {c.expect for c in cases}
    assert outcomes == {DEAD, EMITTED, IMP_DUP, JOINED, LATE, ORPHAN, CLK_DUP}


# -- unit level: the corpus through WaitWindowJoiner --------------------------------------------

def make_joiner(**kw) -> WaitWindowJoiner:
    kw = {"window_ms": W, "early_click_hold_ms": HOLD, "late_click_horizon_ms": HORIZON,
          "idle_timeout_s": 1e9, "max_future_ms": MAX_FUTURE, "max_past_ms": MAX_PAST, **kw}
    return WaitWindowJoiner(**kw)


def _dead_raw_ok(record_raw, sent: bytes | None) -> bool:
    if sent is None:
        return record_raw is None
    return record_raw == sent[:MAX_DEAD_RAW_BYTES]


def _tally(cases: list[Case], keys_checked: bool) -> dict[tuple[str, str], int]:
    n: dict = {}
    for c in cases:
        k = (c.topic, _accepted(c, keys_checked))
        n[k] = n.get(k, 0) + 1
    return n


def check_outputs(cases: list[Case], examples: dict, late: dict, keys_checked: bool) -> set:
    """Effects of processed messages against the examples (id -> record) and the late-click
    records (id -> record); returns the names of the messages checked (not the dead ones).
    Duplicates and orphans have no record of their own: the counters account for them."""
    checked = set()
    for c in cases:
        outcome = _accepted(c, keys_checked)
        if outcome == DEAD:
            continue
        if outcome == EMITTED:
            ex = examples[c.iid]
            assert ex["ts"] == c.ts, c.name
            assert ex["label"] == c.label, (c.name, ex)
            if c.user_id is not None:
                assert ex["user_id"] == c.user_id, (c.name, ex)
            assert set(ex) >= {"impression_id", "ts", "user_id", "item_id", "features",
                               "kind", "label", "click_ts", "delay_ms", "window_ms"}, c.name
            assert not set(ex) & {"campaign", "meta", "deep", "x"}, (c.name, sorted(ex))
            assert ex["kind"] == "example", c.name
        elif outcome == JOINED:
            ex = examples[c.iid]
            assert ex["label"] == 1 and ex["click_ts"] == c.ts, (c.name, ex)
        elif outcome == LATE:
            assert late[c.iid]["click_ts"] == c.ts, (c.name, late[c.iid])
        elif outcome == ORPHAN:
            assert c.iid not in examples, c.name
        elif outcome in (IMP_DUP, CLK_DUP):
            assert c.iid in examples, c.name  # the original was processed
        checked.add(c.name)
    return checked


@pytest.mark.parametrize("keys_checked", [True, False], ids=["keys", "no-keys"])
def test_corpus_through_the_joiner_each_message_accounted(keys_checked):
    now_ms = 1_750_000_000_000
    base = now_ms - DAY
    bad = corpus(base + 1_000_000, now_ms)
    good = valid_stream(base)
    j = make_joiner()
    out: list = []
    offsets = {IMP: 0, CLK: 0}
    accounted = set()
    for case in ordered(bad + good):
        off = offsets[case.topic]
        offsets[case.topic] += 1
        before = dict(vars(j.counters))
        n_out = len(out)
        call = j.on_impression if case.topic == IMP else j.on_click
        try:
            call(case.raw, off, 0.0, out, wall_ms=now_ms,
                 key=case.key if keys_checked else NO_KEY)
            j.advance(0.0, out)
        except Exception:
            COUNTED["crashes"] += 1
            raise
        new = out[n_out:]
        dead = [v for k, _, v in new if k == DEAD_LETTER]
        delta = {k: v - before[k] for k, v in vars(j.counters).items() if v != before[k]}
        outcome = _accepted(case, keys_checked)
        if outcome == DEAD:
            (d,) = dead
            assert case.reason in d["reason"], (case.name, d["reason"])
            assert d["offset"] == off and d["stream"] == case.topic, case.name
            assert _dead_raw_ok(d["raw"], case.raw), case.name
            accounted.add(case.name)
        else:
            assert not dead, (case.name, dead)
        if outcome == IMP_DUP:
            assert delta.get("impressions_duplicate") == 1, case.name
        if outcome == CLK_DUP:
            assert delta.get("clicks_duplicate") == 1, case.name
        if outcome == LATE:
            assert delta.get("clicks_late") == 1, case.name
        assert j.reconcile() == [], case.name
    j.flush(out)

    c = j.counters
    assert j.reconcile() == [] and j.q.pending_count == 0 and j.held_count == 0
    tally = _tally(bad + good, keys_checked)
    assert c.impressions_in == sum(n for (t, _), n in tally.items() if t == IMP)
    assert c.clicks_in == sum(n for (t, _), n in tally.items() if t == CLK)
    assert c.impressions_dead == tally.get((IMP, DEAD), 0)
    assert c.clicks_dead == tally.get((CLK, DEAD), 0)
    assert c.impressions_emitted == tally[(IMP, EMITTED)]
    assert c.impressions_duplicate == tally[(IMP, IMP_DUP)]
    assert c.clicks_joined == tally[(CLK, JOINED)]
    assert c.clicks_late == tally[(CLK, LATE)]
    assert c.clicks_orphan == tally[(CLK, ORPHAN)]
    assert c.clicks_duplicate == tally[(CLK, CLK_DUP)]

    examples, late = {}, {}
    for kind, key, value in out:
        if kind == EXAMPLE:
            ex = orjson.loads(value)
            assert key == ex["impression_id"] and key not in examples
            examples[key] = ex
        elif kind == LATE_CLICK:
            late[key] = orjson.loads(value)
    assert len(examples) == c.impressions_emitted and len(late) == c.clicks_late
    accounted |= check_outputs(bad + good, examples, late, keys_checked)
    assert accounted == {c.name for c in bad + good}
    dead_records = [v for k, _, v in out if k == DEAD_LETTER]
    assert len(dead_records) == c.impressions_dead + c.clicks_dead
    # events in = examples + dead letters + the counters with no record of their own
    assert c.impressions_in + c.clicks_in == (
        len(examples) + len(dead_records) + c.impressions_duplicate + c.clicks_joined
        + c.clicks_late + c.clicks_duplicate + c.clicks_orphan)
    if keys_checked:
        COUNTED["corpus_unit"] = len(bad)
        COUNTED["unit_events"] = COUNTED["unit_accounted"] = len(accounted)


def test_corpus_dead_letters_parse_the_same_without_a_joiner():
    """The parser alone gives the same reason as the joiner for every message it rejects."""
    now_ms = 1_750_000_000_000
    for case in corpus(now_ms - DAY, now_ms):
        parse = parse_impression if case.topic == IMP else parse_click
        wall_only = any(s in case.reason for s in ("in the future", "days in the past",
                                                   "key", "does not match"))
        if case.expect == DEAD and not wall_only:
            with pytest.raises(BadEvent) as e:
                parse(case.raw)
            assert case.reason in str(e.value), case.name
        elif case.expect != DEAD:
            got = parse(case.raw)
            assert got.impression_id == case.iid and got.ts == case.ts, case.name


# -- fuzzing ------------------------------------------------------------------------------------

FIELDS = frozenset(Impression._fields)


class Unparsable(Exception):
    """What orjson refuses among the values json.dumps writes."""


def orjson_view(v):
    """``v`` as orjson reads it back from ``json.dumps(v)``: integers beyond int64/uint64
    become floats; NaN, infinities and lone surrogates are refused."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        if -(2**63) <= v <= 2**64 - 1:
            return v
        f = float(v)
        if math.isinf(f):
            raise Unparsable
        return f
    if isinstance(v, float):
        if not math.isfinite(v):
            raise Unparsable
        return v
    if isinstance(v, str):
        if any(0xD800 <= ord(ch) <= 0xDFFF for ch in v):
            raise Unparsable
        return v
    if isinstance(v, list):
        return [orjson_view(x) for x in v]
    return {orjson_view(k): orjson_view(x) for k, x in v.items()}


def _oracle_id(obj: dict, name: str) -> str:
    v = obj.get(name)
    if v is None:
        raise BadEvent(f"missing field {name!r}")
    if type(v) is int:
        v = str(v)
    if type(v) is not str:
        raise BadEvent(f"field {name!r} must be a string")
    if not 0 < len(v) <= MAX_ID_CHARS:
        raise BadEvent(f"field {name!r} must have 1..{MAX_ID_CHARS} characters")
    return v


def _oracle_ts(obj: dict) -> int:
    v = obj.get("ts")
    if v is None:
        raise BadEvent("missing field 'ts'")
    if type(v) is not int:
        raise BadEvent("field 'ts' must be integer milliseconds")
    if v > MAX_TS_MS:
        raise BadEvent("field 'ts' must be at most")
    if v <= 0:
        raise BadEvent("field 'ts' must be positive")
    return v


def oracle(value, raw: bytes, topic: str) -> Impression | Click | BadEvent:
    """What the parser must make of ``raw`` = json.dumps(value): the event, or BadEvent with
    the start of the reason. Written from the contract, independently of joiner/events.py."""
    try:
        if len(raw) > MAX_MESSAGE_BYTES:
            raise BadEvent(f"message of {len(raw)} bytes exceeds")
        try:
            obj = orjson_view(value)
        except Unparsable:
            raise BadEvent("invalid JSON") from None
        if type(obj) is not dict:
            raise BadEvent("expected a JSON object")
        iid = _oracle_id(obj, "impression_id")
        ts = _oracle_ts(obj)
        if topic == CLK:
            return Click(iid, ts)
        user, item = _oracle_id(obj, "user_id"), _oracle_id(obj, "item_id")
        feats = obj.get("features", {})
        if type(feats) is not dict:
            raise BadEvent("field 'features' must be an object")
        for k, f in feats.items():
            if type(f) not in (str, int, float):
                raise BadEvent(f"feature {k!r} must be a string or number")
        return Impression(iid, ts, user, item, feats)
    except BadEvent as e:
        return e


SPECIAL_INTS = [0, -1, 1, 2**31, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63),
                -(2**63) - 1, MAX_TS_MS, MAX_TS_MS + 1, 1_750_000_000_000, 10**30]
SPECIAL_STRS = ["", "a" * MAX_ID_CHARS, "a" * (MAX_ID_CHARS + 1), "\ud800", "x\udfffy", "\x00",
                "日本", "🎉", '"', "\\", "NaN", "1750000000000", " "]
scalars = (st.none() | st.booleans()
           | st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from(SPECIAL_INTS)
           | st.floats() | st.sampled_from([float("nan"), float("inf"), -0.0, 5e-324, 1e308])
           | st.text(max_size=12) | st.sampled_from(SPECIAL_STRS))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.sampled_from(sorted(FIELDS)), inner, max_size=4),
    max_leaves=8)
good_ids = st.text(min_size=1, max_size=8) | st.integers(0, 10**6) | st.sampled_from(["a", "b"])
good_values = {
    "impression_id": good_ids, "user_id": good_ids, "item_id": good_ids,
    "ts": st.integers(1, MAX_TS_MS) | st.sampled_from([1, MAX_TS_MS, 1_750_000_000_000]),
    "features": st.dictionaries(st.text(max_size=6), st.text(max_size=6) | st.integers()
                                | st.floats(allow_nan=False, allow_infinity=False),
                                max_size=4),
}

# Values at the edges of each field's contract, drawn often so every boundary is hit.
EDGE_VALUES = {
    "impression_id": ["", "a" * MAX_ID_CHARS, "a" * (MAX_ID_CHARS + 1), 0, -1, 2**64 - 1,
                      2**64, True, 1.5, None, [], {}, "\ud800", " ", "\x00"],
    "ts": [0, -1, 1, MAX_TS_MS, MAX_TS_MS + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
           -(2**63) - 1, True, False, 1.0, 1e300, float("nan"), float("inf"), "5", None, [5]],
    "features": [{}, None, [], "x", 0, {"a": None}, {"a": True}, {"a": {}}, {"a": []},
                 {"a": 2**64}, {"a": -(2**63) - 1}, {"a": float("nan")}, {"a": float("-inf")},
                 {"a": 1e308}, {"": ""}, {"\ud800": 1}],
}


@st.composite
def event_like(draw, topic: str):
    """A dict with the event's fields, each good, missing or anything JSON-ish, plus extras."""
    names = ["impression_id", "ts"] + (["user_id", "item_id", "features"] if topic == IMP
                                       else [])
    d = {}
    for name in draw(st.permutations(names)):
        choice = draw(st.sampled_from(["good"] * 3 + ["missing", "wild", "edge"]))
        if choice == "good":
            d[name] = draw(good_values[name])
        elif choice == "wild":
            d[name] = draw(json_values)
        elif choice == "edge":
            d[name] = draw(st.sampled_from(
                EDGE_VALUES["impression_id" if name.endswith("_id") else name]))
    extra = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2))
    return {**d, **{k: v for k, v in extra.items() if k not in FIELDS}}


def dumps(value, spaced: bool, ascii_only: bool) -> bytes:
    text = json.dumps(value, allow_nan=True, ensure_ascii=ascii_only,
                      separators=(", ", ": ") if spaced else (",", ":"))
    return text.encode("utf-8", "surrogatepass")


def _parse(topic: str, raw):
    try:
        if topic == IMP:
            imp, payload = parse_impression_payload(raw)
            # The buffered JSON is exactly the contract's fields, and ends in '}' for the splice.
            assert payload.endswith(b"}") and orjson.loads(payload) == imp._asdict()
            return imp
        return parse_click(raw)
    except BadEvent as e:
        assert str(e), "a dead letter needs a reason"
        return e
    except Exception:
        COUNTED["crashes"] += 1
        raise


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.sampled_from([b"", b"{}", b"[]", b"null", b"\xef\xbb\xbf{}"]))
def test_fuzz_parsers_on_arbitrary_bytes(raw):
    for topic in (IMP, CLK):
        got = _parse(topic, raw)
        if not isinstance(got, BadEvent):  # random bytes that happen to be a valid event
            assert got == oracle(orjson.loads(raw), raw, topic)
        COUNTED["fuzzed"] += 1


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([IMP, CLK]).flatmap(lambda t: st.tuples(
    st.just(t), event_like(t) | json_values, st.booleans(), st.booleans())))
def test_fuzz_parsers_against_an_oracle(case):
    """JSON-ish values, most of them near a valid event: the parser accepts exactly what the
    contract allows and gives the oracle's reason for the rest."""
    topic, value, spaced, ascii_only = case
    raw = dumps(value, spaced, ascii_only)
    got, want = _parse(topic, raw), oracle(value, raw, topic)
    COUNTED["fuzzed"] += 1
    if isinstance(want, BadEvent):
        assert isinstance(got, BadEvent), (raw, got, want)
        assert str(got).startswith(str(want)), (raw, str(got), str(want))
    else:
        assert got == want, (raw, got)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([IMP, CLK]).flatmap(lambda t: st.tuples(st.just(t), event_like(t))),
       st.data())
def test_fuzz_parsers_on_mutated_messages(case, data):
    """Near-valid messages with bytes cut, dropped, replaced or inserted: an event or a
    BadEvent, never another exception."""
    topic, value = case
    raw = bytearray(dumps(value, False, False))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.sampled_from(["cut", "drop", "set", "insert"]))
        b = data.draw(st.sampled_from(b'\x00\xff\x80"{}[],:\\-.e0N I') | st.integers(0, 255))
        if op == "cut":
            del raw[i:]
        elif op == "drop" and i < len(raw):
            del raw[i]
        elif op == "set" and i < len(raw):
            raw[i] = b
        else:
            raw.insert(i, b)
    raw = bytes(raw)
    got = _parse(topic, raw)
    COUNTED["fuzzed"] += 1
    if not isinstance(got, BadEvent):
        assert got == oracle(orjson.loads(raw), raw, topic)


ID_POOL = ["a", "b", "c", "7", "ü"]
FUZZ_NOW_MS = 1_750_000_000_000


@st.composite
def fuzz_message(draw):
    """(topic, raw, key): valid events over a small id pool (so joins, duplicates, late and
    orphan clicks happen), near-valid and arbitrary messages, tombstones."""
    topic = draw(st.sampled_from([IMP, CLK]))
    kind = draw(st.sampled_from(["valid"] * 5 + ["near", "bytes", "null"]))
    iid = draw(st.sampled_from(ID_POOL))
    if kind == "valid":
        ts = FUZZ_NOW_MS - DAY + draw(st.integers(-60_000, 3 * W))
        obj = {"impression_id": iid, "ts": ts}
        if topic == IMP:
            obj |= {"user_id": "u", "item_id": draw(st.sampled_from(["i1", "i2"])),
                    "features": draw(good_values["features"])}
        raw = dumps(obj, False, False)
    elif kind == "near":
        raw = dumps(draw(event_like(topic)), False, draw(st.booleans()))
    elif kind == "bytes":
        raw = draw(st.binary(max_size=64))
    else:
        raw = None
    key = draw(st.sampled_from(["same"] * 6 + ["none", "other"]))
    key = {"same": iid.encode(), "none": None, "other": b"zz"}[key]
    if kind == "near":
        try:  # near-valid messages keyed by their own id when they have one
            key = (parse_impression if topic == IMP else parse_click)(raw).impression_id.encode()
        except BadEvent:
            pass
    return topic, raw, key


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fuzz_message(), max_size=40), st.booleans(), st.booleans(),
       st.lists(st.floats(0, 20), max_size=40), st.integers(1, 8), st.integers(1, 8))
def test_fuzz_joiner_never_raises_and_every_message_is_accounted(
        msgs, keys_checked, wall_clock, nows, capacity, held_capacity):
    """Garbage interleaved with real joins, small queues, idle streams: nothing raises, every
    message is counted once, every dead letter carries its raw bytes and a reason."""
    j = make_joiner(capacity=capacity, held_clicks_capacity=held_capacity, idle_timeout_s=5.0,
                    early_click_hold_ms=60_000)
    out: list = []
    offsets = {IMP: 0, CLK: 0}
    sent: dict = {}
    now = 0.0
    try:
        for i, (topic, raw, key) in enumerate(msgs):
            now += nows[i] if i < len(nows) else 0.0
            off = offsets[topic]
            offsets[topic] += 1
            sent[(topic, off)] = raw
            call = j.on_impression if topic == IMP else j.on_click
            call(raw, off, now, out, wall_ms=FUZZ_NOW_MS if wall_clock else None,
                 key=key if keys_checked else NO_KEY)
            j.advance(now, out)
            assert j.reconcile() == []
        j.flush(out)
    except AssertionError:
        raise
    except Exception:
        COUNTED["crashes"] += 1
        raise
    COUNTED["fuzzed"] += len(msgs)
    c = j.counters
    assert c.impressions_in == offsets[IMP] and c.clicks_in == offsets[CLK]
    assert j.reconcile() == [] and j.q.pending_count == 0 and j.held_count == 0
    dead = [v for k, _, v in out if k == DEAD_LETTER]
    assert len(dead) == c.impressions_dead + c.clicks_dead
    for d in dead:
        assert d["reason"] and _dead_raw_ok(d["raw"], sent[(d["stream"], d["offset"])])
    examples = [orjson.loads(v) for k, _, v in out if k == EXAMPLE]
    assert len(examples) == c.impressions_emitted
    assert all(ex["kind"] == "example" and ex["label"] in (0, 1) for ex in examples)
    assert sum(1 for k, _, _ in out if k == LATE_CLICK) == c.clicks_late
    assert c.clicks_joined == sum(ex["label"] for ex in examples)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fuzz_message(), max_size=30), st.floats(0, 1))
def test_fuzz_replay_after_a_crash_skips_bad_input_like_the_first_run(msgs, where):
    """The recovery path parses the same garbage again: it must neither raise nor count or
    emit differently from a run that never stopped."""
    def feed(j, events, offsets, out):
        for topic, raw, key in events:
            off = offsets[topic]
            offsets[topic] += 1
            call = j.on_impression if topic == IMP else j.on_click
            call(raw, off, 0.0, out, wall_ms=FUZZ_NOW_MS, key=key)
            j.advance(0.0, out)

    whole, whole_out = make_joiner(), []
    feed(whole, msgs, {IMP: 0, CLK: 0}, whole_out)
    whole.flush(whole_out)

    cut = int(where * len(msgs))
    first, first_out = make_joiner(), []
    feed(first, msgs[:cut], {IMP: 0, CLK: 0}, first_out)
    snap = orjson.loads(orjson.dumps(first.snapshot()))
    j = make_joiner()
    j.start_rebuild(snap)
    by = {topic: [raw for t, raw, _ in msgs if t == topic] for topic in (IMP, CLK)}
    lo_imp, lo_clk = snap["replay_from"]
    for off in range(lo_imp, snap["next_offset"][IMP]):
        j.rebuild_impression(by[IMP][off], off)
    for off in range(lo_clk, snap["next_offset"][CLK]):
        j.rebuild_click(by[CLK][off], off)
    j.finish_rebuild()
    out: list = []
    feed(j, msgs[cut:], dict(snap["next_offset"]), out)
    j.flush(out)
    COUNTED["fuzzed"] += len(msgs)
    assert j.counters == whole.counters

    def labels(o):
        return {k: orjson.loads(v)["label"] for kind, k, v in o if kind == EXAMPLE}

    assert {**labels(first_out), **labels(out)} == labels(whole_out)


# -- integration: the corpus on the real broker, through the join flow ---------------------------

def _produce(cfg, cases: list[Case]) -> dict[str, tuple[int, int]]:
    """Produce each topic in event-time order; returns name -> (partition, offset)."""
    from flows.kafka import make_producer

    where: dict = {}
    errors: list = []

    def report(name):
        def cb(err, msg):
            if err is not None:
                errors.append(f"{name}: {err}")
            else:
                where[name] = (msg.partition(), msg.offset())
        return cb

    p = make_producer(cfg, **{"delivery.report.only.error": False,
                              "message.max.bytes": 4_000_000})
    topics = {IMP: cfg.kafka.impressions_topic, CLK: cfg.kafka.clicks_topic}
    for case in ordered(cases):
        p.produce(topics[case.topic], case.raw, case.key, on_delivery=report(case.name))
        p.poll(0)
    assert p.flush(30) == 0
    assert not errors, errors[:5]
    assert len(where) == len(cases)
    return where


def _join_stats(cfg) -> dict:
    total: dict = {}
    files = list((Path(cfg.data_dir) / "join").glob("stats-p*.json"))
    assert len(files) == cfg.kafka.partitions, files
    for f in files:
        for k, v in orjson.loads(f.read_bytes()).items():
            if k == "reconcile_errors":
                assert v == [], v
            elif isinstance(v, int) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total


@pytest.mark.integration
def test_corpus_on_the_broker_every_message_is_a_record_or_counted(fresh_topics, tmp_path):
    from flows.kafka import read_topics
    from flows.run import run_flow

    t0 = time.monotonic()
    cfg = fresh_topics.replace(
        data_dir=str(tmp_path / "data"), recovery_dir=str(tmp_path / "recovery"),
        join={"wait_window_ms": W, "early_click_hold_ms": HOLD,
              "late_click_horizon_ms": HORIZON, "idle_timeout_s": 600.0,
              "max_future_ms": MAX_FUTURE, "max_past_ms": MAX_PAST, "log_interval_s": 0.5},
        features={"store_prefix": f"bad{uuid.uuid4().hex[:8]}"})
    now_ms = int(time.time() * 1000)
    base = now_ms - DAY
    bad = corpus(base + 1_000_000, now_ms)
    good = valid_stream(base)
    where = _produce(cfg, bad + good)
    run_flow(cfg, "join", until_eof=True, recovery=False)
    t_flow = time.monotonic()

    topic_of = {IMP: cfg.kafka.impressions_topic, CLK: cfg.kafka.clicks_topic}
    dead = {}
    for m in read_topics(cfg, [cfg.kafka.dead_letters_topic]):
        rec = orjson.loads(m.value())
        k = (rec["source_topic"], rec["partition"], rec["offset"])
        assert k not in dead, rec
        assert len(m.value()) < 1_000_000
        dead[k] = rec
    examples, late = {}, {}
    for m in read_topics(cfg, [cfg.kafka.examples_topic]):
        rec = orjson.loads(m.value())
        if rec["kind"] == "example":
            assert rec["impression_id"] not in examples, rec["impression_id"]
            assert m.key().decode() == rec["impression_id"]
            examples[rec["impression_id"]] = rec
        else:
            late[rec["impression_id"]] = rec

    keys = _flow_passes_keys()
    accounted = set()
    for case in bad + good:
        part, off = where[case.name]
        rec = dead.pop((topic_of[case.topic], part, off), None)
        if _accepted(case, keys) == DEAD:
            assert rec is not None, f"{case.name}: no dead letter at {part}/{off}"
            assert case.reason in rec["reason"], (case.name, rec["reason"])
            if case.raw is None:
                assert "raw" not in rec and "raw_base64" not in rec, case.name
            elif "raw" in rec:
                assert rec["raw"].encode() == case.raw[:MAX_DEAD_RAW_BYTES], case.name
            else:
                assert base64.b64decode(rec["raw_base64"]) == case.raw[:MAX_DEAD_RAW_BYTES]
            accounted.add(case.name)
        else:
            assert rec is None, (case.name, rec)
    assert dead == {}, f"dead letters for no corpus message: {list(dead.values())[:3]}"
    accounted |= check_outputs(bad + good, examples, late, keys)
    assert accounted == {c.name for c in bad + good}

    s = _join_stats(cfg)
    tally = _tally(bad + good, keys)
    n_dead = sum(n for (_, o), n in tally.items() if o == DEAD)
    assert s["impressions_in"] == sum(n for (t, _), n in tally.items() if t == IMP)
    assert s["clicks_in"] == sum(n for (t, _), n in tally.items() if t == CLK)
    assert s["impressions_dead"] + s["clicks_dead"] == n_dead
    assert s["impressions_emitted"] == len(examples) == tally[(IMP, EMITTED)]
    assert s["impressions_duplicate"] == tally[(IMP, IMP_DUP)]
    assert s["clicks_joined"] == tally[(CLK, JOINED)]
    assert s["clicks_late"] == len(late) == tally[(CLK, LATE)]
    assert s["clicks_orphan"] == tally[(CLK, ORPHAN)]
    assert s["clicks_duplicate"] == tally[(CLK, CLK_DUP)]
    assert s["pending"] == s["held"] == 0
    events_in = s["impressions_in"] + s["clicks_in"]
    assert events_in == len(bad) + len(good)
    assert events_in == (len(examples) + n_dead + s["impressions_duplicate"]
                         + s["clicks_joined"] + s["clicks_late"] + s["clicks_duplicate"]
                         + s["clicks_orphan"])
    COUNTED["corpus_flow"] = len(bad)
    COUNTED["flow_events"], COUNTED["flow_accounted"] = events_in, len(accounted)
    elapsed = time.monotonic() - t0
    assert elapsed < 30, f"took {elapsed:.1f} s (flow {t_flow - t0:.1f} s)"
