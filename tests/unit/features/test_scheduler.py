"""The point-in-time scheduler driven with plain lists of signals, as the join partitions send
them: event-time order across partitions, the watermark, the snapshot delay, recovery."""

from __future__ import annotations

import gc
import pickle
import random

import orjson
import pytest

from features.scheduler import (
    DONE,
    RESEEN,
    WATERMARK,
    PointInTimeScheduler,
    ShardRouter,
    entity_shard,
    merge_parts,
    resend_ms,
)
from features.spec import FeatureSpec, window_label
from joiner.events import Impression
from joiner.join import CLICKED, SEEN

SEC, MIN, HOUR = 1000, 60_000, 3_600_000
SPEC = FeatureSpec(entities={"user": ("user_id",), "item": ("item_id",)},
                   windows_ms=(MIN, HOUR))
LATENESS, DELAY = 10 * SEC, 4 * SEC  # counted up to 6 s ahead, snapshots 4 s behind


def imp(ts, user="u1", item="i1", iid=None):
    return Impression(iid or f"{user}-{ts}", ts, user, item, {})


def scheduler(partitions=1, resume=None):
    return PointInTimeScheduler(SPEC, partitions, LATENESS, DELAY, resume)


def seen(im, offset=-1):
    """An impression's signal as the join sends it, with its offset (-1: before any replay)."""
    return SEEN, (im, offset)


def routed(batch, shards=1):
    """One partition's batch of join signals through a router of that partition (the one of
    its watermark, last), as the join sends them: (shard, signals) for each shard."""
    part = batch[-1][1][0] if batch and batch[-1][0] == WATERMARK else 0
    return ShardRouter(SPEC, shards, part).route(batch)


def push(s, batch):
    """Feed one batch of join signals to a single-shard scheduler, as the router sends them."""
    return s.push(*[signals for _, signals in routed(batch)])


def counts(pits):
    return {i: orjson.loads(j) for i, _, j, _ in pits}


def recount(events, im):
    """The oracle: every event of the impression's entities in [ts - w, ts)."""
    out = {}
    for name, eid in SPEC.entity_ids(im):
        vals = {}
        for w in SPEC.windows_ms:
            for prefix, kind in (("imp", SEEN), ("clk", CLICKED)):
                vals[f"{prefix}_{window_label(w)}"] = sum(
                    1 for k, e, ts in events if k == kind and im.ts - w <= ts < im.ts
                    and dict(SPEC.entity_ids(e))[name] == eid)
        out[name] = vals
    return out


def partitioned_batches(seed, n=600, partitions=2, batch=7, horizon=None, ids=20):
    """(events, batches): impressions and their clicks spread over the partitions by id; each
    partition's signals in its own arrival order (jittered up to 3 s, clicks after their
    impression) cut into batches, each followed by the partition's watermark (the lowest ts
    still to come from it, DONE at its end); the partitions' batches interleave at random,
    one partition running far ahead of the other; ``ids`` users and items. An impression's
    offset is its place in its partition's arrivals. ``horizon``: the watermark also says
    where a replay would start, as the join's queue keeps impressions, in arrival order, until
    the watermark is ``horizon`` past the oldest."""
    rng = random.Random(seed)
    events, arrivals, ts = [], [[] for _ in range(partitions)], 0
    for i in range(n):
        ts += rng.randrange(0, 2 * SEC)
        im = imp(ts, user=f"u{rng.randrange(ids)}", item=f"i{rng.randrange(ids)}", iid=str(i))
        part, key = i % partitions, ts + rng.randrange(3 * SEC)
        events.append((SEEN, im, ts))
        arrivals[part].append((key, i, (SEEN, im), ts))
        if rng.random() < 0.3:
            cts = ts + rng.randrange(20 * SEC)
            events.append((CLICKED, im, cts))
            arrivals[part].append((max(cts + rng.randrange(3 * SEC), key), i, (CLICKED, (im, cts)),
                                   cts))
    queues = []
    for arr in arrivals:
        arr.sort()
        imps = [a for a in arr if a[2][0] == SEEN]
        offsets = {id(a): k for k, a in enumerate(imps)}
        cuts, head, sent = [], 0, 0
        for j in range(0, len(arr), batch):
            rest = [a[3] for a in arr[j + batch:]]
            part = len(queues)
            wm = min(rest) if rest else DONE
            signals = [(SEEN, (a[2][1], offsets[id(a)])) if id(a) in offsets else a[2]
                       for a in arr[j:j + batch]]
            if horizon is None:
                cuts.append(signals + [(WATERMARK, (part, wm))])
                continue
            sent += sum(1 for a in arr[j:j + batch] if id(a) in offsets)
            while head < sent and imps[head][3] + horizon <= wm:
                head += 1
            cuts.append(signals + [(WATERMARK, (part, wm, head))])
        queues.append(cuts)
    out = []
    while any(queues):
        # partition 1 reads four batches for each of partition 0's: it runs ahead
        weights = [1 if p == 0 else 4 for p, q in enumerate(queues) if q]
        live = [q for q in queues if q]
        out.append(rng.choices(live, weights)[0].pop(0))
    return events, out


