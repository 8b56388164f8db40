"""The real-time counter core against brute-force recounts: windows, point-in-time, lateness,
expiry, recovery; Beta smoothing and log buckets."""

from __future__ import annotations

import heapq
import pickle
import random
from bisect import bisect_left, insort

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.counters import TILES, EntityCounters
from features.derived import BetaPrior, derived_features, log_bucket
from features.spec import FeatureSpec, window_label
from joiner.events import Impression

MIN, HOUR = 60_000, 3_600_000


def imp(ts, user="u1", item="i1", category="c1", position=0, iid=None):
    return Impression(iid or f"{user}-{ts}", ts, user, item,
                      {"category": category, "position": position})


class Recount:
    """The oracle: every event that arrived, per (entity, id, kind), sorted by event time."""

    def __init__(self, spec: FeatureSpec):
        self.spec, self.events = spec, {}

    def add(self, key, kind, ts):
        insort(self.events.setdefault((*key, kind), []), ts)

    def between(self, key, kind, lo, hi):
        """Events in [lo, hi)."""
        ev = self.events.get((*key, kind), [])
        return bisect_left(ev, hi) - bisect_left(ev, lo)

    def check(self, key, ts, got, exact, cover=None):
        """``got`` equals the recount over [ts - w, ts), or with tiles (``cover`` is the
        entity's, before the query) lies between the events after the window's oldest tile
        and those from that tile's start: the error is confined to that one tile and nothing
        at or after ts is ever included. The tile's share is the documented interpolation."""
        for w in self.spec.windows_ms:
            t = w // self.spec.tiles_per_window
            start = ts - w
            k0 = start // t
            for kind, name in ((0, f"imp_{window_label(w)}"), (1, f"clk_{window_label(w)}")):
                truth = self.between(key, kind, start, ts)
                if exact or cover is None or start >= cover:
                    assert got[name] == truth, (key, ts, name, got, truth)
                    continue
                lo = self.between(key, kind, (k0 + 1) * t, ts)
                hi = self.between(key, kind, k0 * t, ts)
                assert lo <= got[name] <= hi, (key, ts, name, got, lo, truth, hi)
                # The tile holds the events before cover only; later ones are counted exactly.
                end = min((k0 + 1) * t, cover)
                num, den, n = end - start, end - k0 * t, self.between(key, kind, k0 * t, end)
                assert got[name] == self.between(key, kind, end, ts) + (2 * n * num + den) // (
                    2 * den)


def cover_if_tiled(counters, key):
    e = counters._entities[key[0]].get(key[1])
    return None if e is None or e[4] is None else e[0]


def play(counters, recount, arrivals, exact=False):
    """Feed (kind, impression, ts) in arrival order; check every seen() against the oracle,
    for equality when ``exact`` or while the entity has no tiles."""
    for kind, im, ts in arrivals:
        keys = counters.spec.entity_ids(im)
        if kind == 0:
            covers = [cover_if_tiled(counters, k) for k in keys]
            got = counters.seen(im)
            for key, cover in zip(keys, covers, strict=True):
                recount.check(key, ts, got[key[0]], exact, cover)
        else:
            counters.clicked(im, ts)
        for key in keys:
            recount.add(key, kind, ts)


# -- spec -------------------------------------------------------------------------------------


def test_spec_ids_names_and_labels():
    spec = FeatureSpec()
    assert spec.entity_ids(imp(5, "u", "i", "c", 3)) == [
        ("user", "u"), ("item", "i"), ("category", "c"), ("user_category", "u|c"),
        ("item_position", "i|3")]
    no_category = Impression("x", 5, "u", "i", {"position": 1})
    assert [n for n, _ in spec.entity_ids(no_category)] == ["user", "item", "item_position"]
    assert spec.feature_names() == ["imp_5m", "clk_5m", "imp_1h", "clk_1h", "imp_24h", "clk_24h"]
    assert [window_label(ms) for ms in (30_000, 90_000, 86_400_000, 1500)] == [
        "30s", "90s", "24h", "1500ms"]
    with pytest.raises(ValueError, match="repeated"):
        FeatureSpec(windows_ms=(60_000, 60_000))
    with pytest.raises(ValueError, match="shorter"):
        FeatureSpec(windows_ms=(5,))


