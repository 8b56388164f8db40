"""The scorer against a real Redis: one round trip per request once the version is loaded,
scores equal to the learner's own, and a push or a newly published version picked up."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis

from flows.build import feature_spec, feature_store, model_settings, model_store, scorer
from joiner.events import Impression
from learners.model import Models
from learners.publish import LOG_LENGTH, ModelStore
from learners.scorer import LoadedVersion, NotLoaded, Weights
from tests.integration.test_embeddings_cli import synthetic

CONTEXT = {"device": "mobile", "position": 2, "hour": 20}


@pytest.fixture
def setup(stack_cfg):
    tag = uuid.uuid4().hex[:8]
    cfg = stack_cfg.replace(learn={"store_name": f"sc{tag}", "emb_dim": 8,
                                   "emb_fallback_rows": 64},
                            features={"store_prefix": f"f{tag}"})
    spec = feature_spec(cfg)
    models = Models(model_settings(cfg), spec)
    records = synthetic(600)
    models.learn(records[:400])
    store = model_store(cfg)
    version = models.write_version(store, "online", None)
    store.publish(version)
    names = spec.feature_names()
    rows = {(entity, id_): {n: (k * 3 + j) % 11 for j, n in enumerate(names)}
            for k in range(10) for entity, id_ in
            (("user", f"u{k}"), ("item", f"i{k}"), ("category", f"c{k % 5}"),
             ("user_category", f"u{k}|c{k % 5}"))
            if entity in spec.entities}
    feature_store(cfg, names).write_many(rows, ts_ms=1)  # counts the scores must read
    return cfg, models, store, version, records


class Trips:
    """Counts the round trips of every client in the process: one per command sent alone,
    one per pipeline executed."""

    def __init__(self, monkeypatch):
        self.n = 0
        pipe_execute, command = redis.client.Pipeline.execute, redis.Redis.execute_command

        def execute(pipe, *a, **kw):
            self.n += 1
            return pipe_execute(pipe, *a, **kw)

        def execute_command(client, *a, **kw):
            self.n += 1
            return command(client, *a, **kw)

        monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
        monkeypatch.setattr(redis.Redis, "execute_command", execute_command)


def check_equal(s, models, users, items):
    for user in users:
        _, examples = s.examples(user, items, CONTEXT)
        want = models.predict(examples)
        got = s.score(user, items, CONTEXT)
        for name in ("ftrl", "bopr", "emb"):
            np.testing.assert_allclose([g[name] for g in got], want[name], rtol=0, atol=1e-6)


def test_one_round_trip_per_score_and_new_versions_and_pushes_picked_up(setup, monkeypatch):
    cfg, models, store, version, records = setup
    s = scorer(cfg)
    items = [f"i{k}" for k in range(20)] + ["never-seen"]
    users = ["u1", "u7", "nobody"]
    check_equal(s, models, users, items)
    assert s.version == version and s.loads == 1

    trips = Trips(monkeypatch)
    s.score("u3", items, CONTEXT)
    assert trips.n == 1
    s.score("u3", items[:5], CONTEXT)
    assert trips.n == 2 and s.loads == 1

    # The online learner pushes into the current version: the next score sees it.
    before = s.score("u3", items, CONTEXT)
    models.learn(records[400:500])
    models.push(store, version)
    after = s.score("u3", items, CONTEXT)
    assert s.loads == 2 and s.version == version
    assert [a["ftrl"] for a in after] != [b["ftrl"] for b in before]
    check_equal(s, models, users, items)
    # The embedding model's dense block is learned online and goes with every push.
    dense = store.load(version).get_vectors("dense", np.arange(len(models.emb.dense_weights())))
    np.testing.assert_array_equal(dense[:, 0], models.emb.dense_weights())

    # A newly published version is picked up on the next request, and kept after it.
    models.learn(records[500:])
    new = models.write_version(store, "online", version)
    store.publish(new, expected_current=version)
    check_equal(s, models, users, items)
    assert s.version == new and s.loads == 3
    n = trips.n
    s.score("u1", items, CONTEXT)
    assert trips.n == n + 1 and s.loads == 3


def test_scorers_sharing_a_loaded_version_load_it_once(setup):
    """As the HTTP server's threads do: each version and each push loaded once between them,
    and every scorer's scores still the learner's."""
    cfg, models, store, version, records = setup
    shared = LoadedVersion()
    scorers = [scorer(cfg, shared) for _ in range(3)]
    items = [f"i{k}" for k in range(10)]
    for s in scorers:
        check_equal(s, models, ["u1"], items)
    assert shared.loads == 1 and {s.loads for s in scorers} == {1}
    models.learn(records[400:500])
    models.push(store, version)
    for s in scorers:
        check_equal(s, models, ["u2"], items)
    assert shared.loads == 2 and {s.version for s in scorers} == {version}


def test_new_attributes_cost_one_more_round_trip_and_are_used(setup, monkeypatch):
    cfg, models, store, version, _ = setup
    s = scorer(cfg)
    items = [f"i{k}" for k in range(5)]
    s.score("u1", items, CONTEXT)
    trips = Trips(monkeypatch)
    store.client.hset(f"{store.prefix}:items", "i0", b'{"category": "c-new"}')
    check_equal(s, models, ["u1"], items)  # examples() then score(): both see c-new
    _, examples = s.examples("u1", items, CONTEXT)
    assert examples[0]["features"]["category"] == "c-new"
    n = trips.n
    s.score("u1", items, CONTEXT)
    assert trips.n == n + 1


def test_examples_hold_the_stores_counts_of_each_entity(setup):
    """What check_equal feeds the learner is what the store holds, entity by entity."""
    cfg, models, store, version, _ = setup
    spec = feature_spec(cfg)
    features = feature_store(cfg, spec.feature_names())
    items = ["i1", "i2", "never-seen"]
    _, examples = scorer(cfg).examples("u1", items, CONTEXT)
    assert [e["item_id"] for e in examples] == items
    for e in examples:
        imp = Impression("", 0, "u1", e["item_id"], e["features"])
        pairs = spec.entity_ids(imp)
        assert list(e["counts"]) == [entity for entity, _ in pairs]
        for (entity, _), row in zip(pairs, features.get_pairs(pairs), strict=True):
            assert e["counts"][entity] == {n: row[n] for n in spec.feature_names()}
    assert examples[0]["features"] == {"category": "c1", **CONTEXT}
    assert examples[0]["counts"]["user_category"]["imp_5m"] > 0  # written by the fixture


def test_without_load_only_the_first_load_is_waited_for(setup):
    """As the HTTP server scores: the first version is named (`NotLoaded`) and loaded apart;
    after it, a push or a new version is brought in by a thread while requests are answered
    from the copy held, whole (the scores of one copy, and its version named)."""
    cfg, models, store, version, records = setup
    shared = LoadedVersion()
    s = scorer(cfg, shared)
    with pytest.raises(NotLoaded) as e:
        s.score("u1", ["i1"], CONTEXT, load=False)
    assert e.value.version == version and s.loads == 0
    s.load(e.value.version, e.value.generation)
    check_equal(s, models, ["u1"], ["i1", "i2"])
    items = [f"i{k}" for k in range(10)]
    before = s.score("u1", items, CONTEXT, load=False)
    held = shared.current
    models.learn(records[400:500])
    models.push(store, version)  # a push: the copy held answers until the new one is in
    assert s.score("u1", items, CONTEXT, load=False) == before and s.version == version
    shared.settle()
    assert shared.current is not held and shared.current[0].version == version
    assert shared.current[0].generation > held[0].generation
    after = s.score("u1", items, CONTEXT, load=False)
    assert [a["ftrl"] for a in after] != [b["ftrl"] for b in before]
    check_equal(s, models, ["u1"], items)
    assert shared.full_loads == 1  # the push was read incrementally

    models.learn(records[500:])
    new = models.write_version(store, "online", version)
    store.publish(new, expected_current=version)
    assert s.score("u1", items, CONTEXT, load=False) == after and s.version == version
    shared.settle()
    s.score("u1", items, CONTEXT, load=False)
    assert s.version == new and shared.full_loads == 2
    check_equal(s, models, ["u1", "u7"], items)


def assert_copy_equal(got, want):
    """Two copies of a version hold the same vectors and rows (``got`` may keep removed rows
    in its arrays, out of its index)."""
    assert got.version == want.version and got.meta == want.meta
    assert got.vectors.keys() == want.vectors.keys() and got.rows.keys() == want.rows.keys()
    for m, (coords, values) in want.vectors.items():
        np.testing.assert_array_equal(got.vectors[m][0], coords)
        np.testing.assert_array_equal(got.vectors[m][1], values)
    for t, (index, _) in want.rows.items():
        assert got.rows[t][0].keys() == index.keys()
        ids = list(index)
        for a, b in zip(got.get_rows(t, ids), want.get_rows(t, ids), strict=True):
            np.testing.assert_array_equal(a, b)


def test_pushes_are_read_incrementally_and_scores_stay_the_learners(setup, monkeypatch):
    """Over several pushes (rows added, changed and evicted, new FTRL and BOPR coordinates,
    the dense block), a copy refreshed from the version's log equals the version loaded
    whole, and the scores the learner's; only the fields the pushes wrote are read."""
    cfg, models, store, version, records = setup
    shared = LoadedVersion()
    s = scorer(cfg, shared)
    items = [f"i{k}" for k in range(20)] + ["never-seen"]
    check_equal(s, models, ["u1"], items)
    read = []  # fields read from the version's keys
    hmget = redis.client.Pipeline.hmget
    monkeypatch.setattr(redis.client.Pipeline, "hmget", lambda p, key, fields, *a: (
        read.append(len(fields)) if key.startswith(f"{store.prefix}:v:") else None,
        hmget(p, key, fields, *a))[1])
    for k, chunk in enumerate((records[400:430], records[430:480], records[480:600])):
        models.learn(chunk)
        changes = models.changes()
        models.write(store, version, changes)
        written = sum(len(changes[m][0]) for m in ("ftrl", "bopr")) + sum(
            len(changes["emb"][t].ids) for t in ("user", "item"))
        written += 0 if changes["emb"]["dense"] is None else len(changes["emb"]["dense"])
        if k == 1:  # rows deleted, as the learner evicts them
            deleted = list(shared.current[0].rows["item"][0])[:3]
            store.delete_rows(version, "item", deleted)
            store.delete_rows(version, "user", ["u1", "not-a-row"])
            written += len(deleted) + 2
        read.clear()
        s.score("u1", items, CONTEXT)
        assert 0 < sum(read) <= written
        assert_copy_equal(shared.current[0], store.load(version))
        if k != 1:
            check_equal(s, models, ["u1", "u7", "nobody"], items)
    assert shared.full_loads == 1 and shared.loads == 4
    copy, weights = shared.current  # the tables: what the copy reads at every coordinate
    everywhere = np.arange(1 << models.hasher.bits)
    for m, default in (("ftrl", None), ("bopr", weights.prior)):
        np.testing.assert_array_equal(np.stack(weights.tables[m], axis=1),
                                      copy.get_vectors(m, everywhere, default))


