"""`ctrstream embeddings get` and `ctrstream recommend` against a real Redis: a small model is
learned in the test, published, and every printed number is checked against the learner."""

from __future__ import annotations

import time
import uuid

import numpy as np
import orjson
import pytest

from ctrstream.cli import main
from ctrstream.embeddings import retrieve
from ctrstream.stack import free_port
from flows.build import feature_spec, model_settings, model_store, scorer
from learners.embeddings import FALLBACK_PREFIX, serving_keys
from learners.model import Models

pytestmark = pytest.mark.integration

CONTEXT = {"device": "desktop", "position": 3, "hour": 14}
CONTEXT_ARGS = ["--device", "desktop", "--position", "3", "--hour", "14"]


def synthetic(n: int, users: int = 40, items: int = 60, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    uvec, ivec = rng.normal(0, 0.8, (users, 4)), rng.normal(0, 0.8, (items, 4))
    u, i, pos = rng.integers(0, users, n), rng.integers(0, items, n), rng.integers(0, 10, n)
    y = rng.random(n) < 1 / (1 + np.exp(2.0 - 2 * (uvec[u] * ivec[i]).sum(1) + 0.2 * pos))
    t0 = int(time.time() * 1000) - 600_000
    return [{"impression_id": f"x{k}", "ts": t0 + 1000 * k, "user_id": f"u{u[k]}",
             "item_id": f"i{i[k]}", "label": int(y[k]),
             "features": {"category": f"c{i[k] % 5}", "device": ("mobile", "desktop")[k % 2],
                          "position": int(pos[k]), "hour": (k // 100) % 24},
             "counts": {"user": {"imp_1h": k % 7, "clk_1h": k % 2}}} for k in range(n)]


def published_synthetic(cfg, records: list[dict]) -> tuple[Models, str]:
    """The models learned from ``records`` and the version they were published as."""
    models = Models(model_settings(cfg), feature_spec(cfg))
    models.learn(records)
    store = model_store(cfg)
    version = models.write_version(store, "online", None)
    store.publish(version)
    return models, version


@pytest.fixture(scope="module")
def published(stack_cfg, tmp_path_factory):
    """(config file, config, the learned Models, the published version)."""
    tag = uuid.uuid4().hex[:8]
    cfg = stack_cfg.replace(learn={"store_name": f"emb{tag}", "emb_dim": 8,
                                   "emb_fallback_rows": 64},
                            features={"store_prefix": f"f{tag}"})
    models, version = published_synthetic(cfg, synthetic(600))
    path = tmp_path_factory.mktemp("emb-cli") / "ctrstream.toml"
    path.write_text(cfg.to_toml())
    return path, cfg, models, version


def cli(capsys, path, *argv: str) -> tuple[int, str, str]:
    code = main(["--config", str(path), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def learner_row(models: Models, table: str, key: str) -> np.ndarray:
    t = models.emb.tables[table]
    return t.weight[t.index[key]].numpy().astype(np.float64)


def test_get_prints_the_learners_own_row(published, capsys):
    path, _, models, version = published
    for table, id_ in (("user", "u3"), ("item", "i7")):
        t = models.emb.tables[table]
        assert id_ in t.index  # seen often enough to own a row
        code, out, err = cli(capsys, path, "embeddings", "get", table, id_, "--json")
        assert code == 0, err
        got = orjson.loads(out)
        want = learner_row(models, table, id_)
        assert (got["version"], got["own_row"], got["fallback_row"]) == (version, True, None)
        assert got["dim"] == 8 and len(got["vector"]) == 8
        np.testing.assert_allclose(got["vector"], want[:-1], rtol=0, atol=1e-6)
        assert got["bias"] == pytest.approx(want[-1], abs=1e-6)
        assert got["updated_ms"] == int(t.last_seen[t.index[id_]])
        assert 0 < got["age_s"] < 3600

    code, out, _ = cli(capsys, path, "embeddings", "get", "user", "u3")
    assert code == 0
    assert f"model version {version}" in out and "own row" in out and "FALLBACK" not in out
    assert "dim       8" in out and "ago" in out
    w = learner_row(models, "user", "u3")
    assert f"{w[0]:+.4f}" in out and f"bias      {w[-1]:+.4f}" in out


def test_get_unseen_id_shows_its_fallback_row_marked(published, capsys):
    path, _, models, _ = published
    code, out, err = cli(capsys, path, "embeddings", "get", "user", "never-seen", "--json")
    assert code == 0, err
    got = orjson.loads(out)
    _, fb_key = serving_keys("never-seen", 64)
    want = learner_row(models, "user", fb_key)
    assert got["own_row"] is False
    assert got["fallback_row"] == int(fb_key[len(FALLBACK_PREFIX):])
    np.testing.assert_allclose(got["vector"], want[:-1], rtol=0, atol=1e-6)
    code, out, _ = cli(capsys, path, "embeddings", "get", "user", "never-seen")
    assert code == 0 and "FALLBACK" in out and f"fallback row {got['fallback_row']}" in out


def brute_force(models: Models, user: str, n: int) -> list[tuple[str, float]]:
    """Every item's <u, v> + b_v from the learner's own tables, best first (ties by id)."""
    users, items = models.emb.users, models.emb.items
    u = users.weight[int(users.lookup([user])[0])].numpy().astype(np.float64)
    scored = []
    for key, r in items.index.items():
        if not key.startswith(FALLBACK_PREFIX):
            v = items.weight[r].numpy().astype(np.float64)
            scored.append((key, float(v[:-1] @ u[:-1] + v[-1])))
    return sorted(scored, key=lambda t: (-t[1], t[0]))[:n]


@pytest.mark.parametrize("user", ["u5", "never-seen"])
def test_recommend_retrieves_like_brute_force_and_reranks_with_the_scorer(published, capsys,
                                                                          user):
    path, cfg, models, version = published
    code, out, err = cli(capsys, path, "recommend", "--user", user, "-k", "5",
                         "--candidates", "20", *CONTEXT_ARGS, "--json")
    assert code == 0, err
    got = orjson.loads(out)
    assert got["version"] == got["scorer_version"] == version
    assert got["user_row"]["own"] is (user in models.emb.users.index)
    assert got["items_scanned"] == len(models.emb.items)
    want = brute_force(models, user, 20)
    assert [c["item_id"] for c in got["candidates"]] == [i for i, _ in want]
    np.testing.assert_allclose([c["retrieval"] for c in got["candidates"]],
                               [s for _, s in want], rtol=0, atol=1e-9)

    scores = scorer(cfg).score(user, [i for i, _ in want], CONTEXT)
    # the learner's own p for the same inputs (the scorer is tested against it elsewhere)
    _, examples = scorer(cfg).examples(user, [i for i, _ in want], CONTEXT)
    np.testing.assert_allclose([s["emb"] for s in scores], models.predict(examples)["emb"],
                               rtol=0, atol=1e-6)
    ranked = sorted(scores, key=lambda s: s["emb"], reverse=True)[:5]
    assert [r["item_id"] for r in got["results"]] == [s["item_id"] for s in ranked]
    for r, s in zip(got["results"], ranked, strict=True):
        for name in ("emb", "bopr", "ftrl", "bopr_std"):
            assert r[name] == pytest.approx(s[name], abs=1e-12)
        assert want[r["retrieval_rank"] - 1][0] == r["item_id"]

    code, out, _ = cli(capsys, path, "recommend", "--user", user, "-k", "5", "--by", "bopr",
                       *CONTEXT_ARGS)
    assert code == 0
    lines = out.splitlines()
    assert "FALLBACK" in lines[0] if user == "never-seen" else "own row" in lines[0]
    table = lines[lines.index(next(x for x in lines if x.lstrip().startswith("rank"))) + 1:]
    assert len(table) == 5
    bopr = [float(x.split()[5]) for x in table]
    assert bopr == sorted(bopr, reverse=True)


def test_retrieve_in_small_scan_batches_gives_the_same_candidates(published):
    _, cfg, models, version = published
    store = model_store(cfg)
    u = learner_row(models, "user", "u5")
    whole, n = retrieve(store, version, u, 25, batch=5000)
    small, m = retrieve(store, version, u, 25, batch=8)
    assert n == m == len(models.emb.items) and small == whole


def test_no_model_published_and_unreachable_redis_exit_1(stack_cfg, tmp_path, capsys):
    empty = stack_cfg.replace(learn={"store_name": f"none{uuid.uuid4().hex[:8]}"})
    path = tmp_path / "empty.toml"
    path.write_text(empty.to_toml())
    for argv in (["embeddings", "get", "user", "u1"], ["recommend", "--user", "u1"]):
        code, out, err = cli(capsys, path, *argv)
        assert code == 1 and out == ""
        assert "no model published" in err, err

    gone = stack_cfg.replace(redis={"url": f"redis://127.0.0.1:{free_port()}/0"})
    path = tmp_path / "gone.toml"
    path.write_text(gone.to_toml())
    t0 = time.monotonic()
    for argv in (["embeddings", "get", "item", "i1"], ["recommend", "--user", "u1"]):
        code, out, err = cli(capsys, path, *argv)
        assert code == 1 and "cannot reach Redis at redis://127.0.0.1:" in err, err
    assert time.monotonic() - t0 < 10

    code, _, err = cli(capsys, path, "recommend", "--user", "u1", "-k", "0")
    assert code == 2 and "-k and --candidates" in err