# -- windows against a recount ----------------------------------------------------------------

SPEC = FeatureSpec(entities={"user": ("user_id",)}, windows_ms=(5 * MIN, HOUR, 24 * HOUR))


def _stream(seed, n, step_ms, aligned_to=1, lateness=0):
    """(kind, impression, ts) in arrival order: users with skewed activity, clicks after their
    impression, arrival jitter up to ``lateness`` (clicks never before their impression)."""
    rng = random.Random(seed)
    out, ts = [], 10 * 24 * HOUR
    for i in range(n):
        ts += rng.randrange(0, step_ms) // aligned_to * aligned_to
        im = imp(ts, user=f"u{min(int(rng.expovariate(0.5)), 9)}", item=f"i{rng.randrange(5)}",
                 category=f"c{rng.randrange(3)}", position=rng.randrange(3), iid=str(i))
        key = ts + rng.randint(0, lateness)
        out.append((key, len(out), 0, im, ts))
        if rng.random() < 0.2:
            cts = ts + rng.randrange(0, 20 * step_ms) // aligned_to * aligned_to
            out.append((max(cts + rng.randint(0, lateness), key), len(out), 1, im, cts))
    return [(kind, im, t) for _, _, kind, im, t in sorted(out)]


@pytest.mark.parametrize("exact_events", [64, 10**9])
def test_quiet_entities_are_exact(exact_events):
    c = EntityCounters(SPEC, exact_events=exact_events)
    play(c, Recount(SPEC), _stream(1, 3000, 60_000))  # ~50 h: rings wrap
    tiled = sum(e[4] is not None for e in c._entities["user"].values())
    assert tiled == 0 if exact_events > 3000 else 0 < tiled < len(c)


def test_tiles_exact_when_aligned():
    c = EntityCounters(SPEC, exact_events=0)  # every entity on tiles
    play(c, Recount(SPEC), _stream(2, 3000, 4 * HOUR, aligned_to=2 * HOUR), exact=True)
    assert sum(e[4] is not None for e in c._entities["user"].values()) >= 5


def test_tiles_within_bound_otherwise():
    c = EntityCounters(SPEC, exact_events=0)
    play(c, Recount(SPEC), _stream(3, 4000, 20_000))


def test_out_of_order_within_lateness_stays_point_in_time():
    for exact_events in (0, 8, 64):
        c = EntityCounters(SPEC, allowed_lateness_ms=MIN, exact_events=exact_events)
        arrivals = _stream(4, 3000, 20_000, lateness=MIN)
        play(c, Recount(SPEC), arrivals)
        assert c.late == c.late_dropped == 0


def test_events_that_arrived_first_are_excluded():
    c = EntityCounters(SPEC, exact_events=0)
    for ts in range(0, 10 * MIN, 1000):  # enough to move events into tiles
        c.seen(imp(10**9 + ts))
    t0 = 10**9 + 10 * MIN
    c.seen(imp(t0 + 30_000))
    c.clicked(imp(t0 + 30_000), t0 + 31_000)
    c.seen(imp(t0 + 30_000))  # the same millisecond: not before itself
    got = c.seen(imp(t0 + 10_000))["user"]  # arrives 21 s late, within the lateness
    assert got["imp_5m"] == 290 and got["clk_5m"] == 0  # 310 s .. 599 s, not the later ones
    later = c.values("user", "u1", t0 + 50_000)  # 350 s .. 599 s, and those at t0 + 30 s
    assert later["imp_5m"] == 250 + 3 and later["clk_5m"] == 1


def test_too_late_events_are_counted_or_dropped_never_silently():
    c = EntityCounters(SPEC, allowed_lateness_ms=MIN, exact_events=0)
    base = 10**9
    for ts in range(0, 2 * HOUR, 10_000):
        c.seen(imp(base + ts))
    newest = base + 2 * HOUR - 10_000
    before = c.values("user", "u1", newest + 1)
    c.seen(imp(newest - 30 * MIN))  # beyond the lateness: counted in its tile
    assert c.late == 1
    after = c.values("user", "u1", newest + 1)
    assert after["imp_1h"] == before["imp_1h"] + 1 and after["imp_5m"] == before["imp_5m"]
    c.seen(imp(newest - 25 * HOUR))  # older than every window it could be asked for
    assert c.late_dropped == 1 and c.values("user", "u1", newest + 1) == after
    # A late query never counts anything at or after its ts: here the whole last hour.
    got = c.values("user", "u1", newest - 30 * MIN)
    assert got["imp_5m"] <= 30 and got["imp_1h"] <= 361


