"""The online trainer without Redis: dedup, validation, batches and its recovery state.

A trainer resumed from a state and given long intervals makes no Redis call (its store is
None here); the models are a stand-in that records what it is given, so these tests check
the trainer's rules, not the models'."""

from __future__ import annotations

import pickle

import orjson

from learners.archive import ExampleArchive
from learners.trainer import COUNTS, OnlineTrainer, RecentIds, day_end_ms

DAY0 = 1_700_006_400_000
NEVER = 1e9  # s: no push and no version is due during a test


class FakeModels:
    """Records the batches it learns; annotates them as Models.learn does."""

    def __init__(self, learned: list | None = None) -> None:
        self.batches: list[list[dict]] = []
        self.learned = list(learned or [])

    def learn(self, examples, annotate=False, checked=False):
        assert checked, "the trainer applies the learnable rule itself"
        self.batches.append(list(examples))
        for e in examples:
            self.learned.append(e["impression_id"])
            if annotate:
                e["online_p"] = {"ftrl": 0.5, "bopr": 0.5, "emb": 0.5}
        return {"examples": len(examples), "learned": len(examples)}

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.learned)

    @classmethod
    def from_bytes(cls, data: bytes) -> FakeModels:
        return cls(orjson.loads(data))


def make_trainer(tmp_path, state: dict | None = None, horizon_ms: int = 3_600_000):
    state = state or {"models": FakeModels().to_bytes(), "version": "1", "dedup": [],
                      "counts": dict.fromkeys(COUNTS, 0), "offsets": {}}
    return OnlineTrainer(
        None, ExampleArchive(tmp_path / "archive", fsync=False),
        new_models=FakeModels, load_models=lambda v: FakeModels(),
        models_from_bytes=FakeModels.from_bytes, dedup_horizon_ms=horizon_ms,
        push_interval_s=NEVER, snapshot_interval_s=NEVER, online_keep_hours=2, resume=state)


def example(i: int, **kw) -> dict:
    return {"kind": "example", "impression_id": f"i{i}", "ts": DAY0 + i, "user_id": "u1",
            "item_id": "v1", "features": {}, "label": i % 2, **kw}


def records(objs, part: int = 0, first: int = 0) -> list[tuple]:
    return [(part, first + k, o if isinstance(o, bytes) else orjson.dumps(o))
            for k, o in enumerate(objs)]


def archived_ids(trainer) -> list[str]:
    a = trainer.archive
    return sorted(r["impression_id"] for d in a.days() for r in a.read_examples(d))


# -- dedup --------------------------------------------------------------------------------------


def test_recent_ids_forget_what_falls_behind_the_horizon():
    d = RecentIds(horizon_ms=1000)
    assert not d.seen("a", 10_000)
    assert d.seen("a", 10_000)
    assert not d.seen("b", 10_900)
    assert d.seen("a", 11_000)  # 1000 ms behind the newest: still within the horizon
    assert not d.seen("c", 11_001)  # the newest moves on: "a" falls out
    assert not d.seen("a", 11_002)


def test_recent_ids_memory_is_bounded_by_rate_times_horizon():
    d = RecentIds(horizon_ms=1000)
    for i in range(100_000):  # one id a ms
        d.seen(f"id{i}", i)
    assert len(d.ids) == len(d.order) <= 1001
    # An id arriving late (an old ts) is remembered until the newest moves past it.
    assert not d.seen("late", 99_500)
    assert d.seen("late", 99_999)


def test_recent_ids_state_round_trips():
    d = RecentIds(1000)
    for i in range(10):
        d.seen(f"x{i}", 100 * i)
    back = RecentIds(1000, d.state())
    assert back.ids == d.ids and back.newest == d.newest
    assert back.seen("x3", 2000) and not back.seen("y", 2000)


def test_duplicates_are_counted_not_learned_also_across_batches(tmp_path):
    t = make_trainer(tmp_path)
    assert t.on_batch(records([example(1), example(2), example(1)])) == []
    assert t.on_batch(records([example(2), example(3)], first=3)) == []
    assert t.models.learned == ["i1", "i2", "i3"]
    assert t.counts["duplicates"] == 2 and t.counts["learned"] == 3


def test_dedup_horizon_comes_from_the_constructor(tmp_path):
    t = make_trainer(tmp_path, horizon_ms=10)
    t.on_batch(records([example(1), example(100), example(1)]))
    assert t.models.learned == ["i1", "i100", "i1"]  # i1 again, 99 ms later: beyond 10 ms


# -- validation -----------------------------------------------------------------------------


