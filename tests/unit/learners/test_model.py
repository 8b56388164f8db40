"""Models: the three learners together, as the learn flow runs them."""

from __future__ import annotations

import numpy as np
import pytest

from features.spec import FeatureSpec
from learners.model import MODELS, Models, ModelSettings, slice_keys
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


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_every_example_is_predicted_before_it_is_learned(rate):
    # Flip one example's label: no model's prediction of it, or of any example before it,
    # may change (they were made before it was learned); later ones may.
    data = synthetic(700)
    settings = ModelSettings(hash_bits=16, emb_dim=4, emb_fallback_rows=16,
                             negative_sample_rate=rate)
    runs = []
    for flip in (False, True):
        models = Models(settings, FeatureSpec())
        models.learn([dict(e) for e in data[:300]])
        batch = [dict(e) for e in data[300:700]]
        at = next(k for k in range(200, 400) if not batch[k]["label"])  # a click: learned
        if flip:
            batch[at]["label"] = 1
        models.learn(batch, annotate=True)
        runs.append({n: np.array([e["online_p"][n] for e in batch]) for n in MODELS})
    for name in MODELS:
        a, b = runs[0][name], runs[1][name]
        np.testing.assert_array_equal(a[:at + 1], b[:at + 1], err_msg=name)
        assert not np.array_equal(a[at + 1:], b[at + 1:]), name
    if rate == 1.0:  # and with all three predicted up front, as before, the same figures
        models = Models(settings, FeatureSpec())
        models.learn([dict(e) for e in data[:300]])
        want = models.predict(data[300:556])
        models.micro_batch = 256
        batch = [dict(e) for e in data[300:556]]
        models.learn(batch, annotate=True)
        np.testing.assert_allclose([e["online_p"]["emb"] for e in batch], want["emb"],
                                   rtol=0, atol=1e-6)


def test_each_push_carries_the_changed_rows_and_the_dense_block():
    models = Models(ModelSettings(hash_bits=16, emb_dim=4, emb_fallback_rows=16), FeatureSpec())
    data = synthetic(1200)
    models.changes(full=True)
    models.learn(data[:600])
    first = models.changes()["emb"]
    np.testing.assert_array_equal(first["dense"], models.emb.dense_weights())
    assert first["user"].ids and first["item"].ids and not first["user"].full
    assert models.changes()["emb"]["dense"] is None  # nothing learned since: nothing to send
    before = first["dense"]
    models.learn(data[600:])
    second = models.changes()["emb"]
    assert second["dense"] is not None and not np.array_equal(second["dense"], before)
