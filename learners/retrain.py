"""The daily full retrain: one day of archived examples -> a new model version, published only
when it is not worse than the online models on the day's last hours.

What it does, in order (`retrain`):

1. **Read the day** (`load_day`): ``ExampleArchive.read_day`` with the late-click
   corrections applied, so an impression whose click came after the join's wait window is a
   positive here (the online models learned it as a negative), and the learnable rows (the
   learn flow's rule, ``joiner.events.why_not_learnable``, applied to the columns:
   `learnable`) in event-time order (ties in archive order).
2. **Warm start** (`find_base`): from the newest version published by a retrain of an
   *earlier* day, not from the current version: the online models have already learned this
   day, and retraining them on it would learn it twice, holdout included, which blinds the
   rule: such a retrain (one more shuffled epoch over the day, every parameter) scored
   holdout NE 0.92-0.96 against 0.97-0.98 online and was never refused, while on the next
   day it was worse than online only for the embedding model (+0.0003, +0.0008;
   ``bench/retrain.py``, "simplified retrain"). None yet (the first day), or one
   whose hasher differs from the settings (bits, crosses, the count features it reads:
   `incompatible`): fresh models.
3. **Split**: the last ``holdout_fraction`` of the day's examples (by count, in event time) is
   the holdout; the rest is the training set.
4. **Train** (`train_epoch`) on the training set: FTRL and BOPR batch by batch, two passes
   (``RetrainSettings.linear_epochs``) each in a shuffled order drawn from ``seed``, the
   embedding model (rows and dense part) once in event-time order, as it learns online
   (``RetrainSettings.emb_order``). Negatives are downsampled exactly as online (by id,
   ``negative_sample_rate``). Over 3 simulated days (``python bench/retrain.py``, ~86k
   examples a day), next-day NE against online only: FTRL -0.0023 and -0.0043, BOPR -0.0013
   and -0.0034 with two passes (one: -0.0002 / -0.0014 and -0.0005 / -0.0018; three: FTRL
   -0.0030 / -0.0054, BOPR -0.0010 / -0.0036, for 1.5x the time). Why not shuffled for the
   embedding model too: with its dense part learned online, one shuffled epoch was a lottery
   on the next day (NE 0.9676 to 0.9736 over four shuffle seeds of one simulated day, against
   0.9682 online and 0.9677 in time order), and over 3 simulated days it made the next day
   worse than online only (+0.0038, +0.0017) where time order did not (-0.0006, +0.0000):
   ``python bench/retrain.py --emb-order shuffled`` against ``python bench/retrain.py``.
   (The simulator's interests turn once a day; a second pass in time order, or smaller
   batches, did not help either.)
5. **Evaluate on the holdout, and learn it** (`learn_holdout`): the new models predict each
   holdout example, then learn it, in event-time order and micro-batches, as the learn flow
   would have (``Models.learn``). Their NE there is compared, model by model and on the same
   (corrected) labels, with the NE of the online models' own progressive predictions stored
   in the archive (``p_ftrl``/``p_bopr``/``p_emb``). Progressive against progressive: both
   predicted each example before learning it, and both had learned the holdout's earlier
   part by then. The NE of the new models' predictions *before* learning any of the holdout
   ("frozen") is computed too and reported; with ``evaluation="frozen"`` the rule uses it.
   Why progressive by default: it is what the published version will do (the learn flow
   continues from it), and what the online numbers are. Frozen predictions over a couple of
   hours of drift are another quantity: on simulated days they differed from the
   progressive ones by up to about the default margin, either way (``python
   bench/retrain.py --rate 1.5``: FTRL 0.9646 progressive, 0.9687 frozen, online 0.9669).
   Learning the holdout this way also means the published version has seen the whole day.
   (A second shuffled epoch over the holdout alone was tried instead: it pulled the
   embedding model's dense part toward the day's last hours and made it worse on the next
   morning.)
6. **Decide model by model** (`model_decisions`), paired on the holdout (same examples, same
   labels; ``ne_difference_se`` from the per-example log-loss differences): a model's
   retrain goes into the version unless its NE is above the online one by more than
   ``max_ne_regression`` or, for a model named in ``min_gain_se`` (default: the embedding
   model, 2 se; `MIN_GAIN_SE` says why), it is not below it by more than that many paired
   standard errors ("no measurable gain"). A model that fails keeps its online state in the
   version (`replay_online`: the warm start learning the day as the learn flow did, labels
   as joined, same micro-batches; `keep_online`), with its reason in ``kept_online`` and
   the meta, and printed. One version still holds all three models. **Refuse** when no
   model passes; also when the rule cannot be applied (no holdout, no positive in
   it, online predictions missing for most of it) or when a retrain of a later day already
   exists (publishing this one would go back in time). ``force`` publishes the retrained
   models anyway. A refused retrain's models (refused by the rule: every model in its
   online state; else as retrained) are still written, as a version never published (meta
   ``refused``: the reason; it expires after ``keep_days``), the next day's warm start:
   from fresh models instead, that retrain would lose to online models that have learned
   every day so far, and be refused too (``python bench/retrain.py --max-ne-regression 0``,
   before the online states were kept: the second day's, warm-started from nothing, was
   worse on its holdout by 0.0012-0.0060 and on the next day by 0.0008-0.0046; now the
   first day's is refused, the second's, from the online states, published: FTRL -0.0024,
   BOPR -0.0019 on the third day).
7. **Publish** (`publish`): ``Models.write_version`` (source ``"retrain"``, parent the warm
   start) under a new version namespace, then one pointer flip expecting the version that
   was current when the retrain started. When the learn flow published one of its periodic
   versions meanwhile, publish over it (the learn flow then continues from ours); when
   another retrain did, refuse. The version replaced expires after ``keep_days`` (the learn
   flow's own periodic ones after ``online_keep_hours``, as the learn flow does). The learn
   flow, on finding our version current, loads it and learns again what it archived since
   the day's end (``OnlineTrainer.replay_since``): the retrain saw the day, not the hour or
   two after it, and nothing learned online is dropped.

Same archive, same ``seed`` and same base version: the same model state, byte for byte
(``Models.to_bytes``; tests/test_retrain.py checks it).

The day is held as an Arrow table (the archive's columns, JSON text for features and
counts: ~600 B an example) and turned into example dicts a chunk at a time: as dicts it
would take ~2.6 KB an example (measured with tracemalloc on simulated examples), 11 GB for
a day at the generator's default 50 impressions/s. The training loop lives here rather than in
``Models.train_epoch`` for that and for progress reporting; it does what ``train_epoch``
does plus the negative downsampling.

    result = retrain(RetrainSettings(ModelSettings(), spec), "2023-11-15", store, archive,
                     progress=tqdm)
    result.status, result.ne_online, result.ne_retrained
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.spec import FeatureSpec
from joiner.errors import CtrstreamError
from learners.archive import ONLINE_P, ExampleArchive, to_examples
from learners.metrics import ProgressiveMetrics, log_loss, normalized_entropy
from learners.model import MICRO_BATCH, MODELS, Models, ModelSettings, trained_spec
from learners.publish import ModelStore, PublishConflict
from learners.sampling import keep_many

log = logging.getLogger(__name__)

SOURCE = "retrain"
CHUNK_BATCHES = 32  # batches decoded from Arrow (and reported to the progress bar) at a time
MIN_ONLINE_COVERAGE = 0.5  # share of the holdout that must carry the online predictions
PUBLISH_ATTEMPTS = 5  # pointer flips tried while the learn flow keeps publishing
EVALUATIONS = ("progressive", "frozen")
EMB_ORDERS = ("time", "shuffled")
# The embedding model's retrain is its online pass again (time order, micro-batches) with the
# late clicks relabelled: over 3 simulated days x 3 seeds (bench/retrain.py) it moved the next
# day's NE by -0.0005 to +0.0000 against online, and the holdout's by -0.0033 to +0.0013
# against 2 paired se of 0.0028-0.0052: it must show a measurable gain, and has not yet.
# FTRL's and BOPR's two shuffled passes improved the next day in each of those 12 cases
# (-0.0012 to -0.0043), yet on the holdout they were worse in 5 of 12 (up to +0.0021) and
# never 2 se better: a gain requirement would keep them online every day; the margin only.
MIN_GAIN_SE = {"emb": 2.0}
# Holdout NE of the replayed online state against the learn flow's own beyond which a warning
# says the replay is not the online state (its micro-batches follow its poll batches: 0.0003
# apart in the two-day test).
REPLAY_TOLERANCE = 0.005


class NoArchive(CtrstreamError, LookupError):
    """The archive holds no examples for that date."""

    exit_code = 2

    def __init__(self, date: str, root: str, days: list[str]) -> None:
        shown = ", ".join(days[-10:]) if days else "none"
        more = f" (and {len(days) - 10} earlier)" if len(days) > 10 else ""
        super().__init__(f"no archived examples for {date} under {root}/date={date}; "
                         f"days in the archive: {shown}{more}")
        self.date, self.root, self.days = date, root, days


class RetrainConflict(CtrstreamError, RuntimeError):
    """Another publisher than the learn flow made a version current while the retrain ran."""

    exit_code = 4

    def __init__(self, message: str, version: str, found: str | None) -> None:
        super().__init__(message)
        self.version, self.found = version, found


@dataclass(frozen=True)
class RetrainSettings:
    """What a retrain needs besides the data (flows/build.py makes it from the config)."""

    models: ModelSettings = field(default_factory=ModelSettings)
    spec: FeatureSpec = field(default_factory=FeatureSpec)  # what the counters count
    holdout_fraction: float = 0.1
    max_ne_regression: float = 0.005
    online_keep_hours: float = 2.0  # how long a learn flow's version replaced stays readable
    emb_order: str = "time"  # the embedding model's order in `train_epoch` (EMB_ORDERS)
    linear_epochs: int = 2  # FTRL's and BOPR's passes over the training set (see step 4)
    # > 0: a second time-ordered pass on the embedding model's rows only, at this fraction of
    # their step size (`train_epoch`). Off: with 0.5, the embedding model's next day against
    # online (bench/retrain.py --emb-row-pass 0.5, seeds 0-2, "candidate") was +0.0000 /
    # +0.0000, -0.0004 / -0.0002, -0.0010 / +0.0003, no better than without. A first scratch
    # version's -0.0010 / -0.0004 on seed 0 came from the dense block's Adagrad sums growing
    # during that pass (its step 0): a smaller dense step on the next day, not the rows.
    emb_row_pass: float = 0.0
    # A model named here replaces its online state with its retrain only when its holdout NE
    # is below the online one by more than this many paired standard errors; the others
    # only when not above it by more than max_ne_regression (`model_decisions`).
    min_gain_se: Mapping[str, float] = field(default_factory=lambda: dict(MIN_GAIN_SE))


@dataclass
class Day:
    """One day's learnable examples, in event-time order."""

    date: str
    table: pa.Table  # the archive's columns and late_click, learnable rows only, by ts
    rows: int  # rows the archive holds for the day (each impression_id once)

    @property
    def examples(self) -> int:
        return self.table.num_rows

    @property
    def positives(self) -> int:
        return int(pc.sum(self.table["label"]).as_py() or 0)

    @property
    def late_positives(self) -> int:
        """Positives only because of a late-click correction."""
        return int(pc.sum(pc.cast(self.table["late_click"], pa.int64())).as_py() or 0)


