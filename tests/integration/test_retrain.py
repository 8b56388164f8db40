"""The daily retrain (learners/retrain.py, `ctrstream retrain`): determinism, the publish
refusal rule, warm start, late-click corrections, publish conflicts, CLI errors; and two
simulated days end to end (online learning on day 1, retrain at the boundary, day 2 from the
new version).

Examples come from the simulator's World (ctrstream/simulator.py) without Kafka: impressions in
event-time order, labeled as the joiner labels them (clicked within the wait window), with
point-in-time counts from features.counters.EntityCounters, and a late-click correction for
a click after the window but within the late-click horizon.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson
import pytest
import torch

from ctrstream.cli import main
from ctrstream.simulator import DEVICES, MS_PER_DAY, World
from ctrstream.stack import free_port
from features.counters import EntityCounters
from features.spec import FeatureSpec
from flows.build import feature_spec, model_settings, model_store, retrain_settings
from flows.config import GeneratorConfig
from flows.learn import LearnLogic
from joiner.events import Impression
from learners.archive import ExampleArchive, to_examples
from learners.metrics import normalized_entropy
from learners.model import MICRO_BATCH, MODELS, Models, ModelSettings
from learners.publish import ModelStore
from learners.retrain import (
    find_base,
    later_retrain,
    load_day,
    model_decisions,
    ne_difference_se,
    parse_min_gain_se,
    refusal,
    replay_online,
    retrain,
    split_holdout,
    train_epoch,
)

MIDNIGHT = 1_700_006_400_000  # 2023-11-15T00:00:00Z
DAY = "2023-11-15"
WINDOW_MS = 15 * 60_000
HORIZON_MS = 60 * 60_000


class Sim(NamedTuple):
    examples: list[dict]  # in event-time order, labels as the joiner gives them
    corrections: list[dict]  # late_click records
    p: np.ndarray  # the true click probability of each example


def simulate(start_ms: int, duration_s: float, rate: float, seed: int = 0,
             gen: GeneratorConfig | None = None) -> Sim:
    """``rate`` impressions per second of event time for ``duration_s`` from ``start_ms``."""
    gen = gen or GeneratorConfig()
    world = World(gen, seed)
    rng = np.random.default_rng([seed, 7])
    gaps = rng.exponential(1000 / rate, int(duration_s * rate * 1.1) + 100)
    t = np.cumsum(gaps)
    ts = start_ms + t[t < duration_s * 1000].astype(np.int64)
    s = world.sample(rng, ts)
    p = 1 / (1 + np.exp(-world.logit(**s)))
    clicked = rng.random(len(ts)) < p
    delay = np.full(len(ts), -1, np.int64)
    delay[clicked] = world.delays_ms(rng, int(clicked.sum()))
    users, items = world.user_names[s["user"]].tolist(), world.item_names[s["item"]].tolist()
    cats = world.category_names[world.item_category[s["item"]]].tolist()
    devices = np.array(DEVICES, dtype=object)[s["device"]].tolist()
    positions, hours = s["position"].tolist(), ((ts % MS_PER_DAY) // 3_600_000).tolist()
    counters = EntityCounters(FeatureSpec())
    clicks: list[tuple[int, int, Impression]] = []  # joined clicks, by click time
    examples, corrections = [], []
    for k, (t_k, d) in enumerate(zip(ts.tolist(), delay.tolist(), strict=True)):
        while clicks and clicks[0][0] < t_k:
            click_ts, _, imp = heapq.heappop(clicks)
            counters.clicked(imp, click_ts)
        feats = {"category": cats[k], "device": devices[k], "position": positions[k],
                 "hour": hours[k]}
        imp = Impression(f"s{seed}-{t_k}-{k}", t_k, users[k], items[k], feats)
        label = int(0 <= d <= WINDOW_MS)
        examples.append({"impression_id": imp.impression_id, "ts": t_k, "user_id": users[k],
                         "item_id": items[k], "features": feats, "kind": "example",
                         "label": label, "click_ts": t_k + d if label else None,
                         "window_ms": WINDOW_MS, "counts": counters.seen(imp)})
        if label:
            heapq.heappush(clicks, (t_k + d, k, imp))
        elif WINDOW_MS < d <= HORIZON_MS:
            corrections.append({"kind": "late_click", "impression_id": imp.impression_id,
                                "ts": t_k, "click_ts": t_k + d})
    return Sim(examples, corrections, p)


@pytest.fixture
def configs(stack_cfg, tmp_path):
    """``make(sub="", **learn)``: the session's stack config with a data_dir under tmp_path
    and a model store of its own (hash_bits 16 unless given: small blobs); the stores'
    keys are deleted afterwards."""
    names = []

    def make(sub: str = "", **learn):
        names.append(f"r{uuid.uuid4().hex[:8]}")
        return stack_cfg.replace(data_dir=str(tmp_path / sub / "data"), learn={
            "hash_bits": 16, "store_name": names[-1], **learn})

    yield make
    client = store_of(stack_cfg).client
    for name in names:
        keys = list(client.scan_iter(match=f"m:{{{name}}}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])


def every_retrain(cfg):
    """The config's retrain settings, with every model's retrain kept however small its
    gain on the holdout (the tests of publishing, not of the rule)."""
    return dataclasses.replace(retrain_settings(cfg), min_gain_se={})


ANY_GAIN = ("--min-gain-se=",)


def archive_of(cfg) -> ExampleArchive:
    return ExampleArchive(Path(cfg.data_dir) / "archive", fsync=False)


def store_of(cfg) -> ModelStore:
    return model_store(cfg)


def run_cli(cfg, tmp_path: Path, *args: str) -> int:
    path = tmp_path / f"ctrstream-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(cfg.to_toml())
    return main(["--config", str(path), "retrain", "--no-progress", *args])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As `ctrstream retrain` runs (--threads 1): small batches, and a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_day() -> Sim:
    """A simulated day (2023-11-15, ~22k impressions) learned online in order: each example
    carries the online models' progressive predictions (``online_p``)."""
    sim = simulate(MIDNIGHT, 86_400, 0.25, seed=3)
    Models(ModelSettings(), FeatureSpec()).learn(sim.examples, annotate=True)
    return sim


