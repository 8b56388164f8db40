"""Scoring candidates from Redis: pCTR of items for a user, as the learn flow would predict.

One round trip per request in the steady state: one pipeline reads the model pointer, the
current copy's generation, the candidates' attributes (category, ...) and the count features of
every entity of every (user, item) pair. The model itself is kept in the process: the current
version's meta, weights and embedding rows, loaded whole (`ModelStore.load`) when the pointer
names another version, and refreshed when the version's generation moved (the online learner
pushes into the current version every ``push_interval_s``, and every write bumps it): only the
weights and rows the writes since changed are read again (`ModelStore.refresh`). A server
(``load=False``) never waits for either once a copy is held: `LoadedVersion` brings the new
copy in on a thread and swaps it in whole; each request scores from one copy.

The counts depend on the attributes (an entity such as ``user_category`` needs the item's
category), so the pipeline reads the counts of the entities the attributes last seen for each
item give; an item whose attributes are new or changed costs a second round trip for the
entities it adds. The hasher and the embedding model's dense input are built from the version's
own meta (its bits, crosses and the spec it was trained with), so scoring reads counts and
hashes exactly as training did; a version that reads counts ``spec`` (what is counted into the
feature store) does not count is refused with `NotCounted` naming them.

    scorer = flows.build.scorer(cfg)
    scorer.score("u17", ["i1", "i2"], {"device": "mobile", "position": 0, "hour": 20})
    # [{'item_id': 'i2', 'ftrl': 0.031, 'bopr': 0.029, 'bopr_std': 0.41, 'emb': 0.034}, ...]
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import orjson

from features.spec import ID_SEPARATOR, FeatureSpec
from features.store import FeatureStore
from learners.bopr import norm_cdf
from learners.embeddings import dense_dim, dense_features, score_vectors, serving_keys
from learners.ftrl import csr_rows, sigmoid
from learners.model import catalog_key, check_counted, make_hasher
from learners.publish import ModelStore, ModelStoreError, VersionCopy
from learners.sampling import recalibrate

log = logging.getLogger(__name__)

_UNSEEN = object()  # an item whose attributes were never read (not even as absent)


class LoadedVersion:
    """The model version a process's scorers share: a copy is read-only once loaded, so the
    scorers of a server's threads load each (version, generation) once between them, not once
    each. Only the first load makes a caller wait: once a copy is loaded, a newer version or
    generation is brought in by a thread (`ModelStore.refresh`: only what the pushes since
    wrote; bench/serving.py --demo [3a]: 10 ms of CPU for a push of 250 records, 97 ms to
    read the version whole) while the callers keep getting the copy they had, and swapped in
    whole, with its weights, when ready; after a failed load, the thread is not started again
    for ``RETRY_S``. ``loads``: copies made; ``full_loads``: of them, versions read whole."""

    RETRY_S = 1.0

    def __init__(self) -> None:
        self.current: tuple[VersionCopy, Weights] | None = None  # replaced, never modified
        self.loads = self.full_loads = 0
        self._lock = threading.Lock()  # one load at a time
        self._wanted: tuple[str, int | None] | None = None  # what the thread brings in
        self._thread: threading.Thread | None = None
        self._failed_at = -float("inf")  # time.monotonic() of the last failed load
        self._state = threading.Lock()  # guards _wanted, _thread and _failed_at

    def get(self, models: ModelStore, version: str, generation: int | None, wait: bool = True
            ) -> tuple[VersionCopy, Weights]:
        """The copy of ``version`` at ``generation`` or later, and its hashed models' weights.
        ``wait``: load it first if needed. Without: the copy held, however old, while a thread
        brings in the one asked for; `NotLoaded` when none is held yet."""
        current = self.current
        if current is not None and _fresh(current[0], version, generation):
            return current
        if wait:
            return self._update(models, version, generation)
        if current is None:
            raise NotLoaded(version, generation)
        with self._state:
            self._wanted = (version, generation)
            if self._thread is None and time.monotonic() >= self._failed_at + self.RETRY_S:
                self._thread = threading.Thread(target=self._follow, args=(models,),
                                                name="model-refresh", daemon=True)
                self._thread.start()
        return current

    def settle(self, timeout: float | None = None) -> None:
        """Wait for the thread bringing a copy in, if any, to finish."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _follow(self, models: ModelStore) -> None:
        """The thread: load what was asked for last, until nothing newer is asked for."""
        done = None
        try:
            while True:
                with self._state:
                    want = self._wanted
                    if want == done or _fresh(self.current[0], *want):
                        self._thread = None
                        return
                self._update(models, *want)
                done = want
        except Exception:
            log.exception("loading model version %s failed; the next request tries again",
                          self._wanted[0])
            with self._state:
                self._thread = None
                self._failed_at = time.monotonic()

    def _update(self, models: ModelStore, version: str, generation: int | None
                ) -> tuple[VersionCopy, Weights]:
        with self._lock:  # the others wait for the one load
            current = self.current
            if current is not None and _fresh(current[0], version, generation):
                return current
            if current is not None and current[0].version == version:
                copy, changed = models.refresh(current[0])
            else:
                copy, changed = models.load(version), None
            if changed is None:
                self.full_loads += 1
                weights = Weights(copy)
            else:
                weights = current[1].refreshed(copy, changed)
            self.current = copy, weights
            self.loads += 1
            return self.current


