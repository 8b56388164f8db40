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


def test_without_load_a_version_not_loaded_is_named_then_loaded_apart(setup):
    """As the HTTP server scores: never loading on its event loop, but in a thread."""
    cfg, models, store, version, records = setup
    s = scorer(cfg)
    with pytest.raises(NotLoaded) as e:
        s.score("u1", ["i1"], CONTEXT, load=False)
    assert e.value.version == version and s.loads == 0
    s.load(e.value.version, e.value.generation)
    check_equal(s, models, ["u1"], ["i1", "i2"])
    s.score("u1", ["i1"], CONTEXT, load=False)
    models.learn(records[400:500])
    models.push(store, version)  # a push: the next request needs the new generation
    with pytest.raises(NotLoaded):
        s.score("u1", ["i1"], CONTEXT, load=False)


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
