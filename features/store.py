"""The Redis feature store: a materialized view of the real-time count features.

Layout (prefix ``f``)::

    f:{user:42}   string  little-endian int64s: schema version, _ts, one count per feature
    f:meta        hash    version -> 1, features -> ["imp_5m", "clk_5m", ...],
                          layout -> i64le, updated_ms -> ...

One string per entity, its layout named by the schema version: one MGET reads a hundred
entities and `numpy.frombuffer` decodes them in one call (about 6x faster than a pipeline of
HMGETs of one hash per entity, and about a fifth of the memory). The braces are a Redis
Cluster hash tag, so the same code runs on a cluster (reads are then grouped by hash slot).
Values are absolute integers (the counters): a write replaces the entity's whole row (a
feature not given is 0) and renews its TTL in the same SET, so idle entities expire, and
replaying input after a crash rewrites the same values. ``_ts`` is the event time of the values
(ms). Derived values (CTRs) are computed by readers (features/derived.py), not stored.

Use (against a running Redis)::

    store = FeatureStore(redis.Redis(port=16379), feature_names=["imp_1h", "clk_1h"])
    store.write_many({("user", "42"): {"imp_1h": 30, "clk_1h": 3}}, ts_ms=1714560000000)
    store.get("user", "42")
    # {'_ts': 1714560000000, 'imp_1h': 30, 'clk_1h': 3, '_missing': False}
    store.get_many("user", ["42", "43"])  # one round trip; "43" reads as 0s, _missing True

A store written by the hash layout of earlier versions (one hash per entity) is refused with
`LayoutMismatch` until `ctrstream features migrate` rewrites it.
"""

from __future__ import annotations

import heapq
import logging
import numbers
import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import orjson
import redis

from joiner.errors import CtrstreamError

log = logging.getLogger(__name__)

Row = dict[str, int | bool | None]
T = TypeVar("T")

LAYOUT = "i64le"  # the meta key's name for the row layout described above
META_CHECK_S = 10.0  # writers and readers check the meta key again this often

# Entity names become part of a SCAN pattern and of the hash tag: keep them plain.
_ENTITY = re.compile(r"[A-Za-z0-9_.-]+")


class SchemaMismatch(CtrstreamError, RuntimeError):
    """The store holds features of another schema version (or lacks features we need)."""

    def __init__(self, message: str, found: object = None, expected: object = None) -> None:
        super().__init__(message)
        self.found, self.expected = found, expected


class LayoutMismatch(SchemaMismatch):
    """The store was written in another row layout (the hash per entity of earlier
    versions): `FeatureStore.migrate` rewrites it."""


class StoreUnavailable(CtrstreamError, RuntimeError):
    """Redis could not be written for longer than the writer's give-up time."""


class MetaMissing(CtrstreamError, LookupError):
    """No meta key: nothing was ever written under this prefix (or wrong Redis/db/prefix)."""


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (safe to log)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def row_ts(raw: bytes | None) -> int | None:
    """The ``_ts`` of a packed row as Redis holds it (None for no row).

    >>> row_ts(struct.pack("<3q", 1, 1714560000000, 7))
    1714560000000
    """
    if raw is None or len(raw) < 16:
        return None
    return int.from_bytes(raw[8:16], "little", signed=True)


def _is_cluster(client) -> bool:
    return hasattr(client, "get_node_from_key")  # redis.cluster.RedisCluster