def fill(cfg, sim: Sim, examples: list[dict] | None = None) -> ExampleArchive:
    archive = archive_of(cfg)
    archive.append(sim.examples if examples is None else examples)
    archive.append_corrections(sim.corrections)
    return archive


# -- the rule, without Redis ----------------------------------------------------------------


def test_refusal_names_each_model_worse_by_more_than_the_margin():
    online = {"ftrl": 0.90, "bopr": 0.90, "emb": 0.95}
    assert refusal(online, {"ftrl": 0.905, "bopr": 0.85, "emb": 0.90}, 0.005) is None
    why = refusal(online, {"ftrl": 0.9051, "bopr": 0.90, "emb": 0.96}, 0.005)
    assert why.startswith("worse than the online models on the holdout: ")
    assert "ftrl: retrained NE 0.9051 > online NE 0.9000 + 0.005" in why
    assert "emb: retrained NE 0.9600 > online NE 0.9500 + 0.005" in why
    assert "bopr" not in why
    assert "bopr: retrained NE nan" in refusal(online, {**online, "bopr": float("nan")}, 0.005)


def test_the_ne_difference_comes_with_its_paired_standard_error():
    rng = np.random.default_rng(0)
    y = (rng.random(20_000) < 0.03).astype(np.float64)
    online = dict.fromkeys(MODELS, np.full(len(y), 0.03))
    new = {m: np.clip(0.03 + rng.normal(0, 0.01, len(y)), 1e-3, 1) for m in MODELS}
    mask = np.ones(len(y), bool)
    se = ne_difference_se(new, online, y, mask)
    assert ne_difference_se(online, online, y, mask) == dict.fromkeys(MODELS, 0.0)
    # Against the spread of the NE difference over resampled holdouts.
    diffs = []
    for _ in range(200):
        i = rng.integers(0, len(y), len(y))
        diffs.append(normalized_entropy(new["ftrl"][i], y[i])
                     - normalized_entropy(online["ftrl"][i], y[i]))
    assert se["ftrl"] == pytest.approx(np.std(diffs), rel=0.25)