class Weights:
    """A copy's FTRL weights and BOPR (mean, variance) for any coordinates, as
    `VersionCopy.get_vectors` reads them (missing ones 0, and the prior for BOPR's): as whole
    tables, one per column, a row per coordinate, when the hash space is at most
    ``2**TABLE_BITS`` (12 MB a process at the default 20 bits, 48 MB at 22), so a request reads
    its ~4,000 coordinates with a gather (a column at a time: 3x faster than rows of two),
    not a binary search each."""

    TABLE_BITS = 22

    def __init__(self, copy: VersionCopy) -> None:
        self.copy = copy
        self.prior = np.array([0.0, copy.meta["bopr_prior_variance"]])
        self.tables = None
        if copy.meta["hash_bits"] <= self.TABLE_BITS:
            size = 1 << copy.meta["hash_bits"]
            self.tables = {}
            for m, d in (("ftrl", None), ("bopr", self.prior)):
                # what get_vectors reads at every coordinate, scattered (not searched) in
                coords, values = copy.vectors[m]
                inside = coords < size
                fill = np.zeros(values.shape[1]) if d is None else d
                self.tables[m] = [np.full(size, f, values.dtype) for f in fill]
                for column, v in zip(self.tables[m], values[inside].T, strict=True):
                    column[coords[inside]] = v

    def refreshed(self, copy: VersionCopy, changed: Mapping[str, np.ndarray]) -> Weights:
        """The weights of ``copy``, a refresh of this one's copy that wrote the coordinates
        ``changed`` of each model: the tables copied and those set, not read whole again."""
        new = object.__new__(Weights)
        new.copy, new.prior, new.tables = copy, self.prior, None
        if self.tables is not None:
            new.tables = dict(self.tables)
            for m, d in (("ftrl", None), ("bopr", self.prior)):
                keys = changed.get(m)
                if keys is not None and len(keys):
                    new.tables[m] = [c.copy() for c in self.tables[m]]
                    for c, v in zip(new.tables[m], copy.get_vectors(m, keys, d).T,
                                    strict=True):
                        c[keys] = v
        return new

    def get(self, model: str, indices: np.ndarray) -> list[np.ndarray]:
        """Each column of ``model`` ("ftrl": the weight, "bopr": mean and variance) at
        ``indices``, as float64."""
        if self.tables is None:
            values = self.copy.get_vectors(model, indices,
                                           self.prior if model == "bopr" else None).T
        else:
            values = [column[indices] for column in self.tables[model]]
        return [v.astype(np.float64) for v in values]


class NotLoaded(Exception):
    """The version (or generation) a request needs is not loaded, and the caller said not to
    load it (`Scorer.score` with ``load=False``): a server loads it off its event loop
    (`Scorer.load`), then scores again."""

    def __init__(self, version: str, generation: int | None) -> None:
        super().__init__(f"model version {version} (generation {generation}) not loaded")
        self.version, self.generation = version, generation


def _fresh(copy: VersionCopy | None, version: str, generation: int | None) -> bool:
    if copy is None or copy.version != version:
        return False
    return generation is None or (copy.generation is not None and copy.generation >= generation)


