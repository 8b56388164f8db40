"""The joiner core driven with hand-made and random streams: no broker, no bytewax."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from joiner.events import BadEvent, parse_click, parse_impression
from joiner.hashqueue import HashQueue
from joiner.health import JoinHealthMonitor
from joiner.join import CLICKED, DEAD_LETTER, EXAMPLE, LATE_CLICK, SEEN, WaitWindowJoiner

W = 10_000
HOLD = 5_000


def imp(iid, ts, user="u1", item="i1", **features):
    return orjson.dumps({"impression_id": iid, "ts": ts, "user_id": user, "item_id": item,
                         "features": features})


def clk(iid, ts):
    return orjson.dumps({"impression_id": iid, "ts": ts})


class Driver:
    """Feeds (stream, raw) events with per-stream offsets and advances after each one."""

    def __init__(self, joiner=None, **kw):
        kw = {"window_ms": W, "early_click_hold_ms": HOLD, "late_click_horizon_ms": 60_000,
              "idle_timeout_s": 1e9, **kw}
        self.j = joiner or WaitWindowJoiner(**kw)
        self.out = []
        self.offsets = {"i": 0, "c": 0}
        self.now = 0.0

    def feed(self, *events):
        for stream, raw in events:
            off = self.offsets[stream]
            self.offsets[stream] += 1
            if stream == "i":
                self.j.on_impression(raw, off, self.now, self.out)
            else:
                self.j.on_click(raw, off, self.now, self.out)
            self.j.advance(self.now, self.out)
            assert self.j.reconcile() == []
        return self

    def kinds(self, kind):
        return [(k, orjson.loads(v) if isinstance(v, bytes) else v)
                for t, k, v in self.out if t == kind]

    def labels(self):
        return {k: v["label"] for k, v in self.kinds(EXAMPLE)}


def test_click_inside_window_makes_positive_and_emits_once_when_window_closes():
    d = Driver().feed(("i", imp("a", 1000)), ("c", clk("a", 3000)))
    assert d.labels() == {}
    d.feed(("i", imp("b", 11_000)), ("c", clk("x", 11_000)))  # watermark 10_999: not yet
    assert d.labels() == {}
    d.feed(("i", imp("c", 11_002)), ("c", clk("y", 11_002)))  # watermark 11_001 >= 1000 + W
    (key, ex), = d.kinds(EXAMPLE)
    assert key == "a" and ex["label"] == 1 and ex["click_ts"] == 3000 and ex["delay_ms"] == 2000
    assert ex["user_id"] == "u1" and ex["window_ms"] == W


def test_no_click_is_negative_and_several_clicks_count_once():
    d = Driver().feed(("i", imp("a", 1000)), ("i", imp("b", 1000)),
                      ("c", clk("a", 2000)), ("c", clk("a", 2500)), ("c", clk("a", 2000)))
    d.j.flush(d.out)
    assert d.labels() == {"a": 1, "b": 0}
    c = d.j.counters
    assert (c.clicks_joined, c.clicks_duplicate) == (1, 2)


def test_click_exactly_at_window_end_joins_and_one_ms_later_is_late():
    d = Driver().feed(("i", imp("a", 1000)), ("i", imp("b", 1000)),
                      ("c", clk("a", 1000 + W)), ("c", clk("b", 1001 + W)),
                      ("i", imp("z", 50_000)), ("c", clk("q", 50_000)))
    assert d.labels() == {"a": 1, "b": 0}
    (key, late), = d.kinds(LATE_CLICK)
    assert key == "b" and late["delay_ms"] == W + 1 and late["kind"] == "late_click"


def test_watermark_is_the_minimum_so_a_lagging_click_stream_delays_expiry():
    d = Driver().feed(("i", imp("a", 1000)))
    for k in range(20):  # impressions run far ahead, clicks are silent (but not idle)
        d.feed(("i", imp(f"n{k}", 100_000 + k)))
    assert d.labels() == {}
    d.feed(("c", clk("a", 9000)))  # the lagging click still joins
    d.feed(("c", clk("zz", 20_000)))
    assert d.labels() == {"a": 1}


def test_idle_stream_stops_holding_the_watermark_and_quiet_streams_follow_the_wall_clock():
    d = Driver(idle_timeout_s=30)
    d.feed(("i", imp("a", 1000)), ("c", clk("q", 1000)))
    d.now = 20.0
    d.feed(("i", imp("b", 60_000)))  # clicks quiet for 20 s: still holding back
    assert d.labels() == {}
    d.now = 40.0  # clicks quiet for 40 s > 30 s: impressions alone drive the watermark
    d.j.advance(d.now, d.out)
    assert d.labels() == {"a": 0}
    d.now = 200.0  # both quiet: event time follows the wall clock from the last arrival
    d.j.advance(d.now, d.out)
    assert d.labels() == {"a": 0, "b": 0}


def test_a_stream_not_yet_read_to_its_end_is_behind_not_idle():
    """Catching up on a backlog, the reader may not fetch clicks for longer than the idle
    timeout; closing windows then would turn real clicks into negatives."""
    d = Driver(idle_timeout_s=30, idle_needs_caught_up=True)
    d.feed(("i", imp("a", 1000)), ("c", clk("q", 1000)))
    d.now = 100.0
    d.feed(("i", imp("b", 60_000)))
    assert d.labels() == {}  # clicks silent for 100 s but not known to be at their end
    d.j.caught_up("clicks", 100.0)
    d.now = 120.0
    d.j.advance(d.now, d.out)
    assert d.labels() == {}  # at the end for 20 s < 30 s
    d.now = 131.0
    d.j.advance(d.now, d.out)
    assert d.labels() == {"a": 0}


def test_click_before_its_impression_is_held_and_joined():
    d = Driver().feed(("c", clk("a", 1500)), ("i", imp("a", 1000)))
    d.j.flush(d.out)
    assert d.labels() == {"a": 1}
    assert d.j.counters.clicks_joined == 1 and d.j.counters.clicks_orphan == 0


def test_click_for_impression_that_never_comes_is_orphan_after_hold():
    d = Driver().feed(("c", clk("ghost", 1000)), ("i", imp("a", 1000)))
    assert d.j.held_count == 1
    d.feed(("i", imp("b", 1000 + HOLD + 2)), ("c", clk("b", 1000 + HOLD + 2)))
    assert d.j.held_count == 0 and d.j.counters.clicks_orphan == 1
    d.feed(("i", imp("ghost", 1500)))  # arrives after the hold: not joined
    d.j.flush(d.out)
    assert d.labels()["ghost"] == 0


def test_held_clicks_are_bounded_and_eviction_is_counted():
    d = Driver(held_clicks_capacity=2).feed(("c", clk("x", 1)), ("c", clk("y", 2)),
                                            ("c", clk("z", 3)))
    c = d.j.counters
    assert d.j.held_count == 2 and c.clicks_orphan == 1 and c.clicks_held_evicted == 1


def test_late_click_after_close_is_a_correction_and_later_ones_are_duplicates():
    d = Driver().feed(("i", imp("a", 1000)), ("i", imp("b", 30_000)), ("c", clk("q", 30_000)))
    assert d.labels() == {"a": 0}
    d.feed(("c", clk("a", 31_000)), ("c", clk("a", 31_500)))
    (key, late), = d.kinds(LATE_CLICK)
    assert key == "a" and late["ts"] == 1000 and late["click_ts"] == 31_000
    assert d.j.counters.clicks_late == 1 and d.j.counters.clicks_duplicate == 1


def test_click_past_the_horizon_is_orphan_not_late():
    d = Driver(late_click_horizon_ms=20_000).feed(("i", imp("a", 1000)))
    d.feed(("i", imp("b", 40_000)), ("c", clk("q", 40_000)))  # 'a' forgotten at 21_000
    d.feed(("c", clk("a", 40_001)))
    d.j.flush(d.out)
    assert d.j.counters.clicks_late == 0 and d.j.counters.clicks_orphan == 2


def test_duplicate_impressions_are_dropped_and_counted():
    d = Driver().feed(("i", imp("a", 1000)), ("i", imp("a", 1000)), ("i", imp("a", 1200)))
    d.j.flush(d.out)
    assert list(d.labels()) == ["a"] and d.j.counters.impressions_duplicate == 2


def test_clock_skew_click_before_impression_ts_counts_as_delay_zero():
    d = Driver().feed(("i", imp("a", 1000)), ("c", clk("a", 990)))
    d.j.flush(d.out)
    (_, ex), = d.kinds(EXAMPLE)
    assert ex["label"] == 1 and ex["delay_ms"] == 0


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "invalid JSON"),
    (b"[1,2]", "expected a JSON object"),
    (b'{"ts": 5, "user_id": "u", "item_id": "i"}', "missing field 'impression_id'"),
    (b'{"impression_id": "a", "ts": "5", "user_id": "u", "item_id": "i"}', "'ts' must be integer"),
    (b'{"impression_id": "a", "ts": -5, "user_id": "u", "item_id": "i"}', "must be positive"),
    (b'{"impression_id": "a", "ts": 5, "user_id": "u", "item_id": "i", "features": {"x": [1]}}',
     "feature 'x'"),
    (b'{"impression_id": "a", "ts": 5, "user_id": "u", "item_id": "i", "features": 3}',
     "'features' must be an object"),
    (b"\xff\xfe", "invalid JSON"),
    (b'{"impression_id": "' + b"a" * 70_000 + b'"}', "exceeds"),
])
def test_bad_impressions_become_dead_letters_with_a_reason(raw, reason):
    with pytest.raises(BadEvent, match=reason):
        parse_impression(raw)
    d = Driver().feed(("i", raw))
    (_, dead), = d.kinds(DEAD_LETTER)
    assert reason in dead["reason"] and dead["raw"] == raw and dead["stream"] == "impressions"
    assert d.j.counters.impressions_dead == 1


def test_bad_clicks_and_absurd_timestamps_are_dead_letters():
    assert parse_click(b'{"impression_id": 7, "ts": 5}').impression_id == "7"
    j = WaitWindowJoiner(W, max_future_ms=60_000, max_past_ms=86_400_000)
    out = []
    now_ms = 1_700_000_000_000
    j.on_click(b'{"impression_id": "a"}', 0, 0.0, out, wall_ms=now_ms)
    j.on_click(clk("a", now_ms + 3_600_000), 1, 0.0, out, wall_ms=now_ms)
    j.on_impression(imp("a", now_ms - 2 * 86_400_000), 0, 0.0, out, wall_ms=now_ms)
    j.on_impression(imp("b", now_ms), 1, 0.0, out, wall_ms=now_ms)
    reasons = [v["reason"] for k, _, v in out if k == DEAD_LETTER]
    assert reasons == ["missing field 'ts'", "ts 1700003600000 is 3600 s in the future",
                       "ts 1699827200000 is 2.0 days in the past"]
    assert j.counters.clicks_dead == 2 and j.counters.impressions_dead == 1
    assert j.reconcile() == []


def test_full_queue_forgets_closed_first_then_closes_oldest_early_and_flags_it():
    d = Driver(capacity=3).feed(("i", imp("a", 1000)), ("i", imp("z", 30_000)),
                                ("c", clk("q", 30_000)))
    assert d.labels() == {"a": 0}  # 'a' closed normally, still remembered: queue holds 2
    d.feed(("i", imp("b", 30_001)), ("i", imp("c", 30_002)))
    c = d.j.counters
    assert c.impressions_forgotten_early == 1 and c.impressions_closed_early == 0
    d.feed(("i", imp("e", 30_003)))  # all 3 pending: the oldest closes early
    (key, ex), = d.kinds(EXAMPLE)[1:]
    assert key == "z" and ex["closed_early"] is True and c.impressions_closed_early == 1
    assert len(d.j.q) == 3


def test_signals_carry_the_impression_for_count_features():
    d = Driver(signals=True).feed(("i", imp("a", 1000, user="u9", category="c1")),
                                  ("c", clk("a", 1500)))
    (_, (seen, offset)), = d.kinds(SEEN)
    (_, (clicked, click_ts)), = d.kinds(CLICKED)
    assert seen.user_id == "u9" and clicked.features == {"category": "c1"} and click_ts == 1500
    assert offset == 0  # its offset: a resume's replay resends it to the counters from there
    d.feed(("i", imp("z", 1000 + W + 1)), ("c", clk("z", 1000 + W + 1)))  # a's window closes
    (key, ex), = d.kinds(EXAMPLE)  # the attach step places an example by its impression's ts
    assert key == ("a", 1000) and ex["label"] == 1


def test_health_quarantines_when_click_stream_stops_and_clears_after():
    d = Driver(idle_timeout_s=30, health=JoinHealthMonitor(max_click_lag_ms=20_000))
    d.feed(("i", imp("a", 1000)), ("c", clk("a", 1200)), ("c", clk("q", 12_000)),
           ("i", imp("x", 12_001)))  # clicks seen past a's window: a closes healthy
    d.now = 100.0  # click stream goes silent past the idle timeout; impressions flow on
    d.feed(("i", imp("b", 50_000)), ("i", imp("c", 80_000)))
    ex = dict(d.kinds(EXAMPLE))
    assert ex["b"].get("quarantined") is True and "quarantined" not in ex["a"]
    # clicks resume; judged when the next window closes, which then closes healthy
    d.feed(("c", clk("x", 79_000)), ("i", imp("d", 95_000)), ("c", clk("y", 95_000)))
    assert "quarantined" not in dict(d.kinds(EXAMPLE))["c"]
    assert not d.j.health.quarantined and d.j.health.transitions == 2
    assert d.j.counters.impressions_quarantined >= 1


def test_health_quarantines_on_ctr_collapse():
    m = JoinHealthMonitor(window_examples=200, min_expected_clicks=5,
                          baseline_halflife_examples=1000)
    flags = [m.observe_label(int(i % 10 == 0)) for i in range(3000)]  # CTR 10 %
    assert not any(flags)
    flags = [m.observe_label(0) for _ in range(300)]  # clicks vanish
    assert any(flags) and m.collapsed
    flags = [m.observe_label(int(i % 10 == 0)) for i in range(400)]
    assert not m.quarantined and m.transitions == 2


def test_hashqueue_keeps_fifo_order_across_chunks_and_frees_them():
    q = HashQueue()
    n = 10_000
    for i in range(n):
        q.push(f"k{i}", i, b"{}", i, 0)
    assert [q.pop_pending()[0] for _ in range(n)] == list(range(n))
    for _ in range(n):
        q.forget_oldest()
    assert len(q) == 0 and len(q._chunks) <= 1 and q.lookup("k5") is None


# -- properties over random interleavings --------------------------------------------------

@st.composite
def streams(draw):
    """Random impressions and clicks; each stream is in ts order, the two interleave freely.
    Includes duplicate impressions and clicks, orphan clicks and malformed messages."""
    n = draw(st.integers(1, 30))
    gaps = draw(st.lists(st.integers(0, 4000), min_size=n, max_size=n))
    ts, imps, clicks = 1000, [], []
    for k, g in enumerate(gaps):
        ts += g
        imps.append((ts, imp(f"m{k}", ts)))
        for delay in draw(st.lists(st.integers(-50, 3 * W), max_size=2)):
            clicks.append((ts + delay, clk(f"m{k}", ts + delay), f"m{k}", ts, delay))
        if draw(st.booleans()) and draw(st.booleans()):
            imps.append((ts, imp(f"m{k}", ts)))  # duplicate impression
    for _ in range(draw(st.integers(0, 3))):
        t = draw(st.integers(1000, ts + W))
        clicks.append((t, clk(f"orphan{t}", t), None, None, None))
    if draw(st.booleans()):
        imps.append((ts, b'{"broken'))
        clicks.append((ts, b'{"impression_id": "m0"}', None, None, None))
    clicks.sort(key=lambda c: c[0])
    imp_msgs = [raw for _, raw in imps]
    clk_msgs = [c[1] for c in clicks]
    order = draw(st.permutations(["i"] * len(imp_msgs) + ["c"] * len(clk_msgs)))
    it, ct = iter(imp_msgs), iter(clk_msgs)
    events = [(s, next(it) if s == "i" else next(ct)) for s in order]
    return events, clicks


@settings(max_examples=300, deadline=None)
@given(streams())
def test_property_labels_follow_delay_and_counts_reconcile(case):
    events, clicks = case
    d = Driver(early_click_hold_ms=10**9)  # a click may run arbitrarily far ahead
    d.feed(*events)
    d.j.flush(d.out)
    assert d.j.reconcile() == [] and d.j.q.pending_count == 0 and d.j.held_count == 0
    c = d.j.counters
    assert c.impressions_in == sum(1 for s, _ in events if s == "i")
    assert c.clicks_in == sum(1 for s, _ in events if s == "c")
    expected = {}
    for _, _, iid, _, delay in clicks:
        if iid is not None:
            expected[iid] = expected.get(iid, 0) or int(max(0, delay) <= W)
    labels = d.labels()
    assert len(d.kinds(EXAMPLE)) == len(labels)  # each impression once
    for iid, label in labels.items():
        first = next((max(0, dl) for _, _, i, _, dl in clicks if i == iid), None)
        assert label == int(first is not None and first <= W), iid


@settings(max_examples=200, deadline=None)
@given(streams(), st.floats(0, 1))
def test_property_crash_and_replay_gives_the_uninterrupted_output(case, where):
    events, _ = case
    whole = Driver().feed(*events)
    whole.j.flush(whole.out)

    cut = int(where * len(events))
    first = Driver().feed(*events[:cut])
    snap = orjson.loads(orjson.dumps(first.j.snapshot()))  # must survive serialization
    # crash: everything after the snapshot is lost; a new joiner replays from Kafka
    j = WaitWindowJoiner(window_ms=W, early_click_hold_ms=HOLD, late_click_horizon_ms=60_000,
                         idle_timeout_s=1e9)
    j.start_rebuild(snap)
    imp_from, clk_from = snap["replay_from"]
    by_stream = {"i": [raw for s, raw in events if s == "i"],
                 "c": [raw for s, raw in events if s == "c"]}
    back = [off for off in range(imp_from, snap["next_offset"]["impressions"])
            if j.rebuild_impression(by_stream["i"][off], off) is not None]
    # what it gives back is what the first pass sent a SEEN for (the counters' held ones)
    signals = Driver(signals=True).feed(*events[:cut])
    assert back == [off for _, (_, off) in signals.kinds(SEEN) if off >= imp_from]
    for off in range(clk_from, snap["next_offset"]["clicks"]):
        j.rebuild_click(by_stream["c"][off], off)
    j.finish_rebuild()
    resumed = Driver(joiner=j)
    resumed.offsets = {"i": snap["next_offset"]["impressions"],
                       "c": snap["next_offset"]["clicks"]}
    resumed.feed(*events[cut:])
    resumed.j.flush(resumed.out)

    assert {**first.labels(), **resumed.labels()} == whole.labels()
    assert resumed.j.counters == whole.j.counters
    late = {k for k, _ in first.kinds(LATE_CLICK) + resumed.kinds(LATE_CLICK)}
    assert late == {k for k, _ in whole.kinds(LATE_CLICK)}