def test_each_model_keeps_its_online_state_unless_its_retrain_passes_the_rule():
    online = {"ftrl": 0.97, "bopr": 0.97, "emb": 0.96}
    se = {"ftrl": 0.002, "bopr": 0.002, "emb": 0.0015}
    # FTRL and BOPR: the margin only; emb: a gain of more than 2 paired se.
    gains = {"emb": 2.0}
    ok = model_decisions(online, {"ftrl": 0.974, "bopr": 0.96, "emb": 0.9569}, se, 0.005, gains)
    assert ok == dict.fromkeys(MODELS)  # emb: -0.0031 < -0.0030
    out = model_decisions(online, {"ftrl": 0.9751, "bopr": 0.96, "emb": 0.9575}, se, 0.005,
                          gains)
    assert out["bopr"] is None
    assert out["ftrl"] == ("ftrl: retrained NE 0.9751 > online NE 0.9700 + 0.005 "
                           "(learn.max_ne_regression)")
    assert out["emb"] == ("emb: no measurable gain: retrained NE 0.9575, online 0.9600, "
                          "difference -0.0025, needs < -0.0030 (2 paired se of 0.0015)")
    # A gain required of every model; no standard error (one example): no measurable gain.
    out = model_decisions(online, dict(online), {}, 0.005, dict.fromkeys(MODELS, 0.0))
    assert all(out[m].startswith(f"{m}: no measurable gain: ") for m in MODELS)
    assert parse_min_gain_se("2") == dict.fromkeys(MODELS, 2.0)
    assert parse_min_gain_se("emb=2, ftrl=-1") == {"emb": 2.0, "ftrl": -1.0}
    assert parse_min_gain_se("") == {}
    with pytest.raises(ValueError, match="unknown model 'fm'"):
        parse_min_gain_se("fm=1")


def test_the_online_state_is_replayed_with_the_labels_as_joined(one_day, tmp_path):
    """``replay_online`` learns the day as the learn flow did: a late click, a positive for
    the retrain, is learned as the negative it was online."""
    examples = one_day.examples[:6000]
    late = {c["impression_id"] for c in one_day.corrections}
    assert late & {e["impression_id"] for e in examples}
    tables = []
    for name, corrections in (("with", one_day.corrections), ("without", [])):
        archive = ExampleArchive(tmp_path / name, fsync=False)
        archive.append(examples)
        archive.append_corrections(corrections)
        tables.append(load_day(archive, DAY).table)
    assert tables[0]["label"].to_pylist() != tables[1]["label"].to_pylist()
    probe = to_examples(tables[0].slice(5000))
    preds = []
    for t in tables:
        models = Models(ModelSettings(hash_bits=16), FeatureSpec())
        p = replay_online(models, t.slice(0, 5000), t.slice(5000))
        assert set(p) == set(MODELS) and len(p["emb"]) == 1000
        assert models.metrics["emb"].n == 1000  # restarted at the holdout
        preds.append((p, models.predict(probe)))
    for m in MODELS:
        assert np.array_equal(preds[0][0][m], preds[1][0][m])
        assert np.array_equal(preds[0][1][m], preds[1][1][m])
    # The learn flow's own state: one Models.learn over the day, whatever the chunks the
    # replay decodes (320 examples here, against micro-batches of 1, 2, 4, ... 256).
    settings = ModelSettings(hash_bits=16, retrain_batch_size=10)
    replayed = Models(settings, FeatureSpec())
    p = replay_online(replayed, tables[1].slice(0, 5000), tables[1].slice(5000))
    online = Models(settings, FeatureSpec())
    day = [dict(e) for e in examples]
    online.learn(day, annotate=True)
    for m in MODELS:
        assert np.array_equal(p[m], [e["online_p"][m] for e in day[5000:]])
    assert np.array_equal(replayed.predict(probe)["emb"], online.predict(probe)["emb"])


def test_the_holdout_is_the_last_fraction_by_count():
    assert split_holdout(1000, 0.1) == 900
    assert split_holdout(1000, 0.0) == 1000 and split_holdout(0, 0.1) == 0
    assert split_holdout(5, 0.1) == 5 and split_holdout(6, 0.1) == 5