def run(s, batches):
    pits = []
    for b in batches:
        pits += push(s, b)
    return pits


def test_snapshots_are_a_recount_strictly_before_whatever_the_arrival_order():
    events, batches = partitioned_batches(1)
    pits = run(scheduler(partitions=2), batches)
    imps = {e.impression_id: e for k, e, _ in events if k == SEEN}
    assert sorted(i for i, _, _, _ in pits) == sorted(imps)  # each exactly once
    got = counts(pits)
    for iid, im in imps.items():
        assert got[iid] == recount(events, im), iid
    assert all(t == imps[i].ts for i, _, _, t in pits)  # each part says its impression's ts
    ts = [t for _, _, _, t in pits]
    assert ts == sorted(ts)  # in event-time order
    assert sum(v["user"]["clk_1m"] for v in got.values()) > 50  # clicks were counted


def test_the_lowest_partition_watermark_holds_snapshots_back():
    s = scheduler(partitions=2)
    assert push(s, [seen(imp(100 * SEC)), (WATERMARK, (0, 200 * SEC))]) == []
    # partition 1 has not reported: nothing is counted or snapshotted yet
    assert push(s, [(WATERMARK, (1, 90 * SEC))]) == [] and s.rows() == []
    # a watermark never goes back
    assert push(s, [(WATERMARK, (0, 0)), (WATERMARK, (1, 94 * SEC))]) == []
    assert s.rows() != []  # counted
    assert push(s, [(WATERMARK, (1, 103_999))]) == []
    assert [i for i, _, _, _ in push(s, [(WATERMARK, (1, 104 * SEC))])] == ["u1-100000"]


def test_counts_leave_out_the_impression_itself_and_anything_later():
    s = scheduler()
    t = 100 * SEC
    before, it = imp(t - 30 * SEC), imp(t)
    pits = push(s, [
        seen(imp(t + SEC)),  # later, arrived first
        (CLICKED, (before, t + 500)),  # later click on an earlier impression
        seen(imp(t, iid="same-ms")),  # at the same millisecond
        (CLICKED, (it, t)),  # its own click
        seen(before), (CLICKED, (before, t - SEC)),
        seen(it), (WATERMARK, (0, DONE))])
    one = {"imp_1m": 1, "clk_1m": 1, "imp_1h": 1, "clk_1h": 1}
    assert counts(pits)["u1-100000"] == {"user": one, "item": one}


def test_snapshot_waits_pit_delay_while_counting_runs_ahead():
    s = scheduler()
    t = 100 * SEC
    push(s, [seen(imp(t, user="u2")), (WATERMARK, (0, t - 6 * SEC - 1))])
    # beyond lateness - delay past the watermark: waits
    assert push(s, []) == [] and s.rows() == []
    assert push(s, [(WATERMARK, (0, t - 6 * SEC))]) == []
    assert {(e, i) for e, i, _, _ in s.rows()} == {("user", "u2"), ("item", "i1")}
    # an impression arriving 1.5 s behind the watermark is still in the snapshot of its
    # neighbour, counted before it went out
    assert push(s, [(WATERMARK, (0, t + 500))]) == []
    pits = push(s, [seen(imp(t - SEC, user="u3")), (WATERMARK, (0, t + 4 * SEC - 1))])
    assert [i for i, _, _, _ in pits] == ["u3-99000"]  # its own delay has passed
    pits = push(s, [(WATERMARK, (0, t + 4 * SEC))])
    assert counts(pits) == {"u2-100000": {
        "user": {"imp_1m": 0, "clk_1m": 0, "imp_1h": 0, "clk_1h": 0},
        "item": {"imp_1m": 1, "clk_1m": 0, "imp_1h": 1, "clk_1h": 0}}}