@dataclass
class RetrainResult:
    """What a retrain did; ``to_dict`` for JSON. ``status``: "published" (``kept_online``:
    the models published in their online state, and why), "refused" (no model passes the
    rule, or nothing to compare with), "conflict" (another retrain published meanwhile) or
    "dry_run" (evaluated, not published; ``reason`` says why it would have been refused)."""

    date: str
    status: str = "refused"
    reason: str | None = None
    forced: bool = False
    evaluation: str = "progressive"
    seed: int = 0
    version: str | None = None  # the version written (None when refused before writing)
    previous: str | None = None  # the version it replaced as current
    published_over: list[str] = field(default_factory=list)  # online versions published over
    base: str | None = None  # the warm start (None: fresh models)
    base_date: str | None = None
    rows: int = 0  # in the archive for the day
    examples: int = 0  # learnable
    positives: int = 0  # after corrections
    late_positives: int = 0  # of which positive only by a late-click correction
    train_examples: int = 0
    holdout_examples: int = 0
    holdout_positives: int = 0
    online_coverage: float = float("nan")  # holdout share with the online predictions
    ne_online: dict[str, float] = field(default_factory=dict)
    ne_retrained: dict[str, float] = field(default_factory=dict)  # the rule's numbers
    ne_retrained_progressive: dict[str, float] = field(default_factory=dict)
    ne_retrained_frozen: dict[str, float] = field(default_factory=dict)
    ne_difference_se: dict[str, float] = field(default_factory=dict)  # of retrained - online
    # Models whose retrain did not beat their online state: why; the version holds their
    # online state (`replay_online`) instead. The others: "retrained".
    kept_online: dict[str, str] = field(default_factory=dict)
    ne_online_replayed: dict[str, float] = field(default_factory=dict)  # replay's, holdout
    timings_s: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    models: Models | None = field(default=None, repr=False)  # the models written
    # The retrained models, each one, whether it was kept or not (`models` when none is).
    candidates: Models | None = field(default=None, repr=False)

    @property
    def train_examples_per_s(self) -> float:
        t = self.timings_s.get("train", 0.0)
        return self.train_examples / t if t else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("models", "candidates")}
        out["train_examples_per_s"] = self.train_examples_per_s
        return out


