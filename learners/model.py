"""The models of one version (FTRL, BOPR and the embedding model), learned together from
labeled examples, written to the model store (learners/publish.py) and read back from it.

A version in the store holds::

    meta            source ("online" or "retrain"), parent version, created_ms, the hasher
                    (bits, crosses, and the spec: the entities and windows whose counts it
                    reads), BOPR's beta and prior variance, the negative sample rate,
                    examples learned and each model's metrics
    w:ftrl          coordinate -> w             (the non-zero weights)
    w:bopr          coordinate -> (mu, var)     (the coordinates that moved off the prior)
    w:dense         i -> the embedding model's dense weights (its bias last)
    emb:user/item   id -> row (own rows and the shared fallback rows)
    blob:models     the whole learner state, to continue training from this version

The models read the count features of the ``FeatureSpec`` they are made with (the hasher and
the embedding model's dense input alike) and keep it: a version loaded, or a scorer, reads the
spec it was trained with from the version, and loading one whose counts the given spec does
not count raises `NotCounted` naming them, instead of reading zeros for ever.

FTRL and BOPR learn the kept examples (negatives downsampled at ``negative_sample_rate``,
deterministically by id) and their predictions are recalibrated to the unsampled stream; the
embedding model weights kept negatives by 1/rate instead. Metrics are progressive: each
example is predicted before any model learns it, on the unsampled stream.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from features.hashing import DEFAULT_CROSSES, FeatureHasher
from features.spec import FeatureSpec, NotCounted
from joiner.events import why_not_learnable
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
# Calibration is reported per value of these (position 9 and beyond lumped together).
SLICES = {"position": 10, "hour": 24}


@dataclass(frozen=True)
class ModelSettings:
    """The models' hyperparameters (flows/build.py makes them from ``[learn]``); ``crosses``
    as tuples of field names."""

    hash_bits: int = 20
    crosses: tuple[tuple[str, ...], ...] = DEFAULT_CROSSES
    ftrl_alpha: float = 0.1
    ftrl_beta: float = 1.0
    ftrl_l1: float = 1.0
    ftrl_l2: float = 1.0
    bopr_beta: float = 1.0
    bopr_prior_variance: float = 0.01
    emb_dim: int = 16
    emb_min_count: int = 2
    emb_fallback_rows: int = 1024
    emb_evict_after_days: float = 7.0
    emb_lr: float = 0.2
    emb_max_dirty: int = 100_000
    negative_sample_rate: float = 1.0
    item_attributes: tuple[str, ...] = ("category",)  # kept by item id for scoring
    metrics_window: int = 100_000
    retrain_batch_size: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "crosses", tuple(tuple(c) for c in self.crosses))
        object.__setattr__(self, "item_attributes", tuple(self.item_attributes))
        if not 0 < self.negative_sample_rate <= 1:
            raise ValueError(f"negative_sample_rate must be in (0, 1], got "
                             f"{self.negative_sample_rate}")


def trained_spec(meta: Mapping) -> FeatureSpec:
    """The spec a version's meta (or a models blob's header) records. Versions written before
    it was recorded were all trained with the default spec."""
    return FeatureSpec.from_dict(meta["spec"]) if "spec" in meta else FeatureSpec()


def check_counted(meta: Mapping, spec: FeatureSpec, what: str) -> FeatureSpec:
    """The spec ``meta`` records (`trained_spec`); raises `NotCounted` naming the count
    features it reads that ``spec`` (what is counted now) does not count."""
    trained = trained_spec(meta)
    if missing := trained.missing_from(spec):
        raise NotCounted(f"{what} was trained on count features that are not counted now: "
                         f"{', '.join(missing)}; count them again (features.entities, "
                         "features.windows_ms) or start from fresh models")
    return trained


def make_hasher(meta: Mapping) -> FeatureHasher:
    """The hasher a version's meta describes: its bits, crosses and spec."""
    return FeatureHasher(bits=meta["hash_bits"], crosses=[tuple(c) for c in meta["crosses"]],
                         count_features=trained_spec(meta))