def test_done_partitions_flush_everything():
    events, batches = partitioned_batches(2, n=200, partitions=3)
    s = scheduler(partitions=3)
    pits = run(s, [[sig for sig in b if sig[0] != WATERMARK] for b in batches])
    assert pits == []  # no watermark, nothing out
    pits = push(s, [(WATERMARK, (p, DONE)) for p in range(3)])
    assert len(pits) == 200 and s.waiting == s.snapshots == []


def test_resumed_from_its_state_midway_gives_the_same_snapshots():
    _, batches = partitioned_batches(3, n=3000)
    batches = [sum(batches[i:i + 5], []) for i in range(0, len(batches), 5)]
    half = len(batches) // 2
    whole = scheduler(partitions=2)
    straight = run(whole, batches)
    first = scheduler(partitions=2)
    before = run(first, batches[:half])
    assert first.snapshots and first.waiting  # stopped with snapshots and signals pending
    resumed = scheduler(partitions=2, resume=pickle.loads(pickle.dumps(first.state())))
    # (rows may differ: restored counters look at every entity again, see `restore`)
    assert before + run(resumed, batches[half:]) == straight
    assert len(straight) == 3000 and resumed.counters._entities == whole.counters._entities


def test_quiet_entities_get_stale_rows_then_all_rows_on_demand():
    s = scheduler()
    push(s, [seen(imp(0, user="quiet", item="a")), seen(imp(SEC, user="busy")),
             (WATERMARK, (0, SEC))])
    assert ("user", "quiet") in {(e, i) for e, i, _, _ in s.rows()}
    push(s, [seen(imp(30 * SEC, user="busy")), (WATERMARK, (0, 30 * SEC))])
    assert {(e, i) for e, i, _, _ in s.rows()} == {("user", "busy"), ("item", "i1")}
    # the quiet user's impression leaves its 1-minute window as of 60.001 s
    push(s, [seen(imp(MIN + 1, user="busy")), (WATERMARK, (0, MIN + 1))])
    stale = {(e, i): (v, ts) for e, i, v, ts in s.rows()}
    assert stale[("user", "quiet")] == (
        {"imp_1m": 0, "clk_1m": 0, "imp_1h": 1, "clk_1h": 0}, MIN + 1)
    assert {(e, i) for e, i, _, _ in s.all_rows()} == {
        ("user", "quiet"), ("user", "busy"), ("item", "a"), ("item", "i1")}


def test_pit_delay_must_fit_in_the_lateness():
    with pytest.raises(ValueError, match="pit_delay_ms"):
        PointInTimeScheduler(SPEC, 1, allowed_lateness_ms=SEC, pit_delay_ms=2 * SEC)


def sharded_run(batches, shards, stop=None, epochs=False):
    """The batches through a router and one scheduler per shard: {impression: [(shard, n,
    part)]}, and the schedulers. ``epochs``: each one's state() taken after every batch."""
    ss = [scheduler(partitions=2) for _ in range(shards)]
    parts: dict = {}
    for b in batches[:stop]:
        for k, signals in routed(b, shards):
            for iid, n, part, _ in ss[k].push(signals):
                parts.setdefault(iid, []).append((k, n, part))
        if epochs:
            for s in ss:
                s.state()
    return parts, ss


@pytest.mark.parametrize("shards", [1, 4, 16])
def test_sharded_parts_add_up_to_the_recount(shards):
    events, batches = partitioned_batches(4, n=800)
    parts, ss = sharded_run(batches, shards)
    imps = {e.impression_id: e for k, e, _ in events if k == SEEN}
    assert parts.keys() == imps.keys()
    for iid, got in parts.items():
        # each shard owning an entity of the impression sends one part, and says how many
        assert sorted(k for k, _, _ in got) == sorted({k for k, _, _ in got})
        assert {n for _, n, _ in got} == {len(got)}
        merged = orjson.loads(merge_parts([(k, p) for k, _, p in got]))
        assert merged == recount(events, imps[iid]), iid
    busy = [len(s.counters) for s in ss]
    assert sum(busy) == 40 and (shards == 1 or max(busy) < 40)  # 20 users + 20 items, spread