def test_the_embedding_model_learns_the_day_in_event_time_order_and_the_linear_ones_shuffled(
        one_day, tmp_path):
    archive = ExampleArchive(tmp_path / "archive", fsync=False)
    archive.append(one_day.examples[:8000])
    table = load_day(archive, DAY).table
    train, probe = table.slice(0, 6000), to_examples(table.slice(6000))

    def trained(**kw) -> Models:
        models = Models(ModelSettings(hash_bits=16), FeatureSpec())
        assert train_epoch(models, train, seed=0, **kw) == 6000
        return models

    online = Models(ModelSettings(hash_bits=16), FeatureSpec())
    examples = to_examples(train)
    for s in range(0, len(examples), MICRO_BATCH):  # as online, with the corrected labels
        online.emb.learn_batch(examples[s:s + MICRO_BATCH], checked=True)
    once, twice = trained(), trained(linear_epochs=2)
    assert np.array_equal(once.emb.predict_batch(probe), online.emb.predict_batch(probe))
    assert np.array_equal(twice.emb.predict_batch(probe), online.emb.predict_batch(probe))
    shuffled = trained(emb_order="shuffled")
    assert not np.allclose(shuffled.emb.predict_batch(probe), online.emb.predict_batch(probe))
    p1, p2 = once.predict(probe), twice.predict(probe)
    assert np.array_equal(p1["ftrl"], shuffled.predict(probe)["ftrl"])
    assert not np.allclose(p1["ftrl"], p2["ftrl"]) and not np.allclose(p1["bopr"], p2["bopr"])
    assert once.examples == twice.examples == 6000  # a second pass is not more examples
    # A second pass on the embedding model's rows only: the dense block as after one pass.
    rows = trained(emb_row_pass=0.5)
    assert np.array_equal(rows.emb.dense_weights(), once.emb.dense_weights())
    assert not np.array_equal(rows.emb.predict_batch(probe), once.emb.predict_batch(probe))
    assert np.array_equal(rows.predict(probe)["ftrl"], p1["ftrl"])
    assert rows.examples == 6000 and rows.emb.users.index == once.emb.users.index


# -- against Redis --------------------------------------------------------------------------


@pytest.mark.integration
def test_same_archive_seed_and_base_give_the_same_model_bytes(configs, one_day):
    sim = one_day
    cfg = configs(max_ne_regression=1.0)
    archive = fill(cfg, sim)
    blobs = []
    for _ in range(2):
        c = configs(max_ne_regression=1.0)
        store = store_of(c)
        res = retrain(every_retrain(c), DAY, store, archive)
        assert res.status == "published" and res.base is None, res.reason
        assert store.current() == res.version
        blobs.append(store.get_blob(res.version, "models"))
        assert blobs[-1] == res.models.to_bytes()
    assert blobs[0] == blobs[1]
    other = retrain(every_retrain(cfg), DAY, store_of(cfg), archive, seed=1, dry_run=True)
    assert other.status == "dry_run" and other.models.to_bytes() != blobs[0]
    assert store_of(cfg).versions() == []  # a dry run writes nothing


@pytest.mark.integration
def test_late_click_corrections_are_positives_for_the_retrain(configs, tmp_path, one_day,
                                                              capsys):
    sim = one_day
    cfg = configs(max_ne_regression=1.0)
    store = store_of(cfg)
    fill(cfg, sim)
    assert run_cli(cfg, tmp_path, "--date", DAY, "--json", *ANY_GAIN) == 0
    res = orjson.loads(capsys.readouterr().out)
    in_window = sum(e["label"] for e in sim.examples)
    assert len(sim.corrections) > 10
    assert res["late_positives"] == len(sim.corrections)
    assert res["positives"] == in_window + len(sim.corrections)
    assert res["examples"] == res["rows"] == len(sim.examples)
    assert res["train_examples"] + res["holdout_examples"] == res["examples"]
    assert res["holdout_examples"] == round(0.1 * res["examples"])
    meta = store.get_meta(res["version"])
    assert meta["source"] == "retrain" and meta["date"] == DAY and meta["parent"] is None
    assert meta["positives"] == res["positives"]
    assert meta["late_positives"] == len(sim.corrections)
    assert meta["ne_online"] == res["ne_online"] and set(meta["ne_retrained"]) == set(MODELS)
    # The version's metrics are the new models' progressive ones over the holdout.
    assert meta["metrics"]["emb"]["n"] == res["holdout_examples"]
    assert meta["metrics"]["emb"]["ne"] == pytest.approx(res["ne_retrained"]["emb"])


