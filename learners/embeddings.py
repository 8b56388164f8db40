"""Torch CTR model with user and item ID embeddings, learned online in micro-batches.

logit = dense(x) + <u, v> + b_u + b_v, where ``x`` is a small fixed-size vector from the
example's context and real-time counts (``dense_features``: the counts of the entities and
count names the learner was made with, ``count_entities``/``count_names``, which a
``FeatureSpec`` gives; the default spec's by default), and each user and item row holds a
vector and a bias: ``dim + 1`` floats, the bias last. Item rows serve retrieval as they are
(query ``[u, 1]`` against ``[v, b_v]``).

Online (``learn_batch``) a micro-batch updates the embedding rows it touches, with sparse
Adagrad on the gathered rows, and the dense block (bias, context, counts), with Adagrad every
step: frozen, the dense part left the model a constant plus row terms between retrains, and
position, hour and device effects went into whatever rows happened to see them (NE 0.9651,
calibration 0.88 on the 3-day stream of bench/learners.py). ``train_epoch`` (the daily
retrain) trains the same parameters over a shuffled day. Rows changed since the last push are
tracked by key for incremental publishing (``pop_dirty``), the dense block goes with every
push after a step; evicted rows are pushed as deletions.

A scorer that reads rows from Redis computes the learner's p with the same two functions:
``dense_features`` (with the learner's count entities and names) and ``score_vectors``; an
ID without a row of its own is read from its fallback row, ``serving_keys(id, fallback_rows)``
names both keys.

>>> learner = EmbeddingLearner(dim=4, min_count=1, fallback_rows=8)
>>> ex = {"impression_id": "a", "ts": 1_000, "user_id": "u1", "item_id": "i1",
...       "features": {"device": "mobile", "position": 2, "hour": 20}, "label": 1}
>>> first = learner.pop_dirty()  # a new model: all its rows (the fallback rows) and dense
>>> first["item"].full, len(first["item"].ids), first["dense"].shape
(True, 8, (105,))
>>> learner.learn_batch([ex])["examples"]
1
>>> push = learner.pop_dirty()["item"]
>>> push.ids, push.vectors.shape, push.full
(['i1'], (1, 5), False)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np
import orjson
import torch
import torch.nn.functional as F
from torch import nn

from features.spec import FeatureSpec
from joiner.events import why_not_learnable

FORMAT_VERSION = 1
_MAGIC = b"ctrstream-emb\x00"
DAY_MS = 86_400_000

# Context features: (name, buckets, how). "clamp" and "mod" read integers (position 0..9 with
# the tail lumped together, hour of day); "hash" and any non-integer value go through crc32,
# which unlike hash() is the same in every process, so a scorer builds the same x.
CONTEXT_FEATURES = (("device", 8, "hash"), ("position", 10, "clamp"), ("hour", 24, "mod"),
                    ("category", 32, "hash"))
# The default spec's counts: what a learner made without count_entities/count_names reads.
COUNT_ENTITIES = tuple(FeatureSpec().entities)
COUNT_NAMES = tuple(FeatureSpec().feature_names())
_N_CONTEXT = sum(n for _, n, _ in CONTEXT_FEATURES)
DENSE_DIM = _N_CONTEXT + len(COUNT_ENTITIES) * len(COUNT_NAMES)  # with the default counts
# (name, first column, buckets, how, value -> column cache): the crc32 of a value once, not
# per example. Bounded: past the cap new values are computed each time.
_CONTEXT_COLUMNS = tuple((name, sum(c[1] for c in CONTEXT_FEATURES[:i]), n, how, {})
                         for i, (name, n, how) in enumerate(CONTEXT_FEATURES))

FALLBACK_PREFIX = "\x00fallback:"
_FREE = np.iinfo(np.int64).max  # last_seen of a free slot: never older than any cut
_NEVER = np.iinfo(np.int64).min


def dense_names(count_entities: Sequence[str] = COUNT_ENTITIES,
                count_names: Sequence[str] = COUNT_NAMES) -> list[str]:
    """Name of each column of ``dense_features``."""
    names = [f"{name}#{i}" for name, n, _ in CONTEXT_FEATURES for i in range(n)]
    return names + [f"log1p:{e}.{c}" for e in count_entities for c in count_names]


def dense_dim(count_entities: Sequence[str] = COUNT_ENTITIES,
              count_names: Sequence[str] = COUNT_NAMES) -> int:
    return _N_CONTEXT + len(count_entities) * len(count_names)


def _bucket(name: str, value: Any, n: int, how: str) -> int:
    # 2, 2.0 and "2" are one value (as in features/hashing.py): a value that went through
    # Parquet or Redis as a float or a string still lands in its training-time bucket.
    if (i := _as_int(value)) is not None:
        if how != "hash":
            return min(max(i, 0), n - 1) if how == "clamp" else i % n
        value = i
    return zlib.crc32(f"{name}={value}".encode()) % n


def _as_int(value: Any) -> int | None:
    if isinstance(value, int):
        return int(value)  # True -> 1
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.removeprefix("-").isdecimal():
        return int(value)
    return None


def dense_features(examples: Sequence[Mapping], count_entities: Sequence[str] = COUNT_ENTITIES,
                   count_names: Sequence[str] = COUNT_NAMES, counts: np.ndarray | None = None
                   ) -> np.ndarray:
    """The dense input of each example, float32 [n, dense_dim]: one-hot context buckets, then
    log1p of each count named, entity by entity (missing entities or counts are 0; negative
    or non-numeric ones too). ``counts``: those counts as a matrix in that order, if read
    already (``FeatureHasher.count_values``)."""
    n, per_entity = len(examples), len(count_names)
    out = np.zeros((n, dense_dim(count_entities, count_names)), np.float32)
    zeros = (0,) * per_entity
    get_counts = (itemgetter(*count_names) if per_entity > 1  # one name: no tuple from it
                  else lambda d: (d[count_names[0]],))
    hot_r: list[int] = []
    hot_c: list[int] = []
    given, counts = counts, []
    for r, e in enumerate(examples):
        f = e.get("features")
        if f:
            for name, off, size, how, cache in _CONTEXT_COLUMNS:
                v = f.get(name)
                if v is not None:
                    try:
                        col = cache.get(v)
                    except TypeError:  # unhashable: not in the contract, still no crash
                        col = None
                    if col is None:
                        col = off + _bucket(name, v, size, how)
                        # 1, 1.0 and True are one key here, and share a bucket too.
                        if len(cache) < 100_000 and isinstance(v, str | int | float):
                            cache[v] = col
                    hot_r.append(r)
                    hot_c.append(col)
        if given is not None:
            continue
        c = e.get("counts") or {}
        for ent in count_entities:
            d = c.get(ent)
            if not d:
                counts.extend(zeros)
                continue
            try:
                counts.extend(get_counts(d))  # the common case: all present
            except KeyError:
                counts.extend([d.get(k, 0) for k in count_names])
    out[hot_r, hot_c] = 1.0
    if given is not None:
        out[:, _N_CONTEXT:] = np.log1p(np.maximum(given, 0))
        return out
    try:
        vals = np.array(counts, np.float64)
    except (TypeError, ValueError):  # a stray string or None: only that value becomes 0
        vals = np.array([_num(v) for v in counts], np.float64)
    vals = np.nan_to_num(np.maximum(vals, 0.0), nan=0.0, posinf=0.0)
    out[:, _N_CONTEXT:] = np.log1p(vals).reshape(n, len(count_entities) * per_entity)
    return out


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


def score_vectors(user_vecs: np.ndarray, item_vecs: np.ndarray, x_dense: np.ndarray,
                  dense_weights: np.ndarray) -> np.ndarray:
    """p for each row: the one scoring function of learner and scorer (float64 math).

    ``user_vecs``/``item_vecs`` are rows as pushed ([n, dim + 1], bias last), ``x_dense`` is
    ``dense_features(examples, ...)`` and ``dense_weights`` is
    ``EmbeddingLearner.dense_weights()`` (the dense weights, then the bias)."""
    u = np.asarray(user_vecs, np.float64)
    v = np.asarray(item_vecs, np.float64)
    w = np.asarray(dense_weights, np.float64)
    z = np.asarray(x_dense, np.float64) @ w[:-1] + w[-1]
    z += (u[:, :-1] * v[:, :-1]).sum(axis=1) + u[:, -1] + v[:, -1]
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow


def fallback_key(row: int) -> str:
    """Key of shared fallback row ``row`` (a NUL-prefixed name no ordinary ID uses)."""
    return f"{FALLBACK_PREFIX}{row}"


def serving_keys(id_: Any, fallback_rows: int) -> tuple[str, str]:
    """The keys a scorer reads for an ID: its own row's, and the fallback row's to use when the
    own row is absent (never promoted, or evicted and its deletion pushed)."""
    key = _key(id_)
    return key, fallback_key(zlib.crc32(key.encode()) % fallback_rows)


def _key(id_: Any) -> str:
    return "" if id_ is None else str(id_)


class RowPush(NamedTuple):
    """Rows to publish: with ``full`` the ids are every live row and anything else stored is
    stale; otherwise the rows changed and the rows deleted since the previous push."""
    ids: list[str]
    vectors: np.ndarray  # float32 [len(ids), dim + 1]
    updated_ms: np.ndarray  # int64 [len(ids)]: event time each row was last seen
    deleted_ids: list[str]
    full: bool


class EmbeddingTable:
    """String IDs -> rows of a float32 tensor, with a frequency filter, event-time eviction and
    dirty-row tracking.

    Rows ``0..fallback_rows-1`` are shared fallback rows, keyed ``fallback_key(i)``; an ID uses
    ``crc32(id) % fallback_rows`` until its ``min_count``-th sighting, which gives it its own row,
    initialised as a copy of that fallback row (so its score does not jump) and used from that
    example on. Sightings of row-less IDs are counted in ``pending``; past ``max_pending``
    entries the oldest-inserted half is forgotten (those IDs start counting again).

    Capacity doubles as needed. With ``max_rows`` set, at most that many own rows are live;
    when full, new IDs stay on their fallback rows (``counters["full"]`` counts them): a
    stream never stops on a full table, and ``evict`` frees rows.

    Dirty tracking is by key, not row, since an evicted row can be reused before the next push:
    the evicted ID becomes a deletion, the new one a change. More than ``max_dirty`` pending
    keys set ``full_due`` and the next push is a full one, never a silently dropped change. A
    new table starts with ``full_due`` too: its first push carries every fallback row, which a
    scorer needs before any of them is touched.
    """

    def __init__(self, dim: int = 16, min_count: int = 2, fallback_rows: int = 1024,
                 evict_after_ms: int = 7 * DAY_MS, max_dirty: int = 100_000,
                 max_rows: int | None = None, max_pending: int = 1_000_000,
                 init_std: float = 0.05, initial_accumulator: float = 1.0, seed: int = 0,
                 initial_capacity: int = 1024) -> None:
        if dim < 1 or min_count < 1 or fallback_rows < 1 or max_dirty < 1 or max_pending < 1:
            raise ValueError("dim, min_count, fallback_rows, max_dirty, max_pending must be >= 1")
        self.dim, self.width = dim, dim + 1
        self.min_count, self.fallback_rows = min_count, fallback_rows
        self.evict_after_ms, self.max_dirty = evict_after_ms, max_dirty
        self.max_rows, self.max_pending = max_rows, max_pending
        self.initial_accumulator = initial_accumulator
        nf = fallback_rows
        cap = nf + max(1, initial_capacity)
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.zeros(cap, self.width)
        self.weight[:nf, :dim] = torch.randn(nf, dim, generator=g) * init_std
        self.acc = torch.full((cap, self.width), initial_accumulator)  # Adagrad sums of g^2
        self.last_seen = np.full(cap, _FREE, np.int64)
        self.last_seen[:nf] = 0
        self.keys: list[str | None] = [fallback_key(i) for i in range(nf)] + [None] * (cap - nf)
        self.index: dict[str, int] = {k: i for i, k in enumerate(self.keys[:nf])}
        self.free: list[int] = list(range(cap - 1, nf - 1, -1))  # pop() -> lowest row
        self.pending: dict[str, int] = {}
        self.dirty: dict[str, None] = {}  # ordered sets: pushes come out in a stable order
        self.deleted: dict[str, None] = {}
        self.full_due = True
        self.counters = {"promoted": 0, "evicted": 0, "pending_pruned": 0, "full": 0,
                         "overflows": 0}

    def __len__(self) -> int:
        """Live own rows (fallback rows not included)."""
        return len(self.index) - self.fallback_rows

    def fallback_row(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.fallback_rows

    def lookup(self, ids: Iterable[Any]) -> np.ndarray:
        """Rows for ``ids`` without counting a sighting (for prediction)."""
        idx = self.index
        return np.fromiter(((r if (r := idx.get(k := _key(i))) is not None
                             else self.fallback_row(k)) for i in ids), np.int64)

    def observe(self, ids: Sequence[Any], ts: Sequence[int]) -> np.ndarray:
        """Rows for ``ids``, counting each as a sighting at event time ``ts`` (promoting IDs
        that reach ``min_count``); last_seen of each row becomes the latest ts seen."""
        idx, pend, mc = self.index, self.pending, self.min_count
        rows = np.empty(len(ids), np.int64)
        new: list[int] = []
        for j, i in enumerate(ids):
            r = idx.get(k := _key(i))
            if r is None:
                c = pend.get(k, 0) + 1
                if c >= mc and (r := self._allocate(k)) is not None:
                    pend.pop(k, None)
                    new.append(r)
                else:
                    pend[k] = min(c, mc)
                    r = self.fallback_row(k)
            rows[j] = r
        if new:  # a new row starts as a copy of its fallback row: one copy for all of them
            src = [self.fallback_row(self.keys[r]) for r in new]
            with torch.no_grad():
                self.weight[new] = self.weight[src]
                self.acc[new] = self.initial_accumulator
        if len(rows):
            np.maximum.at(self.last_seen, rows, np.asarray(ts, np.int64))
        if len(pend) > self.max_pending:
            drop = list(islice(pend, len(pend) - self.max_pending // 2))
            for k in drop:
                del pend[k]
            self.counters["pending_pruned"] += len(drop)
        return rows

    def _allocate(self, key: str) -> int | None:
        if self.max_rows is not None and len(self) >= self.max_rows:
            self.counters["full"] += 1
            return None
        if not self.free:
            self._grow()
        r = self.free.pop()
        self.last_seen[r] = _NEVER  # observe() raises it to the sighting's ts
        self.keys[r] = key
        self.index[key] = r
        self.counters["promoted"] += 1
        self.deleted.pop(key, None)
        # Dirty at once: from now on the scorer must read this row, not the fallback row.
        self._mark(key)
        return r

    def _grow(self) -> None:
        old = len(self.keys)
        extra = old - self.fallback_rows
        self.weight = torch.cat([self.weight, torch.zeros(extra, self.width)])
        self.acc = torch.cat([self.acc, torch.full((extra, self.width),
                                                   self.initial_accumulator)])
        self.last_seen = np.concatenate([self.last_seen, np.full(extra, _FREE, np.int64)])
        self.keys.extend([None] * extra)
        self.free = list(range(old + extra - 1, old - 1, -1)) + self.free

    def apply_adagrad(self, rows: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """One Adagrad step on ``rows`` (unique) only; the rest of the table is not written.

        The step divides by the accumulator as it was before this gradient, which is added
        after: dividing by one that already holds this step's g^2 shrinks a rare large
        gradient (a click, 1 - p) more than the many small ones (p), so a row's bias settled
        below its rate (calibration 0.88 on the 3-day stream). The accumulator's initial
        value bounds the first steps."""
        with torch.no_grad():
            acc = self.acc[rows]
            self.weight[rows] = self.weight[rows] - lr * grad / acc.sqrt()
            self.acc[rows] = acc + grad * grad
        self.mark_dirty(rows.tolist())

    def mark_dirty(self, rows: Iterable[int]) -> None:
        if self.full_due:
            return
        keys = self.keys
        for r in rows:
            self.dirty[keys[r]] = None
        self._check_overflow()

    def _mark(self, key: str) -> None:
        if not self.full_due:
            self.dirty[key] = None
            self._check_overflow()

    def _check_overflow(self) -> None:
        if len(self.dirty) + len(self.deleted) > self.max_dirty:
            self.full_due = True
            self.counters["overflows"] += 1
            self.dirty.clear()
            self.deleted.clear()

    def evict(self, now_ms: int) -> list[str]:
        """Free the own rows last seen before ``now_ms - evict_after_ms`` (event time); their
        IDs become deletions for the next push and start counting sightings anew."""
        nf = self.fallback_rows
        rows = np.flatnonzero(self.last_seen[nf:] < now_ms - self.evict_after_ms) + nf
        out = []
        for r in rows.tolist():
            key = self.keys[r]
            out.append(key)
            del self.index[key]
            self.keys[r] = None
            self.free.append(r)
            self.dirty.pop(key, None)
            if not self.full_due:
                self.deleted[key] = None
        self.last_seen[rows] = _FREE
        self.counters["evicted"] += len(out)
        self._check_overflow()
        return out

    def pop_dirty(self) -> RowPush:
        """The rows to publish since the previous call, and reset the tracking."""
        if self.full_due:
            rows = np.flatnonzero(self.last_seen != _FREE)
            ids = [self.keys[r] for r in rows.tolist()]
            deleted: list[str] = []
        else:
            ids = list(self.dirty)
            rows = np.fromiter((self.index[k] for k in ids), np.int64, len(ids))
            deleted = list(self.deleted)
        push = RowPush(ids, self.weight[torch.from_numpy(rows)].numpy().copy(),
                       self.last_seen[rows].copy(), deleted, self.full_due)
        self.dirty, self.deleted, self.full_due = {}, {}, False
        return push

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.weight[torch.from_numpy(np.asarray(rows, np.int64))].numpy()

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(plain data, tensors): what ``EmbeddingLearner.to_bytes`` stores."""
        meta = {"keys": list(self.keys), "free": list(self.free),
                "pending_keys": list(self.pending), "pending_counts": list(self.pending.values()),
                "dirty": list(self.dirty), "deleted": list(self.deleted),
                "full_due": self.full_due, "counters": dict(self.counters)}
        return meta, {"weight": self.weight, "acc": self.acc,
                      "last_seen": torch.from_numpy(self.last_seen)}

    def load_state(self, meta: Mapping, tensors: Mapping[str, torch.Tensor]) -> None:
        self.weight, self.acc = tensors["weight"].clone(), tensors["acc"].clone()
        self.last_seen = tensors["last_seen"].numpy().copy()
        self.keys, self.free = list(meta["keys"]), list(meta["free"])
        self.index = {k: r for r, k in enumerate(self.keys) if k is not None}
        self.pending = dict(zip(meta["pending_keys"], meta["pending_counts"], strict=True))
        self.dirty = dict.fromkeys(meta["dirty"])
        self.deleted = dict.fromkeys(meta["deleted"])
        self.full_due = bool(meta["full_due"])
        self.counters = dict(meta["counters"])


