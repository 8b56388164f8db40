"""`ctrstream doctor` through the CLI, against the session's real broker and Redis, and against
ports where nothing listens."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from ctrstream.cli import main
from ctrstream.stack import free_port
from features.store import FeatureStore
from flows.build import feature_spec, feature_store, model_store, redis_client

pytestmark = pytest.mark.integration

TIMEOUT_S = 2.0


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No CTRSTREAM_* variable from the caller's environment reaches the config."""
    import os

    for var in list(os.environ):
        if var.startswith("CTRSTREAM_"):
            monkeypatch.delenv(var)


@pytest.fixture
def cfg(fresh_topics):
    """Fresh topics, and a feature-store prefix and model-store name of this test only."""
    s = uuid.uuid4().hex[:8]
    return fresh_topics.replace(features={"store_prefix": f"doc{s}"},
                                learn={"store_name": f"doc{s}"})


def doctor(cfg, tmp_path, capsys) -> tuple[int, dict[str, str], str, float]:
    """Run `ctrstream --config FILE doctor`; returns the exit code, check name -> its line,
    all output and the seconds it took."""
    path = tmp_path / f"doctor-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(cfg.to_toml())
    started = time.monotonic()
    code = main(["--config", str(path), "doctor", "--timeout", str(TIMEOUT_S)])
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    lines = {}
    for line in out.splitlines():
        status, _, rest = line.partition(" ")
        for name in ("config", "kafka", "input topics", "output topics", "redis",
                     "feature store", "model store"):
            if rest.strip().startswith(name + " "):
                lines[name] = line
    return code, lines, out, elapsed


def status(line: str) -> str:
    return line.split()[0]


def test_healthy_deployment_is_all_ok(cfg, tmp_path, capsys):
    spec = feature_spec(cfg)
    fs = feature_store(cfg, spec.feature_names())
    fs.write_many({("user", "u1"): dict.fromkeys(spec.feature_names(), 1)}, ts_ms=1_000)
    ms = model_store(cfg)
    version = ms.new_version()
    ms.put_meta(version, {"schema": 1})
    ms.publish(version)

    code, lines, out, _ = doctor(cfg, tmp_path, capsys)
    assert code == 0, out
    assert len(lines) == 7, out
    assert {n: status(line) for n, line in lines.items()} == dict.fromkeys(lines, "ok"), out
    assert f"file {tmp_path}" in lines["config"]
    assert f"version {version}" in lines["model store"]
    assert "all checks passed" in out


def test_a_model_reading_counts_nobody_counts_fails(cfg, tmp_path, capsys):
    ms = model_store(cfg)
    version = ms.new_version()
    ms.put_meta(version, {"spec": {"entities": {"device_hour": ["device", "hour"]},
                                   "windows_ms": [60_000]}})
    ms.publish(version)
    code, lines, out, _ = doctor(cfg, tmp_path, capsys)
    assert code == 1, out
    assert status(lines["model store"]) == "FAIL"
    assert "entity device_hour (device,hour), imp_1m, clk_1m" in lines["model store"], out


def test_empty_stores_warn_but_pass(cfg, tmp_path, capsys):
    code, lines, out, _ = doctor(cfg, tmp_path, capsys)
    assert code == 0, out
    assert status(lines["feature store"]) == "warn"
    assert "nothing written yet" in lines["feature store"]
    assert status(lines["model store"]) == "warn"
    assert "no model published yet" in lines["model store"]
    assert "2 warning(s)" in out


def test_input_topics_with_different_partition_counts_fail(stack_cfg, tmp_path, capsys):
    s = uuid.uuid4().hex[:8]
    imp, clk = f"impressions-{s}", f"clicks-{s}"
    admin = AdminClient(stack_cfg.kafka_client())
    for f in admin.create_topics([NewTopic(imp, 2, 1), NewTopic(clk, 3, 1)]).values():
        f.result(10)
    cfg = stack_cfg.replace(kafka={"impressions_topic": imp, "clicks_topic": clk,
                                   "examples_topic": f"examples-{s}",
                                   "dead_letters_topic": f"dead-letters-{s}"})
    code, lines, out, _ = doctor(cfg, tmp_path, capsys)
    assert code == 1, out
    line = lines["input topics"]
    assert status(line) == "FAIL"
    assert f"'{imp}': 2" in line and f"'{clk}': 3" in line, line
    assert "Fix: recreate one input topic" in line
    assert status(lines["output topics"]) == "FAIL"
    assert f"examples-{s}" in lines["output topics"]
    assert "topics create" in lines["output topics"]


