"""The Redis feature store against a real redis-server (the session's, or a private one)."""

from __future__ import annotations

import logging
import struct
import threading

import orjson
import pytest
import redis

from ctrstream.cli import main
from ctrstream.stack import Component, free_port
from features.store import (
    BufferedWriter,
    FeatureStore,
    LayoutMismatch,
    SchemaMismatch,
    StoreUnavailable,
    row_ts,
)
from flows.build import redis_client
from flows.config import Config

pytestmark = pytest.mark.integration

NAMES = ["clicks_1h", "imps_1h", "clicks_5m", "delta"]


@pytest.fixture
def store(redis_client):
    return FeatureStore(redis_client, feature_names=NAMES, ttl_s=3600)


class CountingConnection(redis.Connection):
    """A real connection that counts the requests it sends (one per round trip)."""

    sends = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sends += 1
        return super().send_packed_command(command, check_health)


def test_round_trip(store):
    store.write_many({("user", "1"): {"clicks_1h": 3, "imps_1h": 120, "clicks_5m": 1,
                                      "delta": -7},
                      ("item", "9"): {"clicks_1h": 1}},
                     ts_ms={("user", "1"): 1_700_000_000_123, ("item", "9"): 5})
    row = store.get("user", "1")
    assert row == {"clicks_1h": 3, "imps_1h": 120, "clicks_5m": 1, "delta": -7,
                   "_ts": 1_700_000_000_123, "_missing": False}
    assert all(type(row[n]) is int for n in NAMES)
    # a partly written entity: the features it lacks read as 0
    assert store.get("item", "9") == {"clicks_1h": 1, "imps_1h": 0, "clicks_5m": 0, "delta": 0,
                                      "_ts": 5, "_missing": False}
    # the documented layout: little-endian int64 version, _ts, then the features in order
    raw = store.client.get("f:{user:1}")
    assert struct.unpack("<6q", raw) == (1, 1_700_000_000_123, 3, 120, 1, -7)
    assert row_ts(raw) == 1_700_000_000_123
    meta = store.client.hgetall("f:meta")
    assert meta[b"version"] == b"1" and orjson.loads(meta[b"features"]) == NAMES
    assert meta[b"layout"] == b"i64le"


def test_writes_are_absolute_and_idempotent(store):
    rows = {("user", str(i)): {"clicks_1h": i, "delta": i * 10} for i in range(50)}
    store.write_many(rows, 1000)
    first = store.client.mget([store.key(*k) for k in rows])
    store.write_many(rows, 1000)  # a replay after a crash
    assert store.client.mget([store.key(*k) for k in rows]) == first
    assert store.get("user", "7")["clicks_1h"] == 7  # not 14


def test_missing_entity_reads_as_defaults(store):
    assert store.get("user", "nobody") == {**dict.fromkeys(NAMES, 0), "_ts": None,
                                           "_missing": True}