def test_a_reader_behind_the_log_loads_the_version_whole(setup):
    """The log keeps the last LOG_LENGTH writes: a copy older than that is loaded whole, and
    scores as the learner still; a write the log cannot name field by field (a table
    replaced whole) too."""
    cfg, models, store, version, records = setup
    shared = LoadedVersion()
    s = scorer(cfg, shared)
    check_equal(s, models, ["u1"], ["i1", "i2"])
    held = shared.current[0]
    models.learn(records[400:500])
    changes = models.changes()
    models.write(store, version, changes)
    coords, weights = changes["ftrl"]
    for _ in range(LOG_LENGTH):  # rewrites of one weight, each a write of its own
        store.put_vectors(version, "ftrl", coords[:1], weights[:1])
    copy, changed = store.refresh(held)
    assert changed is None and copy.generation > held.generation + LOG_LENGTH
    assert_copy_equal(copy, store.load(version))
    check_equal(s, models, ["u1", "u7"], ["i1", "i2", "i3"])
    assert shared.full_loads == 2

    p = models.emb.tables["item"].pop_dirty()
    copy = shared.current[0]
    store.replace_rows(version, "item", p.ids, p.vectors, p.updated_ms)
    fresh, changed = store.refresh(copy)
    assert changed is None and fresh.generation == copy.generation + 1
    again, changed = store.refresh(fresh)  # nothing written since
    assert again is fresh and changed == {}


