"""Scoring candidates from Redis: pCTR of items for a user, as the learn flow would predict.

Three round trips: (1) the model pointer and the candidates' attributes (category, ...);
(2) the count features of every entity of every (user, item) pair; (3) the weights of the
hashed features and the embedding rows, all from one model version. Each depends on the one
before: the entities need the attributes, the hashed features need the counts. The hasher and
the embedding model's dense input are built from the version's own meta (its bits, crosses and
the spec it was trained with), so scoring reads counts and hashes exactly as training did; a
version that reads counts ``spec`` (what is counted into the feature store) does not count is
refused with `NotCounted` naming them.

    scorer = flows.build.scorer(cfg)
    scorer.score("u17", ["i1", "i2"], {"device": "mobile", "position": 0, "hour": 20})
    # [{'item_id': 'i2', 'ftrl': 0.031, 'bopr': 0.029, 'bopr_std': 0.41, 'emb': 0.034}, ...]
"""

from __future__ import annotations

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
from learners.publish import ModelStore, ModelStoreError
from learners.sampling import recalibrate


class Scorer:
    def __init__(self, models: ModelStore, features: FeatureStore, spec: FeatureSpec) -> None:
        self.models, self.features, self.spec = models, features, spec
        self._meta: dict | None = None
        self.version: str | None = None
        self._hasher = None
        self._counts: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # dense input's

    def _use_version(self, version: str | None) -> dict:
        if version is None:
            raise ModelStoreError(f"no model published in {self.models.prefix} yet "
                                  "(run the learn flow, or the daily retrain)")
        if version != self.version:
            meta = self.models.get_meta(version)
            if meta is None:
                raise ModelStoreError(f"model version {version} has no meta")
            trained = check_counted(meta, self.spec, f"model version {version}")
            self._meta, self.version = meta, version
            self._hasher = make_hasher(meta)
            self._counts = (tuple(trained.entities), tuple(trained.feature_names()))
        return self._meta

    def examples(self, user_id: str, item_ids: Sequence[str],
                 context: Mapping | None = None) -> tuple[str | None, list[dict]]:
        """The current version and one example-like dict per item, counts included: what
        the models would have seen had these been impressions now."""
        client, key = self.models.client, catalog_key(self.models)
        pipe = client.pipeline(transaction=False)
        pipe.get(self.models.pointer_key)
        if item_ids:
            pipe.hmget(key, list(item_ids))
        pointer, *attrs = pipe.execute()
        attrs = attrs[0] if attrs else []
        examples = []
        for item, raw in zip(item_ids, attrs, strict=True):
            feats = {**(orjson.loads(raw) if raw else {}), **(context or {})}
            examples.append({"user_id": user_id, "item_id": item, "features": feats})
        pairs = [self.spec.entity_ids(Impression("", 0, e["user_id"], e["item_id"],
                                                 e["features"])) for e in examples]
        flat = sorted({p for ps in pairs for p in ps})
        rows = dict(zip(flat, self.features.get_pairs(flat), strict=True))
        names = self.features.feature_names
        for e, ps in zip(examples, pairs, strict=True):
            e["counts"] = {entity: {n: rows[(entity, id_)][n] for n in names}
                           for entity, id_ in ps}
        return (None if pointer is None else pointer.decode()), examples

    def score(self, user_id: str, item_ids: Sequence[str],
              context: Mapping | None = None) -> list[dict]:
        """pCTR per item from FTRL, BOPR (with the spread of its score) and the embedding
        model, in the order given."""
        version, examples = self.examples(user_id, item_ids, context)
        for _ in range(3):
            meta = self._use_version(version)
            snap, csr = self._read(meta, examples)
            if snap.version == version:
                return self._predict(meta, snap, csr, examples)
            version = snap.version  # published between the reads: score with the new one
        raise ModelStoreError("the model version changed during every read")

    def _read(self, meta: dict, examples: list[dict]):
        indptr, indices = self._hasher.batch(examples)
        keys, inverse = np.unique(indices, return_inverse=True)
        n = meta["fallback_rows"]
        user = serving_keys(examples[0]["user_id"], n) if examples else ()
        items = [k for e in examples for k in serving_keys(e["item_id"], n)]
        dense = np.arange(dense_dim(*self._counts) + 1)
        snap = self.models.read_consistent(
            vectors={"ftrl": keys, "bopr": keys, "dense": dense},
            rows={"user": list(user), "item": items},
            defaults={"bopr": np.array([0.0, meta["bopr_prior_variance"]])})
        return snap, (indptr, inverse)

    def _predict(self, meta: dict, snap, csr, examples: list[dict]) -> list[dict]:
        if not examples:
            return []
        indptr, inverse = csr
        rows = csr_rows(indptr)
        m = len(examples)
        w = snap.vectors["ftrl"][:, 0].astype(np.float64)[inverse]
        p_ftrl = sigmoid(np.bincount(rows, weights=w, minlength=m))
        mv = snap.vectors["bopr"].astype(np.float64)[inverse]
        mean = np.bincount(rows, weights=mv[:, 0], minlength=m)
        var = np.bincount(rows, weights=mv[:, 1], minlength=m)
        p_bopr = norm_cdf(mean / np.sqrt(meta["bopr_beta"] ** 2 + var))
        if meta["sample_rate"] < 1:
            p_ftrl = recalibrate(p_ftrl, meta["sample_rate"])
            p_bopr = recalibrate(p_bopr, meta["sample_rate"])
        u = _own_or_fallback(snap.rows["user"])
        v = _own_or_fallback(snap.rows["item"])
        p_emb = score_vectors(np.repeat(u, m, axis=0), v, dense_features(examples, *self._counts),
                              snap.vectors["dense"][:, 0])
        return [{"item_id": e["item_id"], "ftrl": float(a), "bopr": float(b),
                 "bopr_std": float(s), "emb": float(c)}
                for e, a, b, s, c in zip(examples, p_ftrl, p_bopr, np.sqrt(var), p_emb,
                                         strict=True)]


def _own_or_fallback(rows) -> np.ndarray:
    """Rows were read in (own, fallback) pairs: the own row where it exists."""
    vec = rows.vectors.reshape(-1, 2, rows.vectors.shape[1])
    found = np.asarray(rows.found).reshape(-1, 2)
    return np.where(found[:, :1], vec[:, 0], vec[:, 1]).astype(np.float64)