def test_old_tiles_expire_and_idle_entities_are_dropped():
    c = EntityCounters(SPEC, exact_events=0)
    base = 10**9
    for ts in range(0, HOUR, 1000):
        c.seen(imp(base + ts))
        c.seen(imp(base + ts, user="u2"))
    c.seen(imp(base + 3 * HOUR))  # two quiet hours: the rings have turned
    got = c.values("user", "u1", base + 3 * HOUR + 1)
    assert (got["imp_5m"], got["imp_1h"], got["imp_24h"]) == (1, 1, 3601)
    assert len(c._entities["user"]["u1"][2]) < 200  # recent stays about a lateness long
    c.touched()
    c.stale(base + 27 * HOUR + MIN + 1)  # a lateness past the longest window
    assert len(c) == 0  # both forgotten
    assert c.values("user", "u1", base) == dict.fromkeys(SPEC.feature_names(), 0)


def test_stale_returns_quiet_entities_once_per_window_then_forgets_them():
    c = EntityCounters(SPEC, allowed_lateness_ms=MIN)
    b = 10**9  # an event at b is in [ts - w, ts) up to ts = b + w
    c.seen(imp(b, user="u1"))
    c.seen(imp(b + 2 * MIN, user="u2"))
    assert c.touched() == {("user", "u1"), ("user", "u2")}
    assert c.stale(b + 5 * MIN) == []
    assert c.stale(b + 5 * MIN + 1) == [("user", "u1")]  # its 5-minute count just went to 0
    assert c.values("user", "u1", b + 5 * MIN + 1)["imp_5m"] == 0
    c.seen(imp(b + 6 * MIN, user="u2"))  # active: written when counted, not stale
    c.touched()
    assert c.stale(b + 7 * MIN + 1) == []
    assert c.stale(b + 11 * MIN + 1) == [("user", "u2")]
    assert c.stale(b + HOUR + 1) == [("user", "u1")]
    assert c.stale(b + HOUR + 6 * MIN + 1) == [("user", "u2")]
    assert c.stale(b + 24 * HOUR + 1) == [("user", "u1")]
    assert c.values("user", "u1", b + 24 * HOUR + 1) == dict.fromkeys(SPEC.feature_names(), 0)
    assert len(c) == 2
    assert c.stale(b + 24 * HOUR + MIN + 1) == [] and list(c._entities["user"]) == ["u2"]
    c.seen(imp(b + 25 * HOUR, user="u1"))  # back after being forgotten: counted afresh
    assert ("user", "u1") in c.touched()
    assert c.stale(b + 25 * HOUR + 5 * MIN + 1) == [("user", "u1")]


def test_touched_since_last_call():
    c = EntityCounters(FeatureSpec())
    c.seen(imp(1000, "u1", "i1", "c1"))
    assert c.touched() == {("user", "u1"), ("item", "i1"), ("category", "c1"),
                           ("user_category", "u1|c1"), ("item_position", "i1|0")}
    c.clicked(imp(1000, "u1", "i1", "c1"), 2000)
    c.seen(imp(3000, "u2", "i1", "c1"))
    assert ("user", "u1") in c.touched() and c.touched() == set()


def test_state_round_trip():
    spec = FeatureSpec()
    arrivals = _stream(5, 4000, 20_000, lateness=MIN)
    a = EntityCounters(spec, exact_events=16)
    for kind, im, ts in arrivals[:2000]:
        a.seen(im) if kind == 0 else a.clicked(im, ts)
    b = EntityCounters(spec, exact_events=16)
    b.restore(pickle.loads(pickle.dumps(a.state())))
    assert b.touched() == a.touched() and (b.late, b.late_dropped) == (a.late, a.late_dropped)
    for kind, im, ts in arrivals[2000:]:
        if kind == 0:
            assert a.seen(im) == b.seen(im)
        else:
            a.clicked(im, ts), b.clicked(im, ts)
    assert a._entities == b._entities
    with pytest.raises(ValueError):
        EntityCounters(spec, allowed_lateness_ms=1).restore(a.state())