# -- the steps ------------------------------------------------------------------------------


def day_str(date: str | dt.date) -> str:
    return date.isoformat() if isinstance(date, dt.date) else dt.date.fromisoformat(
        date).isoformat()


# JSON as the archive writes it (orjson: compact, finite numbers), in RE2 syntax.
_STR = r'"(?:[^"\\]|\\.)*"'
_NUM = r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?"
_COUNT = r"(?:(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|-0(?:\.0+)?(?:[eE][+-]?\d+)?)"  # -0 is 0


def _object(value: str) -> str:
    return rf"\{{(?:{_STR}:{value}(?:,{_STR}:{value})*)?\}}"


_FEATURES = f"^{_object(f'(?:{_STR}|{_NUM})')}$"  # string or number values
_COUNTS = f"^{_object(_object(_COUNT))}$"  # {entity: {name: number >= 0}}


def learnable(t: pa.Table) -> pa.Array:
    """Which rows of an archive table (``read_day``) ``joiner.events.why_not_learnable``
    accepts, as ``to_examples`` decodes them, decided on the columns at once: asking the rule
    row by row means decoding every row's JSON first, for millions of rows. A null features
    or counts column is a record that had none. tests/unit/learners/test_learnable_filter.py
    checks that the two agree."""
    checks = [
        pc.greater(pc.utf8_length(t["impression_id"]), 0),
        pc.is_valid(t["ts"]), pc.is_valid(t["user_id"]), pc.is_valid(t["item_id"]),
        pc.is_in(t["label"], value_set=pa.array([0, 1], t.schema.field("label").type)),
        pc.fill_null(pc.match_substring_regex(t["features"], _FEATURES), True),
        pc.fill_null(pc.match_substring_regex(t["counts"], _COUNTS), True),
        pc.invert(pc.fill_null(t["quarantined"], False)),
    ]
    ok = checks[0]
    for c in checks[1:]:
        ok = pc.and_kleene(ok, c)
    return pc.fill_null(ok, False)  # a null (a missing impression_id) is not learnable


