"""Models: the three learners together, as the learn flow runs them."""

from __future__ import annotations

import numpy as np

from features.spec import FeatureSpec
from learners.model import Models, ModelSettings, slice_keys
from tests.unit.learners.test_embeddings import synthetic


def test_calibration_by_position_and_hour_is_reported_and_survives_a_round_trip():
    data = synthetic(3000)
    models = Models(ModelSettings(hash_bits=16, emb_dim=4, emb_fallback_rows=16), FeatureSpec())
    models.learn(data)
    s = models.summary()
    for name in ("ftrl", "bopr", "emb"):
        by = s[name]["calibration_by"]
        assert len(by["position"]) == 10 and len(by["hour"]) == 24
        assert all(0.2 < c < 5 for c in by["position"])  # every position was shown
    back = Models.from_bytes(models.settings, FeatureSpec(), models.to_bytes())
    np.testing.assert_equal(back.summary()["emb"]["calibration_by"], s["emb"]["calibration_by"])


def test_slice_keys_read_position_and_hour_as_the_models_do():
    keys = slice_keys([{"features": {"position": 3, "hour": 25}},
                       {"features": {"position": "12", "hour": 7.0}},
                       {"features": {"position": "top"}}, {}])
    assert keys["position"].tolist() == [3, 9, -1, -1]
    assert keys["hour"].tolist() == [1, 7, -1, -1]


def test_every_example_is_predicted_before_it_is_learned():
    data = synthetic(600)
    a = Models(ModelSettings(hash_bits=16, emb_dim=4, emb_fallback_rows=16), FeatureSpec())
    b = Models(ModelSettings(hash_bits=16, emb_dim=4, emb_fallback_rows=16), FeatureSpec())
    a.learn(data[:300])
    b.learn(data[:300])
    batch = [dict(e) for e in data[300:556]]
    want = b.predict(batch)
    a.micro_batch = 256
    a.learn(batch, annotate=True)
    for name in ("ftrl", "bopr", "emb"):
        got = np.array([e["online_p"][name] for e in batch])
        np.testing.assert_allclose(got, want[name], rtol=0, atol=1e-6)