class FeatureStore:
    """Reads and writes one packed string per entity; see the module docstring for the layout.

    ``schema_version`` names the meaning of ``feature_names``. A writer records both in the meta
    key; a reader that finds another version raises `SchemaMismatch`. Rows left by an older
    version read as missing (they expire by TTL); bump the version whenever a feature's
    meaning changes. Thread-safe for reads (one redis-py client may be shared).
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "f", schema_version: int = 1,
                 ttl_s: int = 2 * 86_400, feature_names: list[str],
                 batch_commands: int = 1000, where: str | None = None) -> None:
        if not feature_names or len(set(feature_names)) != len(feature_names):
            raise ValueError(f"feature_names must be non-empty and unique: {feature_names!r}")
        bad = [n for n in feature_names if not isinstance(n, str) or not n or n[0] == "_"]
        if bad:
            raise ValueError(f"feature names must be strings not starting with '_': {bad!r}")
        if client.get_encoder().decode_responses:
            raise ValueError("FeatureStore needs a client with decode_responses=False")
        if schema_version < 1:
            raise ValueError(f"schema_version must be >= 1, got {schema_version}")
        self.client = client
        self.prefix = prefix
        self.schema_version = int(schema_version)
        self.ttl_s = int(ttl_s)
        self.feature_names = list(feature_names)
        self.batch_commands = batch_commands
        self.meta_key = f"{prefix}:meta"
        self.where = where or _describe(client)
        self._names = frozenset(feature_names)
        self._cluster = _is_cluster(client)
        self._set_rows = None if self._cluster else client.register_script(_SET_ROWS)
        layout = struct.Struct(f"<{len(feature_names) + 2}q")
        self._pack, self._unpack = layout.pack, layout.iter_unpack
        self._row_bytes = layout.size
        self._zero_row = bytes(layout.size)  # version 0: reads as missing
        self._decode = _decoder(self.schema_version, ["_ts", *feature_names])
        self._missing_row: Row = {"_ts": None, **dict.fromkeys(feature_names, 0),
                                  "_missing": True}
        self._meta_written = False
        self._meta_due = 0.0  # writer: when to check the meta key again
        self._read_due = 0.0  # reader: same
        self._entities_ok: set[str] = set()

    # -- keys ---------------------------------------------------------------------------------

    def key(self, entity: str, id: str) -> str:
        return f"{self.prefix}:{{{entity}:{id}}}"

    def _check_entity(self, entity: str) -> None:
        if entity in self._entities_ok:
            return
        if not isinstance(entity, str) or not _ENTITY.fullmatch(entity):
            raise ValueError(f"entity name {entity!r}: use letters, digits, '_', '.', '-'")
        self._entities_ok.add(entity)

    # -- meta ---------------------------------------------------------------------------------

    @classmethod
    def from_meta(cls, client: redis.Redis, *, prefix: str = "f", **kwargs) -> FeatureStore:
        """A store whose version and feature names are read from the meta key (for readers
        that do not know the spec, such as the CLI); raises `MetaMissing`, and
        `LayoutMismatch` for a store in another layout."""
        version, names, layout = client.hmget(f"{prefix}:meta",
                                              ["version", "features", "layout"])
        if version is None or names is None:
            raise MetaMissing(f"no feature store meta key {prefix}:meta")
        store = cls(client, prefix=prefix, schema_version=int(version),
                    feature_names=orjson.loads(names), **kwargs)
        store._check_meta(version, names, layout)
        return store

    def _layout_error(self, layout: bytes | None) -> LayoutMismatch:
        found = "the hash per entity of ctrstream before packed rows" if layout is None else \
            f"layout {layout.decode(errors='replace')!r}"
        return LayoutMismatch(
            f"feature store {self.meta_key} on {self.where} was written in {found}; this "
            f"version reads and writes packed rows ({LAYOUT}). Stop the join flow and run "
            "`ctrstream features migrate` to rewrite the rows (or delete the prefix's keys).",
            None if layout is None else layout.decode(errors="replace"), LAYOUT)

    def _write_meta(self) -> None:
        """Record our schema, unless a newer writer already did (an old writer still running
        must not relabel a newer store)."""
        version, names, layout = self.client.hmget(self.meta_key,
                                                   ["version", "features", "layout"])
        if version is not None:
            if layout != LAYOUT.encode():
                raise self._layout_error(layout)
            found = int(version)
            if found > self.schema_version:
                raise SchemaMismatch(
                    f"{self.meta_key} on {self.where} has schema version {found}, newer than "
                    f"this writer's {self.schema_version}: refusing to write", found,
                    self.schema_version)
            if found == self.schema_version:
                stored = orjson.loads(names) if names else []
                if stored == self.feature_names:
                    self._meta_written = True
                    return
                raise SchemaMismatch(
                    f"{self.meta_key} on {self.where} has schema version {found} with features "
                    f"{stored}, this writer has {self.feature_names}: bump schema_version "
                    "when the features change", stored, self.feature_names)
            log.info("feature store %s on %s: schema version %d -> %d", self.meta_key,
                     self.where, found, self.schema_version)
        self.client.hset(self.meta_key, mapping={
            "version": self.schema_version,
            "features": orjson.dumps(self.feature_names),
            "layout": LAYOUT,
            "updated_ms": int(time.time() * 1000),
        })
        self._meta_written = True

    def _check_meta(self, version: bytes | None, names: bytes | None,
                    layout: bytes | None) -> None:
        if version is None:  # nothing written yet: every entity reads as missing
            return
        if layout != LAYOUT.encode():
            raise self._layout_error(layout)
        if int(version) != self.schema_version:
            raise SchemaMismatch(
                f"feature store {self.meta_key} on {self.where} has schema version "
                f"{version.decode()}, this reader expects {self.schema_version}",
                int(version), self.schema_version)
        stored = orjson.loads(names or b"[]")
        if stored != self.feature_names:
            # same version, other names: the rows' numbers would be read under wrong names
            raise SchemaMismatch(
                f"feature store {self.meta_key} on {self.where} (schema version "
                f"{self.schema_version}) has features {stored}, this reader expects "
                f"{self.feature_names}", stored, self.feature_names)

    def check(self) -> None:
        """Read the meta key now and raise `SchemaMismatch` (or `LayoutMismatch`) if this
        store cannot read it; readers do this on their first read and every
        ``META_CHECK_S`` after, in the same round trip."""
        self._check_meta(*self.client.hmget(self.meta_key, ["version", "features", "layout"]))
        self._read_due = time.monotonic() + META_CHECK_S

    # -- writes -------------------------------------------------------------------------------

    def validate(self, entity: str, values: Mapping[str, int]) -> None:
        """Raise ValueError for an entity name, feature or value this store cannot take."""
        self._check_entity(entity)
        if not values.keys() <= self._names:
            raise ValueError(f"unknown features {sorted(values.keys() - self._names)} "
                             f"(the store has {self.feature_names})")
        for name, v in values.items():
            if type(v) is not int and (isinstance(v, bool) or
                                       not isinstance(v, numbers.Integral)):
                raise ValueError(f"{entity}: feature {name} = {v!r}: the store holds integers "
                                 "(counts); derive ratios when reading")

    def pack(self, values: Mapping[str, int], ts_ms: int) -> bytes:
        """One entity's row as Redis holds it (a feature not in ``values`` is 0)."""
        get = values.get
        try:
            return self._pack(self.schema_version, ts_ms,
                              *[get(n, 0) for n in self.feature_names])
        except struct.error as e:
            raise ValueError(f"cannot store {dict(values)!r} at ts {ts_ms!r}: {e}") from None

    def write_many(self, rows: Mapping[tuple[str, str], Mapping[str, int]],
                   ts_ms: Mapping[tuple[str, str], int] | int, *, validated: bool = False) -> int:
        """SET each (entity, id)'s whole row with its TTL; returns the number of entities
        written. Not transactional: a failure halfway leaves some entities written, which is
        harmless because writing them again gives the same values. ``validated``: the caller
        has checked every row with `validate` (as `BufferedWriter.put` does)."""
        if not validated:
            for ek, values in rows.items():
                self.validate(ek[0], values)
        one = ts_ms if isinstance(ts_ms, int) else None
        key, pack = self.key, self.pack  # all rows packed before any is written: bad input
        packed = [(key(*ek), pack(values, ts_ms[ek] if one is None else one))  # writes nothing
                  for ek, values in rows.items()]
        if not self._meta_written or time.monotonic() >= self._meta_due:
            # Again now and then: a Redis restarted empty must get its meta key back.
            self._write_meta()
            self._meta_due = time.monotonic() + META_CHECK_S
        for chunk in _chunks(packed, self.batch_commands):
            if self._cluster:  # keys of many hash slots: one SET each, grouped by node
                pipe = self.client.pipeline(transaction=False)
                for k, row in chunk:
                    pipe.set(k, row, ex=self.ttl_s or None)
                pipe.execute()
            elif self.ttl_s:
                self._set_rows(keys=[k for k, _ in chunk], args=[self.ttl_s,
                                                                 *[r for _, r in chunk]])
            else:
                self.client.mset(dict(chunk))
        return len(rows)

    # -- reads --------------------------------------------------------------------------------

    def get(self, entity: str, id: str) -> Row:
        """The features of one entity, plus ``_ts`` (ms, None when missing) and ``_missing``.
        A missing entity reads as 0 for every feature."""
        return self.get_many(entity, [id])[0]

    def get_many(self, entity: str, ids: list[str]) -> list[Row]:
        """`get` for many ids of one entity in one round trip."""
        self._check_entity(entity)
        head = f"{self.prefix}:{{{entity}:"
        return self._read([f"{head}{i}}}" for i in ids])

    def get_pairs(self, pairs: list[tuple[str, str]]) -> list[Row]:
        """`get` for many (entity, id) pairs in one round trip: one MGET (one per hash slot on
        a cluster), with the meta key read in the same round trip when its check is due."""
        return self._read(self._keys(pairs))

    def _read(self, keys: list[str]) -> list[Row]:
        if time.monotonic() >= self._read_due:
            pipe = self.client.pipeline(transaction=False)
            self._queue(pipe, keys)
            return self.decode_pairs(pipe.execute())
        if not keys:
            return []
        raw = self.client.mget_nonatomic(keys) if self._cluster else self.client.mget(keys)
        return self._rows(raw)

    def _keys(self, pairs: list[tuple[str, str]]) -> list[str]:
        for entity in {e for e, _ in pairs}:
            self._check_entity(entity)
        p = self.prefix
        return [f"{p}:{{{e}:{i}}}" for e, i in pairs]

    def queue_pairs(self, pipe, pairs: list[tuple[str, str]]) -> int:
        """Queue the reads of `get_pairs` on ``pipe`` (a caller's pipeline, to share its round
        trip), led by the meta key; returns how many replies they make, which `decode_pairs`
        takes in order."""
        return self._queue(pipe, self._keys(pairs))

    def _queue(self, pipe, keys: list[str]) -> int:
        pipe.execute_command("HMGET", self.meta_key, "version", "features", "layout")
        if self._cluster:  # a cluster pipeline sends each GET to its key's node
            for k in keys:
                pipe.execute_command("GET", k)
            return len(keys) + 1
        if keys:
            pipe.execute_command("MGET", *keys)
        return 2 if keys else 1

    def decode_pairs(self, replies: list) -> list[Row]:
        """The rows from the replies of the reads `queue_pairs` queued (raises
        `SchemaMismatch` as `get_pairs` does)."""
        return self._rows(self._raw_replies(replies))

    def _raw_replies(self, replies: list) -> list[bytes | None]:
        """The rows' raw values in the replies of `queue_pairs`, after checking its meta."""
        self._check_meta(*replies[0])
        self._read_due = time.monotonic() + META_CHECK_S
        if self._cluster:
            return replies[1:]
        return replies[1] if len(replies) > 1 else []

    def decode_counts(self, replies: list) -> np.ndarray:
        """`decode_pairs` as one int64 array [pairs, features] (``feature_names`` order), 0s
        for a missing row: for a reader that computes on the counts, not one that prints them."""
        raw = self._raw_replies(replies)
        rows = np.frombuffer(self._blob(raw), "<i8").reshape(len(raw), self._row_bytes // 8)
        missing = rows[:, 0] != self.schema_version
        if missing.any():
            for i in np.flatnonzero(missing):
                self._check_row(raw[i])
            rows = rows.copy()
            rows[missing] = 0
        return rows[:, 2:]

    def _blob(self, raw: list[bytes | None]) -> bytes:
        """The rows as one string, a row of version 0 (read as missing) where one is absent
        or of another length."""
        size, zero = self._row_bytes, self._zero_row
        if None not in raw and set(map(len, raw)) <= {size}:  # all there: no Python loop
            return b"".join(raw)
        return b"".join([r if r is not None and len(r) == size else zero for r in raw])

    def _rows(self, raw: list[bytes | None]) -> list[Row]:
        """Decode packed rows in bulk; absent rows and rows of an older version read as
        missing, a newer version raises."""
        out = self._decode(self._unpack(self._blob(raw)))
        if None in out:  # absent, another version or another length
            for i, row in enumerate(out):
                if row is None:
                    self._check_row(raw[i])
                    out[i] = dict(self._missing_row)
        return out

    def _check_row(self, r: bytes | None) -> None:
        """Raise `SchemaMismatch` for a row this reader must not take as missing."""
        if r is None or len(r) < 8:
            return
        v = int.from_bytes(r[:8], "little", signed=True)
        if v == self.schema_version and len(r) != self._row_bytes:
            raise SchemaMismatch(
                f"a row of schema version {v} has {len(r) // 8 - 2} values, this reader "
                f"expects {len(self.feature_names)}: the store's features differ from this "
                "reader's", v, self.schema_version)
        if v > self.schema_version:
            raise SchemaMismatch(f"a row has schema version {v}, this reader expects "
                                 f"{self.schema_version}", v, self.schema_version)

    def top(self, entity: str, feature: str, n: int = 10,
            scan_count: int = 1000) -> list[tuple[str, int]]:
        """The ``n`` ids with the largest ``feature``, largest first. SCANs every key of the
        entity: fine for a CLI, not for serving."""
        self._check_entity(entity)
        if feature not in self._names:
            raise ValueError(f"unknown feature {feature!r} (the store has {self.feature_names})")
        self.check()
        head = f"{self.prefix}:{{{entity}:"
        best: list[tuple[int, str]] = []  # min-heap of the n largest so far
        match = re.sub(r"([*?\[\]\\])", r"\\\1", head) + "*}"  # the prefix is not a glob
        for keys in _chunks(self.client.scan_iter(match=match, count=scan_count), scan_count):
            raw = self.client.mget_nonatomic(keys) if self._cluster else self.client.mget(keys)
            for k, row in zip(keys, self._rows(raw), strict=True):
                if row["_missing"]:
                    continue
                item = (row[feature], k.decode()[len(head):-1])
                if len(best) < n:
                    heapq.heappush(best, item)
                elif item > best[0]:
                    heapq.heapreplace(best, item)
        return [(id_, v) for v, id_ in sorted(best, reverse=True)]

    # -- migration ----------------------------------------------------------------------------

    @classmethod
    def migrate(cls, client: redis.Redis, *, prefix: str = "f", scan_count: int = 1000,
                progress: Callable[[int, int], None] | None = None, **kwargs) -> int | None:
        """Rewrite a store of the hash layout (one hash per entity, fields per feature plus
        ``_ts`` and ``_v``) as packed rows, keeping each key's TTL, and mark the meta key;
        returns the rows rewritten (None when the store was already packed). Rows of another
        schema version are left to expire (they read as missing either way). Safe to run
        again after an interruption. Stop the writers of the old layout first: they would keep
        writing hashes."""
        version, names, layout = client.hmget(f"{prefix}:meta",
                                              ["version", "features", "layout"])
        if version is None or names is None:
            raise MetaMissing(f"no feature store meta key {prefix}:meta")
        if layout == LAYOUT.encode():
            return None
        store = cls(client, prefix=prefix, schema_version=int(version),
                    feature_names=orjson.loads(names), **kwargs)
        fields = [*store.feature_names, "_ts", "_v"]
        match = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + ":{*}"
        rewritten = seen = 0
        for keys in _chunks(client.scan_iter(match=match, count=scan_count, _type="hash"),
                            scan_count):
            pipe = client.pipeline(transaction=False)
            for k in keys:
                pipe.hmget(k, fields)
                pipe.pttl(k)
            replies = pipe.execute()
            pipe = client.pipeline(transaction=False)
            for k, raw, pttl in zip(keys, replies[::2], replies[1::2], strict=True):
                if raw[-1] is None or int(raw[-1]) != store.schema_version:
                    continue
                values = {n: int(float(v)) for n, v in zip(fields, raw[:-2], strict=False)
                          if v is not None}
                row = store.pack(values, int(raw[-2] or 0))
                pipe.execute_command("SET", k, row, *(("PX", pttl) if pttl > 0 else ()))
                rewritten += 1
            pipe.execute()
            seen += len(keys)
            if progress is not None:
                progress(seen, rewritten)
        client.hset(f"{prefix}:meta", mapping={"layout": LAYOUT,
                                               "updated_ms": int(time.time() * 1000)})
        return rewritten


def _decoder(version: int, keys: list[str]) -> Callable[[Iterable[tuple]], list[Row | None]]:
    """``rows -> [{keys[0]: row[1], ..., "_missing": False} or None, ...]`` for unpacked
    rows (version first; None where it is not ``version``), compiled to one comprehension of
    dict displays, as namedtuple and dataclasses generate their code: 3x faster than
    ``dict(zip(...))`` per row, and building the dicts is most of a `get_many`'s own time.

    >>> _decoder(2, ["_ts", "it's"])([(2, 5, 7), (1, 5, 7)])
    [{'_ts': 5, "it's": 7, '_missing': False}, None]
    """
    names = ", ".join(f"v{i}" for i in range(len(keys)))
    items = ", ".join(f"{k!r}: v{i}" for i, k in enumerate(keys))
    code = (f"lambda rows: [{{{items}, '_missing': False}} if version == {int(version)} "
            f"else None for version, {names}, in rows]")
    return eval(code)  # noqa: S307 - the keys are repr()'d, the version an int


# A chunk of rows SET with their TTL in one call: a pipeline of SETs cost 12 us a row in
# redis-py's packing of each command and parsing of each reply, this 5 (3,250 rows: 40 -> 16 ms).
_SET_ROWS = ("local ttl = ARGV[1] "
             "for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i + 1], 'EX', ttl) end "
             "return #KEYS")


def _chunks(it: Iterable, size: int) -> Iterable[list]:
    chunk: list = []
    for x in it:
        chunk.append(x)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _describe(client) -> str:
    """Where a client points, without its password."""
    try:
        kw = client.connection_pool.connection_kwargs
    except AttributeError:  # RedisCluster: no single pool
        return type(client).__name__
    user = f"{kw['username']}@" if kw.get("username") else ""
    return f"redis://{user}{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


def _password(client) -> str | None:
    try:
        return client.connection_pool.connection_kwargs.get("password")
    except AttributeError:
        return getattr(client, "_ctrstream_password", None)


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def until_done(what: str, fn: Callable[[], T], *, client=None,
               on_error: Callable[[], None] | None = None, give_up_s: float = 0.0,
               initial_s: float = 0.05, max_s: float = 2.0,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, tried again with exponential backoff while Redis fails: an outage holds the
    caller (and so the reading of its input) back, never crashes it. With ``give_up_s`` > 0,
    raises `StoreUnavailable` after that long instead. ``what`` leads every log line;
    ``client``'s password is scrubbed from them; ``on_error`` is called on each failure (a
    metric). The one retry loop of every Redis writer: the feature writer and the online
    trainer."""
    attempt, started = 0, clock()
    while True:
        try:
            result = fn()
        except redis.DataError:  # a value Redis cannot take: retrying will not help
            raise
        except redis.RedisError as e:
            attempt += 1
            if on_error is not None:
                on_error()
            waited = clock() - started
            why = _scrub(f"{type(e).__name__}: {e}", _password(client))
            if give_up_s and waited >= give_up_s:
                msg = f"{what}: Redis failed for {waited:.1f} s ({attempt} attempts): {why}"
                log.error("%s", msg)
                raise StoreUnavailable(msg) from None
            delay = min(initial_s * 2 ** (attempt - 1), max_s)
            if give_up_s:
                delay = min(delay, give_up_s - waited)
            log.warning("%s: attempt %d failed (Redis failing for %.1f s), retrying in %.2f s: "
                        "%s", what, attempt, waited, delay, why)
            sleep(delay)
        else:
            if attempt:
                log.info("%s: done after %d failed attempts", what, attempt)
            return result


class BufferedWriter:
    """Coalesces feature updates and writes them to a `FeatureStore` in batches.

    `put` keeps only the latest values per (entity, id) — only the state at flush time matters,
    since writes are absolute. A flush happens when ``max_pending`` entities are pending, when
    `maybe_flush` finds ``flush_interval_s`` passed, or on `flush`. When Redis fails, the flush
    retries with exponential backoff and keeps every pending value, holding its caller back;
    with ``give_up_s`` > 0 it raises `StoreUnavailable` after that long (values still pending)
    so the caller decides: stop, or keep buffering and flush later. Not thread-safe: one
    writer per dataflow worker.
    """

    def __init__(self, store: FeatureStore, flush_interval_s: float = 0.5,
                 max_pending: int = 5000, *, give_up_s: float = 60.0,
                 backoff_initial_s: float = 0.05, backoff_max_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if max_pending <= 0:
            raise ValueError(f"max_pending must be > 0, got {max_pending}")
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.give_up_s = give_up_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._clock, self._sleep = clock, sleep
        self._values: dict[tuple[str, str], dict[str, int]] = {}
        self._ts: dict[tuple[str, str], int] = {}
        self._last_flush = clock()
        self.flushes = 0  # successful flushes with something to write
        self.written = 0  # entities written

    @property
    def pending(self) -> int:
        """Entities waiting to be written."""
        return len(self._values)

    def put(self, entity: str, id: str, values: Mapping[str, int], ts_ms: int) -> None:
        """Buffer absolute values for one entity (may flush; see `flush` for what it raises)."""
        # refuse bad input here: once pending, it would fail every flush after it
        self.store.validate(entity, values)
        key = (entity, id)
        current = self._values.get(key)
        if current is None:
            self._values[key] = dict(values)
        else:  # the row is written whole: later values win, the others stay
            current.update(values)
        self._ts[key] = ts_ms
        if len(self._values) >= self.max_pending:
            self.flush()

    def maybe_flush(self, now: float | None = None) -> int:
        """Flush if ``flush_interval_s`` passed since the last one; returns entities written.
        ``now`` is on the writer's clock (``time.monotonic`` unless another was given)."""
        now = self._clock() if now is None else now
        if now - self._last_flush < self.flush_interval_s:
            return 0
        return self.flush()

    def flush(self) -> int:
        """Write every pending entity; returns how many. Raises `StoreUnavailable` after
        ``give_up_s`` of failures, with nothing dropped."""
        if not self._values:
            self._last_flush = self._clock()
            return 0
        n = len(self._values)
        until_done(f"feature store {self.store.where}, {n} entities kept pending",
                   lambda: self.store.write_many(self._values, self._ts, validated=True),
                   client=self.store.client, give_up_s=self.give_up_s,
                   initial_s=self.backoff_initial_s, max_s=self.backoff_max_s,
                   clock=self._clock, sleep=self._sleep)
        self._values, self._ts = {}, {}
        self._last_flush = self._clock()
        self.flushes += 1
        self.written += n
        return n

