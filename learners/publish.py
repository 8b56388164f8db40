"""The Redis store of model versions: online pushes into a version, atomic daily publishing.

Layout (store name ``ctr``; every key carries the hash tag ``{ctr}``)::

    m:{ctr}:current            string  the current version ("17"); never expires
    m:{ctr}:seq                string  INCR counter behind new_version()
    m:{ctr}:versions           zset    version -> its sequence number (the listing)
    m:{ctr}:v:17:keys          set     the name of every key of version 17, itself included
    m:{ctr}:v:17:layout        hash    "w:ftrl" -> "<f4x1", "w:bopr" -> "<f4x2",
                                       "emb:user" -> "<f4x16" (dtype, width of each value)
    m:{ctr}:v:17:meta          hash    created_ms, schema, examples, metrics ... (JSON values);
                                       the completion marker: write it last
    m:{ctr}:v:17:w:ftrl        hash    coordinate (uint32, 4 bytes little-endian) -> value
                                       (width x dtype, raw little-endian: FTRL w as 1 x float32,
                                       BOPR (mu, var) as 2 x float32)
    m:{ctr}:v:17:emb:user      hash    id (str) -> updated_ms (int64 LE) + dim x float32 LE
    m:{ctr}:v:17:blob:state    string  a learner's whole state (e.g. numpy npz bytes)
    m:{ctr}:v:17:gen           string  INCR by every write into version 17 (its generation)
    m:{ctr}:v:17:log           stream  what each write changed, entry ID <generation>-0: k the
                                       key, f its fields (the last LOG_LENGTH writes)

Publishing: a retrain calls `new_version`, writes everything under the new namespace, writes
the meta last, then `publish` flips the pointer in one Lua script. A reader names one version
per read, so it sees the old version or the new one, never a mix. The flip sets a TTL of
``keep_days`` on every key of the previous version (found through its ``keys`` set, no KEYS or
SCAN), so it stays readable, and resumable, until then. An unpublished version carries the same
TTL from `new_version` on, so an abandoned retrain cleans itself up; publish removes it
(PERSIST), which also makes a rollback to a retired version safe. The online learner pushes
into the current version with the same calls (`put_vectors`, `put_rows`, `delete_rows`); a
push is atomic per batch, not across batches, and every value a reader gets is still from the
version it named. Writes into a version that is gone (expired, or never created) raise and
leave nothing behind; writes into a retired version get its remaining TTL, so a straggling
learner cannot make keys that never expire.

The layout lives in its own hash, not in the meta, because the meta is the completion marker
written last while the layout is fixed by the first write.

Hash tag trade-off: one tag per store name puts every version of a model (and the pointer) in
one Redis Cluster slot, so one pipeline or one Lua script can read or flip all of it, and the
publish script may touch the previous version's keys found at run time (Redis only allows keys
of the script's own slot). The price: one model lives on one shard, so its memory and read load
do not spread over the cluster; spread it with several store names (one per model or per table
group, each with its own pointer) if one shard is not enough.

Version names come from INCR: unique across processes and hosts without trusting clocks or
random numbers, in creation order (sort with ``key=int``), short in every key; the creation
time is in the meta.

Reads (`read_consistent`) are optimistic and one round trip in the steady state: a pipeline
reads the pointer and the data of the version this store saw last; when the pointer names
another version, the read is done again for that one. The data always come from a single
version because every key is namespaced by it; the pointer in the same pipeline only says the
version is current. Chosen over a Lua script that reads pointer and data: the same round
trip and the same latency (bench/publish.py: p50 0.33 vs 0.35 ms for 100 keys), but plain
commands, which replicas can serve and which name every key they touch.

The online learner's full push (every live row; anything else stored is stale) goes through
`replace_rows`: written to a staging key, swapped in by RENAME. Blobs are written the same way.
Use (against a running Redis)::

    store = ModelStore(redis.Redis(port=16379))
    v = store.new_version()
    store.put_vectors(v, "bopr", np.array([3, 9]), np.array([[0.1, 0.01], [-0.2, 0.02]]))
    store.put_meta(v, {"schema": 1, "examples": 123456, "metrics": {"ne": 0.82}})
    store.publish(v, expected_current=store.current())  # fails if another publisher was first
    store.read_consistent(vectors={"bopr": np.array([3, 4])}).vectors["bopr"]
    # array([[0.1, 0.01], [0., 0.]], dtype=float32)

Memory (``python bench/publish.py``, Redis 7.0): a BOPR (mu, var) vector ~65 B, an FTRL
weight ~56 B, an embedding row ~135 B at dim 16 and ~215 B at dim 32 (big hashes use Redis's
hashtable encoding). Every version alive counts: with daily publishes about keep_days + 1
versions are in Redis at once. Redis frees an expired key synchronously unless
``lazyfree-lazy-expire yes``: freeing a 1M-field hash took ~350 ms, a stall of the server
when a retired version expires; set it on servers that hold big models.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import orjson
import redis

from joiner.errors import CtrstreamError

# Names become key segments (and the store name the hash tag): keep them plain.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ROW_HEADER = np.dtype("<i8")  # updated_ms in front of every embedding row
# publish(expected_current=ANY): no check. Not a possible version name (see _NAME).
ANY = "*"
_STAGING_MS = 3_600_000  # a staged write that dies halfway leaves garbage this long


class ModelStoreError(CtrstreamError, RuntimeError):
    """A model version is missing, incomplete, or holds data of another layout."""


class PublishConflict(ModelStoreError):
    """Another publisher moved the pointer since the caller read it (stale expected_current)."""

    exit_code = 4

    def __init__(self, message: str, found: str | None, expected: str | None) -> None:
        super().__init__(message)
        self.found, self.expected = found, expected


class Rows(NamedTuple):
    vectors: np.ndarray  # (n, dim) float32, zeros where missing
    updated_ms: np.ndarray  # (n,) int64, 0 where missing
    found: np.ndarray  # (n,) bool


class VersionCopy(NamedTuple):
    """A whole model version in memory (`ModelStore.load`), read like `read_consistent`."""

    version: str
    generation: int | None  # the version's write counter when loaded (None: never bumped)
    meta: dict
    vectors: dict[str, tuple[np.ndarray, np.ndarray]]  # model -> sorted coordinates, values
    rows: dict[str, tuple[dict[str, int], Rows]]  # table -> id -> row index, the rows

    def get_vectors(self, model: str, keys, default=None) -> np.ndarray:
        """Like `ModelStore.get_vectors`, from memory: ``default`` (or zeros) where missing."""
        coords, values = self.vectors[model]
        keys = np.asarray(keys, dtype=np.int64)
        at = np.searchsorted(coords, keys)
        hit = at < len(coords)
        hit[hit] = coords[at[hit]] == keys[hit]
        fill = np.zeros(values.shape[1], values.dtype) if default is None else \
            np.asarray(default, values.dtype).reshape(values.shape[1])
        out = np.empty((len(keys), values.shape[1]), values.dtype)
        out[:] = fill
        out[hit] = values[at[hit]]
        return out

    def get_rows(self, table: str, ids: Sequence[str]) -> Rows:
        """Like `ModelStore.get_rows`, from memory."""
        index, rows = self.rows[table]
        at = np.fromiter((index.get(i, -1) for i in ids), np.int64, len(ids))
        found = at >= 0
        vectors = np.zeros((len(ids), rows.vectors.shape[1]), rows.vectors.dtype)
        updated = np.zeros(len(ids), rows.updated_ms.dtype)
        vectors[found], updated[found] = rows.vectors[at[found]], rows.updated_ms[at[found]]
        return Rows(vectors, updated, found)


class Snapshot(NamedTuple):
    version: str
    vectors: dict[str, np.ndarray]
    rows: dict[str, Rows]


# Write scripts. Keys of the version are checked inside the script so that a write into a
# version that is gone cannot recreate it, and a write into a retired (or unpublished) version
# takes the TTL of its key set: every key of a version expires together.
_CHECK = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then
  if KEYS[4] then redis.call('DEL', KEYS[3]) end
  return redis.error_reply('CTRS_NOVERSION')
end
if ARGV[1] ~= '' then
  local spec = redis.call('HGET', KEYS[2], ARGV[1])
  if not spec then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  elseif spec ~= ARGV[2] then
    if KEYS[4] then redis.call('DEL', KEYS[3]) end
    return redis.error_reply('CTRS_LAYOUT ' .. spec)
  end
end
"""