def test_each_record_is_learned_archived_or_a_dead_letter_and_counted(tmp_path):
    t = make_trainer(tmp_path)
    correction = {"kind": "late_click", "impression_id": "i1", "ts": DAY0 + 1,
                  "click_ts": DAY0 + 5000}
    batch = records([example(1), b"{not json", [1, 2], {"impression_id": "i9", "ts": "x"},
                     example(2, label=None), example(3, label=True), correction,
                     example(4, quarantined=True), example(4, quarantined=True), example(5)])
    batch.append((1, None, "KafkaError{_TRANSPORT}"))  # a consumer error
    dead = t.on_batch(batch)

    assert [(d.partition, d.offset) for d in dead] == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5),
                                                       (1, None)]
    reasons = [d.reason for d in dead]
    assert reasons[0].startswith("bad JSON: ")
    assert reasons[1:] == ["not a JSON object", "ts missing or not an integer",
                           "label missing or not 0/1", "label missing or not 0/1",
                           "kafka error: KafkaError{_TRANSPORT}"]
    assert dead[0].raw == b"{not json" and dead[-1].raw is None
    assert t.models.learned == ["i1", "i5"]
    assert t.counts == {"in": 11, "learned": 2, "duplicates": 1, "corrections": 1,
                        "dead_letters": 6, "skipped": 1}
    assert sum(t.counts[k] for k in COUNTS if k != "in") == t.counts["in"]
    assert t.offsets == {0: 10}  # a consumer error moves no offset

    t.state()  # flushes the archive
    # quarantined: archived for the retrain, not learned; the correction relabels i1
    assert archived_ids(t) == ["i1", "i4", "i5"]
    day = t.archive.read_examples(t.archive.days()[0])
    assert {r["impression_id"]: r["label"] for r in day}["i1"] == 1


# -- batches --------------------------------------------------------------------------------


def test_a_batch_is_learned_in_one_call_in_arrival_order_and_archived_annotated(tmp_path):
    t = make_trainer(tmp_path)
    t.on_batch(records([example(i) for i in range(5)]))
    t.on_batch(records([b"bad"]))  # nothing learnable: no call
    t.on_batch(records([example(i) for i in range(5, 8)], first=5))
    assert [[e["impression_id"] for e in b] for b in t.models.batches] == [
        [f"i{i}" for i in range(5)], [f"i{i}" for i in range(5, 8)]]
    assert archived_ids(t) == []  # written at the next flush, not on every batch
    t.state()
    day = t.archive.read_examples(t.archive.days()[0])
    assert len(day) == 8 and all(r["online_p"]["ftrl"] == 0.5 for r in day)


# -- recovery state -------------------------------------------------------------------------


def test_state_round_trips_models_dedup_counts_offsets_and_version(tmp_path):
    t = make_trainer(tmp_path)
    t.on_batch(records([example(1), example(2)], part=3, first=40))
    state = t.state()
    assert set(state) == {"models", "version", "dedup", "counts", "offsets"}
    back = make_trainer(tmp_path, pickle.loads(pickle.dumps(state)))  # as bytewax keeps it
    assert back.version == "1" and back.offsets == {3: 42}
    assert back.counts == t.counts and back.models.learned == ["i1", "i2"]
    back.on_batch(records([example(2), example(3)], part=3, first=42))
    assert back.counts["duplicates"] == 1 and back.models.learned == ["i1", "i2", "i3"]
    assert t.counts["learned"] == 2  # the state is a copy: the original did not move


def test_next_due_is_the_earlier_of_push_and_version(tmp_path):
    t = make_trainer(tmp_path)
    t.next_push, t.next_version = 5.0, 9.0
    assert t.next_due() == 5.0
    t.on_time(4.9)  # nothing due: no Redis call (the store is None)
    assert (t.next_push, t.next_version) == (5.0, 9.0)


# -- replay after a version switch ------------------------------------------------------------


def test_replay_since_learns_the_archived_learnable_examples_from_then_in_event_time_order(
        tmp_path):
    t = make_trainer(tmp_path)
    boundary = DAY0 + 86_400_000
    late = [example(i, ts=boundary + 1000 - 10 * i) for i in range(50)]  # arrive newest first
    t.on_batch(records([example(1000 + i, ts=boundary - 500 + i) for i in range(10)]
                       + late + [example(2000, ts=boundary + 5, quarantined=True)]))
    t.models = FakeModels()  # the retrained version: has learned nothing since the boundary
    assert t.replay_since(boundary) == 50  # also reads what was not flushed yet
    assert t.models.learned == [f"i{i}" for i in reversed(range(50))]  # by ts, not arrival
    assert t.counts["learned"] == 60  # counts are of the input: a replay is not input
    assert "online_p" not in t.models.batches[0][0]  # predicted afresh, not the archived ones


def test_day_end_is_the_next_utc_midnight():
    assert day_end_ms("2023-11-14") == DAY0  # 2023-11-15T00:00Z
    assert day_end_ms("2023-11-15") == DAY0 + 86_400_000
