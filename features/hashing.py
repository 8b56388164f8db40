"""The hashing trick: an example (or a scoring request) as the sorted indices of its active
binary features in ``[0, 2**bits)``, index 0 being the bias.

One token per active feature, each hashed with CRC-32 (zlib: the same value in every process,
on every machine, unlike the salted ``hash()``) into ``[1, 2**bits)``:

* ``user_id=u17``, ``item_id=i42`` and ``name=value`` for every key of ``features``;
* crosses, ``user_id^category=u17^c3``, from a tuple of field names each (config is data: a
  field is looked up at the top level first, then in ``features``, as entities are in
  features/spec.py); a cross with a missing field is left out;
* a log bucket (``features.derived.log_bucket``) per counted entity and count feature,
  ``user.imp_5m#3``; a missing ``counts``, entity or feature counts as 0, so a scoring request
  whose entity Redis has never seen hashes like a training example whose count was 0;
* with ``ctr_prior``, a bucket of each entity's smoothed CTR per window relative to the prior.

Values are canonical: ``2``, ``2.0`` and ``"2"`` are the same token, so a value that went
through Parquet or Redis as a float or a string still hits its training-time weight.

>>> h = FeatureHasher(bits=20)
>>> ex = {"user_id": "u17", "item_id": "i42", "label": 1,
...       "features": {"category": "c3", "device": "mobile", "position": 2, "hour": 20},
...       "counts": {"user": {"imp_5m": 3, "clk_5m": 0}}}
>>> x = h.indices(ex)
>>> int(x[0]), len(x), bool((x[1:] > 0).all() and (x[1:] < 2**20).all())
(0, 40, True)
>>> scoring = {"user_id": "u17", "item_id": "i42", "counts": {"user": {"imp_5m": 3.0}},
...            "features": {"category": "c3", "device": "mobile", "position": "2", "hour": 20}}
>>> bool((h.indices(scoring) == x).all())
True
>>> indptr, indices = h.batch([ex, scoring])
>>> indptr.tolist() == [0, 40, 80]
True
"""

from __future__ import annotations

import math
import zlib
from array import array
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter

import numpy as np

from features.derived import BetaPrior, log_bucket
from features.spec import FeatureSpec

DEFAULT_CROSSES = (("user_id", "category"), ("item_id", "position"), ("device", "hour"))
DEFAULT_FIELDS = ("user_id", "item_id")
MAX_BUCKET = 64  # log buckets of counts below 2**64: every count there is
CTR_BUCKETS = 8  # smoothed-CTR buckets: half-octaves of CTR / prior mean, clipped to +-this
MAX_CACHE = 1 << 20  # cached value -> index entries per field; cleared (not evicted) past it
_EMPTY: dict = {}
_BIG = 1 << MAX_BUCKET


def canonical(value) -> str:
    """The token text of a value: integral floats and bools as ints, so 2 == 2.0 == "2"."""
    t = type(value)
    if t is str:
        return value
    if t is float and value.is_integer():
        return str(int(value))
    if t is bool:
        return str(int(value))
    return str(value)


def _bucket(n) -> int:
    """The log bucket of a count given as a float or text (b"3", "3.0"); a value that is no
    number (NaN, "x") raises ValueError for the caller to dead-letter."""
    if type(n) is not int:
        n = int(n) if type(n) is float else int(float(n))
    return min(log_bucket(n), MAX_BUCKET)