def test_a_hash_space_too_big_for_tables_is_read_by_search(setup, monkeypatch):
    cfg, models, *_ = setup
    monkeypatch.setattr(Weights, "TABLE_BITS", models.hasher.bits - 1)
    s = scorer(cfg)
    check_equal(s, models, ["u1", "nobody"], [f"i{k}" for k in range(12)])
    assert s._weights.tables is None


def test_counts_the_vector_path_refuses_are_hashed_one_by_one(setup):
    """A negative count (no counter writes one, but the store holds any int64) sends the
    request through the learner's own per-example path: the scores still agree."""
    cfg, models, *_ = setup
    spec = feature_spec(cfg)
    feature_store(cfg, spec.feature_names()).write_many(
        {("user", "u5"): {spec.feature_names()[0]: -3}}, ts_ms=1)
    s = scorer(cfg)
    _, examples = s.examples("u5", ["i1", "i2"], CONTEXT)
    assert examples[0]["counts"]["user"][spec.feature_names()[0]] == -3
    assert models.hasher.count_values(examples) is None
    check_equal(s, models, ["u5"], ["i1", "i2", "i3"])


def test_a_failed_refresh_keeps_the_copy_held_logs_and_is_tried_again_later(setup, monkeypatch,
                                                                            caplog):
    cfg, models, store, version, records = setup
    shared = LoadedVersion()
    s = scorer(cfg, shared)
    items = [f"i{k}" for k in range(10)]
    before = s.score("u1", items, CONTEXT)
    held = shared.current
    models.learn(records[400:500])
    models.push(store, version)
    refresh = ModelStore.refresh

    def broken(self, copy):
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(ModelStore, "refresh", broken)
    monkeypatch.setattr(LoadedVersion, "RETRY_S", 3600)
    assert s.score("u1", items, CONTEXT, load=False) == before
    shared.settle()
    assert "Redis went away" in caplog.text and shared.current is held
    monkeypatch.setattr(ModelStore, "refresh", refresh)
    assert s.score("u1", items, CONTEXT, load=False) == before  # not tried again yet
    shared.settle()
    assert shared.current is held
    monkeypatch.setattr(LoadedVersion, "RETRY_S", 0)
    s.score("u1", items, CONTEXT, load=False)  # the failed one's pause is over: tried again
    shared.settle()
    assert shared.current is not held
    check_equal(s, models, ["u1"], items)
