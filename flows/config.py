"""One settings object for every tunable.

Precedence: defaults < TOML file < environment variables. The file is the one passed
explicitly, else ``$CTRSTREAM_CONFIG``, else ``ctrstream.toml`` in the working directory if it
exists. Environment variables are ``CTRSTREAM_<SECTION>__<KEY>``
(``CTRSTREAM_JOIN__WAIT_WINDOW_MS``)
or ``CTRSTREAM_<KEY>`` for top-level keys (``CTRSTREAM_DATA_DIR``). Unknown keys and bad values
are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import orjson

from features.spec import split_names
from joiner.errors import CtrstreamError

ENV_PREFIX = "CTRSTREAM_"


class ConfigError(CtrstreamError, ValueError):
    """A configuration value is unknown, mistyped or out of range; the message names the key."""

    exit_code = 2


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:19092"
    # Impressions and clicks must share partition count and key so a join needs no shuffle.
    partitions: int = 4
    replication_factor: int = 1
    impressions_topic: str = "impressions"
    clicks_topic: str = "clicks"
    examples_topic: str = "examples"
    dead_letters_topic: str = "dead-letters"
    # Passed through to every confluent-kafka client (security.protocol, sasl.*, ssl.*, ...).
    client: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RedisConfig:
    # rediss://... for TLS. A password may be in the URL, but better set it through
    # $CTRSTREAM_REDIS__PASSWORD so it stays out of files; logs and errors redact it.
    url: str = "redis://127.0.0.1:16379/0"
    username: str = ""  # empty: the URL's (or none)
    password: str = field(default="", repr=False)  # empty: the URL's (or none)
    ssl: bool = False  # TLS even with a redis:// URL
    ssl_ca_certs: str = ""  # CA bundle file; empty: the system's
    cluster: bool = False  # Redis Cluster: the url names any one node
    socket_timeout_s: float = 5.0  # 0: no timeout
    connect_timeout_s: float = 2.0  # 0: no timeout
    # redis-py's own retries of one command on a broken connection (its default of 10 makes
    # an unreachable server take seconds to report); the feature writer retries on top.
    retries: int = 1


@dataclass(frozen=True)
class StackConfig:
    """The embedded local stack (`ctrstream stack up`)."""

    state_dir: str = ".ctrstream/stack"
    kafka_port: int = 19092
    redis_port: int = 16379
    start_timeout_s: float = 20.0


@dataclass(frozen=True)
class JoinConfig:
    wait_window_ms: int = 15 * 60_000
    # A click that arrives before its impression is held until the watermark passes
    # click_ts + early_click_hold_ms, then it is an orphan.
    early_click_hold_ms: int = 5 * 60_000
    # Closed impressions are remembered this long so a late click is told from an orphan.
    late_click_horizon_ms: int = 60 * 60_000
    # A stream silent this long (wall clock) no longer holds the watermark back.
    idle_timeout_s: float = 30.0
    capacity: int = 5_000_000
    held_clicks_capacity: int = 100_000
    # A partition's reader pauses the input stream whose newest event is this far (event
    # time) ahead of the other's while the other has more to read, so a backlog is read in
    # step and not one stream first (joiner/join.py held_back). 0: never pause.
    align_ms: int = 5 * 60_000
    max_future_ms: int = 60 * 60_000
    max_past_ms: int = 30 * 86_400_000
    batch_size: int = 1000
    log_interval_s: float = 10.0


@dataclass(frozen=True)
class HealthConfig:
    """Join-health monitor: when to quarantine the labeled stream."""

    # Click stream silent (or lagging) this long in event time while impressions flow.
    max_click_lag_ms: int = 120_000
    # Short-window labeled CTR below this fraction of the long-run baseline is a collapse.
    ctr_collapse_ratio: float = 0.3
    window_examples: int = 2000
    min_expected_clicks: float = 20.0
    baseline_halflife_examples: int = 50_000


@dataclass(frozen=True)
class FeaturesConfig:
    # The join flow keeps the counters, attaches them to examples and writes Redis.
    enabled: bool = True
    windows_ms: list[int] = field(default_factory=lambda: [300_000, 3_600_000, 86_400_000])
    # Counted entities (features/spec.py): name -> impression fields making its id, comma
    # separated, looked up at the impression's top level, then in its `features`. A TOML
    # [features.entities] table adds to these; an empty value removes one.
    entities: dict[str, str] = field(default_factory=lambda: {
        "user": "user_id", "item": "item_id", "category": "category",
        "user_category": "user_id,category", "item_position": "item_id,position"})
    # Window counters (features/counters.py): tiles per window ring, and how far behind an
    # entity's newest event an event may arrive and still be counted point-in-time exactly.
    tiles_per_window: int = 12
    allowed_lateness_ms: int = 150_000
    # An impression's point-in-time snapshot is taken this long (event time) after every join
    # partition's watermark has passed it, so an impression that arrives out of order by up to
    # this much is still in its neighbours' snapshots. Must be below allowed_lateness_ms: the
    # rest is how far ahead of the watermark events are counted (and reach Redis) at once.
    pit_delay_ms: int = 90_000
    # The counters are split by entity into this many shards, each a bytewax key, so they
    # spread over the flow's workers: a few times the usual worker count. An entity's shard
    # is a hash of its id; changing this (like the spec) needs a fresh recovery store.
    shards: int = 16
    # Redis feature store (features/store.py): keys are store_prefix:{entity:id}.
    store_prefix: str = "f"
    # Idle entities expire; longer than the longest window, whose counts are 0 by then anyway.
    store_ttl_s: int = 2 * 86_400  # 0: never expire
    store_flush_interval_s: float = 0.2
    store_max_pending: int = 5000
    # A writer that cannot reach Redis retries with backoff, holding the flow back; after
    # this long it raises instead (its pending values kept). 0: retry for ever.
    store_give_up_s: float = 0.0


@dataclass(frozen=True)
class LearnConfig:
    """The learn flow (flows/learn.py), the models it keeps and the daily retrain."""

    hash_bits: int = 20
    # Crossed features, each "field,field" (looked up like feature entities: top level first,
    # then in an impression's `features`).
    crosses: list[str] = field(default_factory=lambda: [
        "user_id,category", "item_id,position", "device,hour"])
    ftrl_alpha: float = 0.1
    ftrl_beta: float = 1.0
    ftrl_l1: float = 1.0
    ftrl_l2: float = 1.0
    bopr_beta: float = 1.0
    bopr_prior_variance: float = 0.01
    # Embedding model (learners/embeddings.py): rows per ID after `emb_min_count` sightings.
    emb_dim: int = 16
    emb_min_count: int = 2
    emb_fallback_rows: int = 1024
    emb_evict_after_days: float = 7.0
    emb_lr: float = 0.2
    emb_max_dirty: int = 100_000
    # Negatives are learned at this rate (1: all); predictions are recalibrated.
    negative_sample_rate: float = 1.0
    # An example id seen again within this much event time is a duplicate (the join's output
    # is at-least-once).
    dedup_horizon_ms: int = 2 * 3_600_000
    # Impression fields that describe the item (not the request): kept in Redis for scoring.
    item_attributes: list[str] = field(default_factory=lambda: ["category"])
    # Changed weights and rows go to Redis this often; a full new version this often.
    push_interval_s: float = 5.0
    snapshot_interval_s: float = 900.0
    log_interval_s: float = 10.0
    metrics_window: int = 100_000
    # Model store (learners/publish.py): versions retired by a daily retrain stay readable
    # `keep_days`; the learn flow's own periodic versions `online_keep_hours`.
    store_name: str = "ctr"
    keep_days: float = 7.0
    online_keep_hours: float = 2.0
    # Daily retrain: the last `holdout_fraction` of the day (by event time) is held out, and
    # a model whose NE there is worse than the online model's by more than `max_ne_regression`
    # is not published.
    holdout_fraction: float = 0.1
    max_ne_regression: float = 0.005
    # ...and a model named here only when its holdout NE is below the online one by more than
    # this many paired standard errors: "emb=2", "2" (every model), "" (none; `retrain
    # --min-gain-se` overrides it).
    retrain_min_gain_se: str = "emb=2"
    retrain_linear_epochs: int = 2  # FTRL's and BOPR's shuffled passes over the day
    retrain_batch_size: int = 512
    seed: int = 0


@dataclass(frozen=True)
class GeneratorConfig:
    """The simulator behind `ctrstream produce` (see ctrstream/simulator.py)."""

    users: int = 10_000
    items: int = 2_000
    categories: int = 20
    impressions_per_s: float = 50.0  # in event time
    base_ctr: float = 0.03
    click_delay_median_s: float = 30.0
    click_delay_sigma: float = 2.5
    max_click_delay_s: float = 3 * 3600.0
    # Zipf exponents of item popularity and user activity (0 = uniform).
    item_zipf: float = 1.1
    user_zipf: float = 0.9
    seed: int = 0
    start_ms: int = 0  # event time of the first impression; 0 = yesterday 00:00 UTC


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics of the flows (flows/metrics.py), served over HTTP."""

    enabled: bool = True
    # Loopback by default: the endpoint has no authentication. In a container, "0.0.0.0".
    host: str = "127.0.0.1"
    # Process i of a flow serves on its flow's port + i, so the processes of a multi-process
    # run on one machine do not collide (join: 9464, 9465, ...); 0 turns that flow's server off.
    join_port: int = 9464
    learn_port: int = 9474
    # A partition whose consumer lag has been at least lag_warn_messages for lag_window_s and
    # has not fallen over it is behind: the input outruns the flow. Logged as a warning and
    # exported as ctrstream_input_behind (also with enabled = false, logged only; the learn
    # flow measures its lag only when enabled). Caught up again below half the threshold.
    lag_window_s: float = 60.0
    lag_warn_messages: int = 100_000