# Every write into a version bumps its generation (``v:N:gen``, one of its keys), so a reader
# that keeps a copy of the version (the scorer) knows when to load it again, and appends what
# it changed to the version's log (``v:N:log``, a stream, entry ID ``<generation>-0``: ``k`` the
# key written, ``f`` its fields, packed as `_pack_fields` does, or `WHOLE_KEY`), trimmed to the
# last LOG_LENGTH writes, so that the reader re-reads only those (`ModelStore.refresh`). The
# keys are found from the key set's name: the same hash tag, so the same slot. The script sets
# ``changed`` and ``fields`` before.
LOG_LENGTH = 512
WHOLE_KEY = b"*"  # a log entry's fields when the whole key was replaced (or is not a table)
_BUMP = f"""
local gen = string.sub(KEYS[1], 1, -5) .. 'gen'
local log = string.sub(KEYS[1], 1, -5) .. 'log'
local g = redis.call('INCR', gen)
redis.call('XADD', log, 'MAXLEN', '{LOG_LENGTH}', g .. '-0', 'k', changed, 'f', fields)
redis.call('SADD', KEYS[1], gen, log)
if ttl > 0 then
  redis.call('PEXPIRE', gen, ttl)
  redis.call('PEXPIRE', log, ttl)
end
"""