def slice_keys(examples: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Each example's position (0..9, 9 and beyond together) and hour (mod 24); -1 where the
    feature is missing or not an integer."""
    pos, hour = [], []
    for e in examples:
        f = e.get("features") or {}
        p, h = _int(f.get("position")), _int(f.get("hour"))
        pos.append(-1 if p is None or p < 0 else min(p, SLICES["position"] - 1))
        hour.append(-1 if h is None else h % 24)
    return {"position": np.array(pos, np.int64), "hour": np.array(hour, np.int64)}


def _int(v) -> int | None:
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.isdecimal():
        return int(v)
    return None


def take_rows(indptr: np.ndarray, indices: np.ndarray, mask: np.ndarray):
    """The rows of a CSR batch where ``mask`` is true."""
    lengths = np.diff(indptr)
    return (np.concatenate([[0], np.cumsum(lengths[mask])]),
            indices[np.repeat(mask, lengths)])


class Models:
    """FTRL, BOPR and the embedding model, with one hasher and progressive metrics; all read
    the count features of ``spec``."""

    def __init__(self, settings: ModelSettings, spec: FeatureSpec,
                 ftrl: FTRLProximal | None = None, bopr: BOPR | None = None,
                 emb: EmbeddingLearner | None = None) -> None:
        s = self.settings = settings
        self.spec = spec
        self.hasher = FeatureHasher(bits=s.hash_bits, crosses=s.crosses, count_features=spec)
        self.rate = float(s.negative_sample_rate)
        self.ftrl = ftrl or FTRLProximal(s.ftrl_alpha, s.ftrl_beta, s.ftrl_l1, s.ftrl_l2,
                                         bits=s.hash_bits)
        self.bopr = bopr or BOPR(s.bopr_beta, s.bopr_prior_variance, bits=s.hash_bits)
        self.emb = emb or EmbeddingLearner(
            dim=s.emb_dim, min_count=s.emb_min_count, fallback_rows=s.emb_fallback_rows,
            evict_after_ms=int(s.emb_evict_after_days * DAY_MS), lr=s.emb_lr,
            max_dirty=s.emb_max_dirty, seed=s.seed, count_entities=tuple(spec.entities),
            count_names=spec.feature_names())
        if self.emb.count_entities != tuple(spec.entities) or (
                self.emb.count_names != tuple(spec.feature_names())):
            raise ValueError("the embedding model reads other counts than the spec given")
        self.metrics = {m: ProgressiveMetrics(s.metrics_window, slices=SLICES) for m in MODELS}
        # The hasher's count matrix is the embedding model's too when they read the same
        # counts in the same order (they do from one spec).
        self._shared_counts = self.hasher.count_features == {
            e: self.emb.count_names for e in self.emb.count_entities}
        self.examples = 0  # learned (after downsampling)
        self.micro_batch = 1
        self.items: dict[str, dict] = {}  # item attributes seen since the last push

    # -- learning -----------------------------------------------------------------------------

    def predict(self, examples: Sequence[Mapping], csr=None, x=None) -> dict[str, np.ndarray]:
        """p of each model for each example, on the unsampled scale (``csr``: the examples
        hashed, ``x``: the embedding model's dense input, if made already)."""
        indptr, indices = csr if csr is not None else self.hasher.batch(examples)
        p = {"ftrl": self.ftrl.predict_many(indptr, indices),
             "bopr": self.bopr.predict_many(indptr, indices),
             "emb": self.emb.predict_batch(examples, x)}
        if self.rate < 1:
            p["ftrl"], p["bopr"] = recalibrate(p["ftrl"], self.rate), recalibrate(p["bopr"],
                                                                                   self.rate)
        return p

    def learn(self, examples: Sequence[dict], annotate: bool = False,
              checked: bool = False) -> dict[str, int]:
        """Predict (for the metrics), then learn the usable examples, ``MICRO_BATCH`` at a
        time: a prediction made with weights older than that costs log loss at a cold start,
        and FTRL overshoots on larger batches. With ``annotate`` each usable example gets
        ``online_p``: the models' predictions before learning it (the daily retrain compares
        itself with those). ``checked``: the caller already applied
        ``joiner.events.why_not_learnable`` (~7 us an example), so it is not run twice. Returns
        counts."""
        batch = list(examples) if checked else [e for e in examples
                                                if why_not_learnable(e) is None]
        learned = s = 0
        while s < len(batch):
            learned += self._learn(batch[s:s + self.micro_batch], annotate)
            s += self.micro_batch
            # From 1 up: a fresh model's first predictions are not made by an empty model
            # for a whole micro-batch.
            self.micro_batch = min(2 * self.micro_batch, MICRO_BATCH)
        return {"examples": len(batch), "learned": learned}

    def _learn(self, batch: list[dict], annotate: bool) -> int:
        # Each example's features are made once, for the predictions and the learning alike,
        # and its counts read once for all models.
        counts = self.hasher.count_values(batch)
        csr = self.hasher.batch(batch, counts)
        x = self.emb.dense_features(batch, counts if self._shared_counts else None)
        y = np.fromiter((e["label"] for e in batch), np.float64, len(batch))
        if self.rate < 1:
            predictions = self.predict(batch, csr, x)
            keep = keep_many([e["impression_id"] for e in batch], y, self.rate)
            learn = [e if e["label"] else {**e, "sample_rate": self.rate}
                     for e, k in zip(batch, keep, strict=True) if k]
            self.ftrl.learn_many(*take_rows(*csr, keep), y[keep])
            self.bopr.learn_many(*take_rows(*csr, keep), y[keep])
            self.emb.learn_batch(learn, checked=True, x=x[keep])
        else:
            # The hashed learners return each example's prediction made before learning it
            # (from the weights at its chunk's start): no separate pass to predict.
            predictions = {"ftrl": self.ftrl.learn_many(*csr, y),
                           "bopr": self.bopr.learn_many(*csr, y),
                           "emb": self.emb.predict_batch(batch, x)}
            self.emb.learn_batch(batch, checked=True, x=x)
            learn = batch
        keys = slice_keys(batch)
        for name, p in predictions.items():
            self.metrics[name].update_many(p, y, keys)
        if annotate:
            for i, e in enumerate(batch):
                e["online_p"] = {name: float(p[i]) for name, p in predictions.items()}
        batch = learn
        attrs = self.settings.item_attributes
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
        return {"format": FORMAT, "hash_bits": self.hasher.bits,
                "crosses": [list(x) for x in self.hasher.crosses], "spec": self.spec.to_dict(),
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
        arrays, header = {}, {"format": FORMAT, "examples": self.examples, "items": self.items,
                              # the hasher, to continue hashing as these models learned
                              "hash_bits": self.hasher.bits, "spec": self.spec.to_dict(),
                              "crosses": [list(x) for x in self.hasher.crosses]}
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
    def from_bytes(cls, settings: ModelSettings, spec: FeatureSpec, data: bytes,
                   what: str = "the model state") -> Models:
        """The models ``to_bytes`` wrote, hashing and reading counts as they learned (their
        own spec, bits and crosses; ``settings`` for the rest). ``spec`` is what is counted
        now: models that read counts it does not count raise `NotCounted` naming them."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = orjson.loads(arrays.pop("header").tobytes())
        if header.get("format") != FORMAT:
            raise ValueError(f"model state of format {header.get('format')}, expected {FORMAT}")

        def state(name):
            return {**header[name], **{k[len(name) + 1:]: v for k, v in arrays.items()
                                       if k.startswith(name + ".")}}

        trained = check_counted(header, spec, what)
        if "hash_bits" in header:  # else from before the header kept them: the settings'
            settings = dataclasses.replace(settings, hash_bits=header["hash_bits"],
                                           crosses=header["crosses"])
        models = cls(settings, trained, FTRLProximal.from_state(state("ftrl")),
                     BOPR.from_state(state("bopr")),
                     EmbeddingLearner.from_bytes(arrays.pop("emb").tobytes()))
        for name, m in models.metrics.items():
            for k, v in state(f"metrics.{name}").items():
                setattr(m, k, v)
        models.examples, models.items = header["examples"], header["items"]
        return models

    @classmethod
    def load(cls, settings: ModelSettings, spec: FeatureSpec, store: ModelStore,
             version: str) -> Models:
        """``version``'s models (see `from_bytes`)."""
        data = store.get_blob(version, "models")
        if data is None:
            raise LookupError(f"version {version} of {store.prefix} has no models blob")
        return cls.from_bytes(settings, spec, data, f"model version {version} of {store.prefix}")


def catalog_key(store: ModelStore) -> str:
    """Item attributes (``item_attributes`` of the learn config) by item id, as JSON: what a
    scorer needs to build a candidate's features. Not versioned: attributes are facts."""
    return f"{store.prefix}:items"