class FeatureHasher:
    """Hashes examples to sorted unique feature indices; see the module docstring.

    ``count_features``: a ``FeatureSpec`` hashes its entities and windows (what the
    counters count); True the default spec's; a mapping ``{entity: [count name, ...]}``
    chooses; False hashes no counts. ``ctr_prior`` (a ``BetaPrior``) adds smoothed-CTR
    buckets for each ``imp_<w>``/``clk_<w>`` pair (off by default).
    """

    def __init__(
        self,
        bits: int = 20,
        crosses: Iterable[Sequence[str]] = DEFAULT_CROSSES,
        count_features: FeatureSpec | bool | Mapping[str, Sequence[str]] = True,
        fields: Sequence[str] = DEFAULT_FIELDS,
        ctr_prior: BetaPrior | None = None,
    ):
        if not 1 <= bits <= 32:  # CRC-32 gives 32 bits
            raise ValueError(f"bits must be in 1..32, got {bits}")
        self.bits = bits
        self.size = 1 << bits
        self.fields = tuple(fields)
        self.crosses = tuple(tuple(c) for c in crosses)
        for c in self.crosses:
            if len(c) < 2 or not all(isinstance(f, str) and f for f in c):
                raise ValueError(f"a cross needs at least two field names, got {c!r}")
        if count_features is True:
            count_features = FeatureSpec()
        if isinstance(count_features, FeatureSpec):
            count_features = dict.fromkeys(count_features.entities,
                                           count_features.feature_names())
        elif not count_features:
            count_features = {}
        self.count_features = {e: tuple(names) for e, names in count_features.items()}
        self.ctr_prior = ctr_prior
        # Every count bucket's index, computed once: the hot path is a list lookup.
        self._count_plan = tuple(
            (
                entity,
                tuple(
                    (name, [self._hash(f"{entity}.{name}#{b}") for b in range(MAX_BUCKET + 1)])
                    for name in names
                ),
            )
            for entity, names in self.count_features.items()
        )
        self._ctr_plan = ()
        if ctr_prior is not None:
            self._ctr_plan = tuple(
                (
                    entity,
                    tuple(
                        (
                            name,
                            f"clk_{name[4:]}",
                            [
                                self._hash(f"{entity}.ctr_{name[4:]}#{b}")
                                for b in range(-CTR_BUCKETS, CTR_BUCKETS + 1)
                            ],
                        )
                        for name in names
                        if name.startswith("imp_")
                    ),
                )
                for entity, names in self.count_features.items()
            )
        # The same tables as one array, [count feature, bucket], for batch()'s vector path.
        self._count_table = np.array([t for _, names in self._count_plan for _, t in names],
                                     np.int64).reshape(-1, MAX_BUCKET + 1)
        # flat, with each count feature's first entry: one gather instead of a 2-D one
        self._count_flat = self._count_table.ravel()
        self._count_offsets = np.arange(len(self._count_table)) * (MAX_BUCKET + 1)
        self._count_getters = tuple(
            (entity, itemgetter(*(n for n, _ in names)) if len(names) > 1
             else (lambda d, k=names[0][0]: (d[k],)), tuple(n for n, _ in names))
            for entity, names in self._count_plan)
        self._field_cache: dict[str, dict] = {}
        self._cross_cache: dict[tuple[str, ...], dict] = {c: {} for c in self.crosses}
        self._cross_names = {c: "^".join(c) for c in self.crosses}

    def _hash(self, token: str) -> int:
        # Modulo 2**bits - 1, plus 1: never 0, which is the bias's.
        return zlib.crc32(token.encode()) % (self.size - 1) + 1

    def _field_index(self, name: str, value) -> int:
        cache = self._field_cache.get(name)
        if cache is None:
            cache = self._field_cache[name] = {}
        # Keyed by the raw value: values equal as dict keys (2, 2.0, True == 1) have the same
        # canonical text, so the cache never changes an answer.
        i = cache.get(value)
        if i is None:
            if len(cache) >= MAX_CACHE:
                cache.clear()
            i = cache[value] = self._hash(f"{name}={canonical(value)}")
        return i

    def _raw(self, example: Mapping) -> list[int]:
        """The indices of one example, unsorted, maybe repeated (hash collisions)."""
        out = self._raw_fields(example)
        if self._count_plan:
            counts = example.get("counts") or _EMPTY
            for entity, names in self._count_plan:
                c = counts.get(entity) or _EMPTY
                for name, table in names:
                    n = c.get(name, 0)
                    # log_bucket inlined for ints below 2**64 (the usual case: this runs 30
                    # times an example); anything else (a float, a str from Redis) goes through
                    # it.
                    if type(n) is int and 0 <= n < _BIG:
                        out.append(table[n.bit_length()])
                    else:
                        out.append(table[_bucket(n)])
            if self._ctr_plan:
                self._ctr_indices(counts, out)
        return out

    def _raw_fields(self, example: Mapping) -> list[int]:
        """The bias, field, feature and cross indices of one example (no counts)."""
        out = [0]
        feats = example.get("features") or _EMPTY
        field_index, caches = self._field_index, self._field_cache
        for f in self.fields:
            v = example.get(f)
            if v is not None:
                out.append(field_index(f, v))
        for k, v in feats.items():
            if v is not None:
                # the cache read inline (the common case), field_index on a miss
                c = caches.get(k)
                i = c.get(v) if c is not None else None
                out.append(i if i is not None else field_index(k, v))
        for cross in self.crosses:
            values = []
            for f in cross:
                v = example.get(f)
                if v is None:
                    v = feats.get(f)
                    if v is None:
                        break
                values.append(v)
            else:
                key = tuple(values)
                i = self._cross_cache[cross].get(key)
                out.append(i if i is not None else self._cross_index(cross, key))
        return out

    def _cross_index(self, cross: tuple[str, ...], key: tuple) -> int:
        """The index of ``cross`` with field values ``key``, hashed and cached."""
        cache = self._cross_cache[cross]
        i = cache.get(key)
        if i is None:
            if len(cache) >= MAX_CACHE:
                cache.clear()
            token = "^".join(map(canonical, key))
            i = cache[key] = self._hash(f"{self._cross_names[cross]}={token}")
        return i

    def _field_indices(self, name: str, values: Sequence) -> list[int | None]:
        """``_field_index`` of each value, None for None, the cache read inline."""
        cache = self._field_cache.setdefault(name, {})
        field_index = self._field_index
        return [None if v is None else i if (i := cache.get(v)) is not None
                else field_index(name, v) for v in values]

    def request_batch(self, user_id: str, item_ids: Sequence[str],
                      item_features: Sequence[Mapping], context: Mapping, counts: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
        """``batch`` of a scoring request's examples, ``{"user_id": user_id, "item_id": item,
        "features": {**item_features[k], **context}, "counts": ...}`` for each item, with
        ``counts`` as ``count_values`` gives them (not None): the same CSR, but what every
        example shares (the bias, the user, the context and the crosses of those alone) is
        hashed once, not once an item. The ids are strings; not for a hasher with
        ``ctr_prior``."""
        if self._ctr_plan:
            raise ValueError("request_batch reads counts as a matrix: no ctr_prior")
        field_index = self._field_index
        shared = [0]
        if "user_id" in self.fields:
            shared.append(field_index("user_id", user_id))
        shared += [field_index(k, v) for k, v in context.items() if v is not None]
        own = []  # the crosses of an item's fields: (cross, its cache, each field's source)
        for cross in self.crosses:
            # a field's value, as _raw_fields looks it up: (0, the request's), (1, the item
            # id) or (2, the item's attribute of that name)
            src = [(0, user_id) if f == "user_id" else (1, None) if f == "item_id" else
                   (0, context[f]) if f in context else (2, f) for f in cross]
            if any(kind == 0 and v is None for kind, v in src):
                continue  # a field the request lacks: no example has the cross
            if all(kind == 0 for kind, _ in src):
                shared.append(self._cross_index(cross, tuple(v for _, v in src)))
            else:
                own.append((cross, self._cross_cache[cross], src))
        # Column by column (one list per field, attribute or cross; None where an item has
        # none), each column one comprehension: 4x faster than a loop over the items.
        m = len(item_ids)
        columns = []
        if "item_id" in self.fields:
            columns.append(self._field_indices("item_id", item_ids))
        distinct = {id(a): a for a in item_features}.values()  # the catalog's, shared
        for k in dict.fromkeys(k for a in distinct for k in a if k not in context):
            columns.append(self._field_indices(k, [a.get(k) for a in item_features]))
        for cross, cache, src in own:
            values = [[v] * m if kind == 0 else item_ids if kind == 1 else
                      [a.get(v) for a in item_features] for kind, v in src]
            columns.append([None if None in key else i if (i := cache.get(key)) is not None
                            else self._cross_index(cross, key)
                            for key in zip(*values, strict=True)])
        try:  # rows of one length, item by item
            flat = np.array(columns, np.int64).reshape(len(columns), m).T.ravel()
            lengths = [len(columns)] * m
        except TypeError:  # a None: an item lacks an attribute
            rows = [[i for i in row if i is not None] for row in zip(*columns, strict=True)]
            flat, lengths = [i for row in rows for i in row], [len(row) for row in rows]
        return self._csr(flat, lengths, counts, shared)

    def count_values(self, examples: Sequence[Mapping]) -> np.ndarray | None:
        """The counts this hasher reads, int64 [examples, count features] (entity by entity,
        missing ones 0), or None unless every one is an int in [0, 2**53) (a float or a
        string from Redis, a negative count): then each example is hashed on its own.
        ``batch`` takes it, and the embedding model's dense input reads the same matrix, so
        a batch's counts are read from the dicts once for all models."""
        if not self._count_plan:
            return None
        vals: list = []
        for ex in examples:
            counts = ex.get("counts") or _EMPTY
            for entity, getter, names in self._count_getters:
                c = counts.get(entity)
                if not c:
                    vals.extend((0,) * len(names))
                    continue
                try:
                    vals.extend(getter(c))
                except KeyError:
                    vals.extend([c.get(k, 0) for k in names])
        try:  # array("q") takes ints (bools too, as _raw does) and refuses anything else
            a = np.frombuffer(array("q", vals), np.int64)
        except (TypeError, OverflowError):
            return None
        if a.size and (a.min() < 0 or a.max() >= 1 << 53):
            return None
        return a.reshape(len(examples), len(self._count_table))

    def _ctr_indices(self, counts: Mapping, out: list[int]) -> None:
        prior = self.ctr_prior
        for entity, pairs in self._ctr_plan:
            c = counts.get(entity) or _EMPTY
            for imp_name, clk_name, table in pairs:
                ratio = (
                    prior.smoothed_ctr(float(c.get(clk_name, 0)), float(c.get(imp_name, 0)))
                    / prior.mean
                )
                # Half-octave buckets: 0 at the prior, +-1 at 1.41x / 0.71x, ...
                b = max(-CTR_BUCKETS, min(CTR_BUCKETS, round(2 * math.log2(ratio))))
                out.append(table[b + CTR_BUCKETS])

    def indices(self, example: Mapping) -> np.ndarray:
        """Sorted unique int64 indices, 0 (the bias) first."""
        return np.array(sorted(set(self._raw(example))), dtype=np.int64)

    def batch(self, examples: Iterable[Mapping], counts: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr, indices)``, CSR style: example k's indices are
        ``indices[indptr[k]:indptr[k + 1]]``, each row as ``indices()`` gives it.
        ``counts``: ``count_values(examples)``, if read already.

        Counts (30 of ~40 indices an example) are bucketed as one array, and the rows sorted
        and deduplicated as one array too: the per-example loop was a third of the learn
        path's time."""
        examples = examples if isinstance(examples, list) else list(examples)
        if counts is None and self._count_plan and not self._ctr_plan:
            counts = self.count_values(examples)
        if counts is not None and not self._ctr_plan:
            return self._batch_vector(examples, counts)
        flat: list[int] = []
        indptr = [0]
        raw = self._raw
        for ex in examples:
            flat.extend(sorted(set(raw(ex))))
            indptr.append(len(flat))
        return np.array(indptr, dtype=np.int64), np.array(flat, dtype=np.int64)

    def _batch_vector(self, examples: list[Mapping], counts: np.ndarray):
        flat: list[int] = []
        lengths: list[int] = []
        raw = self._raw_fields
        for ex in examples:
            r = raw(ex)
            flat.extend(r)
            lengths.append(len(r))
        return self._csr(flat, lengths, counts)

    def _csr(self, flat: list[int], lengths: list[int], counts: np.ndarray,
             shared: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The CSR of rows of ``lengths[k]`` indices from ``flat``, plus ``shared`` in every
        row, plus the count buckets of ``counts``, sorted and deduplicated within each row."""
        n, j = counts.shape
        # bit_length of each count: frexp's exponent, exact below 2**53
        buckets = np.minimum(np.frexp(counts.astype(np.float64))[1], MAX_BUCKET)
        counted = self._count_flat[buckets + self._count_offsets[:j]]
        own = np.array(flat, np.int64)
        if n and len(own) == n * lengths[0] and min(lengths) == max(lengths):
            # rows of one length (the usual case): sorted as rows, no row keys
            rows = np.sort(np.concatenate([own.reshape(n, -1), counted, np.broadcast_to(
                np.array(shared, np.int64), (n, len(shared)))], axis=1), axis=1)
            if not (rows[:, 1:] == rows[:, :-1]).any():  # no collision within a row
                width = rows.shape[1]
                return np.arange(0, n * width + 1, width, dtype=np.int64), rows.ravel()
        at = np.arange(n, dtype=np.int64)
        idx = np.concatenate([own, counted.ravel(), np.tile(np.array(shared, np.int64), n)])
        rows = np.concatenate([np.repeat(at, lengths), np.repeat(at, j),
                               np.repeat(at, len(shared))])
        key = np.sort((rows << 32) | idx)  # by row, then index; indices are below 2**32
        if len(key):
            key = key[np.concatenate([[True], key[1:] != key[:-1]])]  # np.unique, 3x slower
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(key >> 32, minlength=n), out=indptr[1:])
        return indptr, key & 0xFFFFFFFF
