"""One FeatureSpec reaches every learner: what the counters count (a custom entity, one window)
is what FTRL/BOPR hash and what the embedding model reads, a version records it, and a version
or state reading counts that nobody counts is refused by name instead of reading zeros."""

from __future__ import annotations

import numpy as np
import pytest

from features.hashing import FeatureHasher
from features.spec import FeatureSpec, NotCounted
from learners.embeddings import dense_names
from learners.model import Models, ModelSettings, make_hasher, trained_spec
from learners.retrain import incompatible
from learners.scorer import Scorer

SPEC = FeatureSpec(entities={"user": ("user_id",), "device_hour": ("device", "hour")},
                   windows_ms=(60_000,))
SETTINGS = ModelSettings(hash_bits=18, emb_dim=4, emb_fallback_rows=8)


def example(imp: int = 5, clk: int = 1, k: int = 0) -> dict:
    return {"impression_id": f"x{k}", "ts": 1_700_000_000_000 + k, "user_id": "u1",
            "item_id": "i1", "features": {"device": "mobile", "hour": 20}, "label": k % 2,
            "counts": {"user": {"imp_1m": 2, "clk_1m": 0},
                       "device_hour": {"imp_1m": imp, "clk_1m": clk}}}


def test_the_hasher_reads_the_specs_entities_and_windows():
    models = Models(SETTINGS, SPEC)
    assert models.hasher.count_features == {"user": ("imp_1m", "clk_1m"),
                                            "device_hour": ("imp_1m", "clk_1m")}
    x = models.hasher.indices(example())
    # imp_1m = 5 is log bucket 3 (features.derived.log_bucket)
    assert models.hasher._hash("device_hour.imp_1m#3") in x
    assert not np.array_equal(x, models.hasher.indices(example(imp=500)))
    assert not np.array_equal(x, models.hasher.indices(example(clk=9)))
    # The bug this replaces: a hasher on the default spec reads none of these counts.
    default = FeatureHasher(bits=18, crosses=SETTINGS.crosses)
    assert np.array_equal(default.indices(example()), default.indices(example(imp=500)))


def test_the_embedding_models_dense_input_reads_them_too():
    models = Models(SETTINGS, SPEC)
    names = models.emb.dense_names()
    assert names == dense_names(("user", "device_hour"), ("imp_1m", "clk_1m"))
    x = models.emb.dense_features([example(), example(imp=500)])
    col = names.index("log1p:device_hour.imp_1m")
    assert x[:, col].tolist() == pytest.approx([np.log1p(5), np.log1p(500)])
    assert not any(n.endswith("imp_5m") for n in names)
    assert models.emb.predict_batch([example()]).shape == (1,)


def test_a_version_records_the_spec_and_is_read_back_with_it():
    models = Models(SETTINGS, SPEC)
    models.learn([example(k=k) for k in range(20)])
    meta = models.describe()
    assert trained_spec(meta) == SPEC
    assert meta["spec"] == {"entities": {"user": ["user_id"], "device_hour": ["device", "hour"]},
                            "windows_ms": [60_000]}
    # The scorer's hasher, from the meta alone, hashes as training did.
    assert np.array_equal(make_hasher(meta).indices(example()), models.hasher.indices(example()))
    # Loaded with other settings' crosses and a spec counting more: it keeps its own.
    counted = FeatureSpec(entities={**SPEC.entities, "item": ("item_id",)},
                          windows_ms=(60_000, 3_600_000))
    back = Models.from_bytes(ModelSettings(crosses=()), counted, models.to_bytes())
    assert back.spec == SPEC and back.hasher.crosses == models.hasher.crosses
    assert back.to_bytes() == models.to_bytes()
    assert np.array_equal(back.hasher.indices(example()), models.hasher.indices(example()))


def test_state_from_before_the_spec_was_recorded_reads_the_default_spec():
    models = Models(ModelSettings(emb_dim=4, emb_fallback_rows=8), FeatureSpec())
    meta = {k: v for k, v in models.describe().items() if k != "spec"}
    assert trained_spec(meta) == FeatureSpec()


def test_a_version_reading_uncounted_features_is_refused_by_name():
    data = Models(SETTINGS, SPEC).to_bytes()
    with pytest.raises(NotCounted, match=r"entity device_hour \(device,hour\), imp_1m, clk_1m"):
        Models.from_bytes(SETTINGS, FeatureSpec(), data, "model version 7")

    class Store:  # what Models.load and the scorer read
        prefix = "m:ctr"

        def get_blob(self, version, name):
            return data

        def get_meta(self, version):
            return Models(SETTINGS, SPEC).describe()

    with pytest.raises(NotCounted, match="model version 7 of m:ctr .*device_hour"):
        Models.load(SETTINGS, FeatureSpec(), Store(), "7")
    with pytest.raises(NotCounted, match="model version 7 .*imp_1m"):
        Scorer(Store(), None, FeatureSpec())._use_meta("7", Store().get_meta("7"))
    assert Scorer(Store(), None, SPEC)._use_meta("7", Store().get_meta("7"))["spec"] \
        == SPEC.to_dict()


def test_the_retrain_does_not_warm_start_from_a_version_reading_other_counts():
    meta = Models(SETTINGS, SPEC).describe()
    assert incompatible(meta, Models(SETTINGS, SPEC)) is None
    why = incompatible(meta, Models(SETTINGS, FeatureSpec()))
    assert "not counted now" in why and "device_hour" in why and "imp_1m" in why
    more = FeatureSpec(entities=SPEC.entities, windows_ms=(60_000, 300_000))
    assert "imp_5m" in incompatible(meta, Models(SETTINGS, more))
