"""The models of one version (FTRL, BOPR and the embedding model), learned together from
labeled examples, written to the model store (learners/publish.py) and read back from it.

A version in the store holds::

    meta            source ("online" or "retrain"), parent version, created_ms, the hasher
                    (bits, crosses), BOPR's beta and prior variance, the negative sample rate,
                    examples learned and each model's metrics
    w:ftrl          coordinate -> w             (the non-zero weights)
    w:bopr          coordinate -> (mu, var)     (the coordinates that moved off the prior)
    w:dense         i -> the embedding model's dense weights (its bias last)
    emb:user/item   id -> row (own rows and the shared fallback rows)
    blob:models     the whole learner state, to continue training from this version

FTRL and BOPR learn the kept examples (negatives downsampled at ``negative_sample_rate``,
deterministically by id) and their predictions are recalibrated to the unsampled stream; the
embedding model weights kept negatives by 1/rate instead. Metrics are progressive: each
example is predicted before any model learns it, on the unsampled stream.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence

import numpy as np
import orjson

from features.hashing import FeatureHasher
from features.spec import split_names
from learners.bopr import BOPR
from learners.embeddings import EmbeddingLearner
from learners.ftrl import FTRLProximal
from learners.metrics import ProgressiveMetrics
from learners.publish import ModelStore
from learners.sampling import keep_many, recalibrate

MODELS = ("ftrl", "bopr", "emb")
FORMAT = 1
DAY_MS = 86_400_000
MICRO_BATCH = 256  # examples predicted, then learned, at a time


def usable(example: Mapping) -> bool:
    """A labeled example the models learn from: not a correction record, not quarantined
    (the joiner's health monitor suspects its label)."""
    return (example.get("kind", "example") == "example" and example.get("label") in (0, 1)
            and not example.get("quarantined"))


def make_hasher(meta_or_cfg) -> FeatureHasher:
    """The hasher a learn config, or a version's meta, describes."""
    if isinstance(meta_or_cfg, Mapping):
        bits, crosses = meta_or_cfg["hash_bits"], meta_or_cfg["crosses"]
    else:
        bits = meta_or_cfg.hash_bits
        crosses = [split_names(c) for c in meta_or_cfg.crosses]
    return FeatureHasher(bits=bits, crosses=[tuple(c) for c in crosses])


def take_rows(indptr: np.ndarray, indices: np.ndarray, mask: np.ndarray):
    """The rows of a CSR batch where ``mask`` is true."""
    lengths = np.diff(indptr)
    return (np.concatenate([[0], np.cumsum(lengths[mask])]),
            indices[np.repeat(mask, lengths)])


class Models:
    """FTRL, BOPR and the embedding model, with one hasher and progressive metrics."""

    def __init__(self, cfg, ftrl: FTRLProximal | None = None, bopr: BOPR | None = None,
                 emb: EmbeddingLearner | None = None) -> None:
        self.cfg = cfg  # flows.config.LearnConfig
        self.hasher = make_hasher(cfg)
        self.rate = float(cfg.negative_sample_rate)
        if not 0 < self.rate <= 1:
            raise ValueError(f"learn.negative_sample_rate must be in (0, 1], got {self.rate}")
        self.ftrl = ftrl or FTRLProximal(cfg.ftrl_alpha, cfg.ftrl_beta, cfg.ftrl_l1,
                                         cfg.ftrl_l2, bits=cfg.hash_bits)
        self.bopr = bopr or BOPR(cfg.bopr_beta, cfg.bopr_prior_variance, bits=cfg.hash_bits)
        self.emb = emb or EmbeddingLearner(
            dim=cfg.emb_dim, min_count=cfg.emb_min_count, fallback_rows=cfg.emb_fallback_rows,
            evict_after_ms=int(cfg.emb_evict_after_days * DAY_MS), lr=cfg.emb_lr,
            max_dirty=cfg.emb_max_dirty, seed=cfg.seed)
        self.metrics = {m: ProgressiveMetrics(cfg.metrics_window) for m in MODELS}
        self.examples = 0  # learned (after downsampling)
        self.micro_batch = 1
        self.items: dict[str, dict] = {}  # item attributes seen since the last push

    # -- learning -----------------------------------------------------------------------------

    def predict(self, examples: Sequence[Mapping], csr=None) -> dict[str, np.ndarray]:
        """p of each model for each example, on the unsampled scale."""
        indptr, indices = csr if csr is not None else self.hasher.batch(examples)
        p = {"ftrl": self.ftrl.predict_many(indptr, indices),
             "bopr": self.bopr.predict_many(indptr, indices),
             "emb": self.emb.predict_batch(examples)}
        if self.rate < 1:
            p["ftrl"], p["bopr"] = recalibrate(p["ftrl"], self.rate), recalibrate(p["bopr"],
                                                                                   self.rate)
        return p

    def learn(self, examples: Sequence[dict], annotate: bool = False) -> dict[str, int]:
        """Predict (for the metrics), then learn the usable examples, ``MICRO_BATCH`` at a
        time: a prediction made with weights older than that costs log loss at a cold start,
        and FTRL overshoots on larger batches. With ``annotate`` each usable example gets
        ``online_p``: the models' predictions before learning it (the daily retrain compares
        itself with those). Returns counts."""
        batch = [e for e in examples if usable(e)]
        learned = s = 0
        while s < len(batch):
            learned += self._learn(batch[s:s + self.micro_batch], annotate)
            s += self.micro_batch
            # From 1 up: a fresh model's first predictions are not made by an empty model
            # for a whole micro-batch.
            self.micro_batch = min(2 * self.micro_batch, MICRO_BATCH)
        return {"examples": len(batch), "learned": learned}

    def _learn(self, batch: list[dict], annotate: bool) -> int:
        csr = self.hasher.batch(batch)
        y = np.fromiter((e["label"] for e in batch), np.float64, len(batch))
        predictions = self.predict(batch, csr)
        for name, p in predictions.items():
            self.metrics[name].update_many(p, y)
        if annotate:
            for i, e in enumerate(batch):
                e["online_p"] = {name: float(p[i]) for name, p in predictions.items()}
        if self.rate < 1:
            keep = keep_many([e["impression_id"] for e in batch], y, self.rate)
            csr = take_rows(*csr, keep)
            batch = [e if e["label"] else {**e, "sample_rate": self.rate}
                     for e, k in zip(batch, keep, strict=True) if k]
            y = y[keep]
        self.ftrl.learn_many(*csr, y)
        self.bopr.learn_many(*csr, y)
        self.emb.learn_batch(batch)
        attrs = self.cfg.item_attributes
        for e in batch:
            feats = e.get("features") or {}
            self.items[str(e["item_id"])] = {a: feats[a] for a in attrs if a in feats}
        self.examples += len(batch)
        return len(batch)

    def summary(self) -> dict[str, dict]:
        return {m: self.metrics[m].summary() for m in MODELS}

    # -- publishing ---------------------------------------------------------------------------

    def describe(self) -> dict:
        """What a scorer needs to know to score exactly as these models do."""
        c = self.cfg
        return {"format": FORMAT, "hash_bits": c.hash_bits,
                "crosses": [list(x) for x in self.hasher.crosses],
                "bopr_beta": self.bopr.beta, "bopr_prior_variance": self.bopr.prior_variance,
                "sample_rate": self.rate, "fallback_rows": self.emb.users.fallback_rows,
                "emb_dim": self.emb.users.dim}

    def changes(self, full: bool = False) -> dict:
        """What changed since the last call (everything with ``full``), taken out of the
        learners' change tracking: `write` it, and retry the write until it succeeds, or the
        changes are lost (the learn flow then resumes from its snapshot)."""
        if full:
            ftrl_idx = self.ftrl.nonzero()
            self.ftrl.pop_touched()
            b = self.bopr
            bopr_idx = np.flatnonzero((b.mu != 0) | (b.var != b.prior_variance))
            b.pop_touched()
            for t in self.emb.tables.values():
                t.full_due = True
            self.emb._dense_pushed = -1  # the dense weights go into every full push
        else:
            ftrl_idx, bopr_idx = self.ftrl.pop_touched(), self.bopr.pop_touched()
        mu, var = self.bopr.params(bopr_idx)
        items, self.items = self.items, {}
        return {"ftrl": (ftrl_idx, self.ftrl.weights(ftrl_idx)[:, None]),
                "bopr": (bopr_idx, np.stack([mu, var], axis=1)),
                "emb": self.emb.pop_dirty(), "items": items}

    @staticmethod
    def write(store: ModelStore, version: str, changes: dict) -> dict[str, int]:
        """Write `changes` into ``version``. Values are absolute: writing twice is harmless."""
        for model in ("ftrl", "bopr"):
            store.put_vectors(version, model, *changes[model])
        dirty, rows = changes["emb"], 0
        for table in ("user", "item"):
            p = dirty[table]
            if p.full:
                store.replace_rows(version, table, p.ids, p.vectors, p.updated_ms)
            else:
                if p.ids:
                    store.put_rows(version, table, p.ids, p.vectors, p.updated_ms)
                if p.deleted_ids:
                    store.delete_rows(version, table, p.deleted_ids)
            rows += len(p.ids) + len(p.deleted_ids)
        if dirty["dense"] is not None:
            w = dirty["dense"]
            store.put_vectors(version, "dense", np.arange(len(w)), w[:, None])
        if changes["items"]:
            store.client.hset(catalog_key(store), mapping={
                k: orjson.dumps(v) for k, v in changes["items"].items()})
        return {"ftrl": len(changes["ftrl"][0]), "bopr": len(changes["bopr"][0]), "rows": rows}

    def push(self, store: ModelStore, version: str, full: bool = False) -> dict[str, int]:
        """`write` the `changes` into ``version``."""
        return self.write(store, version, self.changes(full))

    def write_version(self, store: ModelStore, source: str, parent: str | None,
                      extra: Mapping | None = None) -> str:
        """A new complete version holding everything (not yet published)."""
        version = store.new_version()
        self.emb.evict()
        counts = self.push(store, version, full=True)
        store.put_blob(version, "models", self.to_bytes())
        store.put_meta(version, {**self.describe(), "source": source, "parent": parent,
                                 "created_ms": int(time.time() * 1000),
                                 "examples": self.examples, "written": counts,
                                 "metrics": self.summary(), **(extra or {})})
        return version

    # -- state --------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Every learner's state and the metrics as one npz (no pickle: loading runs no code)."""
        arrays, header = {}, {"format": FORMAT, "examples": self.examples, "items": self.items}
        for name, learner in (("ftrl", self.ftrl), ("bopr", self.bopr)):
            st = learner.state()
            header[name] = {k: v for k, v in st.items() if not isinstance(v, np.ndarray)}
            arrays.update({f"{name}.{k}": v for k, v in st.items() if isinstance(v, np.ndarray)})
        for name, m in self.metrics.items():
            header[f"metrics.{name}"] = {k: v for k, v in vars(m).items()
                                         if not isinstance(v, np.ndarray)}
            arrays.update({f"metrics.{name}.{k}": v for k, v in vars(m).items()
                           if isinstance(v, np.ndarray)})
        arrays["emb"] = np.frombuffer(self.emb.to_bytes(), np.uint8)
        arrays["header"] = np.frombuffer(orjson.dumps(header), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, cfg, data: bytes) -> Models:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = orjson.loads(arrays.pop("header").tobytes())
        if header.get("format") != FORMAT:
            raise ValueError(f"model state of format {header.get('format')}, expected {FORMAT}")

        def state(name):
            return {**header[name], **{k[len(name) + 1:]: v for k, v in arrays.items()
                                       if k.startswith(name + ".")}}

        models = cls(cfg, FTRLProximal.from_state(state("ftrl")),
                     BOPR.from_state(state("bopr")),
                     EmbeddingLearner.from_bytes(arrays.pop("emb").tobytes()))
        for name, m in models.metrics.items():
            for k, v in state(f"metrics.{name}").items():
                setattr(m, k, v)
        models.examples, models.items = header["examples"], header["items"]
        return models

    @classmethod
    def load(cls, cfg, store: ModelStore, version: str) -> Models:
        data = store.get_blob(version, "models")
        if data is None:
            raise LookupError(f"version {version} of {store.prefix} has no models blob")
        return cls.from_bytes(cfg, data)


def catalog_key(store: ModelStore) -> str:
    """Item attributes (``item_attributes`` of the learn config) by item id, as JSON: what a
    scorer needs to build a candidate's features. Not versioned: attributes are facts."""
    return f"{store.prefix}:items"