@dataclass(frozen=True)
class Config:
    data_dir: str = ".ctrstream/data"
    recovery_dir: str = ".ctrstream/recovery"
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    join: JoinConfig = field(default_factory=JoinConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def replace(self, **changes: Any) -> Config:
        """Copy with changes; ``section={"key": value}`` updates one section. Validated."""
        return _build(type(self), _merge(dataclasses.asdict(self), changes), "")

    def to_toml(self) -> str:
        """Every setting as a TOML file that ``load_config`` reads back to this Config, for
        handing a config to another process (a flow, a benchmark run). Secrets included:
        keep the file private."""
        top, sections = [], []
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, dict) and dataclasses.is_dataclass(getattr(self, name)):
                sections.append(f"\n[{name}]")
                sections += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
            else:
                top.append(f"{name} = {_toml_value(value)}")
        return "\n".join(top + sections) + "\n"

    def kafka_client(self, **overrides: Any) -> dict[str, Any]:
        """confluent-kafka settings: bootstrap servers, the pass-through options, then overrides."""
        return {"bootstrap.servers": self.kafka.bootstrap_servers, **self.kafka.client, **overrides}


# Keys that must be strictly positive; everything else numeric must be >= 0.
_POSITIVE = {
    "partitions", "replication_factor", "wait_window_ms", "capacity", "held_clicks_capacity",
    "batch_size", "hash_bits", "users", "items", "categories", "impressions_per_s",
    "window_examples", "baseline_halflife_examples", "kafka_port", "redis_port",
    "idle_timeout_s", "push_interval_s", "snapshot_interval_s", "log_interval_s",
    "ftrl_alpha", "bopr_beta", "bopr_prior_variance", "click_delay_median_s",
    "start_timeout_s", "max_click_lag_ms", "lag_window_s", "lag_warn_messages",
    "retrain_linear_epochs",
}
_UNIT_INTERVAL = {"base_ctr", "ctr_collapse_ratio"}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return orjson.dumps(v).decode()  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = get_origin(typ)
    if origin is list:
        if isinstance(value, str):
            value = orjson.loads(value) if value.strip().startswith("[") else split_names(value)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = get_args(typ)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = orjson.loads(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            num = typ(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and not isinstance(num, int):
            if isinstance(num, float) and num.is_integer():
                num = int(num)
            else:
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if not isinstance(num, int | float) or num != num:
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
        name = key.rsplit(".", 1)[-1].split("[")[0]
        if name in _POSITIVE and num <= 0:
            raise ConfigError(f"{key}: must be > 0, got {num}")
        if num < 0:
            raise ConfigError(f"{key}: must be >= 0, got {num}")
        if name in _UNIT_INTERVAL and not 0 < num < 1:
            raise ConfigError(f"{key}: must be between 0 and 1, got {num}")
        return num
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a table, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, typ, f"{prefix}{name}")
    return cls(**kwargs)


def _from_env(environ: dict[str, str]) -> dict:
    sections = {n for n, t in get_type_hints(Config).items() if dataclasses.is_dataclass(t)}
    out: dict[str, Any] = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        rest = var[len(ENV_PREFIX):].lower()
        if "__" in rest:
            section, key = rest.split("__", 1)
            if section not in sections:
                raise ConfigError(f"unknown config key {section}.{key} (from ${var})")
            out.setdefault(section, {})[key] = value
        else:
            out[rest] = value
    return out


def load_config(path: str | os.PathLike | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """Load defaults < TOML file < environment and validate; raises ConfigError naming the key."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    if path is None and Path("ctrstream.toml").exists():
        path = "ctrstream.toml"
    data: dict = dataclasses.asdict(Config())
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = _merge(data, tomllib.load(f))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    data = _merge(data, _from_env(environ))
    cfg = _build(Config, data, "")
    f = cfg.features
    if f.pit_delay_ms > f.allowed_lateness_ms:  # the scheduler counts lateness - delay ahead
        raise ConfigError(f"features.pit_delay_ms: must not exceed features.allowed_lateness_ms "
                          f"({f.allowed_lateness_ms}), got {f.pit_delay_ms}")
    if f.shards < 1:
        raise ConfigError(f"features.shards: must be at least 1, got {f.shards}")
    return cfg