def test_feature_store_of_another_schema_fails(cfg, tmp_path, capsys):
    spec = feature_spec(cfg)
    newer = FeatureStore(redis_client(cfg), prefix=cfg.features.store_prefix, schema_version=99,
                         feature_names=spec.feature_names())
    newer.write_many({("user", "u1"): {spec.feature_names()[0]: 1}}, ts_ms=1_000)
    code, lines, out, _ = doctor(cfg, tmp_path, capsys)
    assert code == 1, out
    assert status(lines["feature store"]) == "FAIL"
    assert "schema version 99, newer than this code's 1" in lines["feature store"]


def test_feature_store_lacking_features_fails(cfg, tmp_path, capsys):
    FeatureStore(redis_client(cfg), prefix=cfg.features.store_prefix, feature_names=["other"]
                 ).write_many({("user", "u1"): {"other": 1}}, ts_ms=1_000)
    code, lines, out, _ = doctor(cfg, tmp_path, capsys)
    assert code == 1, out
    assert status(lines["feature store"]) == "FAIL"
    assert "has features ['other'], this reader expects" in lines["feature store"]


def test_feature_store_of_the_hash_layout_fails_with_the_fix(cfg, tmp_path, capsys):
    spec = feature_spec(cfg)
    redis_client(cfg).hset(f"{cfg.features.store_prefix}:meta", mapping={
        "version": 1, "features": orjson.dumps(spec.feature_names())})  # before packed rows
    code, lines, out, _ = doctor(cfg, tmp_path, capsys)
    assert code == 1, out
    assert status(lines["feature store"]) == "FAIL"
    assert "hash per entity" in lines["feature store"]
    assert "run `ctrstream features migrate`" in lines["feature store"]


def test_redis_down_fails_fast(cfg, tmp_path, capsys):
    cfg = cfg.replace(redis={"url": f"redis://127.0.0.1:{free_port()}/0"})
    code, lines, out, elapsed = doctor(cfg, tmp_path, capsys)
    assert code == 1, out
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert status(lines["redis"]) == "FAIL"
    assert "cannot reach redis://127.0.0.1:" in lines["redis"]
    assert "Fix: is Redis running" in lines["redis"]
    assert status(lines["feature store"]) == status(lines["model store"]) == "skip"
    assert status(lines["kafka"]) == "ok"  # the other checks still run


def test_kafka_unreachable_fails_fast(cfg, tmp_path, capsys):
    cfg = cfg.replace(kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    code, lines, out, elapsed = doctor(cfg, tmp_path, capsys)
    assert code == 1, out
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert status(lines["kafka"]) == "FAIL"
    assert "no answer from 127.0.0.1:" in lines["kafka"]
    assert status(lines["input topics"]) == status(lines["output topics"]) == "skip"
    assert status(lines["redis"]) == "ok"


def test_secrets_are_never_printed(cfg, tmp_path, capsys, monkeypatch):
    user = f"doctor-{uuid.uuid4().hex[:8]}"  # an ACL user: the default user stays open
    client = redis_client(cfg)
    client.acl_setuser(user, enabled=True, passwords=["+right-s3cret"], keys=["*"],
                       commands=["+@all"])
    client.close()
    monkeypatch.setenv("CTRSTREAM_KAFKA__CLIENT", '{"client.id": "env-s3cret"}')
    host = cfg.redis.url.removeprefix("redis://")

    wrong = cfg.replace(redis={"url": f"redis://{user}:wrong-s3cret@{host}"})
    code, lines, out, _ = doctor(wrong, tmp_path, capsys)
    assert code == 1, out
    assert status(lines["redis"]) == "FAIL"
    assert f"redis://{user}:***@127.0.0.1" in lines["redis"]
    assert "refused the login" in lines["redis"]
    assert "environment CTRSTREAM_KAFKA__CLIENT" in lines["config"]
    assert "s3cret" not in out

    right = cfg.replace(redis={"url": f"redis://{user}@{host}", "password": "right-s3cret"})
    code, lines, out, _ = doctor(right, tmp_path, capsys)
    assert code == 0, out
    assert "login accepted" in lines["redis"]
    assert "s3cret" not in out