class Scorer:
    """Not thread-safe: one scorer per thread (it keeps the attributes seen); the scorers of
    one process may share the model through one `LoadedVersion`."""

    def __init__(self, models: ModelStore, features: FeatureStore, spec: FeatureSpec,
                 *, attributes_kept: int = 100_000, shared: LoadedVersion | None = None
                 ) -> None:
        if features is not None and features.feature_names != spec.feature_names():
            raise ValueError(f"the feature store holds {features.feature_names}, the spec "
                             f"counts {spec.feature_names()}: a scorer reads them as one")
        self.models, self.features, self.spec = models, features, spec
        self.attributes_kept = attributes_kept
        self._shared = LoadedVersion() if shared is None else shared
        self._meta: dict | None = None
        self.version: str | None = None
        self._copy: VersionCopy | None = None
        self._weights: Weights | None = None
        self._hasher = None
        self._counts: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # dense input's
        self._attrs: dict[str, bytes | None] = {}  # raw attributes last read, by item
        self._parsed: dict[bytes | None, dict] = {}  # attributes by their raw JSON
        self._entities = tuple(self.spec.entities.items())
        self._item_rows: dict[str, int] = {}  # item -> its row in the kept version's table
        self.loads = 0  # versions (or generations of one) loaded

    def _use_meta(self, version: str, meta: dict | None) -> dict:
        if meta is None:
            raise ModelStoreError(f"model version {version} has no meta")
        trained = check_counted(meta, self.spec, f"model version {version}")
        self._hasher = make_hasher(meta)
        self._counts = (tuple(trained.entities), tuple(trained.feature_names()))
        # where the version's counts are in a request's: its entities among the spec's, its
        # count names among the store's (the hasher's count matrix is the dense input's too)
        entities, names = list(self.spec.entities), self.spec.feature_names()
        self._count_at = (np.array([entities.index(e) for e in self._counts[0]], np.intp),
                          np.array([names.index(n) for n in self._counts[1]], np.intp))
        self._meta = meta
        return meta

    def _model(self, pointer: str | None, generation: int | None, load: bool = True
                ) -> VersionCopy:
        """The copy of the version ``pointer`` names, loaded again unless it is the one kept
        and ``generation`` (its counter, read with the request) has not moved."""
        if pointer is None:
            raise ModelStoreError(f"no model published in {self.models.prefix} yet "
                                  "(run the learn flow, or the daily retrain)")
        copy, self._weights = self._shared.get(self.models, pointer, generation, load)
        if copy is not self._copy:
            if self._copy is None or copy.meta is not self._copy.meta:
                self._use_meta(copy.version, copy.meta)
            self._item_rows = {}
            self._copy, self.version = copy, copy.version
            self.loads += 1
        return copy

    def _attributes(self, raw: bytes | None) -> dict:
        """An item's attributes from the catalog's JSON, parsed once per distinct text."""
        attrs = self._parsed.get(raw)
        if attrs is None:
            if len(self._parsed) >= self.attributes_kept:
                self._parsed.clear()
            attrs = self._parsed[raw] = orjson.loads(raw) if raw else {}
        return attrs

    def _request(self, user_id: str, item_ids: Sequence[str], context: Mapping | None
                 ) -> tuple[str | None, int | None, Candidates]:
        """The pointer, the kept version's generation and the candidates, counts included:
        one pipeline unless an item's attributes are new or changed."""
        item_ids = list(item_ids)
        context = context or {}
        seen = [self._attrs.get(i, _UNSEEN) for i in item_ids]
        attrs = [self._attributes(None if a is _UNSEEN else a) for a in seen]
        ids = self._entity_ids(user_id, item_ids, attrs, context)
        at_row: list[dict[str, int]] = [{} for _ in self._entities]  # entity: id -> row
        pairs = self._new_pairs(ids, at_row, [])
        pipe = self.models.client.pipeline(transaction=False)
        pipe.get(self.models.pointer_key)
        kept = self._copy.version if self._copy is not None else None
        if kept is not None:
            pipe.get(self.models.generation_key(kept))
        if item_ids:
            pipe.hmget(catalog_key(self.models), item_ids)
        self.features.queue_pairs(pipe, pairs)
        replies = pipe.execute()
        pointer = replies[0]
        # the generation of the version kept: only what the pointer names, if that one
        generation = replies[1] if kept is not None and pointer == kept.encode() else None
        at = 1 + (kept is not None)
        raw = replies[at] if item_ids else []
        counts = [self.features.decode_counts(replies[at + bool(item_ids):])]
        if len(self._attrs) + len(item_ids) > self.attributes_kept:
            self._attrs.clear()
        self._attrs.update(zip(item_ids, raw, strict=True))
        if raw != seen:  # attributes new or changed since last read: their entities' counts
            attrs = [self._attributes(a) for a in raw]
            ids = self._entity_ids(user_id, item_ids, attrs, context)
            more = self._new_pairs(ids, at_row, pairs)
            if more:
                pipe = self.features.client.pipeline(transaction=False)
                self.features.queue_pairs(pipe, more)
                counts.append(self.features.decode_counts(pipe.execute()))
                pairs += more
        # each example's row of ``counts`` for each entity; -1, the zero row, where it has none
        rows = np.array([[row.get(i, -1) for i in column] for column, row in zip(
            ids, at_row, strict=True)], np.intp).T
        counts.append(np.zeros((1, len(self.features.feature_names)), np.int64))
        return (None if pointer is None else pointer.decode(),
                None if generation is None else int(generation),
                Candidates(user_id, item_ids, attrs, context, pairs, np.concatenate(counts),
                           rows.reshape(len(item_ids), len(self._entities))))

    def _new_pairs(self, ids: list[list[str | None]], at_row: list[dict[str, int]],
                   pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (entity, id) of ``ids`` not in ``at_row`` yet (where ``pairs`` has them),
        each once; entered in ``at_row`` at the rows they will have after ``pairs``."""
        new = []
        for (entity, _), column, row in zip(self._entities, ids, at_row, strict=True):
            for i in dict.fromkeys(column):
                if i is not None and i not in row:
                    row[i] = len(pairs) + len(new)
                    new.append((entity, i))
        return new

    def _entity_ids(self, user_id: str, item_ids: list[str], attrs: list[dict],
                    context: Mapping) -> list[list[str | None]]:
        """For each entity of the spec, each example's id of it, None where it lacks one of
        the fields: `FeatureSpec.entity_ids` of ``Impression("", 0, user_id, item,
        {**attrs, **context})``, column by column, a field the examples share read once."""
        m = len(item_ids)
        top = {"impression_id": "", "ts": 0, "user_id": user_id}
        texts: dict[str, list[str | None]] = {}  # field -> its text in each example

        def text(f: str) -> list[str | None]:  # as entity_ids looks a field up
            if f not in texts:
                if f == "item_id":
                    values = item_ids
                elif f in top or f in context:
                    values = [top[f] if f in top else context[f]] * m
                else:
                    values = [a.get(f) for a in attrs]
                texts[f] = [None if v is None else v if type(v) is str else str(v)
                            for v in values]
            return texts[f]

        return [text(fields[0]) if len(fields) == 1 else
                [None if None in vs else ID_SEPARATOR.join(vs)
                 for vs in zip(*map(text, fields), strict=True)]
                for _, fields in self._entities]

    def examples(self, user_id: str, item_ids: Sequence[str],
                 context: Mapping | None = None) -> tuple[str | None, list[dict]]:
        """The current version and one example-like dict per item, counts included: what
        the models would have seen had these been impressions now."""
        pointer, _, c = self._request(user_id, item_ids, context)
        return pointer, c.examples(self.features.feature_names, list(self.spec.entities))

    def score(self, user_id: str, item_ids: Sequence[str],
              context: Mapping | None = None, *, load: bool = True) -> list[dict]:
        """pCTR per item from FTRL, BOPR (with the spread of its score) and the embedding
        model, in the order given, from the current version at its current generation.
        ``load=False``, as a server scores: never wait for a load; from the copy held (the
        version `version` names, maybe a few pushes old) while a thread brings the current
        one in, and `NotLoaded` when none is held yet."""
        pointer, generation, candidates = self._request(user_id, item_ids, context)
        copy = self._model(pointer, generation, load)
        return self._predict(copy, candidates)

    def load(self, version: str, generation: int | None) -> None:
        """Load ``version`` at ``generation`` (what `NotLoaded` names) for the scorers that
        share this one's copy."""
        self._shared.get(self.models, version, generation)

    def _predict(self, copy: VersionCopy, c: Candidates) -> list[dict]:
        m = len(c.item_ids)
        if not m:
            return []
        meta, hasher = self._meta, self._hasher
        entities, names = self._count_at
        # [examples, the version's entities x its count names], as count_values reads them
        counts = c.counts[c.rows[:, entities]][:, :, names].reshape(m, -1)
        if counts.size and (counts.min() < 0 or counts.max() >= 1 << 53):
            # counts the vector path refuses: the examples as dicts, hashed one by one
            examples = c.examples(self.features.feature_names, list(self.spec.entities))
            indptr, indices = hasher.batch(examples)
        else:
            indptr, indices = hasher.request_batch(c.user_id, c.item_ids, c.attrs, c.context,
                                                   counts)
        rows = csr_rows(indptr)
        (w,) = self._weights.get("ftrl", indices)
        p_ftrl = sigmoid(np.bincount(rows, weights=w, minlength=m))
        mu, sigma2 = self._weights.get("bopr", indices)
        mean = np.bincount(rows, weights=mu, minlength=m)
        var = np.bincount(rows, weights=sigma2, minlength=m)
        p_bopr = norm_cdf(mean / np.sqrt(meta["bopr_beta"] ** 2 + var))
        if meta["sample_rate"] < 1:
            p_ftrl = recalibrate(p_ftrl, meta["sample_rate"])
            p_bopr = recalibrate(p_bopr, meta["sample_rate"])
        n = meta["fallback_rows"]
        u = _own_or_fallback(copy.get_rows("user", serving_keys(c.user_id, n)))
        v = self._item_vectors(copy, c.item_ids, n)
        dense = copy.get_vectors("dense", np.arange(dense_dim(*self._counts) + 1))
        x = self._dense(c, counts)
        p_emb = score_vectors(np.repeat(u, m, axis=0), v, x, dense[:, 0])
        return [{"item_id": i, "ftrl": a, "bopr": b, "bopr_std": s, "emb": e}
                for i, a, b, s, e in zip(c.item_ids, p_ftrl.tolist(), p_bopr.tolist(),
                                         np.sqrt(var).tolist(), p_emb.tolist(), strict=True)]

    def _dense(self, c: Candidates, counts: np.ndarray) -> np.ndarray:
        """``dense_features`` of the examples: their counts' columns, plus the context's made
        once per distinct attributes (items of one category share them; each column is 0 in
        one of the two parts, so the sum is exact)."""
        firsts: dict[int, dict] = {}  # the catalog's attributes are one object per text
        for a in c.attrs:
            firsts.setdefault(id(a), a)
        at = {k: i for i, k in enumerate(firsts)}
        contexts = dense_features([{"features": {**a, **c.context}} for a in firsts.values()],
                                  *self._counts, np.zeros((len(firsts), counts.shape[1])))
        return dense_features([{}] * len(c.attrs), *self._counts, counts) + \
            contexts[[at[id(a)] for a in c.attrs]]

    def _item_vectors(self, copy: VersionCopy, item_ids: list[str], n: int) -> np.ndarray:
        """Each item's row, its own or its fallback row: looked up once per item and version
        (kept in ``_item_rows``, dropped with the copy)."""
        at = self._item_rows
        new = [i for i in dict.fromkeys(item_ids) if i not in at]
        if new:
            if len(at) + len(new) > self.attributes_kept:
                at.clear()
                new = list(dict.fromkeys(item_ids))
            index, _ = copy.rows["item"]
            for i in new:
                own, fallback = serving_keys(i, n)
                at[i] = index.get(own, index.get(fallback, -1))
        at = np.fromiter((at[i] for i in item_ids), np.intp, len(item_ids))
        vectors = copy.rows["item"][1].vectors[at].astype(np.float64)
        vectors[at < 0] = 0.0  # neither row: zeros, as get_rows reads them
        return vectors


class Candidates(NamedTuple):
    """A request's items, their attributes and the counts of every entity they name."""

    user_id: str
    item_ids: list[str]
    attrs: list[dict]  # each item's attributes from the catalog
    context: Mapping
    pairs: list[tuple[str, str]]  # the (entity, id) whose counts were read
    counts: np.ndarray  # int64 [pairs + 1, the store's feature names]: their counts, 0s last
    rows: np.ndarray  # [items, the spec's entities]: the row of each example's entity, or -1

    def examples(self, names: Sequence[str], entities: Sequence[str]) -> list[dict]:
        """The examples as dicts, ``counts`` as the learn flow's examples hold them."""
        counts = self.counts.tolist()
        return [{"user_id": self.user_id, "item_id": item,
                 "features": {**attrs, **self.context},
                 "counts": {e: dict(zip(names, counts[r], strict=True))
                            for e, r in zip(entities, rows, strict=True) if r >= 0}}
                for item, attrs, rows in zip(self.item_ids, self.attrs, self.rows.tolist(),
                                             strict=True)]


def _own_or_fallback(rows) -> np.ndarray:
    """Rows were read in (own, fallback) pairs: the own row where it exists."""
    vec = rows.vectors.reshape(-1, 2, rows.vectors.shape[1])
    found = np.asarray(rows.found).reshape(-1, 2)
    return np.where(found[:, :1], vec[:, 0], vec[:, 1]).astype(np.float64)