@pytest.mark.integration
def test_a_model_worse_than_the_online_one_is_refused_unless_forced(configs, tmp_path,
                                                                    one_day, capsys):
    # Online "predictions" that are the true click probabilities: no model trained on a
    # day of data comes near them.
    sim = one_day
    cfg = configs()
    perfect = [{**e, "online_p": dict.fromkeys(MODELS, float(p))}
               for e, p in zip(sim.examples, sim.p, strict=True)]
    fill(cfg, sim, perfect)
    store = store_of(cfg)
    assert run_cli(cfg, tmp_path, "--date", DAY) == 3
    out, err = capsys.readouterr()
    assert "REFUSED" in out
    assert f"{DAY} not published: worse than the online models on the holdout" in err
    for m in MODELS:  # each model named, with both figures
        assert f"{m}: retrained NE 0." in err and "> online NE 0." in err
    # Written, never published: the next day's retrain warm-starts from it.
    assert store.current() is None
    [refused] = store.versions()
    assert f"written as version {refused['version']}, the next day's warm start" in out
    meta = store.get_meta(refused["version"])
    assert meta["refused"].startswith("worse than the online models") and not meta["forced"]
    assert find_base(store, "2023-11-16")[0] == refused["version"]
    assert find_base(store, DAY) == (None, None)
    # Nor does a refused retrain of a later day make this day's "go back in time".
    assert later_retrain(store, "2023-11-14") is None

    assert run_cli(cfg, tmp_path, "--date", DAY, "--force") == 0
    out = capsys.readouterr().out
    version = store.current()
    assert out.startswith(f"retrain {DAY}: published version {version} despite the rule "
                          "(--force)\n")
    assert "  overridden    worse than the online models on the holdout: ftrl: " in out
    meta = store.get_meta(version)
    assert meta["forced"] and meta["refusal_overridden"].startswith("worse than the online")


@pytest.mark.integration
def test_a_model_whose_retrain_fails_the_rule_is_published_in_its_online_state(
        configs, tmp_path, one_day, capsys):
    # Online FTRL and BOPR predicting the day's mean CTR: their retrains beat that; an online
    # embedding model predicting the true click probabilities: its retrain cannot.
    sim = one_day
    cfg = configs()
    ctr = float(np.mean([e["label"] for e in sim.examples]))
    archived = [{**e, "online_p": {"ftrl": ctr, "bopr": ctr, "emb": float(p)}}
                for e, p in zip(sim.examples, sim.p, strict=True)]
    fill(cfg, sim, archived)
    store = store_of(cfg)
    assert run_cli(cfg, tmp_path, "--date", DAY) == 0
    out = capsys.readouterr().out
    version = store.current()
    assert out.startswith(f"retrain {DAY}: published version {version}")
    assert "  keeps online  emb: retrained NE 0." in out
    assert "keeps online  ftrl" not in out and "keeps online  bopr" not in out
    meta = store.get_meta(version)
    assert list(meta["kept_online"]) == ["emb"] and meta["retrained_models"] == ["ftrl", "bopr"]
    assert meta["refused"] is None
    assert set(meta["ne_online_replayed"]) == set(MODELS)
    # Replayed, the embedding model is nowhere near the archived "online" predictions.
    assert "  warning       emb: its online state replayed from the warm start scores" in out

    # One version, all three models: FTRL and BOPR as retrained, the embedding model as the
    # learn flow learned the day (replayed from the same start, fresh models here).
    published = Models.load(model_settings(cfg), feature_spec(cfg), store, version)
    day = load_day(archive_of(cfg), DAY).table
    cut = split_holdout(day.num_rows, cfg.learn.holdout_fraction)
    replayed = Models(model_settings(cfg), feature_spec(cfg))
    replay_online(replayed, day.slice(0, cut), day.slice(cut))
    res = retrain(retrain_settings(cfg), DAY, store, archive_of(cfg), dry_run=True)
    assert res.kept_online.keys() == {"emb"} and res.candidates is not res.models
    probe = to_examples(day.slice(cut - 2000, 2000))
    p, r, c = published.predict(probe), replayed.predict(probe), res.candidates.predict(probe)
    assert np.array_equal(p["emb"], r["emb"]) and not np.allclose(p["emb"], c["emb"])
    for m in ("ftrl", "bopr"):
        assert np.array_equal(p[m], c[m])
    assert meta["metrics"]["emb"]["n"] == res.holdout_examples