def test_get_many_is_one_round_trip(redis_client, stack_cfg):
    ids = [str(i) for i in range(300)]
    writer = FeatureStore(redis_client, feature_names=NAMES)
    writer.write_many({("user", i): {"clicks_1h": int(i)} for i in ids[::2]}, 1)
    pool = redis.ConnectionPool.from_url(stack_cfg.redis.url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    try:
        reader = FeatureStore(client, feature_names=NAMES)
        client.ping()  # connect (HELLO, CLIENT SETINFO) before counting
        redis_client.config_resetstat()
        CountingConnection.sends = 0
        rows = reader.get_many("user", ids)  # the first read checks the meta key too
        assert CountingConnection.sends == 1
        again = reader.get_many("user", ids)
        assert CountingConnection.sends == 2
    finally:
        client.close()
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 2  # one MGET of 300 keys per call
    assert stats["cmdstat_hmget"]["calls"] == 1  # the meta key, once until its check is due
    assert [r["clicks_1h"] for r in rows[:4]] == [0, 0, 2, 0]
    assert [r["_missing"] for r in rows[:4]] == [False, True, False, True]
    assert again == rows


def test_ttl_is_set_on_every_write(redis_client):
    store = FeatureStore(redis_client, feature_names=NAMES, ttl_s=600)
    store.write_many({("user", "1"): {"clicks_1h": 1}}, 1)
    redis_client.expire("f:{user:1}", 5)
    store.write_many({("user", "1"): {"clicks_1h": 2}}, 2)
    assert 590 <= redis_client.ttl("f:{user:1}") <= 600  # renewed
    forever = FeatureStore(redis_client, feature_names=NAMES, ttl_s=0)
    forever.write_many({("user", "2"): {"clicks_1h": 1}}, 1)
    assert redis_client.ttl("f:{user:2}") == -1


def test_writes_are_one_call_per_chunk_of_rows(redis_client):
    store = FeatureStore(redis_client, feature_names=NAMES, ttl_s=600, batch_commands=1000)
    rows = {("user", str(i)): {"clicks_1h": i} for i in range(2500)}
    redis_client.config_resetstat()
    store.write_many(rows, 5)
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] + stats.get("cmdstat_eval", {}).get("calls", 0) == 3
    assert stats["cmdstat_set"]["calls"] == 2500
    assert [r["clicks_1h"] for r in store.get_many("user", ["0", "1234", "2499"])] == [
        0, 1234, 2499]
    assert all(590 <= t <= 600 for t in map(redis_client.ttl, ("f:{user:0}", "f:{user:2499}")))
    redis_client.script_flush()  # a Redis restarted empty has no scripts: loaded again
    store.write_many({("user", "0"): {"clicks_1h": 7}}, 6)
    assert store.get("user", "0")["clicks_1h"] == 7


def test_schema_mismatch(redis_client):
    v1 = FeatureStore(redis_client, feature_names=NAMES)
    v1.write_many({("user", "1"): {"clicks_1h": 1}}, 1)
    v2 = FeatureStore(redis_client, feature_names=NAMES, schema_version=2)
    with pytest.raises(SchemaMismatch, match="has schema version 1, this reader expects 2"):
        v2.get("user", "1")
    with pytest.raises(SchemaMismatch, match="this reader expects \\['clicks_1h', 'new'\\]"):
        FeatureStore(redis_client, feature_names=["clicks_1h", "new"]).get("user", "1")
    with pytest.raises(SchemaMismatch, match="bump schema_version"):
        FeatureStore(redis_client, feature_names=["clicks_1h"]).write_many({}, 1)
    # the v2 writer takes over; a v1 writer still running must not relabel the store
    v2.write_many({("user", "2"): {"clicks_1h": 2}}, 1)
    with pytest.raises(SchemaMismatch, match="newer than this writer's 1"):
        FeatureStore(redis_client, feature_names=NAMES).write_many({}, 1)
    with pytest.raises(SchemaMismatch) as e:
        v1.get("user", "1")
    assert (e.value.found, e.value.expected) == (2, 1)
    # a row left by v1 means something else under v2: it reads as missing
    assert v2.get("user", "1")["_missing"] is True
    assert v2.get("user", "2")["clicks_1h"] == 2


def test_rows_of_other_versions_and_lengths(redis_client):
    store = FeatureStore(redis_client, feature_names=NAMES, schema_version=2)
    store.write_many({("user", "ok"): {"clicks_1h": 5}}, 7)
    assert store.get("user", "ok")["clicks_1h"] == 5  # the meta check is now done
    k = store.key
    redis_client.set(k("user", "old"), struct.pack("<6q", 1, 9, 1, 2, 3, 4))
    redis_client.set(k("user", "older"), struct.pack("<3q", 1, 9, 1))  # fewer features
    redis_client.set(k("user", "short"), b"abc")
    redis_client.hset(k("user", "hash"), "clicks_1h", 1)  # a hash: MGET reads it as absent
    rows = store.get_many("user", ["old", "older", "short", "hash", "ok"])
    assert [r["_missing"] for r in rows] == [True, True, True, True, False]
    assert rows[0] == {**dict.fromkeys(NAMES, 0), "_ts": None, "_missing": True}
    # a row of a newer version is noticed on the row itself, between the meta checks
    redis_client.set(k("user", "new"), struct.pack("<6q", 3, 9, 1, 2, 3, 4))
    with pytest.raises(SchemaMismatch, match="a row has schema version 3"):
        store.get_many("user", ["ok", "new"])
    # this version's rows with another number of features: the writer's names differ
    redis_client.set(k("user", "odd"), struct.pack("<4q", 2, 9, 1, 2))
    with pytest.raises(SchemaMismatch, match="has 2 values, this reader expects 4"):
        store.get("user", "odd")


