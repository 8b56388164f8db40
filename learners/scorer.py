"""Scoring candidates from Redis: pCTR of items for a user, as the learn flow would predict.

One round trip per request in the steady state: one pipeline reads the model pointer, the
current copy's generation, the candidates' attributes (category, ...) and the count features of
every entity of every (user, item) pair. The model itself is kept in the process: the current
version's meta, weights and embedding rows, loaded whole (`ModelStore.load`) and loaded again
only when the pointer names another version or the version's generation moved (the online
learner pushes into the current version every ``push_interval_s``, and every push bumps it).

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

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import orjson

from features.spec import FeatureSpec
from features.store import FeatureStore
from joiner.events import Impression
from learners.bopr import norm_cdf
from learners.embeddings import dense_dim, dense_features, score_vectors, serving_keys
from learners.ftrl import csr_rows, sigmoid
from learners.model import catalog_key, check_counted, make_hasher
from learners.publish import ModelStore, ModelStoreError, VersionCopy
from learners.sampling import recalibrate

_UNSEEN = object()  # an item whose attributes were never read (not even as absent)


class LoadedVersion:
    """The model version a process's scorers share: a copy is read-only once loaded, so the
    scorers of a server's threads load each (version, generation) once between them, not once
    each (a load reads every weight and row: about a second for the default model)."""

    def __init__(self) -> None:
        self.copy: VersionCopy | None = None
        self.loads = 0
        self._lock = threading.Lock()

    def get(self, models: ModelStore, version: str, generation: int | None) -> VersionCopy:
        """The copy of ``version`` at ``generation`` or later, loaded if there is none."""
        copy = self.copy
        if not _fresh(copy, version, generation):
            with self._lock:  # the others wait for the one load
                copy = self.copy
                if not _fresh(copy, version, generation):
                    copy = self.copy = models.load(version)
                    self.loads += 1
        return copy


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
        self.models, self.features, self.spec = models, features, spec
        self.attributes_kept = attributes_kept
        self._shared = LoadedVersion() if shared is None else shared
        self._meta: dict | None = None
        self.version: str | None = None
        self._copy: VersionCopy | None = None
        self._hasher = None
        self._counts: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # dense input's
        self._attrs: dict[str, bytes | None] = {}  # raw attributes last read, by item
        self.loads = 0  # versions (or generations of one) loaded

    def _use_meta(self, version: str, meta: dict | None) -> dict:
        if meta is None:
            raise ModelStoreError(f"model version {version} has no meta")
        trained = check_counted(meta, self.spec, f"model version {version}")
        self._hasher = make_hasher(meta)
        self._counts = (tuple(trained.entities), tuple(trained.feature_names()))
        # the hasher's count matrix is the dense input's too when they read the same counts
        self._shared_counts = self._hasher.count_features == {
            e: self._counts[1] for e in self._counts[0]}
        self._meta = meta
        return meta

    def _model(self, pointer: str | None, generation: int | None) -> VersionCopy:
        """The copy of the version ``pointer`` names, loaded again unless it is the one kept
        and ``generation`` (its counter, read with the request) has not moved."""
        if pointer is None:
            raise ModelStoreError(f"no model published in {self.models.prefix} yet "
                                  "(run the learn flow, or the daily retrain)")
        copy = self._shared.get(self.models, pointer, generation)
        if copy is not self._copy:
            self._use_meta(pointer, copy.meta)
            self._copy, self.version = copy, pointer
            self.loads += 1
        return copy

    def _examples(self, attrs: list, user_id: str, item_ids: Sequence[str],
                  context: Mapping | None) -> list[dict]:
        return [{"user_id": user_id, "item_id": item,
                 "features": {**(orjson.loads(raw) if raw else {}), **(context or {})}}
                for item, raw in zip(item_ids, attrs, strict=True)]

    def _pairs(self, examples: list[dict]) -> list[list[tuple[str, str]]]:
        return [self.spec.entity_ids(Impression("", 0, e["user_id"], e["item_id"],
                                                e["features"])) for e in examples]

    def _request(self, user_id: str, item_ids: Sequence[str], context: Mapping | None
                 ) -> tuple[str | None, int | None, list[dict]]:
        """The pointer, the kept version's generation and one example per item, counts
        included: one pipeline unless an item's attributes are new or changed."""
        item_ids = list(item_ids)
        seen = [self._attrs.get(i, _UNSEEN) for i in item_ids]
        guessed = self._examples([None if a is _UNSEEN else a for a in seen], user_id,
                                 item_ids, context)
        guessed_pairs = self._pairs(guessed)
        flat = sorted({p for ps in guessed_pairs for p in ps})
        pipe = self.models.client.pipeline(transaction=False)
        pipe.get(self.models.pointer_key)
        kept = self._copy.version if self._copy is not None else None
        if kept is not None:
            pipe.get(self.models.generation_key(kept))
        if item_ids:
            pipe.hmget(catalog_key(self.models), item_ids)
        self.features.queue_pairs(pipe, flat)
        replies = pipe.execute()
        pointer = replies[0]
        generation = replies[1] if kept is not None else None
        at = 1 + (kept is not None)
        attrs = replies[at] if item_ids else []
        counts = self.features.decode_pairs(replies[at + bool(item_ids):])
        rows = dict(zip(flat, counts, strict=True))
        if len(self._attrs) + len(item_ids) > self.attributes_kept:
            self._attrs.clear()
        for item, raw in zip(item_ids, attrs, strict=True):
            self._attrs[item] = raw
        if attrs == seen:  # the steady state: the guess was right
            examples, pairs = guessed, guessed_pairs
        else:
            examples = self._examples(attrs, user_id, item_ids, context)
            pairs = self._pairs(examples)
        more = sorted({p for ps in pairs for p in ps if p not in rows})
        if more:  # attributes new or changed since last read: their entities' counts
            rows.update(zip(more, self.features.get_pairs(more), strict=True))
        names = self.features.feature_names
        # each entity's counts once (a user's are in every example), shared by the examples
        counts = {pair: {n: row[n] for n in names} for pair, row in rows.items()}
        for e, ps in zip(examples, pairs, strict=True):
            e["counts"] = {entity: counts[(entity, id_)] for entity, id_ in ps}
        return (None if pointer is None else pointer.decode(),
                None if generation is None else int(generation), examples)

    def examples(self, user_id: str, item_ids: Sequence[str],
                 context: Mapping | None = None) -> tuple[str | None, list[dict]]:
        """The current version and one example-like dict per item, counts included: what
        the models would have seen had these been impressions now."""
        pointer, _, examples = self._request(user_id, item_ids, context)
        return pointer, examples

    def score(self, user_id: str, item_ids: Sequence[str],
              context: Mapping | None = None) -> list[dict]:
        """pCTR per item from FTRL, BOPR (with the spread of its score) and the embedding
        model, in the order given."""
        pointer, generation, examples = self._request(user_id, item_ids, context)
        copy = self._model(pointer, generation)
        return self._predict(copy, examples)

    def _predict(self, copy: VersionCopy, examples: list[dict]) -> list[dict]:
        if not examples:
            return []
        meta = self._meta
        counts = self._hasher.count_values(examples)  # read once for both
        indptr, indices = self._hasher.batch(examples, counts)
        rows = csr_rows(indptr)
        m = len(examples)
        w = copy.get_vectors("ftrl", indices)[:, 0].astype(np.float64)
        p_ftrl = sigmoid(np.bincount(rows, weights=w, minlength=m))
        mv = copy.get_vectors("bopr", indices,
                              np.array([0.0, meta["bopr_prior_variance"]])).astype(np.float64)
        mean = np.bincount(rows, weights=mv[:, 0], minlength=m)
        var = np.bincount(rows, weights=mv[:, 1], minlength=m)
        p_bopr = norm_cdf(mean / np.sqrt(meta["bopr_beta"] ** 2 + var))
        if meta["sample_rate"] < 1:
            p_ftrl = recalibrate(p_ftrl, meta["sample_rate"])
            p_bopr = recalibrate(p_bopr, meta["sample_rate"])
        n = meta["fallback_rows"]
        u = _own_or_fallback(copy.get_rows("user", serving_keys(examples[0]["user_id"], n)))
        v = _own_or_fallback(copy.get_rows(
            "item", [k for e in examples for k in serving_keys(e["item_id"], n)]))
        dense = copy.get_vectors("dense", np.arange(dense_dim(*self._counts) + 1))
        x = dense_features(examples, *self._counts, counts if self._shared_counts else None)
        p_emb = score_vectors(np.repeat(u, m, axis=0), v, x, dense[:, 0])
        return [{"item_id": e["item_id"], "ftrl": float(a), "bopr": float(b),
                 "bopr_std": float(s), "emb": float(c)}
                for e, a, b, s, c in zip(examples, p_ftrl, p_bopr, np.sqrt(var), p_emb,
                                         strict=True)]


def _own_or_fallback(rows) -> np.ndarray:
    """Rows were read in (own, fallback) pairs: the own row where it exists."""
    vec = rows.vectors.reshape(-1, 2, rows.vectors.shape[1])
    found = np.asarray(rows.found).reshape(-1, 2)
    return np.where(found[:, :1], vec[:, 0], vec[:, 1]).astype(np.float64)