@pytest.mark.integration
def test_nothing_to_compare_with_is_a_refusal_that_says_why(configs, one_day):
    sim = one_day
    cfg = configs()
    bare = [{k: v for k, v in e.items() if k != "online_p"} for e in sim.examples]
    res = retrain(retrain_settings(cfg), DAY, store_of(cfg), fill(cfg, sim, bare))
    assert res.status == "refused" and res.online_coverage == 0.0
    assert res.reason.startswith(f"the online predictions are missing for "
                                 f"{res.holdout_examples:,} of {res.holdout_examples:,}")

    cfg = configs("b")
    cut = split_holdout(len(sim.examples), cfg.learn.holdout_fraction)
    no_clicks = sim.examples[:cut] + [{**e, "label": 0} for e in sim.examples[cut:]]
    archive = archive_of(cfg)
    archive.append(no_clicks)
    res = retrain(retrain_settings(cfg), DAY, store_of(cfg), archive)
    assert res.status == "refused"
    assert res.reason == (f"the holdout ({res.holdout_examples:,} examples) has no positive: "
                          "NE is undefined")


def _write(store: ModelStore, cfg, source: str, date: str | None) -> str:
    models = Models(model_settings(cfg), feature_spec(cfg))
    return models.write_version(store, source, parent=None, extra={"date": date} if date else None)


@pytest.mark.integration
def test_warm_start_is_the_newest_retrain_of_an_earlier_day(configs, one_day):
    sim = one_day
    cfg = configs(max_ne_regression=1.0)
    lc, store = every_retrain(cfg), store_of(cfg)
    _write(store, cfg, "retrain", "2023-11-13")
    base = _write(store, cfg, "retrain", "2023-11-14")
    _write(store, cfg, "online", None)
    expired = _write(store, cfg, "retrain", "2023-11-14")
    store.client.delete(store.key(expired, "keys"))  # as when its TTL ran out
    same_day = _write(store, cfg, "retrain", DAY)  # an earlier run for the same day
    assert find_base(store, DAY)[0] == base
    assert find_base(store, "2023-11-16")[0] == same_day
    assert find_base(store, "2023-11-13") == (None, None)

    res = retrain(lc, DAY, store, fill(cfg, sim))
    assert res.status == "published" and (res.base, res.base_date) == (base, "2023-11-14")
    assert store.get_meta(res.version)["parent"] == base

    # A base whose hasher differs from the config cannot be continued: fresh models.
    other = cfg.replace(learn={"hash_bits": 18})  # the config's: 16
    _write(store, other, "retrain", "2023-11-14")
    res = retrain(lc, DAY, store, archive_of(cfg), dry_run=True)
    assert res.base is None
    assert res.warnings[-1].endswith("its hash_bits is 18, the config's 16")

    # A retrain of a later day exists: publishing this day's would go back in time.
    later = _write(store, cfg, "retrain", "2023-11-16")
    res = retrain(lc, DAY, store, archive_of(cfg))
    assert res.status == "refused"
    assert f"version {later} is a retrain of a later day (2023-11-16)" in res.reason


class RacingStore(ModelStore):
    """A store on which another publisher makes a version current just before our first
    pointer flip: the learn flow's periodic version ("online") or another "retrain"."""

    def __init__(self, cfg, racer_source: str) -> None:
        super().__init__(store_of(cfg).client, cfg.learn.store_name, cfg.learn.keep_days)
        self.cfg, self.racer_source, self.racer = cfg, racer_source, None

    def publish(self, version, expected_current="*", keep_days=None):
        if self.racer is None:
            self.racer = _write(self, self.cfg, self.racer_source,
                                DAY if self.racer_source == "retrain" else None)
            super().publish(self.racer)
        return super().publish(version, expected_current, keep_days)


