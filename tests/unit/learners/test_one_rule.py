"""The four places that decide which examples are learned (the online trainer, `Models`, the
embedding model and the retrain's filter over the learn flow's archive) decide the same on one
edge-case corpus: each learns exactly the records ``joiner.events.why_not_learnable`` accepts.
(tests/unit/learners/test_learnable_filter.py checks the filter on any archived rows.)"""

from __future__ import annotations

import orjson

from features.spec import FeatureSpec
from joiner.events import why_not_learnable
from learners.archive import ExampleArchive
from learners.embeddings import EmbeddingLearner
from learners.model import Models, ModelSettings
from learners.retrain import learnable
from learners.trainer import COUNTS, OnlineTrainer
from tests.unit.learners.test_learnable_filter import DAY, EDGE_CASES, ex

NEVER = 1e9  # s: no push and no version is due


def corpus() -> list[dict]:
    """The edge cases as they travel (through JSON: orjson writes NaN as null), fresh dicts."""
    return [orjson.loads(orjson.dumps(ex(k, **case))) for k, case in enumerate(EDGE_CASES)]


def test_trainer_models_embeddings_and_retrain_learn_the_same_records(tmp_path):
    want = {e["impression_id"] for e in corpus() if why_not_learnable(e) is None}
    assert 0 < len(want) < len(EDGE_CASES)  # the corpus has both kinds

    def new_models():
        return Models(ModelSettings(), FeatureSpec())

    trainer = OnlineTrainer(
        None, ExampleArchive(tmp_path / "t", fsync=False), new_models=new_models,
        load_models=lambda v: new_models(),
        models_from_bytes=lambda b: Models.from_bytes(ModelSettings(), FeatureSpec(), b),
        dedup_horizon_ms=3_600_000, push_interval_s=NEVER, snapshot_interval_s=NEVER,
        online_keep_hours=2, resume={"models": new_models().to_bytes(), "version": "1",
                                     "dedup": [], "counts": dict.fromkeys(COUNTS, 0),
                                     "offsets": {}})
    trainer.on_batch([(0, k, orjson.dumps(e)) for k, e in enumerate(corpus())])
    assert trainer.counts["learned"] == len(want)

    batch = corpus()
    new_models().learn(batch, annotate=True)  # annotates exactly what it learned
    assert {e["impression_id"] for e in batch if "online_p" in e} == want

    assert EmbeddingLearner().learn_batch(corpus())["examples"] == len(want)

    # The retrain reads what the learn flow archived (the learned, quarantined and correction
    # records; a dead letter never reaches the archive). Its column filter on those rows:
    trainer.state()  # flushes the archive
    table = ExampleArchive(tmp_path / "t", fsync=False).read_day(DAY)
    kept = table.filter(learnable(table))["impression_id"].to_pylist()
    assert set(kept) == want
