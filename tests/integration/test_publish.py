"""The model version store against a real redis-server: the session's (tests/conftest.py), and
a private one-node Redis Cluster (tests/conftest.py `cluster_node`)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from flows.build import model_store, redis_client
from learners.publish import ModelStore, ModelStoreError, PublishConflict

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


@pytest.fixture
def store(redis_client):
    return ModelStore(redis_client, keep_days=1, batch_size=64)


def published(store: ModelStore, value: float, keys, ids, expected=None) -> str:
    """A complete version whose every value is ``value``, published."""
    v = store.new_version()
    store.put_vectors(v, "bopr", keys, np.full((len(keys), 2), value))
    store.put_rows(v, "user", ids, np.full((len(ids), 8), value), int(value))
    store.put_meta(v, {"value": value})
    store.publish(v, expected_current=expected)
    return v


def version_keys(client, version: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"m:{{ctr}}:v:{version}:*"))


class CountingConnection(redis.Connection):
    """A real connection that counts the requests it sends (one per round trip)."""

    sends = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sends += 1
        return super().send_packed_command(command, check_health)


def test_vectors_round_trip_and_defaults(store):
    v = store.new_version()
    keys = np.array([7, 0, 2**32 - 1, 123_456])
    bopr = np.array([[0.1, 0.01], [-0.5, 0.02], [3.0, 0.5], [0.0, 1e-6]], dtype=np.float32)
    store.put_vectors(v, "bopr", keys, bopr)
    store.put_vectors(v, "ftrl", np.arange(200), np.arange(200) / 10)  # 1-D: width 1
    got = store.get_vectors(v, "bopr", np.array([123_456, 5, 7, 2**32 - 1]))
    assert got.dtype == np.float32 and got.shape == (4, 2)
    np.testing.assert_array_equal(got, [bopr[3], [0, 0], bopr[0], bopr[2]])
    got = store.get_vectors(v, "bopr", [5, 0], default=[0.0, 0.01])
    np.testing.assert_array_equal(got, np.array([[0, 0.01], [-0.5, 0.02]], np.float32))
    got = store.get_vectors(v, "ftrl", np.arange(250))  # more keys than one HMGET takes
    np.testing.assert_array_equal(got[:, 0], np.r_[np.arange(200) / 10, np.zeros(50)]
                                  .astype(np.float32))
    assert store.get_vectors(v, "bopr", []).shape == (0, 2)
    raw = store.client.hget(f"m:{{ctr}}:v:{v}:w:bopr", (7).to_bytes(4, "little"))
    assert raw == bopr[0].tobytes()  # raw little-endian float32, findable by hand
    # absolute writes: writing again replaces
    store.put_vectors(v, "bopr", [7], [[1.0, 2.0]])
    np.testing.assert_array_equal(store.get_vectors(v, "bopr", [7]), [[1, 2]])


def test_rows_round_trip_and_delete(store):
    v = store.new_version()
    ids = [f"u{i}" for i in range(100)]
    vecs = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)
    ms = np.arange(100, dtype=np.int64) + 1_700_000_000_000
    store.put_rows(v, "user", ids, vecs, ms)
    store.put_rows(v, "item", ["9"], np.ones((1, 4)), 5)
    got = store.get_rows(v, "user", ["u3", "nobody", "u99"])
    np.testing.assert_array_equal(got.vectors, [vecs[3], np.zeros(16), vecs[99]])
    np.testing.assert_array_equal(got.updated_ms, [ms[3], 0, ms[99]])
    np.testing.assert_array_equal(got.found, [True, False, True])
    vectors, updated_ms, found = store.get_rows(v, "item", ["9"])  # a plain tuple too
    assert updated_ms[0] == 5 and found[0] and vectors.shape == (1, 4)
    assert len(store.client.hget(f"m:{{ctr}}:v:{v}:emb:user", "u3")) == 8 + 16 * 4
    store.delete_rows(v, "user", ["u3", "nobody"])
    assert store.get_rows(v, "user", ["u3", "u4"]).found.tolist() == [False, True]


def test_replace_rows_swaps_the_whole_table(store):
    v = store.new_version()
    store.put_rows(v, "user", ["a", "b", "c"], np.ones((3, 4)), 1)
    store.replace_rows(v, "user", [f"n{i}" for i in range(100)] + ["a"], np.full((101, 4), 2),
                       np.arange(101))  # more rows than one batch
    got = store.get_rows(v, "user", ["a", "b", "n99"])
    assert got.found.tolist() == [True, False, True]  # "b" was stale: gone
    np.testing.assert_array_equal(got.vectors[[0, 2]], np.full((2, 4), 2))
    assert got.updated_ms.tolist() == [100, 0, 99]
    with pytest.raises(ModelStoreError, match=r"emb:user holds values of layout <f4x4"):
        store.replace_rows(v, "user", ["x"], np.ones((1, 5)), 1)
    assert store.get_rows(v, "user", ["a"]).found[0]  # untouched by the refused write
    store.replace_rows(v, "user", [], np.ones((0, 4)), 1)  # no live rows at all
    assert not store.get_rows(v, "user", ["a", "n1"]).found.any()
    assert list(store.client.scan_iter(match="*staging*")) == []


def test_blob_and_meta_round_trip(redis_client):
    store = ModelStore(redis_client, blob_part_bytes=1000)  # forces a chunked write
    v = store.new_version()
    state = {"z": np.arange(300, dtype=np.float64), "n": np.ones(300, np.float32)}
    buf = io.BytesIO()
    np.savez(buf, **state)
    assert len(buf.getvalue()) > 3000
    store.put_blob(v, "ftrl", buf.getvalue())
    loaded = np.load(io.BytesIO(store.get_blob(v, "ftrl")))
    np.testing.assert_array_equal(loaded["z"], state["z"])
    store.put_blob(v, "ftrl", b"smaller")  # replaces the whole value
    assert store.get_blob(v, "ftrl") == b"smaller"
    assert store.get_blob(v, "other") is None
    assert list(redis_client.scan_iter(match="*staging*")) == []
    assert store.get_meta(v) is None
    store.put_meta(v, {"schema": 3, "examples": 12_345, "metrics": {"ne": 0.81, "auc": 0.7},
                       "created_ms": 42})
    assert store.get_meta(v) == {"schema": 3, "examples": 12_345, "created_ms": 42,
                                 "metrics": {"ne": 0.81, "auc": 0.7}}
    store.put_meta(v, {"note": "x"})
    assert store.get_meta(v)["created_ms"] > 42  # added when not given


def test_publish_flips_the_pointer_and_expires_the_old_version_only(store):
    client = store.client
    assert store.current() is None
    v1 = published(store, 1, [1, 2], ["a"])
    v1_keys = version_keys(client, v1)
    assert [k.split(b":", 4)[4] for k in v1_keys] == [b"emb:user", b"gen", b"keys", b"layout",
                                                      b"log", b"meta", b"w:bopr"]
    assert all(client.pttl(k) == -1 for k in v1_keys)  # published: no TTL
    v2 = store.new_version()
    assert 0 < client.pttl(f"m:{{ctr}}:v:{v2}:keys") <= DAY_MS  # unpublished: expires
    store.put_vectors(v2, "bopr", [1], [[2, 2]])
    store.put_meta(v2, {})
    assert store.publish(v2, expected_current=v1) == v1
    assert store.current() == v2
    assert all(0 < client.pttl(k) <= DAY_MS for k in v1_keys)
    assert all(client.pttl(k) == -1 for k in version_keys(client, v2))
    for k in ("current", "seq", "versions"):
        assert client.pttl(f"m:{{ctr}}:{k}") == -1
    # the previous version stays readable until it expires
    np.testing.assert_array_equal(store.get_vectors(v1, "bopr", [1]), [[1, 1]])
    # a straggling learner writing into the retired version cannot make immortal keys
    store.put_vectors(v1, "late", [1], [[1]])
    store.put_blob(v1, "state", b"x")
    store.replace_rows(v1, "item", ["i"], np.ones((1, 2)), 1)
    assert len(version_keys(client, v1)) == 10  # with its generation counter and log
    assert all(0 < client.pttl(k) <= DAY_MS for k in version_keys(client, v1))
    listing = store.versions()
    assert [(d["version"], d["current"], d["complete"]) for d in listing] == [
        (v1, False, True), (v2, True, True)]
    assert listing[0]["expires_in_s"] > 0 and listing[1]["expires_in_s"] is None
    # rollback: the retired version is made permanent again, the other one retires
    assert store.publish(v1, expected_current=v2) == v2
    assert all(client.pttl(k) == -1 for k in version_keys(client, v1))
    assert all(client.pttl(k) > 0 for k in version_keys(client, v2))
    assert store.publish(v1) == v1  # publishing the current version again changes nothing


def test_versions_sort_and_expired_ones_leave_the_listing(store):
    versions = [store.new_version() for _ in range(11)]
    assert versions == sorted(versions, key=int) and len(set(versions)) == 11
    store.client.delete(*version_keys(store.client, versions[0]))  # as if it expired
    assert [d["version"] for d in store.versions()] == versions[1:]
    assert store.client.zcard("m:{ctr}:versions") == 10


def test_stale_expected_current_is_refused(store):
    v1 = published(store, 1, [1], ["a"])
    v2 = store.new_version()
    store.put_meta(v2, {})
    with pytest.raises(PublishConflict, match="names '1', the caller expected '999'") as e:
        store.publish(v2, expected_current="999")
    assert (e.value.found, e.value.expected) == (v1, "999")
    with pytest.raises(PublishConflict, match="expected None"):
        store.publish(v2, expected_current=None)  # None: nothing published yet
    assert store.current() == v1
    # two publishers that both read v1: the second one loses
    v3 = store.new_version()
    store.put_meta(v3, {})
    store.publish(v2, expected_current=v1)
    with pytest.raises(PublishConflict):
        store.publish(v3, expected_current=v1)
    assert store.current() == v2


def test_incomplete_or_unknown_versions_are_refused(store):
    v = store.new_version()
    store.put_vectors(v, "bopr", [1], [[1, 1]])
    with pytest.raises(ModelStoreError, match=r"meta does not exist.*put_meta last"):
        store.publish(v)
    with pytest.raises(ModelStoreError, match="'12345': no such version"):
        store.publish("12345")
    assert store.current() is None


def test_writes_into_a_version_that_is_gone_raise_and_leave_nothing(store):
    v = store.new_version()
    store.client.delete(*version_keys(store.client, v))  # as if it expired
    with pytest.raises(ModelStoreError, match=f"version '{v}' .* does not exist"):
        store.put_vectors(v, "bopr", [1], [[1, 1]])
    with pytest.raises(ModelStoreError, match="does not exist"):
        store.put_blob(v, "state", b"abc")
    with pytest.raises(ModelStoreError, match="does not exist"):
        store.put_meta(v, {})
    with pytest.raises(ModelStoreError, match="does not exist"):
        store.put_vectors("77", "bopr", [1], [[1, 1]])  # never made
    assert list(store.client.scan_iter(match="m:{ctr}:v:*")) == []


def test_layout_and_size_errors_name_the_key(store):
    v = store.new_version()
    store.put_vectors(v, "bopr", [1], [[1, 1]])
    with pytest.raises(ModelStoreError, match=r"w:bopr holds values of layout <f4x2.*<f4x3"):
        store.put_vectors(v, "bopr", [2], [[1, 1, 1]])
    with pytest.raises(ModelStoreError, match=r"holds values of layout <f4x2, .* <f8x2"):
        store.put_vectors(v, "bopr", [2], [[1, 1]], dtype=np.float64)
    store.client.hset(f"m:{{ctr}}:v:{v}:w:bopr", (7).to_bytes(4, "little"), b"abc")
    with pytest.raises(ModelStoreError, match=rf"m:{{ctr}}:v:{v}:w:bopr field 7 holds 3 bytes"):
        store.get_vectors(v, "bopr", [1, 7])
    store.put_rows(v, "user", ["a"], np.ones((1, 4)), 1)
    store.client.hset(f"m:{{ctr}}:v:{v}:emb:user", "b", b"x" * 20)
    with pytest.raises(ModelStoreError, match=r"emb:user field 'b' holds 20 bytes.*needs 24"):
        store.get_rows(v, "user", ["a", "b"])
    with pytest.raises(ModelStoreError, match="has no w:nothing"):
        store.get_vectors(v, "nothing", [1])


def test_bad_arguments(store, stack_cfg):
    v = store.new_version()
    with pytest.raises(ValueError, match="integers"):
        store.put_vectors(v, "bopr", np.array([1.5]), [[1, 1]])
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        store.get_vectors(v, "bopr", [-1])
    with pytest.raises(ValueError, match="model 'a:b'"):
        store.put_vectors(v, "a:b", [1], [[1]])
    with pytest.raises(ValueError, match=r"values must be \(2, width\)"):
        store.put_vectors(v, "bopr", [1, 2], [[1, 1]])
    with pytest.raises(ValueError, match="store name"):
        ModelStore(store.client, name="{x}")
    with pytest.raises(ValueError, match="decode_responses"):
        ModelStore(redis.Redis.from_url(stack_cfg.redis.url, decode_responses=True))


def test_reads_are_one_round_trip(redis_client, stack_cfg):
    keys = np.arange(0, 300, 3)
    v1 = published(ModelStore(redis_client), 1, keys, ["a", "b"])
    pool = redis.ConnectionPool.from_url(stack_cfg.redis.url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    try:
        reader = ModelStore(client)
        client.ping()  # connect (HELLO, CLIENT SETINFO) before counting

        def sends(read) -> int:
            CountingConnection.sends = 0
            read()
            return CountingConnection.sends

        assert sends(lambda: reader.get_vectors(v1, "bopr", keys)) == 1
        assert sends(lambda: reader.get_rows(v1, "user", ["a", "x"])) == 1
        both = {"vectors": {"bopr": keys}, "rows": {"user": ["a"]}}
        assert sends(lambda: reader.read_consistent(**both)) == 2  # first: learns the pointer
        assert sends(lambda: reader.read_consistent(**both)) == 1
        published(ModelStore(redis_client), 2, keys, ["a"], expected=v1)
        assert sends(lambda: reader.read_consistent(**both)) == 2  # the pointer moved
        snap = reader.read_consistent(**both)
        assert snap.version != v1 and snap.vectors["bopr"][0, 0] == 2
        assert snap.rows["user"].updated_ms[0] == 2
    finally:
        client.close()


def test_concurrent_reader_never_sees_a_mix(store, stack_cfg):
    """A reader hammers read_consistent while versions whose every value equals the version
    number are written (in many small batches) and published."""
    keys = np.random.default_rng(1).choice(2**20, 300, replace=False)
    ids = [str(i) for i in range(100)]
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    current = published(store, 1, keys, ids)
    assert current == "1"

    def read() -> None:
        reader = ModelStore(redis_client(stack_cfg))
        try:
            while not stop.is_set():
                snap = reader.read_consistent(vectors={"bopr": keys}, rows={"user": ids})
                want = float(snap.version)
                assert (snap.vectors["bopr"] == want).all(), snap.version
                assert (snap.rows["user"].vectors == want).all(), snap.version
                assert (snap.rows["user"].updated_ms == want).all(), snap.version
                seen.append(snap.version)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            reader.client.close()

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for _ in range(8):
            v = store.new_version()
            store.put_vectors(v, "bopr", keys, np.full((len(keys), 2), float(v)))
            store.put_rows(v, "user", ids, np.full((len(ids), 8), float(v)), int(v))
            store.put_meta(v, {})
            store.publish(v, expected_current=current)
            current = v
            n = len(seen)
            deadline = time.monotonic() + 5
            while len(seen) < n + 3 and not errors and time.monotonic() < deadline:
                time.sleep(0.001)  # let the reader see this version a few times
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]
    assert len(set(seen)) >= 5  # the reader did cross publishes
    assert [int(s) for s in seen] == sorted(int(s) for s in seen)  # never back in time


def test_model_store_from_the_config(stack_cfg):
    store = model_store(stack_cfg, name="other", keep_days=2)
    try:
        assert store.keep_ms == 2 * DAY_MS and store.pointer_key == "m:{other}:current"
        v = store.new_version()
        store.put_meta(v, {})
        store.publish(v)
        assert store.current() == v
    finally:
        store.client.close()


def test_every_write_bumps_the_generation_and_load_copies_the_whole_version(store):
    client = store.client
    v = published(store, 1, [1, 2], ["a"])

    def gen() -> int:
        return int(client.get(store.generation_key(v)))

    copy = store.load(v)
    assert copy.generation == gen() and copy.meta == store.get_meta(v)
    np.testing.assert_array_equal(copy.get_vectors("bopr", [2, 1, 5], [0, 9]),
                                  store.get_vectors(v, "bopr", [2, 1, 5], [0, 9]))
    rows, want = copy.get_rows("user", ["a", "b"]), store.get_rows(v, "user", ["a", "b"])
    for got, exp in zip(rows, want, strict=True):
        np.testing.assert_array_equal(got, exp)
    for write in (lambda: store.put_vectors(v, "bopr", [3], [[3, 3]]),
                  lambda: store.put_rows(v, "user", ["b"], np.ones((1, 8)), 5),
                  lambda: store.delete_rows(v, "user", ["a"]),
                  lambda: store.replace_rows(v, "user", [], np.ones((0, 8)), 5),
                  lambda: store.put_blob(v, "state", b"x"),
                  lambda: store.put_meta(v, {"examples": 2})):
        before = gen()
        write()
        assert gen() == before + 1
    assert client.pttl(store.generation_key(v)) == -1  # published: kept like the version


def test_works_on_redis_cluster(cluster_node):
    client = RedisCluster(host="127.0.0.1", port=cluster_node)
    try:
        store = ModelStore(client, keep_days=1)
        v1 = published(store, 1, [1, 2], ["a"])
        store.put_blob(v1, "state", b"s" * 100)
        v2 = published(store, 2, [1, 2], ["a"], expected=v1)
        # the publish script reached the old version's keys through the hash tag
        assert all(0 < client.pttl(k) <= DAY_MS for k in version_keys(client, v1))
        snap = store.read_consistent(vectors={"bopr": [1, 3]}, rows={"user": ["a"]})
        assert snap.version == v2
        np.testing.assert_array_equal(snap.vectors["bopr"], [[2, 2], [0, 0]])
        assert store.get_blob(v1, "state") == b"s" * 100
        assert [d["version"] for d in store.versions()] == [v1, v2]
        copy = store.load(v2)  # the generation key found from the key set's name, same slot
        np.testing.assert_array_equal(copy.get_vectors("bopr", [1, 3]), [[2, 2], [0, 0]])
        assert copy.generation == int(client.get(store.generation_key(v2)))
        store.put_vectors(v2, "bopr", [3, 1], [[4, 4], [5, 5]])  # the log, same slot too
        store.delete_rows(v2, "user", ["a"])
        copy, changed = store.refresh(copy)
        np.testing.assert_array_equal(copy.get_vectors("bopr", [1, 3]), [[5, 5], [4, 4]])
        assert not copy.get_rows("user", ["a"]).found[0]
        assert copy.generation == int(client.get(store.generation_key(v2)))
        np.testing.assert_array_equal(changed["bopr"], [3, 1])
    finally:
        client.close()