@pytest.mark.integration
def test_publishes_over_the_learn_flows_version_but_not_another_retrains(
        configs, tmp_path, one_day, monkeypatch, capsys):
    sim = one_day
    cfg = configs(max_ne_regression=1.0, push_interval_s=1e6, snapshot_interval_s=1e6,
                  log_interval_s=1e6)
    fill(cfg, sim)
    logic = LearnLogic(cfg, None)  # the learn flow, in-process: publishes its first version
    store = RacingStore(cfg, "online")
    res = retrain(every_retrain(cfg), DAY, store, archive_of(cfg))
    assert res.status == "published" and res.published_over == [store.racer]
    assert store.current() == res.version and res.previous == store.racer
    # The online version replaced expires like the learn flow's own: online_keep_hours.
    ttl_ms = store.client.pttl(store.key(store.racer, "keys"))
    assert 0 < ttl_ms <= cfg.learn.online_keep_hours * 3_600_000
    # The learn flow's next push finds the pointer moved, and continues from the retrain's.
    logic.trainer.next_push = 0
    logic.on_notify()
    assert logic.trainer.version == res.version
    assert logic.trainer.models.to_bytes() == res.models.to_bytes()

    cfg = configs("b", max_ne_regression=1.0)
    fill(cfg, sim)
    store = RacingStore(cfg, "retrain")
    monkeypatch.setattr("ctrstream.retrain.model_store", lambda *a, **k: store)
    assert run_cli(cfg, tmp_path, "--date", DAY, *ANY_GAIN) == 4
    out, err = capsys.readouterr()
    assert store.current() == store.racer
    assert (f"version {store.racer} (a retrain of {DAY}) was made current while this retrain "
            "ran (it expected None)") in err
    assert "NOT PUBLISHED" in out


@pytest.mark.integration
def test_cli_says_which_days_the_archive_has(configs, tmp_path, capsys):
    cfg = configs()
    assert run_cli(cfg, tmp_path, "--date", DAY) == 2
    err = capsys.readouterr().err
    assert f"no archived examples for {DAY} under {cfg.data_dir}/archive/date={DAY}" in err
    assert "no archive directory" in err
    a = archive_of(cfg)
    a.append([{"impression_id": f"x{d}", "ts": MIDNIGHT + d * MS_PER_DAY, "label": 0}
              for d in (-2, -1, 1)])
    assert run_cli(cfg, tmp_path, "--date", DAY) == 2
    assert capsys.readouterr().err.endswith(
        "days in the archive: 2023-11-13, 2023-11-14, 2023-11-16\n")
    with pytest.raises(SystemExit) as e:
        run_cli(cfg, tmp_path, "--date", "15/11/2023")
    assert e.value.code == 2
    a.append([{"impression_id": "y", "ts": MIDNIGHT, "label": 0}])
    gone = cfg.replace(redis={"url": f"redis://127.0.0.1:{free_port()}/0"})
    assert run_cli(gone, tmp_path, "--date", DAY) == 1
    assert "cannot reach Redis at redis://127.0.0.1:" in capsys.readouterr().err


# -- two days end to end --------------------------------------------------------------------


def _stream(sim: Sim, start: int, end: int) -> list[dict]:
    """What the learn flow reads for impressions in [start, end): each example when its wait
    window closes, each late click at its click time."""
    out = [(e["ts"] + WINDOW_MS, 0, e) for e in sim.examples if start <= e["ts"] < end]
    out += [(c["click_ts"], 1, c) for c in sim.corrections if start <= c["ts"] < end]
    return [r for _, _, r in sorted(out, key=lambda x: x[:2])]


def _feed(logic: LearnLogic, records: list[dict], batch: int = 1000) -> None:
    for s in range(0, len(records), batch):
        logic.on_batch([(0, s + i, orjson.dumps(r)) for i, r in enumerate(records[s:s + batch])])


def _ne_table(preds: dict[str, dict[str, np.ndarray]], y: np.ndarray,
              p_true: np.ndarray) -> dict[str, dict[str, float]]:
    return {kind: {m: normalized_entropy(p[m], y) for m in MODELS} for kind, p in
            preds.items()} | {"truth": {"p": normalized_entropy(p_true, y)}}


