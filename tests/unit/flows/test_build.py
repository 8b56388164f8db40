"""flows/build.py: the config to core objects, and the learn flow's start-up check that the
version it continues reads only counts the config counts."""

from __future__ import annotations

import pytest

import flows.learn
from features.spec import FeatureSpec, NotCounted
from flows.build import feature_spec, model_settings, retrain_settings
from flows.config import Config, ConfigError
from learners.model import Models, ModelSettings
from learners.retrain import RetrainSettings


def test_the_cores_defaults_are_the_configs():
    assert model_settings(Config()) == ModelSettings()
    assert retrain_settings(Config()) == RetrainSettings()
    assert feature_spec(Config()) == FeatureSpec()


def test_settings_come_from_the_config_and_bad_ones_name_the_key():
    cfg = Config().replace(learn={"crosses": ["user_id, device", "a,b,c"], "hash_bits": 18},
                           features={"windows_ms": [60_000]})
    assert model_settings(cfg).crosses == (("user_id", "device"), ("a", "b", "c"))
    assert retrain_settings(cfg).spec.feature_names() == ["imp_1m", "clk_1m"]
    with pytest.raises(ConfigError, match="learn.negative_sample_rate"):
        model_settings(Config().replace(learn={"negative_sample_rate": 1.5}))
    retrain = retrain_settings(Config().replace(learn={"retrain_min_gain_se": "ftrl=1, emb=3",
                                                       "retrain_linear_epochs": 1}))
    assert (retrain.min_gain_se, retrain.linear_epochs) == ({"ftrl": 1.0, "emb": 3.0}, 1)
    assert retrain_settings(Config().replace(learn={"retrain_min_gain_se": ""})).min_gain_se == {}
    with pytest.raises(ConfigError, match="learn.retrain_min_gain_se: unknown model 'lr'"):
        retrain_settings(Config().replace(learn={"retrain_min_gain_se": "lr=2"}))
    with pytest.raises(ConfigError, match="learn.retrain_linear_epochs"):
        Config().replace(learn={"retrain_linear_epochs": 0})


def test_the_learn_flow_refuses_at_start_up_a_version_reading_uncounted_features(monkeypatch):
    trained = FeatureSpec(entities={"user": ("user_id",), "device_hour": ("device", "hour")},
                          windows_ms=(60_000,))
    meta = {**Models(ModelSettings(emb_dim=2, emb_fallback_rows=2), trained).describe(),
            "offsets": {"0": 12}}

    class Store:
        client = None

        def current(self):
            return "7"

        def get_meta(self, version):
            return meta

    monkeypatch.setattr(flows.learn, "model_store", lambda cfg: Store())
    cfg = Config()  # counts the default entities and windows: none of device_hour, 1m
    with pytest.raises(NotCounted, match=r"model version 7 .*device_hour.*imp_1m, clk_1m"):
        flows.learn.start_offsets(cfg)
    counting = cfg.replace(features={"windows_ms": [60_000],
                                     "entities": {"device_hour": "device,hour"}})
    assert flows.learn.start_offsets(counting) == {0: 12}
