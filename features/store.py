"""The Redis feature store: a materialized view of the real-time count features.

Layout (prefix ``f``)::

    f:{user:42}   hash  clicks_1h -> 3, ctr_1h -> 0.0312, ..., _ts -> 1714560000000, _v -> 1
    f:meta        hash  version -> 1, features -> ["clicks_1h", "ctr_1h", ...], updated_ms -> ...

One hash per entity keeps one entity's features in one key (one HMGET reads them, and a hash of
a few dozen small fields stays in Redis's compact listpack encoding: about a third of the memory
of one string key per feature). The braces are a Redis Cluster hash tag, so the same code runs on
a cluster. Values are absolute (HSET, never HINCRBY): the counters live in the dataflow's state,
and replaying input after a crash rewrites the same values. ``_ts`` is the event time of the
values (ms), ``_v`` the schema version; every write renews the entity's TTL, so idle entities
expire.

Use (against a running Redis)::

    store = FeatureStore(redis.Redis(port=16379), feature_names=["clicks_1h", "ctr_1h"])
    store.write_many({("user", "42"): {"clicks_1h": 3, "ctr_1h": 0.03}}, ts_ms=1714560000000)
    store.get("user", "42")
    # {'clicks_1h': 3, 'ctr_1h': 0.03, '_ts': 1714560000000, '_missing': False}
    store.get_many("user", ["42", "43"])  # one round trip; "43" reads as 0s, _missing True
"""

from __future__ import annotations

import heapq
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis

from joiner.errors import CtrstreamError

log = logging.getLogger(__name__)

Number = int | float
Row = dict[str, Number | bool | None]
T = TypeVar("T")

META_CHECK_S = 10.0  # a writer checks that the meta key is still there this often

# Entity names become part of a SCAN pattern and of the hash tag: keep them plain.
_ENTITY = re.compile(r"[A-Za-z0-9_.-]+")


class SchemaMismatch(CtrstreamError, RuntimeError):
    """The store holds features of another schema version (or lacks features we need)."""

    def __init__(self, message: str, found: object = None, expected: object = None) -> None:
        super().__init__(message)
        self.found, self.expected = found, expected


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


def _num(raw: bytes) -> Number:
    """A stored value back as int or float (redis-py writes floats with repr: never all
    digits). Readers inline the common case, a non-negative int, to save a call per value."""
    if raw.isdigit() or (raw[:1] == b"-" and raw[1:].isdigit()):
        return int(raw)
    return float(raw)