def test_sharded_resume_midway_gives_the_same_parts():
    _, batches = partitioned_batches(5, n=2000)
    straight, _ = sharded_run(batches, 4)
    half = len(batches) // 2
    before, ss = sharded_run(batches, 4, stop=half)
    states = [pickle.loads(pickle.dumps(s.state())) for s in ss]
    resumed = [scheduler(partitions=2, resume=st) for st in states]
    after: dict = {}
    for b in batches[half:]:
        for k, signals in routed(b, 4):
            for iid, n, part, _ in resumed[k].push(signals):
                after.setdefault(iid, []).append((k, n, part))
    joined = {i: sorted(before.get(i, []) + after.get(i, [])) for i in straight}
    assert joined == {i: sorted(v) for i, v in straight.items()}


def test_state_taken_every_epoch_resumes_like_the_first_state():
    """state() is taken at every epoch's end and encodes only what came in since: resuming
    from any epoch's state gives the snapshots of an uninterrupted run."""
    _, batches = partitioned_batches(6, n=1500)
    straight = run(scheduler(partitions=2), batches)
    for stop in (len(batches) // 5, len(batches) // 2, len(batches) - 3):
        s, before = scheduler(partitions=2), []
        for b in batches[:stop]:
            before += push(s, b)
            state = pickle.loads(pickle.dumps(s.state()))
        assert s.waiting or s.snapshots, stop  # stopped with something held
        # fewer chunks than epochs: those whose every entry is done are dropped
        assert len(state["waiting"]) + len(state["snapshots"]) < 2 * stop
        resumed = scheduler(partitions=2, resume=state)
        assert sorted(resumed.waiting) == sorted(s.waiting)
        # (entities come back from JSON as lists: the same to snapshot_at)
        assert orjson.dumps(sorted(resumed.snapshots)) == orjson.dumps(sorted(s.snapshots))
        assert before + run(resumed, batches[stop:]) == straight


def replayed(batches):
    """What the join partitions resend on resume after ``batches`` (`RESEEN`): the
    impressions from each one's replay_from on, after its watermark less resend_ms."""
    sent: dict = {}
    last: dict = {}
    for b in batches:
        for kind, value in b:
            if kind == SEEN:
                part = int(value[0].impression_id) % 2
                sent.setdefault(part, []).append(value)
            elif kind == WATERMARK:
                last[value[0]] = value
    after = resend_ms(LATENESS, DELAY)
    return {part: [(RESEEN, (im, off)) for im, off in imps
                   if off >= last[part][2] and im.ts > last[part][1] - after]
            for part, imps in sent.items()}


def test_held_impressions_a_replay_resends_are_left_out_of_the_state():
    """The state keeps only the held impressions a replay would not resend: those below the
    partition's replay_from (more of them when the join's queue forgets sooner), or resend_ms
    behind its watermark (the partition running ahead); a resume from it, given the RESEEN
    of the replay, gives the parts of an uninterrupted run, from every epoch's state, on 1 and
    4 shards."""
    kept, resent = {}, {}
    for horizon in (2 * SEC, 60 * SEC):
        # 3 users and 3 items: their older events go to tiles, where a query's ts falls in
        # a tile (after counting ran on) is less exact than in the recent events
        _, batches = partitioned_batches(7, n=1500, horizon=horizon, ids=3)
        for shards in (1, 4):
            straight, _ = sharded_run(batches, shards)
            for stop in range(len(batches) // 6, len(batches) - 2, len(batches) // 6):
                before, ss = sharded_run(batches, shards, stop, epochs=True)
                states = [pickle.loads(pickle.dumps(s.state())) for s in ss]
                resumed = [scheduler(partitions=2, resume=st) for st in states]
                n_kept = sum(len(r.snapshots) for r in resumed)
                kept[horizon] = kept.get(horizon, 0) + n_kept
                resent[horizon] = (resent.get(horizon, 0)
                                   + sum(len(s.snapshots) for s in ss) - n_kept)
                after: dict = {}
                resend = replayed(batches[:stop])
                for b in batches[stop:]:
                    # each partition sends its RESEEN with its first batch
                    b = resend.pop(b[-1][1][0], []) + b
                    for k, signals in routed(b, shards):
                        for iid, n, p, _ in resumed[k].push(signals):
                            after.setdefault(iid, []).append((k, n, p))
                joined = {i: sorted(before.get(i, []) + after.get(i, [])) for i in straight}
                assert joined == {i: sorted(v) for i, v in straight.items()}, (horizon, stop)
    assert kept[2 * SEC] > kept[60 * SEC] > 0 and resent[2 * SEC] > 0, (kept, resent)


def test_a_resumed_shard_waits_for_every_partition_to_resend():
    """After a resume, nothing is counted or snapshotted until every partition has sent its
    first batch (its RESEEN, then its watermark): else a partition's watermark could move
    the counting on, and another's resent impressions be snapshotted late, from tiles."""
    s = scheduler(partitions=2)
    a, b = imp(10 * SEC, iid="a"), imp(10 * SEC, user="u2", iid="b")
    push(s, [(SEEN, (a, 0)), (WATERMARK, (0, 10 * SEC, 0))])  # partition 0 is the slowest
    push(s, [(SEEN, (b, 0)), (WATERMARK, (1, 20 * SEC, 0))])
    state = pickle.loads(pickle.dumps(s.state()))
    assert len(s.snapshots) == 2 and state["snapshots"] == []  # both would be resent
    resumed = scheduler(partitions=2, resume=state)
    # partition 0 moves on first: b, due now, is not back yet, so nothing moves
    assert push(resumed, [(RESEEN, (a, 0)), (WATERMARK, (0, 60 * SEC, 0))]) == []
    assert resumed.counted_to == s.counted_to and len(resumed.snapshots) == 1
    got = push(resumed, [(RESEEN, (b, 0)), (WATERMARK, (1, 60 * SEC, 0))])
    assert sorted(i for i, _, _, _ in got) == ["a", "b"]


def test_a_state_of_another_format_is_refused():
    s = scheduler()
    push(s, [seen(imp(1000)), (WATERMARK, (0, 1000))])
    state = s.state()
    del state["format"]
    with pytest.raises(ValueError, match="another format"):
        scheduler(resume=state)


def test_entities_sharing_a_first_field_share_a_shard_and_the_shards_stay_even():
    """The default five entities: an impression touches at most three shards (its user's,
    its item's, its category's), and 20k users spread evenly over 16 shards."""
    spec = FeatureSpec()
    router = ShardRouter(spec, 16)
    rng = random.Random(0)
    touched = []
    for i in range(2000):
        user, item, cat = f"u{rng.randrange(500)}", f"i{rng.randrange(300)}", f"c{i % 7}"
        ids = [("user", user), ("item", item), ("category", cat),
               ("user_category", f"{user}|{cat}"), ("item_position", f"{item}|{i % 5}")]
        split = router.split(ids)
        assert len(split) <= 3
        assert entity_shard(spec, "user", user, 16) == entity_shard(
            spec, "user_category", f"{user}|{cat}", 16)
        assert entity_shard(spec, "item", item, 16) == entity_shard(
            spec, "item_position", f"{item}|{i % 5}", 16)
        touched.append(len(split))
    assert sum(touched) / len(touched) < 3
    per_shard = [0] * 16
    for u in range(20_000):
        per_shard[entity_shard(spec, "user", f"u{u}", 16)] += 1
    assert max(per_shard) < 1.1 * 20_000 / 16 and min(per_shard) > 0.9 * 20_000 / 16


def test_held_signals_and_snapshots_leave_the_garbage_collectors_view():
    """A shard holds minutes of signals and impressions; held as tuples of strings and ints,
    the collector stops tracking them (inner tuples first, one level a pass) instead of
    rescanning millions at every collection of the older generations."""
    s = scheduler()
    push(s, [seen(imp(1000)), seen(imp(20 * SEC)), (WATERMARK, (0, 1000))])
    for _ in range(4):  # entry, signal, its entities, each entity
        gc.collect()
    assert s.waiting and s.snapshots
    assert not any(gc.is_tracked(e) for e in s.waiting + s.snapshots)
    resumed = scheduler(resume=pickle.loads(pickle.dumps(s.state())))
    for _ in range(4):  # entry, signal, its entities, each entity
        gc.collect()
    assert resumed.waiting == s.waiting and resumed.snapshots == s.snapshots
    assert not any(gc.is_tracked(e) for e in resumed.waiting + resumed.snapshots)