_PUT = """
-- KEYS: version key set, layout hash, target hash
-- ARGV: layout field, spec, the fields packed for the log, field, value, ...
""" + _CHECK + """
local changed, fields = KEYS[3], ARGV[3]
-- unpack() is limited to a few thousand values by Lua's C stack
for i = 4, #ARGV, 4000 do
  redis.call('HSET', KEYS[3], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
end
redis.call('SADD', KEYS[1], KEYS[3])
if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
""" + _BUMP + """
return 0
"""

# Replaces a whole key by a staging key written beforehand: readers see the old value or the
# new one. The staging key's own TTL is replaced by the version's (or removed).
_COMMIT = """
-- KEYS: version key set, layout hash, staging key, target key
-- ARGV: layout field ('' for none), spec, expected size, 'STRLEN' or 'HLEN'
""" + _CHECK + """
local changed, fields = KEYS[4], '*'  -- WHOLE_KEY
local n = redis.call(ARGV[4], KEYS[3])
if n ~= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[3])
  return redis.error_reply('CTRS_SIZE ' .. n)
end
if redis.call('EXISTS', KEYS[3]) == 0 then  -- nothing staged: an empty hash
  redis.call('DEL', KEYS[4])
""" + _BUMP + """
  return 0
end
redis.call('RENAME', KEYS[3], KEYS[4])
redis.call('SADD', KEYS[1], KEYS[4])
if ttl > 0 then redis.call('PEXPIRE', KEYS[4], ttl) else redis.call('PERSIST', KEYS[4]) end
""" + _BUMP + """
return 0
"""

_BUMP_ONLY = """
-- KEYS: version key set (a write outside the scripts above, such as HDEL, bumps after it)
-- ARGV: the key written, its fields packed for the log
local ttl = redis.call('PTTL', KEYS[1])
local changed, fields = ARGV[1], ARGV[2]
if ttl == -2 then return 0 end
""" + _BUMP + """
return 0
"""

_PUBLISH = """
-- KEYS: pointer, new version's key set, its meta
-- ARGV: version, check expected ('1'/'0'), expected ('' = none), ttl ms, namespace prefix
local cur = redis.call('GET', KEYS[1]) or ''
if ARGV[2] == '1' and cur ~= ARGV[3] then return redis.error_reply('CTRS_STALE ' .. cur) end
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.error_reply('CTRS_NOVERSION') end
if redis.call('EXISTS', KEYS[3]) == 0 then return redis.error_reply('CTRS_NOMETA') end
if cur == ARGV[1] then return cur end
for _, k in ipairs(redis.call('SMEMBERS', KEYS[2])) do redis.call('PERSIST', k) end
redis.call('SET', KEYS[1], ARGV[1])
if cur ~= '' then
  -- same hash tag, so the same slot: allowed although not in KEYS
  for _, k in ipairs(redis.call('SMEMBERS', ARGV[5] .. cur .. ':keys')) do
    redis.call('PEXPIRE', k, ARGV[4])
  end
end
return cur
"""


class _Layout(NamedTuple):
    dtype: np.dtype
    width: int

    @property
    def spec(self) -> str:
        return f"{self.dtype.str}x{self.width}"

    @classmethod
    def parse(cls, spec: bytes) -> _Layout:
        dtype, width = spec.decode().rsplit("x", 1)
        return cls(np.dtype(dtype), int(width))


def _check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r}: use letters, digits, '_', '.', '-'")
    return name


def _fields(keys) -> list[bytes]:
    """Coordinates as 4-byte little-endian hash fields."""
    k = np.asarray(keys)
    if k.ndim != 1 or (k.size and k.dtype.kind not in "iu"):
        raise ValueError(f"keys must be a 1-D array of integers, got {k.dtype} {k.shape}")
    if k.size and (k.min() < 0 or k.max() > 0xFFFF_FFFF):
        raise ValueError(f"keys must be in [0, 2**32), got {k.min()} .. {k.max()}")
    # a void view turns each element into one bytes object without a Python loop
    return np.ascontiguousarray(k, dtype="<u4").view("V4").tolist()


def _pack_fields(fields: list) -> bytes:
    """A write's hash fields as its log entry holds them: coordinates (4 bytes each) end to
    end, row ids (str) as a JSON list; `_unpack_fields` reads them back."""
    return orjson.dumps(fields) if fields and isinstance(fields[0], str) else b"".join(fields)


def _unpack_fields(suffix: str, packed: bytes) -> list:
    if suffix.startswith("w:"):
        return [packed[i:i + 4] for i in range(0, len(packed), 4)]
    return orjson.loads(packed) if packed else []