@pytest.mark.integration
@pytest.mark.slow
def test_two_days_retrain_at_the_boundary_beats_online_only_on_day_two(configs, tmp_path):
    """Day 1 is learned by the learn flow's own logic (in-process, no Kafka), which archives
    it with its progressive predictions, and so is day 2's first hour; then `ctrstream
    retrain` runs on day 1 (with its late clicks in), and the learn flow notices the new
    version, replays that hour into it from the archive and continues from it. Beside it,
    the day-1 online models continue on day 2 without a retrain. Both are scored
    progressively on day 2's hours after the switch."""
    t0 = time.perf_counter()
    hours = 6
    day2 = MIDNIGHT + MS_PER_DAY
    switch = day2 + 3_600_000
    sim = simulate(MIDNIGHT, 86_400 + hours * 3600, 1.5, seed=11)
    cfg = configs(hash_bits=20, push_interval_s=1e6, snapshot_interval_s=1e6,
                       log_interval_s=1e6)
    logic = LearnLogic(cfg, None)
    first = logic.trainer.version
    _feed(logic, _stream(sim, MIDNIGHT, day2))
    logic.snapshot()  # an epoch ends: the archive is flushed
    online_only = Models.from_bytes(model_settings(cfg), feature_spec(cfg),
                                    logic.trainer.models.to_bytes())
    first_hour = [e for e in sim.examples if day2 <= e["ts"] < switch]
    _feed(logic, _stream(sim, day2, switch))  # the retrain runs after the day has ended
    t_day1 = time.perf_counter()

    assert run_cli(cfg, tmp_path, "--date", DAY) == 0
    t_retrain = time.perf_counter()
    store = store_of(cfg)
    retrained = store.current()
    assert retrained != first and store.get_meta(retrained)["source"] == "retrain"
    logic.trainer.next_push = 0  # the learn flow's next push finds the pointer moved ...
    logic.on_notify()
    assert logic.trainer.version == retrained  # ... and continues from the retrain's version
    # ... after learning day 2's first hour again: the retrain saw none of it.
    assert logic.trainer.models.examples == (store.get_meta(retrained)["examples"]
                                             + len(first_hour))

    online_only.learn([dict(e) for e in first_hour])
    day2_examples = [e for e in sim.examples if e["ts"] >= switch]
    p_true = sim.p[len(sim.examples) - len(day2_examples):]
    copies = [dict(e) for e in day2_examples]
    online_only.learn(copies, annotate=True)
    _feed(logic, _stream(sim, switch, day2 + hours * 3_600_000))
    logic.snapshot()
    learned = {e["impression_id"]: e for e in archive_of(cfg).read_examples("2023-11-16")}
    y = np.array([e["label"] for e in day2_examples], np.float64)
    preds = {"online only": {m: np.array([e["online_p"][m] for e in copies]) for m in MODELS},
             "retrained": {m: np.array([learned[e["impression_id"]]["online_p"][m]
                                        for e in day2_examples]) for m in MODELS}}
    ne = _ne_table(preds, y, p_true)
    print(f"\nday 2, hours 1-{hours}: {len(y):,} examples, {int(y.sum()):,} positive; "
          f"progressive NE (labels as joined)")
    print(f"| {'model':<5} | online only | retrained at the boundary |")
    for m in MODELS:
        print(f"| {m:<5} | {ne['online only'][m]:>11.4f} | {ne['retrained'][m]:>25.4f} |")
    print(f"| true p (floor) | {ne['truth']['p']:.4f} |")
    print(f"day 1: {sum(1 for e in sim.examples if e['ts'] < day2):,} examples learned online "
          f"in {t_day1 - t0:.1f} s (simulation included); retrain {t_retrain - t_day1:.1f} s; "
          f"total {time.perf_counter() - t0:.1f} s")
    kept = store.get_meta(retrained)["kept_online"]
    print(f"kept in their online state: {kept or 'none'}")
    if "emb" in kept:  # the day replayed as the learn flow learned it: about online only
        assert abs(ne["retrained"]["emb"] - ne["online only"]["emb"]) < 0.003
    else:
        assert ne["retrained"]["emb"] < ne["online only"]["emb"]