def load_day(archive: ExampleArchive, date: str | dt.date) -> Day:
    """The day's learnable examples (late clicks applied) in event-time order; `NoArchive`
    when the archive holds no file of examples for the date."""
    date = day_str(date)
    if date not in (days := archive.days()):
        raise NoArchive(date, str(archive.root), days)
    t = archive.read_day(date)
    rows = t.num_rows
    t = t.filter(learnable(t))
    order = np.argsort(t["ts"].to_numpy(zero_copy_only=False), kind="stable")
    return Day(date, t.take(order).combine_chunks(), rows)


def split_holdout(n: int, fraction: float) -> int:
    """Index of the first holdout example among ``n`` in event-time order."""
    return n - min(n, int(round(n * fraction)))


def retrain_versions(store: ModelStore) -> list[tuple[str, dict]]:
    """(version, meta) of every complete version a retrain wrote that has not expired,
    newest first."""
    out = []
    for version in sorted((v["version"] for v in store.versions() if v["complete"]),
                          key=int, reverse=True):
        meta = store.get_meta(version)
        if meta and meta.get("source") == SOURCE:
            out.append((version, meta))
    return out


def find_base(store: ModelStore, before: str) -> tuple[str, dict] | tuple[None, None]:
    """The newest version written by a retrain of a day before ``before`` (published or
    not: a refused one too), and its meta."""
    for version, meta in retrain_versions(store):
        if str(meta.get("date", "")) < before:
            return version, meta
    return None, None


def incompatible(meta: Mapping, models: Models) -> str | None:
    """Why a version's models cannot be continued as ``models`` (fresh ones made from the
    settings) would learn, or None: another hasher, or other count features read (ones not
    counted now would read 0; ones counted now but not read would be left out)."""
    want = models.describe()
    for key in ("format", "hash_bits", "crosses", "sample_rate"):
        if meta.get(key) != want[key]:
            return f"its {key} is {meta.get(key)!r}, the config's {want[key]!r}"
    trained = trained_spec(meta)
    if missing := trained.missing_from(models.spec):
        return f"it reads count features that are not counted now: {', '.join(missing)}"
    if unread := models.spec.missing_from(trained):
        return f"it does not read count features counted now: {', '.join(unread)}"
    return None


def later_retrain(store: ModelStore, date: str) -> tuple[str, str] | None:
    """(version, date) of a retrain of a day after ``date`` that was not refused, if one is
    still in the store."""
    for version, meta in retrain_versions(store):
        if str(meta.get("date", "")) > date and not meta.get("refused"):
            return version, str(meta["date"])
    return None