def test_state_encodes_changes_since_the_last_one():
    # state() re-encodes only what changed since its previous call (counted, moved into
    # tiles, forgotten): every state along the way must restore to the counters as they were.
    spec = FeatureSpec()
    arrivals = _stream(5, 6000, 20_000, lateness=MIN)
    a, forgotten = EntityCounters(spec, exact_events=16), 0
    for i, (kind, im, ts) in enumerate(arrivals):
        a.seen(im) if kind == 0 else a.clicked(im, ts)
        if i % 700 == 0:
            a.touched()
        if i % 900 == 0:
            n = len(a)
            a.stale(ts + (25 * HOUR if i == 2700 else 2 * HOUR))  # 25 h: forgets them all
            forgotten += n - len(a)
            b = EntityCounters(spec, exact_events=16)
            b.restore(pickle.loads(pickle.dumps(a.state())))
            assert b._entities == a._entities and b._touched == a._touched
    assert forgotten and any(e[TILES] is not None for ents in a._entities.values()
                             for e in ents.values())


def test_restored_counters_look_at_every_entity_again():
    c = EntityCounters(SPEC)
    c.seen(imp(10**9, user="u1"))
    c.touched()
    b = EntityCounters(SPEC)
    b.restore(c.state())
    assert b.stale(10**9 + 5 * MIN + 1) == c.stale(10**9 + 5 * MIN + 1) == [("user", "u1")]


# -- the point-in-time property ---------------------------------------------------------------

SMALL = FeatureSpec(entities={"user": ("user_id",), "item": ("item_id",),
                              "category": ("category",), "user_category": ("user_id", "category")},
                    windows_ms=(1000, 5000), tiles_per_window=4)  # tiles of 250 and 1250 ms

# (step, user, item, category, click delay or None, impression and click arrival jitter)
event = st.tuples(st.integers(0, 400), st.integers(0, 3), st.integers(0, 2), st.integers(0, 2),
                  st.one_of(st.none(), st.integers(0, 3000)), st.integers(0, 10**6),
                  st.integers(0, 10**6))


def _arrivals(events, unit, lateness, with_keys=False):
    """Arrival order: event time plus a jitter of at most ``lateness``, so every event is
    within the lateness of all that arrived before it; a click never before its impression.
    ``with_keys``: each arrival also carries its arrival time."""
    out, ts = [], 10**6
    for i, (dt, u, it, cat, delay, jit, cjit) in enumerate(events):
        ts += dt * unit
        im = imp(ts, f"u{u}", f"i{it}", f"c{cat}", iid=str(i))
        key = ts + jit % (lateness + 1)
        out.append((key, len(out), 0, im, ts))
        if delay is not None:
            cts = ts + delay * unit
            out.append((max(cts + cjit % (lateness + 1), key), len(out), 1, im, cts))
    return [(kind, im, t, *(key,) * with_keys) for key, _, kind, im, t in sorted(out)]


@settings(max_examples=150, deadline=None)
@given(st.lists(event, max_size=120), st.sampled_from([0, 3, 64]),
       st.sampled_from([0, 600, 3000]))
def test_seen_is_a_recount_strictly_before(events, exact_events, lateness):
    """Exact while an entity has no tiles, within its oldest tile after; never later events."""
    c = EntityCounters(SMALL, allowed_lateness_ms=lateness, exact_events=exact_events)
    play(c, Recount(SMALL), _arrivals(events, 1, lateness))
    assert c.late == c.late_dropped == 0


@settings(max_examples=150, deadline=None)
@given(st.lists(event, max_size=120), st.sampled_from([0, 3, 64]),
       st.sampled_from([0, 600, 3000]))