def hash_layout_store(client, n: int) -> None:
    """What ctrstream wrote before packed rows: one hash per entity, and no layout in meta."""
    client.hset("f:meta", mapping={"version": 1, "features": orjson.dumps(NAMES)})
    for i in range(n):
        client.hset(f"f:{{user:{i}}}", mapping={"clicks_1h": i, "imps_1h": 10 * i,
                                                "_ts": 1000 + i, "_v": 1})
        client.expire(f"f:{{user:{i}}}", 500 + i)
    client.hset("f:{user:v0}", mapping={"clicks_1h": 1, "_ts": 1, "_v": 0})  # an older schema


def test_a_hash_layout_store_is_refused_then_migrated(redis_client, cli_config, capsys):
    hash_layout_store(redis_client, 1500)
    store = FeatureStore(redis_client, feature_names=NAMES)
    for act in (lambda: store.get("user", "1"), lambda: store.write_many({}, 1),
                lambda: FeatureStore.from_meta(redis_client)):
        with pytest.raises(LayoutMismatch, match="ctrstream features migrate"):
            act()
    assert main(["--config", cli_config, "features", "get", "user", "1"]) == 1
    assert "ctrstream features migrate" in capsys.readouterr().err
    assert main(["--config", cli_config, "features", "migrate"]) == 0
    assert "1,500 rows rewritten" in capsys.readouterr().out
    rows = store.get_many("user", ["0", "7", "1499", "v0"])
    assert [(r["clicks_1h"], r["imps_1h"], r["_ts"]) for r in rows[:3]] == [
        (0, 0, 1000), (7, 70, 1007), (1499, 14990, 2499)]
    assert rows[3]["_missing"] is True  # left to expire, as before
    assert 490 < redis_client.ttl("f:{user:7}") <= 507  # each key keeps its TTL
    assert main(["--config", cli_config, "features", "migrate"]) == 0  # again: nothing to do
    assert "already" in capsys.readouterr().out
    store.write_many({("user", "1"): {"clicks_1h": 2}}, 1)  # writers accept it now


def test_bad_input_is_refused(store):
    with pytest.raises(ValueError, match="unknown features"):
        store.write_many({("user", "1"): {"clickz": 1}}, 1)
    with pytest.raises(ValueError, match="entity name"):
        store.write_many({("us*er", "1"): {"clicks_1h": 1}}, 1)
    for bad in (0.5, 2.0, "3", None, True, 2**63):
        with pytest.raises(ValueError, match="clicks_1h"):
            store.write_many({("user", "1"): {"clicks_1h": bad}}, 1)
    assert store.client.exists("f:meta") == 0  # nothing written
    w = BufferedWriter(store)
    with pytest.raises(ValueError, match="integers"):  # refused at put, not at every flush
        w.put("user", "1", {"clicks_1h": 0.25}, 1)
    assert w.pending == 0