def _batches(n: int, size: int) -> int:
    return -(-n // size)


def _progress(factory: Callable[..., Any] | None, total: int, desc: str):
    return factory(total=total, desc=desc) if factory is not None else None


def _note_items(models: Models, examples: list[dict]) -> None:
    attrs = models.settings.item_attributes
    for e in examples:
        feats = e.get("features") or {}
        models.items[str(e["item_id"])] = {a: feats[a] for a in attrs if a in feats}


def train_epoch(models: Models, table: pa.Table, seed: int,
                progress: Callable[..., Any] | None = None, emb_order: str = "time",
                linear_epochs: int = 1, emb_row_pass: float = 0.0) -> int:
    """One pass over ``table``'s rows (in event-time order): FTRL and BOPR learn each batch
    of ``retrain_batch_size`` in the order ``permutation(seed)`` (``linear_epochs`` passes,
    each in an order of its own); the embedding model trains every parameter (rows and dense
    part) once on the same examples in event-time order and in the learn flow's micro-batches
    (``emb_order="time"``, as it learns online) or in the first pass's shuffled order
    ("shuffled"). ``emb_row_pass`` > 0: then a second pass over the same examples in time
    order on the embedding model's rows only, at that fraction of the row step size
    (`EmbeddingLearner.learn_rows`; the dense block, learned online, is not learned twice).
    Returns the examples learned (after downsampling)."""
    if emb_order not in EMB_ORDERS:
        raise ValueError(f"emb_order must be one of {EMB_ORDERS}, got {emb_order!r}")
    step = models.settings.retrain_batch_size
    n = table.num_rows
    order = np.random.default_rng(seed).permutation(n)
    if models.rate < 1:  # the same examples the online models kept, by id
        keep = keep_many(table["impression_id"].to_pylist(), table["label"].to_numpy(),
                         models.rate)
        order = order[keep[order]]
    emb, kept = models.emb, np.sort(order)
    if emb_order == "shuffled":
        # Count every sighting first, as EmbeddingLearner.train_epoch does: an id frequent
        # in the day learns in its own row from its first example. (In time order,
        # learn_batch counts them as they come, as online.)
        ts = table["ts"].to_numpy()[kept]
        for name, table_ in (("user_id", emb.users), ("item_id", emb.items)):
            table_.observe(table[name].take(kept).to_pylist(), ts)
    dense_version = emb.dense_version
    passes = [("linear", order)] + [
        ("linear", order[np.random.default_rng([seed, k]).permutation(len(order))])
        for k in range(1, linear_epochs)] + ([("emb", kept)] if emb_order == "time" else []) + (
        [("emb_rows", kept)] if emb_row_pass > 0 else [])
    bar = _progress(progress, len(passes) * _batches(len(order), step), "train")
    chunk = step * CHUNK_BATCHES
    try:
        for p, (what, rows) in enumerate(passes):
            for c, s in enumerate(range(0, len(rows), chunk)):
                examples = to_examples(table.take(rows[s:s + chunk]))
                if models.rate < 1:
                    examples = [e if e["label"] else {**e, "sample_rate": models.rate}
                                for e in examples]
                if what == "emb":
                    for b in range(0, len(examples), MICRO_BATCH):  # `learnable` rows
                        emb.learn_batch(examples[b:b + MICRO_BATCH], checked=True)
                elif what == "emb_rows":
                    for b in range(0, len(examples), MICRO_BATCH):
                        emb.learn_rows(examples[b:b + MICRO_BATCH], emb_row_pass)
                else:
                    for b in range(0, len(examples), step):
                        part = examples[b:b + step]
                        indptr, indices = models.hasher.batch(part)
                        y = np.fromiter((e["label"] for e in part), np.float64, len(part))
                        models.ftrl.learn_many(indptr, indices, y)
                        models.bopr.learn_many(indptr, indices, y)
                    if p == 0 and emb_order == "shuffled":
                        # Already in shuffled order; train_epoch shuffles them again within
                        # the chunk, from a seed of its own.
                        emb.train_epoch(examples, batch_size=step, shuffle_seed=seed + 1 + c,
                                        observe=False, checked=True)
                    if p == 0:
                        _note_items(models, examples)
                        models.examples += len(examples)
                if bar is not None:
                    bar.update(_batches(len(examples), step))
    finally:
        if bar is not None:
            bar.close()
    emb.dense_version = dense_version + 1  # one epoch, whatever the number of chunks
    return len(order)


def online_predictions(table: pa.Table) -> dict[str, np.ndarray]:
    """The online models' progressive predictions stored with each example (NaN: none)."""
    return {key: pc.fill_null(table[col], float("nan")).to_numpy(zero_copy_only=False)
            for col, key in ONLINE_P.items()}


def learn_holdout(models: Models, table: pa.Table,
                  progress: Callable[..., Any] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Predict the holdout with the models as trained (frozen), then learn it in event-time
    order as the learn flow would (``Models.learn``: each example predicted just before it is
    learned). Returns (frozen, progressive) predictions, each model -> array. The models'
    progressive metrics restart here: they describe the new version on the holdout."""
    models.metrics = {m: ProgressiveMetrics(models.settings.metrics_window) for m in MODELS}
    step = models.settings.retrain_batch_size
    chunk = step * CHUNK_BATCHES
    n = table.num_rows
    frozen = {m: np.empty(n) for m in MODELS}
    progressive = {m: np.empty(n) for m in MODELS}
    bar = _progress(progress, 2 * _batches(n, step), "holdout")
    try:
        for learn in (False, True):
            for s in range(0, n, chunk):
                examples = to_examples(table.slice(s, chunk))
                k = len(examples)
                if not learn:
                    for m, p in models.predict(examples).items():
                        frozen[m][s:s + k] = p
                else:
                    for e in examples:
                        e.pop("online_p", None)  # the online models'; Models.learn sets ours
                    models.learn(examples, annotate=True, checked=True)  # load_day did
                    for m in MODELS:
                        progressive[m][s:s + k] = [e["online_p"][m] for e in examples]
                if bar is not None:
                    bar.update(_batches(k, step))
    finally:
        if bar is not None:
            bar.close()
    return frozen, progressive


def normalized_entropies(p: Mapping[str, np.ndarray], y: np.ndarray,
                         mask: np.ndarray) -> dict[str, float]:
    return {m: normalized_entropy(p[m][mask], y[mask]) for m in MODELS}


def ne_difference_se(new: Mapping[str, np.ndarray], online: Mapping[str, np.ndarray],
                     y: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The standard error of each model's NE difference (retrained - online), from the
    per-example log-loss differences (paired: same examples, same labels). Only reported:
    with a few hundred positives in the holdout it is about as large as the default margin,
    so a refusal close to the margin may be noise."""
    y = y[mask]
    ctr = float(y.mean()) if len(y) else float("nan")
    h = -(ctr * np.log(ctr) + (1 - ctr) * np.log1p(-ctr)) if 0 < ctr < 1 else float("nan")
    out = {}
    for m in MODELS:
        d = log_loss(new[m][mask], y) - log_loss(online[m][mask], y)
        out[m] = float(d.std(ddof=1) / np.sqrt(len(d)) / h) if len(d) > 1 else float("nan")
    return out


def refusal(ne_online: Mapping[str, float], ne_retrained: Mapping[str, float],
            max_ne_regression: float) -> str | None:
    """Why the retrained models must not be published (None: they may): for each model
    whose NE is worse than the online model's by more than ``max_ne_regression``."""
    worse = [f"{m}: retrained NE {ne_retrained[m]:.4f} > online NE {ne_online[m]:.4f} + "
             f"{max_ne_regression:g} (learn.max_ne_regression)"
             for m in MODELS if not ne_retrained[m] <= ne_online[m] + max_ne_regression]
    if not worse:
        return None
    return "worse than the online models on the holdout: " + "; ".join(worse)


def model_decisions(ne_online: Mapping[str, float], ne_retrained: Mapping[str, float],
                    se: Mapping[str, float], max_ne_regression: float,
                    min_gain_se: Mapping[str, float]) -> dict[str, str | None]:
    """Each model's retrain against its online state on the holdout, paired (same examples,
    same labels): None when the retrain may replace it, else why not: worse by more than
    ``max_ne_regression``, or, for a model in ``min_gain_se``, no measurable gain (the NE
    difference not below ``-min_gain_se[m]`` paired standard errors). A fixed margin alone
    cannot say the latter: with a few hundred holdout positives, 2 se of the difference is
    0.003-0.007."""
    out: dict[str, str | None] = {}
    for m in MODELS:
        new, on, e = ne_retrained[m], ne_online[m], se.get(m, float("nan"))
        d, z = new - on, min_gain_se.get(m)
        if not new <= on + max_ne_regression:
            out[m] = (f"{m}: retrained NE {new:.4f} > online NE {on:.4f} + "
                      f"{max_ne_regression:g} (learn.max_ne_regression)")
        elif z is not None and not d < -z * e:
            out[m] = (f"{m}: no measurable gain: retrained NE {new:.4f}, online {on:.4f}, "
                      f"difference {d:+.4f}, needs < {-z * e:+.4f} ({z:g} paired se of "
                      f"{e:.4f})")
        else:
            out[m] = None
    return out


def parse_min_gain_se(text: str) -> dict[str, float]:
    """``--min-gain-se``: "2" (every model), "emb=2,ftrl=1" (those models), "" (none)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.rpartition("=")
        if eq and name not in MODELS:
            raise ValueError(f"unknown model {name!r} in {text!r} (models: "
                             f"{', '.join(MODELS)})")
        out.update({name: float(value)} if eq else dict.fromkeys(MODELS, float(value)))
    return out


def replay_online(models: Models, train: pa.Table, holdout: pa.Table
                  ) -> dict[str, np.ndarray]:
    """The online state at the day's end, as the learn flow learned the day from the warm
    start: ``Models.learn`` over the day in event-time order with the labels as joined
    online (a late click was a negative then), in the same micro-batches as one call over the
    whole day would make (a chunk of examples decoded at a time ends on a micro-batch
    boundary: the predictions of the hashed learners are from the weights at their
    micro-batch's start, and restarting the batches at each chunk changed the holdout NE by
    up to 0.004 on a simulated day). A model whose retrain is not kept goes into the version
    in this state; the learn flow replays what it archived since the day's end into it, as
    into any retrain's. Returns the holdout's progressive predictions (the archived online
    ones, when the warm start is what the learn flow had: ``ne_online_replayed`` says how
    close); the metrics restart at the holdout, on its corrected labels, as `learn_holdout`'s
    do."""
    table = pa.concat_tables([train, holdout]).combine_chunks()
    cut, n = train.num_rows, table.num_rows
    step = models.settings.retrain_batch_size * CHUNK_BATCHES
    out = {m: np.empty(holdout.num_rows) for m in MODELS}
    pending: list[dict] = []
    done = 0  # examples learned
    for s in range(0, n, step):
        examples = to_examples(table.slice(s, step))
        for e in examples:
            e.pop("online_p", None)
            if e.get("late_click"):
                e["label"] = 0
        pending += examples
        k, mb = len(pending), models.micro_batch
        if s + step < n:  # not the last chunk: up to the last whole micro-batch
            k = 0
            while k + mb <= len(pending):
                k, mb = k + mb, min(2 * mb, MICRO_BATCH)
        models.learn(pending[:k], annotate=True, checked=True)
        for i in range(max(cut - done, 0), k):
            for m in MODELS:
                out[m][done + i - cut] = pending[i]["online_p"][m]
        done, pending = done + k, pending[k:]
    y = holdout["label"].to_numpy(zero_copy_only=False)
    for m in MODELS:
        models.metrics[m] = ProgressiveMetrics(models.settings.metrics_window)
        models.metrics[m].update_many(out[m], y)
    return out


def keep_online(models: Models, online: Models, kept: set[str]) -> None:
    """``models`` with the ``kept`` models (and their metrics) taken from ``online``."""
    for m in kept:
        setattr(models, m, getattr(online, m))
        models.metrics[m] = online.metrics[m]


def publish(store: ModelStore, models: Models, *, base: str | None, expected: str | None,
            extra: Mapping, online_keep_days: float,
            attempts: int = PUBLISH_ATTEMPTS) -> tuple[str, str | None, list[str]]:
    """Write the models as a new version and make it current, expecting ``expected`` to be
    current; publish over online versions published meanwhile. Returns (version, previous,
    online versions published over); raises `RetrainConflict` when another retrain (or
    anything but the learn flow) moved the pointer. The replaced version expires after the
    store's keep_days, an online one after ``online_keep_days``."""
    version = models.write_version(store, SOURCE, parent=base, extra=extra)
    over: list[str] = []
    for _ in range(attempts):
        prev_meta = store.get_meta(expected) if expected is not None else None
        online = prev_meta is not None and prev_meta.get("source") == "online"
        try:
            previous = store.publish(version, expected_current=expected,
                                     keep_days=online_keep_days if online else None)
            return version, previous, over
        except PublishConflict as e:
            found = e.found
            meta = store.get_meta(found) if found is not None else None
            source = meta.get("source") if meta else None
            if found is not None and source != "online":
                what = (f"a retrain of {meta.get('date')}" if source == SOURCE
                        else f"a publisher of source {source!r}")
                raise RetrainConflict(
                    f"version {found} ({what}) was made current while this retrain ran "
                    f"(it expected {expected!r}); not publishing version {version} over it "
                    f"(it stays unpublished and expires)", version, found) from None
            if found is None:
                log.warning("retrain: the model pointer disappeared meanwhile (Redis "
                            "emptied?); publishing into an empty store")
            else:
                log.info("retrain: the learn flow published version %s meanwhile; "
                         "publishing %s over it", found, version)
                over.append(found)
            expected = found
    raise RetrainConflict(f"the model pointer moved during each of {attempts} attempts to "
                          f"publish version {version}", version, expected)


# -- all together ---------------------------------------------------------------------------


def retrain(settings: RetrainSettings, date: str | dt.date, store: ModelStore,
            archive: ExampleArchive, *,
            seed: int | None = None, force: bool = False, dry_run: bool = False,
            evaluation: str = "progressive",
            progress: Callable[..., Any] | None = None) -> RetrainResult:
    """Retrain on ``date`` and publish (see the module docstring). ``seed`` defaults to the
    model settings' ``seed``. ``progress`` is called
    as ``progress(total=batches, desc=phase)`` and must return an object with ``update(n)``
    and ``close()`` (``tqdm.tqdm`` does). Raises `NoArchive`; Redis errors propagate."""
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}")
    t_start = time.perf_counter()
    date = day_str(date)
    seed = settings.models.seed if seed is None else seed
    res = RetrainResult(date=date, evaluation=evaluation, seed=seed)
    timings = res.timings_s

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 3)
        return now

    t = time.perf_counter()
    day = load_day(archive, date)
    res.rows, res.examples = day.rows, day.examples
    res.positives, res.late_positives = day.positives, day.late_positives
    if skipped := archive.skipped_files:
        res.warnings.append(f"unreadable archive files skipped: {', '.join(skipped)}")
    expected = store.current()  # what the pointer must still name when we publish
    fresh = Models(settings.models, settings.spec)
    base, meta = find_base(store, date)
    models = fresh
    if base is not None:
        why = incompatible(meta, fresh)
        if why is None:
            models = Models.load(settings.models, settings.spec, store, base)
            res.base, res.base_date = base, str(meta.get("date"))
        else:
            res.warnings.append(f"not warm-starting from retrain version {base}: {why}")
    log.info("retrain %s: %s examples (%s positive, %s by late clicks); %s", date,
             f"{res.examples:,}", f"{res.positives:,}", f"{res.late_positives:,}",
             f"warm start from version {base} ({res.base_date})" if res.base
             else "fresh models")
    t = lap("read", t)

    cut = split_holdout(day.examples, settings.holdout_fraction)
    train, holdout = day.table.slice(0, cut), day.table.slice(cut)
    res.train_examples, res.holdout_examples = train.num_rows, holdout.num_rows
    train_epoch(models, train, seed, progress, settings.emb_order, settings.linear_epochs,
                settings.emb_row_pass)
    t = lap("train", t)

    y = holdout["label"].to_numpy(zero_copy_only=False).astype(np.float64)
    res.holdout_positives = int(y.sum())
    online = online_predictions(holdout)
    covered = np.all([np.isfinite(online[m]) for m in MODELS], axis=0) if len(y) else (
        np.zeros(0, bool))
    res.online_coverage = float(covered.mean()) if len(y) else float("nan")
    frozen, progressive = learn_holdout(models, holdout, progress)
    t = lap("holdout", t)

    reasons = []
    if not res.train_examples:
        reasons.append(f"nothing to train on ({res.examples} usable examples, "
                       f"holdout_fraction {settings.holdout_fraction})")
    if not len(y):
        reasons.append(f"the holdout is empty ({res.examples} usable examples, "
                       f"holdout_fraction {settings.holdout_fraction}): nothing to compare with")
    elif not covered.any() or res.online_coverage < MIN_ONLINE_COVERAGE:
        reasons.append(f"the online predictions are missing for {int((~covered).sum()):,} of "
                       f"{len(y):,} holdout examples (archived before the learn flow stored "
                       "them, or not learned online): nothing to compare with")
    elif not y[covered].any():
        reasons.append(f"the holdout ({len(y):,} examples) has no positive: NE is undefined")
    else:
        res.ne_online = normalized_entropies(online, y, covered)
        res.ne_retrained_progressive = normalized_entropies(progressive, y, covered)
        res.ne_retrained_frozen = normalized_entropies(frozen, y, covered)
        rule = progressive if evaluation == "progressive" else frozen
        res.ne_retrained = (res.ne_retrained_progressive if evaluation == "progressive"
                            else res.ne_retrained_frozen)
        res.ne_difference_se = ne_difference_se(rule, online, y, covered)
        decisions = model_decisions(res.ne_online, res.ne_retrained, res.ne_difference_se,
                                    settings.max_ne_regression, settings.min_gain_se)
        res.kept_online = {m: why for m, why in decisions.items() if why}
        if len(res.kept_online) == len(MODELS):
            worse = refusal(res.ne_online, res.ne_retrained, settings.max_ne_regression)
            reasons.append(worse if worse and len(worse.split("; ")) == len(MODELS) else
                           "no model beats its online state on the holdout: "
                           + "; ".join(res.kept_online.values()))
    if later := later_retrain(store, date):
        reasons.append(f"version {later[0]} is a retrain of a later day ({later[1]}): "
                       f"publishing {date}'s models would go back in time")
    res.reason = "; ".join(reasons) or None
    res.models = res.candidates = models
    if res.kept_online and not force:
        # One version holds all three models: the kept ones in their online state.
        t = time.perf_counter()
        replayed = (Models.load(settings.models, settings.spec, store, res.base) if res.base
                    else Models(settings.models, settings.spec))
        res.ne_online_replayed = normalized_entropies(
            replay_online(replayed, train, holdout), y, covered)
        res.models = models = Models.from_bytes(settings.models, settings.spec,
                                                models.to_bytes())
        keep_online(models, replayed, set(res.kept_online))
        for m in res.kept_online:
            log.info("retrain %s: %s keeps its online state: %s", date, m, res.kept_online[m])
            on, again = res.ne_online[m], res.ne_online_replayed[m]
            if not abs(again - on) <= REPLAY_TOLERANCE:
                res.warnings.append(
                    f"{m}: its online state replayed from the warm start scores NE "
                    f"{again:.4f} on the holdout, the learn flow's online model {on:.4f}: "
                    "the warm start is not what the learn flow continued from")
        t = lap("replay", t)

    def extra() -> dict:
        res.elapsed_s = round(time.perf_counter() - t_start, 3)
        # Where the learn flow's current version read `examples` up to, and its counts: a
        # learn flow started without its recovery state from our version reads on from
        # there, after replaying what it archived since the day's end (learners/trainer.py).
        current = store.current()
        through = store.get_meta(current) if current is not None else None
        return {**{k: through[k] for k in ("offsets", "counts") if through and k in through},
                "date": date, "train_examples": res.train_examples,
                "holdout_examples": res.holdout_examples, "positives": res.positives,
                "late_positives": res.late_positives, "ne_online": res.ne_online,
                "ne_retrained": res.ne_retrained, "ne_retrained_frozen":
                res.ne_retrained_frozen, "ne_difference_se": res.ne_difference_se,
                "kept_online": res.kept_online, "retrained_models": [
                    m for m in MODELS if m not in res.kept_online or res.forced],
                "ne_online_replayed": res.ne_online_replayed,
                "evaluation": evaluation, "seed": seed, "forced": res.forced,
                "refusal_overridden": res.reason if res.forced else None,
                "refused": None if res.forced else res.reason, "elapsed_s": res.elapsed_s}

    if dry_run:
        res.status = "dry_run"
    elif res.reason and not force:
        res.status = "refused"
        if later is None:
            # Written, not published: the next day's retrain warm-starts from it. Else that
            # one would start from fresh models, lose to online models that have learned
            # every day so far, and be refused too, and so on every day after
            # (bench/retrain.py --max-ne-regression 0 showed the second day's).
            res.version = models.write_version(store, SOURCE, parent=res.base, extra=extra())
            t = lap("write", t)
    else:
        if res.reason:
            res.forced = True
            log.warning("retrain %s: publishing despite: %s (--force)", date, res.reason)
        try:
            res.version, res.previous, res.published_over = publish(
                store, models, base=res.base, expected=expected, extra=extra(),
                online_keep_days=settings.online_keep_hours / 24)
            res.status = "published"
        except RetrainConflict as e:
            res.status, res.version = "conflict", e.version
            res.reason = "; ".join(filter(None, [str(e), res.reason]))
        t = lap("publish", t)
    res.elapsed_s = round(time.perf_counter() - t_start, 3)
    return res