def test_snapshot_after_later_events_is_a_recount_strictly_before(events, exact_events,
                                                                   lateness):
    """As the join flow does it: every event counted on arrival, an impression's snapshot
    taken once nothing before it can still arrive, later events counted by then."""
    c = EntityCounters(SMALL, allowed_lateness_ms=lateness, exact_events=exact_events)
    recount, waiting = Recount(SMALL), []

    def snapshot_until(ts_limit):
        while waiting and waiting[0][0] <= ts_limit:
            ts, _, im = heapq.heappop(waiting)
            keys = c.spec.entity_ids(im)
            covers = [cover_if_tiled(c, k) for k in keys]
            got = c.snapshot(im)
            for key, cover in zip(keys, covers, strict=True):
                recount.check(key, ts, got[key[0]], False, cover)

    for i, (kind, im, ts, at) in enumerate(_arrivals(events, 1, lateness, with_keys=True)):
        # Everything before ts has arrived once arrivals reach ts + lateness.
        snapshot_until(at - lateness)
        if kind == 0:
            c.count(im)
            heapq.heappush(waiting, (ts, i, im))
        else:
            c.clicked(im, ts)
        for key in c.spec.entity_ids(im):
            recount.add(key, kind, ts)
    snapshot_until(float("inf"))


@settings(max_examples=100, deadline=None)
@given(st.lists(event, max_size=120), st.sampled_from([600, 2500, 3000]))
def test_seen_is_exact_on_tiles_when_aligned(events, lateness):
    c = EntityCounters(SMALL, allowed_lateness_ms=lateness, exact_events=0)
    aligned = [(dt % 3, u, it, cat, None if d is None else d % 4, j, cj)
               for dt, u, it, cat, d, j, cj in events]  # steps and delays of 1250 ms
    play(c, Recount(SMALL), _arrivals(aligned, 1250, lateness), exact=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(event, min_size=1, max_size=120), st.sampled_from([0, 3, 64]),
       st.lists(st.integers(0, 60_000), max_size=20))
def test_late_queries_never_count_later_events(events, exact_events, ages):
    """A query from behind the lateness (a late impression) may under-count, never over."""
    c = EntityCounters(SMALL, allowed_lateness_ms=0, exact_events=exact_events)
    recount = Recount(SMALL)
    play(c, recount, _arrivals(events, 1, 0))
    newest = max(ts for _, _, ts in _arrivals(events, 1, 0))
    for age in ages:
        ts = newest - age
        for key in {k[:2] for k in recount.events}:
            got = c.values(*key, ts)
            for w in SMALL.windows_ms:
                t = w // SMALL.tiles_per_window
                for kind, f in ((0, "imp_"), (1, "clk_")):
                    most = recount.between(key, kind, ((ts - w) // t) * t, ts)
                    assert 0 <= got[f + window_label(w)] <= most


# -- derived features -------------------------------------------------------------------------


def test_beta_smoothing():
    prior = BetaPrior.from_ctr(0.03, strength=100)
    assert prior.smoothed_ctr(1, 1) < 0.05  # one lucky click is not 100 %
    assert prior.smoothed_ctr(0, 0) == pytest.approx(0.03)
    assert prior.smoothed_ctr(20_000, 100_000) == pytest.approx(0.2, abs=1e-3)  # data wins
    assert prior.smoothed_ctr(1, 1) > prior.smoothed_ctr(0, 1)


def test_beta_fit_by_moments():
    import numpy as np

    rng = np.random.default_rng(0)
    p = rng.beta(3, 97, 20_000)  # true strength 100, mean 3 %
    n = rng.integers(50, 2000, p.size)
    prior = BetaPrior.fit(rng.binomial(n, p), n)
    assert prior.mean == pytest.approx(0.03, rel=0.05)
    assert 70 < prior.alpha + prior.beta < 140
    same = rng.binomial(n, 0.03)  # no real differences: the prior is the global CTR, firmly
    assert BetaPrior.fit(same, n).alpha + BetaPrior.fit(same, n).beta > 1000


def test_log_buckets_and_derived():
    assert [log_bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 1023, 1024)] == [
        0, 1, 2, 2, 3, 3, 4, 10, 11]
    prior = BetaPrior.from_ctr(0.05, strength=20)
    got = derived_features({"imp_5m": 0, "clk_5m": 0, "imp_1h": 40, "clk_1h": 2}, prior)
    assert got["ctr_5m"] == 0.05 and got["ctr_1h"] == round(3 / 60, 4)
    assert (got["imp_1h_lb"], got["clk_1h_lb"], got["imp_5m_lb"]) == (6, 2, 0)
    assert got["imp_1h"] == 40