def test_buffered_writer_coalesces_and_flushes_on_size(store):
    w = BufferedWriter(store, flush_interval_s=60, max_pending=3)
    w.put("user", "1", {"clicks_1h": 1, "imps_1h": 10}, 100)
    w.put("user", "1", {"clicks_1h": 2}, 200)
    w.put("user", "2", {"clicks_1h": 5}, 150)
    assert w.pending == 2 and store.client.exists("f:{user:1}") == 0
    w.put("user", "1", {"clicks_1h": 3}, 300)  # still 2 keys: no flush
    assert w.pending == 2 and w.flushes == 0
    w.put("user", "3", {"clicks_1h": 9}, 300)  # the third key: flush
    assert w.pending == 0 and (w.flushes, w.written) == (1, 3)
    assert store.get("user", "1") == {"clicks_1h": 3, "imps_1h": 10, "clicks_5m": 0, "delta": 0,
                                      "_ts": 300, "_missing": False}
    assert store.get("user", "3")["clicks_1h"] == 9


def test_buffered_writer_flushes_on_interval(store):
    now = [1000.0]
    w = BufferedWriter(store, flush_interval_s=0.5, max_pending=100, clock=lambda: now[0])
    w.put("user", "1", {"clicks_1h": 1}, 1)
    assert w.maybe_flush() == 0
    now[0] += 0.4
    assert w.maybe_flush() == 0 and w.pending == 1
    now[0] += 0.1
    assert w.maybe_flush() == 1 and w.pending == 0
    assert store.get("user", "1")["clicks_1h"] == 1
    w.put("user", "1", {"clicks_1h": 2}, 2)
    assert w.maybe_flush(now[0] + 0.2) == 0
    assert w.maybe_flush(now[0] + 0.5) == 1
    assert store.get("user", "1")["clicks_1h"] == 2


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own, which the test may stop and start."""
    comp = Component("redis", free_port(), tmp_path)
    comp.start(10)
    yield comp
    comp.stop()


def test_buffered_writer_keeps_values_across_a_redis_restart(private_redis, caplog):
    cfg = Config().replace(redis={"url": f"redis://127.0.0.1:{private_redis.port}/0"})
    store = FeatureStore(redis_client(cfg), feature_names=NAMES)
    w = BufferedWriter(store, max_pending=1000, give_up_s=0.3, backoff_initial_s=0.02)
    w.put("user", "1", {"clicks_1h": 1}, 1)
    w.flush()
    private_redis.stop()  # --save "": the restarted server is empty
    w.put("user", "1", {"clicks_1h": 4}, 4)
    w.put("user", "2", {"clicks_1h": 5}, 5)
    with caplog.at_level(logging.WARNING, "features.store"):
        with pytest.raises(StoreUnavailable, match="2 entities kept pending"):
            w.flush()
    assert w.pending == 2
    assert "retrying in" in caplog.text
    # Redis comes back while a flush is retrying: the flush succeeds, nothing is lost
    w.give_up_s = 30
    restart = threading.Timer(0.3, private_redis.start, args=(10,))
    restart.start()
    try:
        assert w.flush() == 2
    finally:
        restart.join()
    assert w.pending == 0
    assert store.get("user", "1")["clicks_1h"] == 4
    assert store.get("user", "2")["clicks_1h"] == 5


def test_buffered_writer_never_logs_the_password(caplog):
    url = f"redis://app:s3cret-pw@127.0.0.1:{free_port()}/0"  # nothing listens there
    store = FeatureStore(redis_client(Config().replace(redis={"url": url})), feature_names=NAMES)
    w = BufferedWriter(store, give_up_s=0.1, backoff_initial_s=0.02)
    w.put("user", "1", {"clicks_1h": 1}, 1)
    with caplog.at_level(logging.DEBUG), pytest.raises(StoreUnavailable) as e:
        w.flush()
    assert "s3cret" not in str(e.value) and "s3cret" not in caplog.text
    assert "app@127.0.0.1" in caplog.text  # says where, without the secret


def test_top(store):
    store.write_many({("user", str(i)): {"clicks_1h": (i * 7) % 23} for i in range(200)}, 1)
    store.write_many({("item", "x"): {"clicks_1h": 1000}}, 1)
    top = store.top("user", "clicks_1h", n=5)
    assert [v for _, v in top] == [22, 22, 22, 22, 22]
    assert len({i for i, _ in top}) == 5
    everything = sorted(((i * 7) % 23 for i in range(200)), reverse=True)
    assert [v for _, v in store.top("user", "clicks_1h", n=300)] == everything


@pytest.fixture
def cli_config(tmp_path, stack_cfg):
    path = tmp_path / "ctrstream.toml"
    path.write_text(f'[redis]\nurl = "{stack_cfg.redis.url}"\n')
    return str(path)


def test_cli_get_table_and_json(store, cli_config, capsys):
    store.write_many({("user", "42"): {"clicks_1h": 3, "imps_1h": 1200, "clicks_5m": 2}},
                     1_700_000_000_000)
    assert main(["--config", cli_config, "features", "get", "user", "42"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("user 42  (key f:{user:42}, schema version 1)")
    assert out[1].startswith("as of 2023-11-14T22:13:20.000+00:00  (")
    assert out[2:] == ["feature    value",
                       "clicks_1h      3",
                       "imps_1h     1200",
                       "clicks_5m      2",
                       "delta          0"]
    assert main(["--config", cli_config, "features", "get", "user", "42", "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["features"] == {"clicks_1h": 3, "imps_1h": 1200, "clicks_5m": 2, "delta": 0}
    assert (doc["ts_ms"], doc["missing"]) == (1_700_000_000_000, False)


def test_cli_get_missing_entity(store, cli_config, capsys):
    store.write_many({("user", "1"): {"clicks_1h": 1}}, 1)
    assert main(["--config", cli_config, "features", "get", "user", "nobody"]) == 0
    out = capsys.readouterr().out
    assert "missing: not in Redis" in out and "clicks_1h      0" in out


def test_cli_top(store, cli_config, capsys):
    store.write_many({("user", str(i)): {"clicks_1h": i} for i in range(20)}, 1)
    assert main(["--config", cli_config, "features", "top", "user", "--by", "clicks_1h",
                 "-n", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == ["top 3 user by clicks_1h",
                                                    "user  clicks_1h",
                                                    "19           19",
                                                    "18           18",
                                                    "17           17"]
    assert main(["--config", cli_config, "features", "top", "user", "--by", "nope"]) == 2
    assert "unknown feature 'nope'" in capsys.readouterr().err


def test_cli_errors(redis_client, cli_config, tmp_path, capsys):
    assert main(["--config", cli_config, "features", "get", "user", "1"]) == 1
    assert "no feature store" in capsys.readouterr().err
    dead = tmp_path / "dead.toml"
    dead.write_text(f'[redis]\nurl = "redis://:pw123@127.0.0.1:{free_port()}/0"\n')
    assert main(["--config", str(dead), "features", "get", "user", "1"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach Redis at redis://:***@127.0.0.1:" in err and "pw123" not in err


def test_works_on_redis_cluster(cluster_node):
    """On a cluster an MGET may only name keys of one hash slot: reads are grouped by slot."""
    from redis.cluster import RedisCluster

    client = RedisCluster(host="127.0.0.1", port=cluster_node)
    try:
        store = FeatureStore(client, feature_names=NAMES)
        ids = [str(i) for i in range(300)]  # keys spread over many slots
        store.write_many({("user", i): {"clicks_1h": int(i)} for i in ids[::2]}, 9)
        rows = store.get_many("user", ids)
        assert len({client.keyslot(store.key("user", i)) for i in ids}) > 100
        assert [(r["clicks_1h"], r["_missing"]) for r in rows[:4]] == [
            (0, False), (0, True), (2, False), (0, True)]
        assert store.get_many("user", ids) == rows  # the second read skips the meta check
        pairs = [("user", "4"), ("item", "x"), ("user", "298")]
        pipe = client.pipeline()
        store.queue_pairs(pipe, pairs)  # as the scorer shares its round trip
        assert [r["clicks_1h"] for r in store.decode_pairs(pipe.execute())] == [4, 0, 298]
        assert [v for _, v in store.top("user", "clicks_1h", n=2)] == [298, 296]
    finally:
        client.close()
