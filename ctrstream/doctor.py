"""`ctrstream doctor`: can this deployment run? One line per check, in the order the pipeline
depends on them: the config, Kafka, the topics, Redis, the feature store, the model store.

    ok    config        /etc/ctrstream/ctrstream.toml + environment CTRSTREAM_REDIS__PASSWORD
    FAIL  kafka         no answer from kafka:9092 within 3 s (...). Fix: is the broker up ...
    skip  input topics  not checked: Kafka is unreachable

``warn`` is something to know that does not stop the pipeline (nothing written to a store
yet); ``skip`` a check that cannot run because one before it failed. The exit code is 1 when a
check FAILed, else 0. Secrets are never printed: the Redis URL goes through `redact_url`,
errors are scrubbed of the password, the environment is listed by variable name only, and of
Kafka only the bootstrap servers are shown.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ctrstream.text import age
from flows.config import ENV_PREFIX, Config

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass(frozen=True)
class Check:
    status: str  # OK, WARN, FAIL or SKIP
    name: str
    detail: str  # what was found, in plain words
    fix: str = ""  # what to do about it (not shown for OK)

    def line(self) -> str:
        text = f"{self.status:<5} {self.name:<14} {self.detail}"
        if self.fix and self.status in (WARN, FAIL):
            text += f". Fix: {self.fix}"
        return text


def config_source(config_path: str | None, environ: dict[str, str]) -> str:
    """Where the config came from, as `load_config` chose it, with the names (never the
    values) of the environment variables that override it."""
    path = config_path or environ.get(ENV_PREFIX + "CONFIG")
    if path is None and Path("ctrstream.toml").exists():
        path = "ctrstream.toml"
    where = f"file {path}" if path else "defaults (no config file)"
    overrides = sorted(v for v in environ
                       if v.startswith(ENV_PREFIX) and v != ENV_PREFIX + "CONFIG")
    if overrides:
        where += " + environment " + ", ".join(overrides)
    return where


def check_kafka(cfg: Config, timeout_s: float):
    """(Check, topic metadata or None): can an admin client list the topics?"""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    servers = cfg.kafka.bootstrap_servers
    errors: list = []
    admin = AdminClient(cfg.kafka_client(**{
        "log_level": 0, "error_cb": errors.append,
        "socket.connection.setup.timeout.ms": max(1000, int(timeout_s * 1000))}))
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException as e:
        why = (errors[-1] if errors else e.args[0]).str()
        return Check(FAIL, "kafka", f"no answer from {servers} within {timeout_s:g} s ({why})",
                     "is the broker running and reachable from here? Check "
                     "kafka.bootstrap_servers, and the security settings in [kafka.client] "
                     "(CTRSTREAM_KAFKA__CLIENT)"), None
    return Check(OK, "kafka", f"{servers} answers: {len(md.brokers)} broker(s)"), md


def check_input_topics(cfg: Config, md, timeout_s: float) -> Check:
    """Both input topics exist with the same partition count (the join's co-partitioning)."""
    from confluent_kafka import KafkaException

    from flows.kafka import input_partitions

    k = cfg.kafka
    try:
        n = input_partitions(cfg, timeout=timeout_s)
    except (RuntimeError, KafkaException) as e:
        missing = [t for t in (k.impressions_topic, k.clicks_topic) if not _exists(md, t)]
        fix = ("run `ctrstream topics create`" if missing else
               "recreate one input topic with the other's partition count (deleting a topic "
               "deletes its messages), then `ctrstream topics create`")
        return Check(FAIL, "input topics", str(e), fix)
    if n != k.partitions:
        return Check(WARN, "input topics",
                     f"{k.impressions_topic} and {k.clicks_topic} have {n} partitions each, "
                     f"but kafka.partitions is {k.partitions}",
                     f"set kafka.partitions = {n} (`ctrstream topics create` refuses the "
                     "difference)")
    return Check(OK, "input topics",
                 f"{k.impressions_topic} and {k.clicks_topic}: {n} partitions each")


def check_output_topics(cfg: Config, md) -> Check:
    k = cfg.kafka
    names = [k.examples_topic, k.dead_letters_topic]
    missing = [t for t in names if not _exists(md, t)]
    if missing:
        return Check(FAIL, "output topics", f"missing on {k.bootstrap_servers}: "
                     + ", ".join(missing), "run `ctrstream topics create`")
    return Check(OK, "output topics", ", ".join(
        f"{t} ({len(md.topics[t].partitions)} partitions)" for t in names))


def _exists(md, topic: str) -> bool:
    t = md.topics.get(topic) if md is not None else None
    return t is not None and t.error is None


def check_redis(cfg: Config):
    """(Check, client or None): does Redis answer a PING with these credentials?"""
    import redis

    from features.store import redact_url
    from flows.build import redis_client

    where = redact_url(cfg.redis.url)
    secret = cfg.redis.password or urlsplit(cfg.redis.url).password
    client = None
    try:
        client = redis_client(cfg)
        client.ping()
    except redis.AuthenticationError as e:
        _close(client)
        return Check(FAIL, "redis", f"{where} refused the login: {_scrub(e, secret)}",
                     "set the password in CTRSTREAM_REDIS__PASSWORD (redis.password), and "
                     "redis.username for an ACL user; a server without a password refuses one "
                     "too"), None
    except (redis.RedisError, redis.exceptions.RedisClusterException) as e:
        _close(client)
        return Check(FAIL, "redis", f"cannot reach {where} within "
                     f"{cfg.redis.connect_timeout_s:g} s: {_scrub(e, secret)}",
                     "is Redis running and reachable from here? Check redis.url (host, port, "
                     "db; rediss:// or redis.ssl for TLS)"), None
    return Check(OK, "redis", f"{where} answers, login accepted"), client


def _scrub(err: BaseException, secret: str | None) -> str:
    text = f"{type(err).__name__}: {err}"
    return text.replace(secret, "***") if secret else text


def _close(client) -> None:
    if client is not None:
        client.close()


def check_feature_store(cfg: Config) -> Check:
    """The store's meta key against the schema this code's join flow writes."""
    from features.store import LayoutMismatch, SchemaMismatch
    from flows.build import feature_spec, feature_store

    if not cfg.features.enabled:
        return Check(OK, "feature store", "features.enabled is false: no count features")
    spec = feature_spec(cfg)
    store = feature_store(cfg, spec.feature_names())  # as the join flow's writer makes it
    try:
        raw_version, raw_names = store.client.hmget(store.meta_key, ["version", "features"])
        if raw_version is None:
            return Check(WARN, "feature store",
                         f"no {store.meta_key} on {store.where}: nothing written yet",
                         "the join flow writes it with its first counts; if it has run, check "
                         "features.store_prefix and the db in redis.url")
        found, ours = int(raw_version), store.schema_version
        if found > ours:
            return Check(FAIL, "feature store",
                         f"{store.meta_key} has schema version {found}, newer than this "
                         f"code's {ours}", "run the same ctrstream version everywhere: a "
                         "newer join flow wrote this store")
        if found < ours:
            return Check(WARN, "feature store",
                         f"{store.meta_key} has schema version {found}, older than this "
                         f"code's {ours}", "the join flow of this version upgrades it on its "
                         "first write; until then readers of this version see no features")
        store.check()  # the readers' check of layout and names
    except LayoutMismatch as e:
        return Check(FAIL, "feature store", str(e), "stop the join flow, run `ctrstream "
                     "features migrate`, start it again")
    except SchemaMismatch as e:
        return Check(FAIL, "feature store", str(e),
                     "use the same [features] config in the join flow and here; bump the "
                     "schema version when the features change")
    finally:
        store.client.close()
    return Check(OK, "feature store", f"{store.meta_key}: schema version {found}, "
                 f"{len(spec.feature_names())} features per entity")


def check_model_store(cfg: Config) -> Check:
    from features.spec import NotCounted
    from flows.build import feature_spec, model_store
    from learners.model import check_counted

    ms = model_store(cfg)
    try:
        current = ms.current()
        if current is None:
            return Check(WARN, "model store",
                         f"no model published yet ({ms.pointer_key} does not exist)",
                         "the learn flow publishes one every learn.snapshot_interval_s, the "
                         "daily retrain once a day is archived; scoring fails until then")
        meta = ms.get_meta(current)
    finally:
        ms.client.close()
    if meta is None:
        return Check(FAIL, "model store",
                     f"{ms.pointer_key} names version {current}, which has no meta (expired "
                     "or deleted)", "publish a version again: restart the learn flow or run "
                     "`ctrstream retrain`")
    try:
        check_counted(meta, feature_spec(cfg), f"version {current}")
    except NotCounted as e:
        return Check(FAIL, "model store", str(e), "the learn flow will not start on it, and "
                     "scoring refuses it")
    created = meta.get("created_ms")
    when = "" if not isinstance(created, int) else \
        f", created {age(time.time() - created / 1000)}"
    return Check(OK, "model store", f"{ms.pointer_key} -> version {current}{when}")


def run_checks(cfg: Config, source: str, timeout_s: float = 3.0) -> list[Check]:
    """Every check, printed as it completes; a check that needs a failed one is skipped."""
    # Short network timeouts and no retries: a doctor answers in seconds.
    t = timeout_s
    cfg = cfg.replace(redis={"connect_timeout_s": t, "socket_timeout_s": t, "retries": 0})
    checks = [Check(OK, "config", f"{source}; kafka {cfg.kafka.bootstrap_servers}")]
    _print(checks[-1])

    def add(check: Check) -> None:
        checks.append(check)
        _print(check)

    kafka, md = check_kafka(cfg, t)
    add(kafka)
    if md is None:
        for name in ("input topics", "output topics"):
            add(Check(SKIP, name, "not checked: Kafka is unreachable"))
    else:
        add(check_input_topics(cfg, md, t))
        add(check_output_topics(cfg, md))
    redis_check, client = check_redis(cfg)
    add(redis_check)
    if client is None:
        for name in ("feature store", "model store"):
            add(Check(SKIP, name, "not checked: Redis is unreachable"))
    else:
        client.close()
        add(check_feature_store(cfg))
        add(check_model_store(cfg))
    return checks


def _print(check: Check) -> None:
    print(check.line(), flush=True)


def _cmd(args: argparse.Namespace, cfg: Config) -> int:
    checks = run_checks(cfg, config_source(args.config, dict(os.environ)), args.timeout)
    failed = [c.name for c in checks if c.status == FAIL]
    warned = [c.name for c in checks if c.status == WARN]
    if failed:
        print(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}")
        return 1
    print("doctor: all checks passed" + (f" ({len(warned)} warning(s))" if warned else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="check the config, Kafka, the topics, Redis and the stores",
        description="Check, in order: the config loads; Kafka answers; the input topics exist "
                    "with the same partition count; the output topics exist; Redis answers "
                    "and accepts the login; the feature store's schema version is this "
                    "code's; a model version is published. One line per check (ok, warn, "
                    "FAIL, skip) with what to do. Exit 1 if a check fails. Secrets are never "
                    "printed.")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                   help="network timeout of each check (default 3)")
    p.set_defaults(func=_cmd)