class FeatureStore:
    """Reads and writes one hash per entity; see the module docstring for the layout.

    ``schema_version`` names the meaning of ``feature_names``. A writer records both in the meta
    key; a reader that finds another version raises `SchemaMismatch`. Rows left by an older
    version read as missing (they expire by TTL); bump the version whenever a feature's
    meaning changes.
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
            # rows are compared and parsed as bytes (the fast path with hiredis)
            raise ValueError("FeatureStore needs a client with decode_responses=False")
        self.client = client
        self.prefix = prefix
        self.schema_version = int(schema_version)
        self.ttl_s = int(ttl_s)
        self.feature_names = list(feature_names)
        self.batch_commands = batch_commands
        self.meta_key = f"{prefix}:meta"
        self.where = where or _describe(client)
        self._names = frozenset(feature_names)
        self._read_fields = [*feature_names, "_ts", "_v"]
        self._version_raw = str(self.schema_version).encode()
        self._defaults: dict[str, Number] = dict.fromkeys(feature_names, 0)
        self._meta_written = False
        self._meta_due = 0.0
        self._meta_ok_raw: bytes | None = None  # the meta feature list already checked
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
        that do not know the spec, such as the CLI); raises `MetaMissing`."""
        version, names = client.hmget(f"{prefix}:meta", ["version", "features"])
        if version is None or names is None:
            raise MetaMissing(f"no feature store meta key {prefix}:meta")
        return cls(client, prefix=prefix, schema_version=int(version),
                   feature_names=orjson.loads(names), **kwargs)

    def _write_meta(self) -> None:
        """Record our schema, unless a newer writer already did (an old writer still running
        must not relabel a newer store)."""
        version, names = self.client.hmget(self.meta_key, ["version", "features"])
        if version is not None:
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
            "updated_ms": int(time.time() * 1000),
        })
        self._meta_written = True

    def _check_meta(self, version: bytes | None, names: bytes | None) -> None:
        if version is None:  # nothing written yet: every entity reads as missing
            return
        if version != self._version_raw:
            raise SchemaMismatch(
                f"feature store {self.meta_key} on {self.where} has schema version "
                f"{version.decode()}, this reader expects {self.schema_version}",
                int(version), self.schema_version)
        if names == self._meta_ok_raw:
            return
        stored = set(orjson.loads(names or b"[]"))
        lacking = [n for n in self.feature_names if n not in stored]
        if lacking:
            raise SchemaMismatch(
                f"feature store {self.meta_key} on {self.where} (schema version "
                f"{self.schema_version}) has no features {lacking}", None, lacking)
        self._meta_ok_raw = names

    # -- writes -------------------------------------------------------------------------------

    def validate(self, entity: str, values: Mapping[str, Number]) -> None:
        """Raise ValueError for an entity name or feature this store cannot take."""
        self._check_entity(entity)
        if not values.keys() <= self._names:
            raise ValueError(f"unknown features {sorted(values.keys() - self._names)} "
                             f"(the store has {self.feature_names})")

    def write_many(self, rows: Mapping[tuple[str, str], Mapping[str, Number]],
                   ts_ms: Mapping[tuple[str, str], int] | int) -> int:
        """HSET absolute values (and renew the TTL) for each (entity, id); returns the number of
        entities written. Pipelined, not transactional: a failure halfway leaves some entities
        written, which is harmless because writing them again gives the same values."""
        for (entity, _), values in rows.items():
            self.validate(entity, values)
        if not self._meta_written or time.monotonic() >= self._meta_due:
            # Again now and then: a Redis restarted empty must get its meta key back.
            self._write_meta()
            self._meta_due = time.monotonic() + META_CHECK_S
        one_ts = ts_ms if isinstance(ts_ms, int) else None
        pipe = self.client.pipeline(transaction=False)
        queued = 0
        for ek, values in rows.items():
            key = self.key(*ek)
            args: list = ["HSET", key]
            for item in values.items():
                args += item
            args += ("_ts", ts_ms[ek] if one_ts is None else one_ts, "_v", self.schema_version)
            pipe.execute_command(*args)
            queued += 1
            if self.ttl_s:
                pipe.execute_command("EXPIRE", key, self.ttl_s)
                queued += 1
            if queued >= self.batch_commands:
                pipe.execute()
                queued = 0
        if queued:
            pipe.execute()
        return len(rows)

    # -- reads --------------------------------------------------------------------------------

    def get(self, entity: str, id: str) -> Row:
        """The features of one entity, plus ``_ts`` (ms, None when missing) and ``_missing``.
        A missing entity reads as 0 for every feature."""
        return self.get_many(entity, [id])[0]

    def get_many(self, entity: str, ids: list[str]) -> list[Row]:
        """`get` for many ids of one entity in one round trip."""
        return self.get_pairs([(entity, id_) for id_ in ids])

    def get_pairs(self, pairs: list[tuple[str, str]]) -> list[Row]:
        """`get` for many (entity, id) pairs in one round trip (one pipeline of HMGETs, led by
        the meta key so a schema change is noticed on every read at no extra round trip)."""
        pipe = self.client.pipeline(transaction=False)
        self.queue_pairs(pipe, pairs)
        return self.decode_pairs(pipe.execute())

    def queue_pairs(self, pipe, pairs: list[tuple[str, str]]) -> int:
        """Queue the reads of `get_pairs` on ``pipe`` (a caller's pipeline, to share its round
        trip); returns how many replies they make, which `decode_pairs` takes in order."""
        for entity in {e for e, _ in pairs}:
            self._check_entity(entity)
        pipe.execute_command("HMGET", self.meta_key, "version", "features")
        fields = self._read_fields
        for entity, id_ in pairs:
            pipe.execute_command("HMGET", self.key(entity, id_), *fields)
        return len(pairs) + 1

    def decode_pairs(self, replies: list) -> list[Row]:
        """The rows from the replies of the reads `queue_pairs` queued (raises
        `SchemaMismatch` as `get_pairs` does)."""
        self._check_meta(*replies[0])
        return [self._row(r) for r in replies[1:]]

    def _row(self, raw: list[bytes | None]) -> Row:
        version = raw[-1]
        if version != self._version_raw:
            if version is not None and int(version) > self.schema_version:
                raise SchemaMismatch(f"a row has schema version {version.decode()}, this reader "
                                     f"expects {self.schema_version}", int(version),
                                     self.schema_version)
            # absent, or left by an older schema: its values mean something else
            return {**self._defaults, "_ts": None, "_missing": True}
        # the hot loop of get_many: one comprehension, no call for plain counts
        values = [0 if v is None else int(v) if v.isdigit() else _num(v) for v in raw[:-1]]
        row: Row = dict(zip(self.feature_names, values, strict=False))
        row["_ts"] = values[-1] if raw[-2] is not None else None
        row["_missing"] = False
        return row

    def top(self, entity: str, feature: str, n: int = 10,
            scan_count: int = 1000) -> list[tuple[str, Number]]:
        """The ``n`` ids with the largest ``feature``, largest first. SCANs every key of the
        entity: fine for a CLI, not for serving."""
        self._check_entity(entity)
        if feature not in self._names:
            raise ValueError(f"unknown feature {feature!r} (the store has {self.feature_names})")
        head = f"{self.prefix}:{{{entity}:"
        best: list[tuple[Number, str]] = []  # min-heap of the n largest so far
        match = re.sub(r"([*?\[\]\\])", r"\\\1", head) + "*}"  # the prefix is not a glob
        for keys in _chunks(self.client.scan_iter(match=match, count=scan_count), scan_count):
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.execute_command("HMGET", k, feature, "_v")
            for k, (raw, version) in zip(keys, pipe.execute(), strict=True):
                if version != self._version_raw:
                    continue
                item = (0 if raw is None else _num(raw), k.decode()[len(head):-1])
                if len(best) < n:
                    heapq.heappush(best, item)
                elif item > best[0]:
                    heapq.heapreplace(best, item)
        return [(id_, v) for v, id_ in sorted(best, reverse=True)]


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
        self._values: dict[tuple[str, str], dict[str, Number]] = {}
        self._ts: dict[tuple[str, str], int] = {}
        self._last_flush = clock()
        self.flushes = 0  # successful flushes with something to write
        self.written = 0  # entities written

    @property
    def pending(self) -> int:
        """Entities waiting to be written."""
        return len(self._values)

    def put(self, entity: str, id: str, values: Mapping[str, Number], ts_ms: int) -> None:
        """Buffer absolute values for one entity (may flush; see `flush` for what it raises)."""
        # refuse bad input here: once pending, it would fail every flush after it
        self.store.validate(entity, values)
        key = (entity, id)
        current = self._values.get(key)
        if current is None:
            self._values[key] = dict(values)
        else:  # same end state as writing both: HSET leaves the other fields alone
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
                   lambda: self.store.write_many(self._values, self._ts),
                   client=self.store.client, give_up_s=self.give_up_s,
                   initial_s=self.backoff_initial_s, max_s=self.backoff_max_s,
                   clock=self._clock, sleep=self._sleep)
        self._values, self._ts = {}, {}
        self._last_flush = self._clock()
        self.flushes += 1
        self.written += n
        return n

