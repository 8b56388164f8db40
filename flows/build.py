"""The builders from the config to the core objects, in one place: joiner/, features/ and
learners/ never see ``Config``, they take what these make (a ``FeatureSpec``, settings, a
redis client). The one ``FeatureSpec`` made here is what the join flow counts and what the
learn flow, the retrain and the scorer read.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from features.spec import FeatureSpec, split_names
from features.store import BufferedWriter, FeatureStore, redact_url
from flows.config import Config, ConfigError
from joiner.health import JoinHealthMonitor
from joiner.join import WaitWindowJoiner
from learners.publish import ModelStore

if TYPE_CHECKING:  # imported where used: they import torch, which the join flow never needs
    from learners.model import ModelSettings
    from learners.retrain import RetrainSettings
    from learners.scorer import LoadedVersion, Scorer


def feature_spec(cfg: Config) -> FeatureSpec:
    """``[features]``: ``entities`` maps name -> "field,field" (an empty value drops the
    entity), ``windows_ms`` and ``tiles_per_window`` as they are."""
    f = cfg.features
    entities = {name: tuple(split_names(fields)) for name, fields in f.entities.items()
                if fields.strip()}
    try:
        return FeatureSpec(entities=entities, windows_ms=tuple(f.windows_ms),
                           tiles_per_window=f.tiles_per_window)
    except ValueError as e:
        raise ConfigError(f"features.{e}") from None


def redis_client(cfg: Config) -> redis.Redis:
    """A redis-py client for ``[redis]`` (a RedisCluster when ``redis.cluster``)."""
    r = cfg.redis
    kwargs: dict = {
        "socket_timeout": r.socket_timeout_s or None,
        "socket_connect_timeout": r.connect_timeout_s or None,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), r.retries),
    }
    if r.username:
        kwargs["username"] = r.username
    if r.password:
        kwargs["password"] = r.password
    if r.ssl:
        kwargs["ssl"] = True
    if r.ssl_ca_certs:
        # redis-py refuses a CA for a plain-text connection with a TypeError; say why instead.
        if not (r.ssl or r.url.startswith("rediss://")):
            raise ConfigError("redis.ssl_ca_certs is set but the connection is plain text: "
                              "use a rediss:// URL or redis.ssl = true")
        kwargs["ssl_ca_certs"] = r.ssl_ca_certs
    if r.cluster:
        from redis.cluster import RedisCluster

        client = RedisCluster.from_url(r.url, **kwargs)
        # no single connection pool to read the password back from, for scrubbing errors
        # (features/store.py _password)
        client._ctrstream_password = r.password or urlsplit(r.url).password
        return client
    return redis.Redis.from_url(r.url, **kwargs)


def feature_store(cfg: Config, feature_names: list[str] | None = None, *,
                  schema_version: int = 1) -> FeatureStore:
    """The feature store with ``features.store_*``. Without ``feature_names``, the version
    and names come from the meta key (raises `MetaMissing` when there is none)."""
    f = cfg.features
    kw = {"prefix": f.store_prefix, "ttl_s": f.store_ttl_s, "where": redact_url(cfg.redis.url)}
    if feature_names is None:
        return FeatureStore.from_meta(redis_client(cfg), **kw)
    return FeatureStore(redis_client(cfg), schema_version=schema_version,
                        feature_names=feature_names, **kw)


def feature_writer(cfg: Config, store: FeatureStore) -> BufferedWriter:
    f = cfg.features
    return BufferedWriter(store, f.store_flush_interval_s, f.store_max_pending,
                          give_up_s=f.store_give_up_s)


def model_store(cfg: Config, name: str | None = None, keep_days: float | None = None,
                **kwargs) -> ModelStore:
    """The model store ``learn.store_name`` (or ``name``), keeping replaced versions
    ``learn.keep_days`` (or ``keep_days``)."""
    lc = cfg.learn
    return ModelStore(redis_client(cfg), name=lc.store_name if name is None else name,
                      keep_days=lc.keep_days if keep_days is None else keep_days, **kwargs)


def model_settings(cfg: Config) -> ModelSettings:
    """The models' hyperparameters from ``[learn]``, where each has the same name."""
    from learners.model import ModelSettings

    lc = cfg.learn
    same = {f.name: getattr(lc, f.name) for f in dataclasses.fields(ModelSettings)}
    try:
        return ModelSettings(**{
            **same, "crosses": tuple(tuple(split_names(c)) for c in lc.crosses),
            "item_attributes": tuple(lc.item_attributes)})
    except ValueError as e:
        raise ConfigError(f"learn.{e}") from None


def retrain_settings(cfg: Config) -> RetrainSettings:
    from learners.retrain import RetrainSettings, parse_min_gain_se

    lc = cfg.learn
    try:
        min_gain_se = parse_min_gain_se(lc.retrain_min_gain_se)
    except ValueError as e:
        raise ConfigError(f"learn.retrain_min_gain_se: {e}") from None
    return RetrainSettings(model_settings(cfg), feature_spec(cfg),
                           holdout_fraction=lc.holdout_fraction,
                           max_ne_regression=lc.max_ne_regression,
                           online_keep_hours=lc.online_keep_hours,
                           linear_epochs=lc.retrain_linear_epochs, min_gain_se=min_gain_se)


def scorer(cfg: Config, shared: LoadedVersion | None = None) -> Scorer:
    """A scorer on the current model version, with the counts the join flow writes; scorers
    given one ``shared`` load each version once between them."""
    from learners.scorer import Scorer

    spec = feature_spec(cfg)
    return Scorer(model_store(cfg), feature_store(cfg, spec.feature_names()), spec,
                  shared=shared)


def wait_window_joiner(cfg: Config, name: str = "", signals: bool = False) -> WaitWindowJoiner:
    """The join flow's joiner for one input partition (``name`` labels its health metrics)."""
    j, h = cfg.join, cfg.health
    return WaitWindowJoiner(
        window_ms=j.wait_window_ms, early_click_hold_ms=j.early_click_hold_ms,
        late_click_horizon_ms=j.late_click_horizon_ms, idle_timeout_s=j.idle_timeout_s,
        capacity=j.capacity, held_clicks_capacity=j.held_clicks_capacity,
        max_future_ms=j.max_future_ms, max_past_ms=j.max_past_ms,
        health=JoinHealthMonitor(h.max_click_lag_ms, h.ctr_collapse_ratio, h.window_examples,
                                 h.min_expected_clicks, h.baseline_halflife_examples, name),
        signals=signals, idle_needs_caught_up=True)