def _to_bytes(a: np.ndarray) -> list[bytes]:
    """Each row of a C-contiguous array (or record array) as one bytes object."""
    return a.view(np.dtype((np.void, a.itemsize * (a.size // len(a))))).ravel().tolist()


class ModelStore:
    """Model versions in Redis; see the module docstring for the layout and the guarantees.

    ``client`` must not decode responses (values are raw bytes). ``keep_days`` is how long a
    retired or unpublished version stays readable. ``batch_size`` is the number of values per
    write command (each write batch is one atomic Lua call) and per HMGET.
    """

    def __init__(self, client: redis.Redis, name: str = "ctr", keep_days: float = 7,
                 *, batch_size: int = 10_000, blob_part_bytes: int = 64 << 20) -> None:
        if client.get_encoder().decode_responses:
            raise ValueError("ModelStore needs a client with decode_responses=False")
        if keep_days <= 0 or batch_size <= 0 or blob_part_bytes <= 0:
            raise ValueError("keep_days, batch_size and blob_part_bytes must be > 0")
        self.client = client
        self.name = _check_name("store name", name)
        self.keep_ms = max(1, int(keep_days * 86_400_000))
        self.batch_size = batch_size
        self.blob_part_bytes = blob_part_bytes
        self.prefix = f"m:{{{name}}}"
        self.pointer_key = f"{self.prefix}:current"
        self.seq_key = f"{self.prefix}:seq"
        self.versions_key = f"{self.prefix}:versions"
        self._put = client.register_script(_PUT)
        self._commit = client.register_script(_COMMIT)
        self._publish = client.register_script(_PUBLISH)
        self._bump = client.register_script(_BUMP_ONLY)
        self._seen: str | None = None  # the version read_consistent found current last time

    # -- keys ---------------------------------------------------------------------------------

    def key(self, version: str, suffix: str) -> str:
        return f"{self.prefix}:v:{_check_name('version', version)}:{suffix}"

    def _call(self, script, keys: list[str], args: list, version: str, what: str):
        """Run a write script; its error codes become ModelStoreErrors that say what failed."""
        try:
            return script(keys=keys, args=args)
        except redis.ResponseError as e:
            code, _, detail = str(e).partition(" ")
            if code == "CTRS_NOVERSION":
                raise ModelStoreError(
                    f"{what}: version {version!r} of {self.prefix} does not exist (expired, "
                    f"or not made by new_version): no {keys[0]}") from None
            if code == "CTRS_LAYOUT":
                raise ModelStoreError(f"{what}: {keys[-1]} holds values of layout {detail}, "
                                      f"this write has {args[1]}") from None
            if code == "CTRS_SIZE":
                raise ModelStoreError(f"{what}: staging key {keys[2]} holds {detail} "
                                      f"{'bytes' if args[3] == 'STRLEN' else 'fields'}, "
                                      f"{args[2]} were written (a part was lost?)") from None
            raise

    # -- versions -----------------------------------------------------------------------------

    def current(self) -> str | None:
        raw = self.client.get(self.pointer_key)
        return None if raw is None else raw.decode()

    def new_version(self) -> str:
        """A new, empty, unpublished version (expires after keep_days unless published)."""
        seq = self.client.incr(self.seq_key)
        version = str(seq)
        ks = self.key(version, "keys")
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(ks, ks, self.key(version, "layout"), self.key(version, "meta"))
        pipe.pexpire(ks, self.keep_ms)
        pipe.zadd(self.versions_key, {version: seq})
        pipe.execute()
        return version

    def publish(self, version: str, expected_current: str | None = ANY,
                keep_days: float | None = None) -> str | None:
        """Make ``version`` the current one, atomically; returns the previous version (None
        if there was none; ``version`` itself if it was already current).

        With ``expected_current`` (a version, or None for "nothing published yet", so that
        ``expected_current=store.current()`` always works), refuse with `PublishConflict`
        when another publisher got there first; the default `ANY` does not check. Refuses a
        version without meta (incomplete) or one that does not exist. The previous version's
        keys expire after keep_days (this store's, unless given here).
        """
        check = expected_current != ANY
        keep_ms = self.keep_ms if keep_days is None else max(1, int(keep_days * 86_400_000))
        args = [version, "1" if check else "0", expected_current or "", keep_ms,
                f"{self.prefix}:v:"]
        keys = [self.pointer_key, self.key(version, "keys"), self.key(version, "meta")]
        try:
            previous = self._publish(keys=keys, args=args)
        except redis.ResponseError as e:
            code, _, detail = str(e).partition(" ")
            if code == "CTRS_STALE":
                found = detail or None
                raise PublishConflict(
                    f"publish {version!r}: {self.pointer_key} names {found!r}, the caller "
                    f"expected {expected_current!r} (another publisher was first)",
                    found, expected_current) from None
            if code == "CTRS_NOMETA":
                raise ModelStoreError(
                    f"publish {version!r}: {keys[2]} does not exist; a version is complete "
                    "only once its meta is written (put_meta last)") from None
            if code == "CTRS_NOVERSION":
                raise ModelStoreError(f"publish {version!r}: no such version ({keys[1]} does "
                                      "not exist: expired, or not made by new_version)") from None
            raise
        return previous.decode() if previous else None

    def versions(self) -> list[dict]:
        """Every version still in Redis, oldest first: version, current, complete (has meta),
        created_ms, expires_in_s (None: does not expire)."""
        names = [v.decode() for v in self.client.zrange(self.versions_key, 0, -1)]
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.pointer_key)
        for v in names:
            pipe.pttl(self.key(v, "keys"))
            pipe.hget(self.key(v, "meta"), "created_ms")
        current, *replies = pipe.execute()
        out, gone = [], []
        for v, ttl, created in zip(names, replies[::2], replies[1::2], strict=True):
            if ttl == -2:
                gone.append(v)
                continue
            out.append({"version": v, "current": current is not None and current.decode() == v,
                        "complete": created is not None,
                        "created_ms": None if created is None else orjson.loads(created),
                        "expires_in_s": None if ttl < 0 else ttl / 1000})
        if gone:  # expired versions leave the listing
            self.client.zrem(self.versions_key, *gone)
        return out

    # -- meta and blobs -----------------------------------------------------------------------

    def put_meta(self, version: str, meta: Mapping[str, object]) -> None:
        """Write the meta (values as JSON; ``created_ms`` added when absent). Write it last:
        its presence marks the version complete for `publish`."""
        meta = {"created_ms": int(time.time() * 1000), **meta}
        args: list = ["", "", WHOLE_KEY]
        for k, v in meta.items():
            args += (k, orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY))
        keys = [self.key(version, "keys"), self.key(version, "layout"),
                self.key(version, "meta")]
        self._call(self._put, keys, args, version, "put_meta")

    def get_meta(self, version: str) -> dict | None:
        raw = self.client.hgetall(self.key(version, "meta"))
        return {k.decode(): orjson.loads(v) for k, v in raw.items()} or None

    def put_blob(self, version: str, name: str, data: bytes) -> None:
        """Store ``data`` as one string, replacing any previous one atomically: the parts go to
        a staging key (SET, then APPEND per part of blob_part_bytes), renamed at the end."""
        suffix = f"blob:{_check_name('blob name', name)}"
        view = memoryview(data).cast("B")
        step = self.blob_part_bytes

        def write(staging: str) -> None:
            self.client.set(staging, view[:step], px=_STAGING_MS)
            for i in range(step, len(view), step):
                self.client.append(staging, view[i:i + step])

        self._staged(version, suffix, None, write, len(view), "STRLEN", f"put_blob {name!r}")

    def get_blob(self, version: str, name: str) -> bytes | None:
        return self.client.get(self.key(version, f"blob:{_check_name('blob name', name)}"))

    # -- vectors and rows ---------------------------------------------------------------------

    def put_vectors(self, version: str, model: str, keys, values,
                    dtype: str | np.dtype = "<f4") -> None:
        """Set the value vector of each key (absolute values; re-writing gives the same state).
        ``values`` is (n, width), or (n,) for width 1; stored as ``dtype``."""
        values = np.asarray(values)
        if values.ndim == 1:
            values = values[:, None]
        fields = _fields(keys)
        if values.ndim != 2 or len(values) != len(fields):
            raise ValueError(f"values must be ({len(fields)}, width), got {values.shape}")
        layout = _Layout(np.dtype(dtype).newbyteorder("<"), values.shape[1])
        data = np.ascontiguousarray(values, dtype=layout.dtype)
        self._put_hash(version, f"w:{_check_name('model', model)}", layout, fields,
                       _to_bytes(data) if len(data) else [])

    def get_vectors(self, version: str, model: str, keys, default=None) -> np.ndarray:
        """(n, width) values of ``keys`` in ``version``; a missing key reads as ``default``
        (a row of width values; zeros when None). One round trip."""
        _, vectors, _ = self._read(version, {model: keys}, {}, {model: default}, False)
        return vectors[model]

    def put_rows(self, version: str, table: str, ids: Sequence[str], vectors,
                 updated_ms) -> None:
        """Set embedding rows (``vectors`` (n, dim) float32; ``updated_ms`` one int or (n,))."""
        layout, fields, values = self._encode_rows(ids, vectors, updated_ms)
        self._put_hash(version, f"emb:{_check_name('table', table)}", layout, fields, values)

    def delete_rows(self, version: str, table: str, ids: Sequence[str]) -> None:
        """Remove rows (evicted ids), so that they stop being served."""
        key = self.key(version, f"emb:{_check_name('table', table)}")
        ids = list(ids)
        pipe = self.client.pipeline(transaction=False)
        for i in range(0, len(ids), self.batch_size):
            pipe.hdel(key, *ids[i:i + self.batch_size])
        pipe.execute()
        self._bump(keys=[self.key(version, "keys")], args=[key, _pack_fields(ids)])

    def replace_rows(self, version: str, table: str, ids: Sequence[str], vectors,
                     updated_ms) -> None:
        """Replace the whole table by these rows (a full push: every row not given is stale).
        Staged in another key and swapped in at once, so readers never see it half written."""
        suffix = f"emb:{_check_name('table', table)}"
        layout, fields, values = self._encode_rows(ids, vectors, updated_ms)

        def write(staging: str) -> None:
            step = self.batch_size
            for i in range(0, len(fields), step):
                pipe = self.client.pipeline(transaction=False)
                pipe.hset(staging, mapping=dict(zip(fields[i:i + step], values[i:i + step],
                                                    strict=True)))
                pipe.pexpire(staging, _STAGING_MS)
                pipe.execute()

        self._staged(version, suffix, layout, write, len(set(fields)), "HLEN",
                     f"replace_rows {table!r}")

    def get_rows(self, version: str, table: str, ids: Sequence[str]) -> Rows:
        """Rows of ``ids`` in ``version`` (zeros, 0 and found=False where missing)."""
        _, _, rows = self._read(version, {}, {table: ids}, {}, False)
        return rows[table]

    def read_consistent(self, vectors: Mapping[str, object] | None = None,
                        rows: Mapping[str, Sequence[str]] | None = None,
                        defaults: Mapping[str, object] | None = None,
                        attempts: int = 3) -> Snapshot:
        """Vectors (model -> keys) and rows (table -> ids) of the current version, all from
        that one version. One round trip unless the pointer moved since this store's last
        read (then two); raises if it moves on every one of ``attempts`` reads."""
        vectors, rows, defaults = vectors or {}, rows or {}, defaults or {}
        version = self._seen or self.current()
        for _ in range(attempts):
            if version is None:
                raise ModelStoreError(f"{self.pointer_key} does not exist: nothing published")
            pointer, vecs, rws = self._read(version, vectors, rows, defaults, True)
            if pointer == version:
                self._seen = version
                return Snapshot(version, vecs, rws)
            version = pointer  # published meanwhile: read the version it names now
        raise ModelStoreError(f"{self.pointer_key} moved during each of {attempts} reads")

    def generation_key(self, version: str) -> str:
        """The counter every write into ``version`` bumps: a copy of the version read at
        generation g is still whole while the counter reads g."""
        return self.key(version, "gen")

    def load(self, version: str) -> VersionCopy:
        """All of ``version`` (meta, every vector and row table) for a reader that keeps it in
        memory, with the generation read before the data: a write landing during the load
        shows as a newer generation, so the copy is never taken for fresher than it is. Two
        round trips; HGETALL of each hash, so Redis is busy for a big model's whole load."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.generation_key(version))
        pipe.hgetall(self.key(version, "layout"))
        pipe.hgetall(self.key(version, "meta"))
        gen, layouts, meta = pipe.execute()
        if not meta:
            raise ModelStoreError(f"model version {version} has no meta "
                                  f"({self.key(version, 'meta')})")
        names = sorted(k.decode() for k in layouts if k[:2] in (b"w:", b"em"))
        pipe = self.client.pipeline(transaction=False)
        for suffix in names:
            pipe.hgetall(self.key(version, suffix))
        vectors, rows = {}, {}
        for suffix, data in zip(names, pipe.execute(), strict=True):
            layout = _Layout.parse(layouts[suffix.encode()])
            key = self.key(version, suffix)
            kind, _, name = suffix.partition(":")
            if kind == "w":
                fields = list(data)
                coords = np.frombuffer(b"".join(fields), "<u4") if fields else \
                    np.empty(0, "<u4")
                if len(coords) != len(fields):
                    raise ModelStoreError(f"{key} has a field that is not a 4-byte coordinate")
                values = _decode_vectors(key, fields, list(data.values()), layout, None)
                order = np.argsort(coords, kind="stable")
                vectors[name] = (coords[order], values[order])
            else:
                ids = [k.decode() for k in data]
                rows[name] = ({id_: i for i, id_ in enumerate(ids)},
                              _decode_rows(key, ids, list(data.values()), layout))
        return VersionCopy(version, None if gen is None else int(gen),
                           {k.decode(): orjson.loads(v) for k, v in meta.items()},
                           vectors, rows)

    def refresh(self, copy: VersionCopy) -> tuple[VersionCopy, dict[str, np.ndarray] | None]:
        """``copy`` brought up to its version's current generation, and the coordinates each
        vector model had written since (None: the version was loaded whole). Only the fields
        the writes since the copy's generation name in the version's log are read again; a
        copy older than the log's oldest entry, or a write the log does not name field by
        field (a table replaced whole, the meta), means a whole `load`. Two round trips: the
        generation with the log (one MULTI), then the fields; like `load`, the copy takes
        the generation read before the data."""
        version, since = copy.version, copy.generation
        if since is None:
            return self.load(version), None
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.generation_key(version))
        pipe.xrange(self.key(version, "log"), min=f"{since + 1}-0")
        gen, entries = pipe.execute()
        gen = None if gen is None else int(gen)
        if gen == since:
            return copy, {}
        if gen is None or len(entries) != gen - since:  # gone, or behind the log's start
            return self.load(version), None
        prefix, changed = self.key(version, ""), {}
        for _, entry in entries:
            if not isinstance(entry, dict):  # a cluster's MULTI leaves the reply as a list
                entry = dict(zip(entry[::2], entry[1::2], strict=True))
            suffix = entry[b"k"].decode().removeprefix(prefix)
            kind, _, name = suffix.partition(":")
            if kind == "blob":
                continue
            if entry[b"f"] == WHOLE_KEY or name not in {"w": copy.vectors,
                                                        "emb": copy.rows}.get(kind, ()):
                return self.load(version), None
            changed.setdefault(suffix, {}).update(
                dict.fromkeys(_unpack_fields(suffix, entry[b"f"])))
        groups = [(suffix, list(fields)) for suffix, fields in changed.items()]
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.key(version, "layout"))
        step = self.batch_size
        for suffix, fields in groups:
            for i in range(0, len(fields), step):
                pipe.hmget(self.key(version, suffix), fields[i:i + step])
        layouts, *replies = pipe.execute()
        vectors, rows, coords = dict(copy.vectors), dict(copy.rows), {}
        for suffix, fields in groups:
            n_cmds = -(-len(fields) // step)
            raw = [v for r in replies[:n_cmds] for v in r]
            replies = replies[n_cmds:]
            key, layout = self.key(version, suffix), _Layout.parse(layouts[suffix.encode()])
            kind, _, name = suffix.partition(":")
            if kind == "w":
                keys = np.frombuffer(b"".join(fields), "<u4")
                found = np.fromiter((v is not None for v in raw), bool, len(raw))
                vectors[name] = _merge_vectors(*copy.vectors[name], keys,
                                               _decode_vectors(key, fields, raw, layout, None),
                                               found)
                coords[name] = keys
            else:
                rows[name] = _merge_rows(*copy.rows[name], fields,
                                         _decode_rows(key, fields, raw, layout))
        return VersionCopy(version, gen, copy.meta, vectors, rows), coords

    # -- internals ----------------------------------------------------------------------------

    def _put_hash(self, version: str, suffix: str, layout: _Layout, fields: list,
                  values: list[bytes]) -> None:
        keys = [self.key(version, "keys"), self.key(version, "layout"),
                self.key(version, suffix)]
        step = self.batch_size
        for i in range(0, max(len(fields), 1), step):  # an empty write still fixes the layout
            args = [suffix, layout.spec, _pack_fields(fields[i:i + step])]
            for pair in zip(fields[i:i + step], values[i:i + step], strict=True):
                args += pair
            self._call(self._put, keys, args, version, f"write {suffix}")

    def _encode_rows(self, ids: Sequence[str], vectors,
                     updated_ms) -> tuple[_Layout, list, list[bytes]]:
        vectors = np.asarray(vectors, dtype="<f4")
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"vectors must be ({len(ids)}, dim), got {vectors.shape}")
        rec = np.empty(len(ids), [("t", _ROW_HEADER), ("v", "<f4", (vectors.shape[1],))])
        rec["t"], rec["v"] = updated_ms, vectors
        return (_Layout(np.dtype("<f4"), vectors.shape[1]), list(ids),
                _to_bytes(rec) if len(rec) else [])

    def _staged(self, version: str, suffix: str, layout: _Layout | None, write,
                size: int, size_cmd: str, what: str) -> None:
        """``write(staging_key)``, then swap the staging key in for the target key."""
        target = self.key(version, suffix)
        staging = f"{target}:staging:{uuid.uuid4().hex[:12]}"
        write(staging)
        keys = [self.key(version, "keys"), self.key(version, "layout"), staging, target]
        args = [suffix if layout else "", layout.spec if layout else "", size, size_cmd]
        self._call(self._commit, keys, args, version, what)

    def _read(self, version: str, vectors: Mapping, rows: Mapping, defaults: Mapping,
              with_pointer: bool) -> tuple[str | None, dict, dict]:
        """One pipeline: [pointer], the layouts, then HMGETs of every requested key."""
        groups = [(f"w:{_check_name('model', m)}", m, _fields(k)) for m, k in vectors.items()]
        groups += [(f"emb:{_check_name('table', t)}", t, list(ids)) for t, ids in rows.items()]
        pipe = self.client.pipeline(transaction=False)
        if with_pointer:
            pipe.get(self.pointer_key)
        if groups:
            pipe.hmget(self.key(version, "layout"), [g[0] for g in groups])
        step = self.batch_size
        for suffix, _, fields in groups:
            for i in range(0, len(fields), step):
                pipe.hmget(self.key(version, suffix), fields[i:i + step])
        replies = pipe.execute()
        pointer = None
        if with_pointer:
            raw = replies.pop(0)
            pointer = None if raw is None else raw.decode()
            if pointer != version:
                return pointer, {}, {}  # the caller reads again; no point decoding
        if not groups:
            return pointer, {}, {}
        specs = replies[0]
        pos = 1
        out_v: dict[str, np.ndarray] = {}
        out_r: dict[str, Rows] = {}
        for (suffix, name, fields), spec in zip(groups, specs, strict=True):
            key = self.key(version, suffix)
            if spec is None:
                raise ModelStoreError(f"version {version!r} has no {suffix} (no field {suffix} "
                                      f"in {self.key(version, 'layout')}; version expired?)")
            layout = _Layout.parse(spec)
            n_cmds = -(-len(fields) // step)
            raw = [v for r in replies[pos:pos + n_cmds] for v in r]
            pos += n_cmds
            if suffix[0] == "w":
                out_v[name] = _decode_vectors(key, fields, raw, layout, defaults.get(name))
            else:
                out_r[name] = _decode_rows(key, fields, raw, layout)
        return pointer, out_v, out_r


def _merge_vectors(coords: np.ndarray, values: np.ndarray, keys: np.ndarray,
                   new: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A loaded model's (sorted coordinates, values) with ``keys`` set to ``new`` (removed
    where not ``found``): new arrays, the given ones untouched."""
    order = np.argsort(keys)
    keys, new, found = keys[order], new[order], found[order]
    at = np.searchsorted(coords, keys)
    hit = at < len(coords)
    hit[hit] = coords[at[hit]] == keys[hit]
    values = values.copy()
    values[at[hit & found]] = new[hit & found]
    gone = at[hit & ~found]
    if gone.size:
        coords, values = np.delete(coords, gone), np.delete(values, gone, axis=0)
    add = ~hit & found
    if add.any():
        at = np.searchsorted(coords, keys[add])
        coords, values = np.insert(coords, at, keys[add]), np.insert(values, at, new[add], axis=0)
    return coords, values


def _merge_rows(index: dict[str, int], rows: Rows, ids: list[str],
                new: Rows) -> tuple[dict[str, int], Rows]:
    """A loaded table with the rows of ``ids`` set to ``new`` (removed where not found): a
    new index and arrays, the given ones untouched. A row removed stays in the arrays, out of
    the index, until the version is loaded whole again."""
    index = dict(index)
    at = np.fromiter((index.get(i, -1) for i in ids), np.int64, len(ids))
    add = (at < 0) & new.found
    for i in np.asarray(ids, dtype=object)[(at >= 0) & ~new.found]:
        del index[i]
    for k, i in enumerate(np.asarray(ids, dtype=object)[add]):
        index[i] = len(rows.vectors) + k
    vectors = np.concatenate([rows.vectors, new.vectors[add]])
    updated = np.concatenate([rows.updated_ms, new.updated_ms[add]])
    set_ = (at >= 0) & new.found
    vectors[at[set_]], updated[at[set_]] = new.vectors[set_], new.updated_ms[set_]
    return index, Rows(vectors, updated, np.ones(len(vectors), bool))


def _joined(key: str, fields: list, raw: list, fill: bytes, size: int,
            coords: bool) -> bytes:
    """The values end to end, ``fill`` for the missing ones; raises naming a bad value."""
    buf = b"".join([fill if v is None else v for v in raw])
    if len(buf) != size * len(raw):
        for f, v in zip(fields, raw, strict=True):
            if v is not None and len(v) != size:
                f = int.from_bytes(f, "little") if coords else f
                raise ModelStoreError(f"{key} field {f!r} holds {len(v)} bytes, its layout "
                                      f"needs {size}")
    return buf


def _decode_vectors(key: str, fields: list, raw: list, layout: _Layout,
                    default) -> np.ndarray:
    size = layout.dtype.itemsize * layout.width
    if default is None:
        fill = bytes(size)
    else:
        fill = np.asarray(default, dtype=layout.dtype).reshape(layout.width).tobytes()
    buf = _joined(key, fields, raw, fill, size, True)
    return np.frombuffer(buf, layout.dtype).reshape(len(raw), layout.width).copy()


def _decode_rows(key: str, fields: list, raw: list, layout: _Layout) -> Rows:
    rec_t = np.dtype([("t", _ROW_HEADER), ("v", layout.dtype, (layout.width,))])
    buf = _joined(key, fields, raw, bytes(rec_t.itemsize), rec_t.itemsize, False)
    rec = np.frombuffer(buf, rec_t)
    found = np.fromiter((v is not None for v in raw), bool, len(raw))
    return Rows(rec["v"].copy(), rec["t"].copy(), found)