class CTRModel(nn.Module):
    """logit = dense(x) + <u, v> + b_u + b_v, for gathered rows ``u``/``v`` ([n, dim + 1],
    bias last). The embedding tables live outside the module: they grow, shrink and carry
    ID maps, which a fixed-shape ``nn.Embedding`` does not."""

    def __init__(self, dense_dim: int = DENSE_DIM) -> None:
        super().__init__()
        self.dense = nn.Linear(dense_dim, 1)
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (self.dense(x).squeeze(-1) + (u[:, :-1] * v[:, :-1]).sum(-1)
                + u[:, -1] + v[:, -1])


def _learnable(examples: Sequence[Mapping]) -> list[Mapping]:
    # The rule costs ~7 us an example (30 counts checked): callers that applied it pass
    # checked=True rather than pay it twice.
    return [e for e in examples if why_not_learnable(e) is None]


def _labels_weights(examples: Sequence[Mapping]) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels, and weights 1/sample_rate on negatives that carry a sample rate (negative
    downsampling): weighted, p stays calibrated, so nothing is recalibrated afterwards."""
    y = [1.0 if e["label"] else 0.0 for e in examples]
    w = [1.0 / r if not yi and isinstance(r := e.get("sample_rate"), int | float) and 0 < r < 1
         else 1.0 for e, yi in zip(examples, y, strict=True)]
    return torch.tensor(y), torch.tensor(w)


class EmbeddingLearner:
    """Online learner for ``CTRModel``: ``learn_batch`` updates touched rows only,
    ``train_epoch`` (daily retrain) trains everything, ``pop_dirty`` returns rows to publish.

    ``lr``/``dense_lr`` are Adagrad step sizes for rows and for the dense part. ``prior_ctr``
    sets the initial dense bias, so a model that has not been retrained yet starts calibrated
    on average. Everything random comes from ``seed`` (torch and numpy generators of its own,
    the global RNGs are not touched): the same calls give bit-identical state.
    """

    def __init__(self, dim: int = 16, min_count: int = 2, fallback_rows: int = 1024,
                 evict_after_ms: int = 7 * DAY_MS, lr: float = 0.2, dense_lr: float = 0.05,
                 max_dirty: int = 100_000, max_rows: int | None = None,
                 max_pending: int = 1_000_000, init_std: float = 0.05,
                 prior_ctr: float = 0.03, seed: int = 0,
                 count_entities: Sequence[str] = COUNT_ENTITIES,
                 count_names: Sequence[str] = COUNT_NAMES,
                 initial_accumulator: float = 1.0) -> None:
        self.count_entities, self.count_names = tuple(count_entities), tuple(count_names)
        self.config = {"dim": dim, "min_count": min_count, "fallback_rows": fallback_rows,
                       "evict_after_ms": evict_after_ms, "lr": lr, "dense_lr": dense_lr,
                       "max_dirty": max_dirty, "max_rows": max_rows,
                       "max_pending": max_pending, "init_std": init_std,
                       "prior_ctr": prior_ctr, "seed": seed,
                       "count_entities": list(self.count_entities),
                       "count_names": list(self.count_names),
                       "initial_accumulator": initial_accumulator}
        self.lr, self.dense_lr = lr, dense_lr
        kw = {"dim": dim, "min_count": min_count, "fallback_rows": fallback_rows,
              "evict_after_ms": evict_after_ms, "max_dirty": max_dirty, "max_rows": max_rows,
              "max_pending": max_pending, "init_std": init_std,
              "initial_accumulator": initial_accumulator}
        self.users = EmbeddingTable(seed=seed, **kw)
        self.items = EmbeddingTable(seed=seed + 1, **kw)
        self.model = CTRModel(dense_dim(self.count_entities, self.count_names))
        with torch.no_grad():
            self.model.dense.bias.fill_(math.log(prior_ctr / (1 - prior_ctr)))
        # Adagrad by hand for the dense part too: its state is two tensors, stored like the rest.
        self.dense_acc = {k: torch.full_like(p, 0.1) for k, p in self.model.named_parameters()}
        self.dense_version = 0  # +1 per train_epoch
        self._dense_pushed = -1
        self._dense_changed = False  # by an online step since the last pop_dirty
        self.max_ts = 0
        self.counters = {"learned": 0, "skipped": 0, "batches": 0, "retrained": 0}

    @property
    def tables(self) -> dict[str, EmbeddingTable]:
        return {"user": self.users, "item": self.items}

    def dense_features(self, examples: Sequence[Mapping], counts: np.ndarray | None = None
                       ) -> np.ndarray:
        """``dense_features`` with this learner's counts."""
        return dense_features(examples, self.count_entities, self.count_names, counts)

    # -- learning ---------------------------------------------------------------------------

    def _step(self, examples: Sequence[Mapping], ru: np.ndarray, ri: np.ndarray,
              x: np.ndarray | None = None, dense: bool = True,
              lr: float | None = None) -> tuple[float, int]:
        x = torch.from_numpy(self.dense_features(examples) if x is None else x)
        y, w = _labels_weights(examples)
        uu, inv_u = np.unique(ru, return_inverse=True)
        ui, inv_i = np.unique(ri, return_inverse=True)
        uu_t, ui_t = torch.from_numpy(uu), torch.from_numpy(ui)
        inv_u_t, inv_i_t = torch.from_numpy(inv_u), torch.from_numpy(inv_i)
        # Gradients by hand (autograd cost as much as the rest of the step): the logit is
        # linear in each part, so d loss / d part is g = weight (p - y) times its input.
        with torch.no_grad():
            ru_w, ri_w = self.users.weight[uu_t], self.items.weight[ui_t]
            u, v = ru_w[inv_u_t], ri_w[inv_i_t]
            logit = self.model(x, u, v)
            # Summed, not averaged: a row's step does not depend on how many other rows
            # share the batch.
            loss = F.binary_cross_entropy_with_logits(logit, y, weight=w, reduction="sum")
            g = (w * (torch.sigmoid(logit) - y))[:, None]
            # Each row's gradient summed over the examples that share it.
            grad_u = torch.zeros_like(ru_w).index_add_(0, inv_u_t,
                                                       torch.cat([g * v[:, :-1], g], 1))
            grad_i = torch.zeros_like(ri_w).index_add_(0, inv_i_t,
                                                       torch.cat([g * u[:, :-1], g], 1))
            # The dense block (every example has a bias and context) moves every step, with
            # Adagrad on the batch's summed gradient; rows with sparse Adagrad, touched only.
            d = self.model.dense
            for k, p, grad in ((("dense.weight", d.weight, g.T @ x),
                                ("dense.bias", d.bias, g.sum(0))) if dense else ()):
                acc = self.dense_acc[k]
                acc += grad * grad
                p -= self.dense_lr * grad / acc.sqrt()
        self._dense_changed = self._dense_changed or dense
        self.users.apply_adagrad(uu_t, grad_u, self.lr if lr is None else lr)
        self.items.apply_adagrad(ui_t, grad_i, self.lr if lr is None else lr)
        return loss.item(), len(uu) + len(ui)

    def _ids_ts(self, examples: Sequence[Mapping]) -> tuple[list, list, list[int]]:
        ts = [_as_int(e.get("ts")) or 0 for e in examples]  # a bad ts is not worth a crash
        if ts:
            self.max_ts = max(self.max_ts, max(ts))
        return [e.get("user_id") for e in examples], [e.get("item_id") for e in examples], ts

    def learn_batch(self, examples: Sequence[Mapping], checked: bool = False,
                    x: np.ndarray | None = None) -> dict[str, float]:
        """One online step on a micro-batch: the rows of its users and items and the dense
        block change. Examples ``joiner.events.why_not_learnable`` refuses are skipped
        (``checked``: the caller has applied it already; only then may ``x``, the examples'
        ``dense_features`` computed for their prediction, be passed). Returns {"examples",
        "skipped", "rows" (rows updated), "loss" (mean log loss before the step)}."""
        batch = list(examples) if checked else _learnable(examples)
        skipped = len(examples) - len(batch)
        self.counters["skipped"] += skipped
        if not batch:
            return {"examples": 0, "skipped": skipped, "rows": 0, "loss": 0.0}
        users, items, ts = self._ids_ts(batch)
        loss, rows = self._step(batch, self.users.observe(users, ts),
                                self.items.observe(items, ts), x if checked else None)
        self.counters["learned"] += len(batch)
        self.counters["batches"] += 1
        return {"examples": len(batch), "skipped": skipped, "rows": rows,
                "loss": loss / len(batch)}

    def learn_rows(self, examples: Sequence[Mapping], lr_scale: float = 1.0) -> int:
        """A step on the rows of ``examples`` (learnable ones, as `learn_batch` with
        ``checked``) at ``lr_scale`` times the row step size: the dense block and its
        accumulators stay as they are, and the sightings are not counted again (a second
        pass over examples already learned; ids never seen use their fallback rows).
        Returns the rows updated."""
        if not examples:
            return 0
        users, items, _ = self._ids_ts(examples)
        _, rows = self._step(examples, self.users.lookup(users), self.items.lookup(items),
                             dense=False, lr=self.lr * lr_scale)
        return rows

    def train_epoch(self, examples: Sequence[Mapping], batch_size: int = 512,
                    shuffle_seed: int = 0, observe: bool = True, checked: bool = False
                    ) -> dict[str, float]:
        """One pass over ``examples`` in a seeded shuffled order, training dense weights and
        rows. With ``observe`` all sightings are counted first, so an ID frequent in the data
        learns in its own row from its first example; pass ``observe=False`` for further
        epochs over the same examples (else each epoch counts as new sightings). ``checked``
        as for `learn_batch`."""
        batch = list(examples) if checked else _learnable(examples)
        if not batch:
            return {"examples": 0, "batches": 0, "loss": 0.0}
        users, items, ts = self._ids_ts(batch)
        if observe:
            self.users.observe(users, ts)
            self.items.observe(items, ts)
        ru, ri = self.users.lookup(users), self.items.lookup(items)
        order = np.random.default_rng(shuffle_seed).permutation(len(batch))
        total, nb = 0.0, 0
        for s in range(0, len(batch), batch_size):
            idx = order[s:s + batch_size]
            loss, _ = self._step([batch[i] for i in idx], ru[idx], ri[idx])
            total += loss
            nb += 1
        self.dense_version += 1
        self.counters["retrained"] += len(batch)
        return {"examples": len(batch), "batches": nb, "loss": total / len(batch)}

    # -- prediction and publishing -----------------------------------------------------------

    def dense_weights(self) -> np.ndarray:
        """float32 [dense_dim + 1]: the dense weights, then the bias (for ``score_vectors``)."""
        d = self.model.dense
        return torch.cat([d.weight.detach().reshape(-1), d.bias.detach()]).numpy().copy()

    def predict_batch(self, examples: Sequence[Mapping], x: np.ndarray | None = None
                      ) -> np.ndarray:
        """p for each example (float64), through ``score_vectors`` exactly as a scorer would
        (``x``: their ``dense_features``, if computed already)."""
        if not examples:
            return np.zeros(0)
        u = self.users.vectors(self.users.lookup(e.get("user_id") for e in examples))
        v = self.items.vectors(self.items.lookup(e.get("item_id") for e in examples))
        x = self.dense_features(examples) if x is None else x
        return score_vectors(u, v, x, self.dense_weights())

    def evict(self, now_ms: int | None = None) -> dict[str, list[str]]:
        """Evict rows unseen for ``evict_after_ms`` before ``now_ms`` (default: the latest
        event time learned)."""
        now = self.max_ts if now_ms is None else now_ms
        return {name: t.evict(now) for name, t in self.tables.items()}

    def pop_dirty(self) -> dict[str, Any]:
        """{"user": RowPush, "item": RowPush, "dense": weights or None if unchanged since the
        previous call, "dense_version": int}. The dense block is learned online too, so
        after any step it goes into the push with the rows: a scorer must never combine rows
        with a dense block they were not learned against."""
        out: dict[str, Any] = {name: t.pop_dirty() for name, t in self.tables.items()}
        changed = self._dense_changed or self._dense_pushed != self.dense_version
        out["dense"] = self.dense_weights() if changed else None
        out["dense_version"] = self._dense_pushed = self.dense_version
        self._dense_changed = False
        return out

    # -- serialization -----------------------------------------------------------------------

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(plain data, tensors): the whole learner, dirty tracking included."""
        meta = {"format": FORMAT_VERSION, "config": dict(self.config),
                "dense_names": self.dense_names(), "dense_version": self.dense_version,
                "dense_pushed": self._dense_pushed, "dense_changed": self._dense_changed,
                "max_ts": self.max_ts,
                "counters": dict(self.counters)}
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"dense_acc.{k}": v for k, v in self.dense_acc.items()})
        for name, t in self.tables.items():
            meta[name], ts = t.state()
            tensors.update({f"{name}.{k}": v for k, v in ts.items()})
        return meta, tensors

    def load_state_dict(self, meta: Mapping, tensors: Mapping[str, torch.Tensor]) -> None:
        if meta.get("format") != FORMAT_VERSION or meta.get("dense_names") != self.dense_names():
            raise ValueError("state is from another format or dense feature layout")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items()
                                    if k.startswith("model.")})
        self.dense_acc = {k: tensors[f"dense_acc.{k}"].clone() for k in self.dense_acc}
        for name, t in self.tables.items():
            t.load_state(meta[name], {k[len(name) + 1:]: v for k, v in tensors.items()
                                      if k.startswith(name + ".")})
        self.dense_version, self._dense_pushed = meta["dense_version"], meta["dense_pushed"]
        self._dense_changed = bool(meta.get("dense_changed", False))
        self.max_ts, self.counters = meta["max_ts"], dict(meta["counters"])

    def dense_names(self) -> list[str]:
        return dense_names(self.count_entities, self.count_names)

    def to_bytes(self) -> bytes:
        """The state as one blob: magic, header length, JSON header, raw little-endian tensors.
        Not pickle: loading a blob runs no code, and equal states give equal bytes (pickle's
        output depends on which equal strings happen to be the same object)."""
        meta, tensors = self.state_dict()
        layout, chunks, offset = {}, [], 0
        for k, t in tensors.items():
            a = np.ascontiguousarray(t.detach().numpy())
            a = a.astype(a.dtype.newbyteorder("<"), copy=False)
            layout[k] = [a.dtype.str, list(a.shape), offset]
            chunks.append(a.tobytes())
            offset += a.nbytes
        header = orjson.dumps({"meta": meta, "tensors": layout})
        return b"".join([_MAGIC, len(header).to_bytes(8, "little"), header, *chunks])

    @classmethod
    def from_bytes(cls, data: bytes) -> EmbeddingLearner:
        if data[:len(_MAGIC)] != _MAGIC:
            raise ValueError("not an EmbeddingLearner blob")
        n = int.from_bytes(data[len(_MAGIC):len(_MAGIC) + 8], "little")
        start = len(_MAGIC) + 8
        header = orjson.loads(data[start:start + n])
        body = memoryview(data)[start + n:]
        tensors = {}
        for k, (dtype, shape, offset) in header["tensors"].items():
            dt = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            a = np.frombuffer(body, dt, count, offset).reshape(shape)
            tensors[k] = torch.from_numpy(a.astype(dt.newbyteorder("="), copy=True))
        learner = cls(**header["meta"]["config"])
        learner.load_state_dict(header["meta"], tensors)
        return learner
