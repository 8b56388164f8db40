"""One contract suite over every learner (in the way river's ``check_estimator`` runs one set of
checks over every estimator): FTRLProximal, BOPR and EmbeddingLearner, each behind a small
adapter that takes example dicts as the joiner emits them (learners/protocol.py).

Each check states what any learner must do, whatever its model: predictions are finite
probabilities, learning moves them the right way, state round-trips exactly, the same seed and
stream give the same predictions, extreme input breaks nothing, an empty batch is a no-op.
Streams are small and synthetic, so the whole suite runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest

from features.hashing import FeatureHasher
from features.spec import DEFAULT_ENTITIES, FeatureSpec
from learners.bopr import BOPR
from learners.embeddings import EmbeddingLearner
from learners.ftrl import FTRLProximal
from learners.protocol import ExampleLearner, HashedLearner

T0 = 1_700_000_000_000
BITS = 16  # 65,536 coordinates: few collisions for these streams, small arrays to copy
COUNT_NAMES = FeatureSpec().feature_names()

# -- streams ----------------------------------------------------------------------------------


def example(k: int, user: Any, item: Any, label: int, **over) -> dict:
    ex = {"impression_id": f"x{k}", "ts": T0 + 100 * k, "user_id": user, "item_id": item,
          "features": {"device": ("mobile", "desktop")[k % 2], "position": k % 10,
                       "hour": (k // 7) % 24, "category": f"c{k % 5}"},
          "counts": {"user": {"imp_5m": k % 7, "clk_5m": k % 2}, "item": {"imp_1h": k % 13}},
          "label": label}
    ex.update(over)
    return ex


def stream(n: int, seed: int = 0, start: int = 0) -> list[dict]:
    """Clicks from a user effect and an item effect, ~20 % positive."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 20, n), rng.integers(0, 30, n)
    z = -1.5 + 0.8 * (users % 3 == 0) + 0.6 * (items % 4 == 0) - 0.5 * (items % 5 == 1)
    y = rng.random(n) < 1 / (1 + np.exp(-z))
    return [example(start + k, f"u{users[k]}", f"i{items[k]}", int(y[k])) for k in range(n)]


def probe(label: int) -> list[dict]:
    """Eight examples with IDs of their own, all labelled ``label``."""
    return [example(10_000 + k, f"pu{k}", f"pi{k}", label) for k in range(8)]


def all_counts(value) -> dict:
    return {e: dict.fromkeys(COUNT_NAMES, value) for e in DEFAULT_ENTITIES}


def extreme_cases() -> dict[str, list[dict]]:
    one = example(20_000, "u1", "i1", 1)
    long_u, long_i = "u" * 100_000, "\u00e9" * 100_000
    return {
        "huge counts": [example(20_001 + k, "u1", "i2", k % 2, counts=all_counts(v))
                        for k, v in enumerate((10**30, 2**63, 1e300, 1.7e308))],
        "tiny counts": [example(20_010 + k, "u2", "i1", k % 2, counts=all_counts(v))
                        for k, v in enumerate((1e-300, 5e-324, 0, 0.0))],
        "huge feature values": [
            example(20_020 + k, "u3", "i3", k % 2,
                    features={"device": "x" * 10_000, "position": v, "hour": v, "price": v,
                              "category": v})
            for k, v in enumerate((10**20, 1e308, -1e308, 2**70))],
        "tiny feature values": [
            example(20_030 + k, "u3", "i3", k % 2,
                    features={"device": "", "position": v, "hour": v, "price": v})
            for k, v in enumerate((1e-300, 5e-324, -0.0, -1e-300))],
        "very long ids": [example(20_040, long_u, long_i, 1, impression_id="x" * 100_000),
                          example(20_041, long_u + "2", long_i, 0)],
        "empty features": [example(20_050, "u4", "i4", 1, features={}, counts={}),
                           {k: v for k, v in example(20_051, "u4", "i5", 0).items()
                            if k not in ("features", "counts")}],
        "batch of one": [one],
        "all positive": [example(20_100 + k, f"u{k % 20}", f"i{k % 30}", 1) for k in range(64)],
        "one example x1000": [one] * 1000,
        "one negative x1000": [example(20_200, "u5", "i5", 0)] * 1000,
    }


# -- adapters: example dicts in, each learner's own calls out ----------------------------------

HASHER = FeatureHasher(bits=BITS)


def _labels(examples) -> np.ndarray:
    return np.fromiter((e["label"] for e in examples), np.float64, len(examples))


def _pack(state: dict) -> bytes:
    """A hashed learner's state as bytes (JSON header + raw arrays, as learners/model.py stores
    it without pickle): a copy that shares nothing with the learner."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    header = {"scalars": {k: v for k, v in state.items() if k not in arrays},
              "arrays": {k: [a.dtype.str, list(a.shape)] for k, a in arrays.items()}}
    head = orjson.dumps(header, option=orjson.OPT_SORT_KEYS)
    return b"".join([len(head).to_bytes(8, "little"), head,
                     *(np.ascontiguousarray(arrays[k]).tobytes() for k in sorted(arrays))])


def _unpack(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    header = orjson.loads(data[8:8 + n])
    state, offset = dict(header["scalars"]), 8 + n
    for k in sorted(header["arrays"]):
        dtype, shape = header["arrays"][k]
        a = np.frombuffer(data, np.dtype(dtype), int(np.prod(shape)), offset).reshape(shape)
        state[k], offset = a.copy(), offset + a.nbytes
    return state


@dataclass(frozen=True)
class Adapter:
    name: str
    make: Callable[[int], Any]  # seed -> a new learner
    learn: Callable[[Any, list[dict]], None]
    predict: Callable[[Any, list[dict]], np.ndarray]
    predict_one: Callable[[Any, dict], float]
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]
    protocol: type


def hashed(name: str, cls: type, **params) -> Adapter:
    # FTRL and BOPR have nothing random: the seed is not theirs to take.
    return Adapter(
        name=name,
        make=lambda seed: cls(bits=BITS, **params),
        learn=lambda m, exs: m.learn_many(*HASHER.batch(exs), _labels(exs)),
        predict=lambda m, exs: m.predict_many(*HASHER.batch(exs)),
        predict_one=lambda m, ex: m.predict_one(HASHER.indices(ex)),
        dumps=lambda m: _pack(m.state()),
        loads=lambda data: cls.from_state(_unpack(data)),
        protocol=HashedLearner,
    )


ADAPTERS = [
    hashed("ftrl", FTRLProximal),
    hashed("bopr", BOPR),
    Adapter(
        name="emb",
        make=lambda seed: EmbeddingLearner(dim=8, fallback_rows=64, seed=seed),
        learn=lambda m, exs: m.learn_batch(exs),
        predict=lambda m, exs: m.predict_batch(exs),
        predict_one=lambda m, ex: float(m.predict_batch([ex])[0]),
        dumps=lambda m: m.to_bytes(),
        loads=EmbeddingLearner.from_bytes,
        protocol=ExampleLearner,
    ),
]


@pytest.fixture(params=ADAPTERS, ids=[a.name for a in ADAPTERS])
def adapter(request) -> Adapter:
    return request.param


def learn_stream(a: Adapter, model, examples: list[dict], batch: int = 64) -> None:
    for s in range(0, len(examples), batch):
        a.learn(model, examples[s:s + batch])


@pytest.fixture
def warm(adapter):
    """A learner after 600 examples of the stream, in micro-batches of 64."""
    model = adapter.make(0)
    learn_stream(adapter, model, stream(600))
    return model


def assert_probabilities(p, n: int) -> None:
    p = np.asarray(p)
    assert p.shape == (n,)
    assert np.isfinite(p).all(), p[~np.isfinite(p)]
    assert ((p >= 0.0) & (p <= 1.0)).all(), p[(p < 0.0) | (p > 1.0)]


# -- the contract -----------------------------------------------------------------------------


def test_implements_the_protocol(adapter):
    assert isinstance(adapter.make(0), adapter.protocol)


@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
def test_predictions_are_probabilities(adapter, trained):
    model = adapter.make(0)
    if trained:
        learn_stream(adapter, model, stream(600))
    batch = stream(50, seed=1, start=5_000)
    p = adapter.predict(model, batch)
    assert_probabilities(p, 50)
    one = adapter.predict_one(model, batch[3])
    assert isinstance(one, float) and np.isfinite(one) and 0.0 <= one <= 1.0
    assert one == pytest.approx(p[3], abs=1e-12)
    assert_probabilities(adapter.predict(model, batch[3:4]), 1)


@pytest.mark.parametrize("label", [1, 0], ids=["positives raise", "negatives lower"])
def test_learning_moves_predictions_toward_the_label(adapter, warm, label):
    examples = probe(label)
    before = adapter.predict(warm, examples)
    for _ in range(3):
        adapter.learn(warm, examples)
    after = adapter.predict(warm, examples)
    moved = (after - before) if label else (before - after)
    assert (moved > 0).all(), {"before": before.tolist(), "after": after.tolist()}


def test_state_round_trip_predicts_and_learns_identically(adapter, warm):
    data = adapter.dumps(warm)
    copy = adapter.loads(data)
    assert adapter.dumps(copy) == data
    probe_set = stream(100, seed=2, start=7_000)
    np.testing.assert_array_equal(adapter.predict(copy, probe_set),
                                  adapter.predict(warm, probe_set))
    # The state is all of it: both go on learning the same way (FTRL's adaptive chunk length,
    # the embedding tables' pending sightings, ...).
    more = stream(300, seed=3, start=8_000)
    learn_stream(adapter, warm, more)
    learn_stream(adapter, copy, more)
    np.testing.assert_array_equal(adapter.predict(copy, probe_set),
                                  adapter.predict(warm, probe_set))
    assert adapter.dumps(copy) == adapter.dumps(warm)


def test_same_seed_same_stream_same_predictions(adapter):
    runs = []
    for _ in range(2):
        model = adapter.make(7)
        learn_stream(adapter, model, stream(400, seed=4))
        runs.append((adapter.predict(model, stream(100, seed=5, start=9_000)),
                     adapter.dumps(model)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


@pytest.mark.parametrize("case", list(extreme_cases()))
def test_extreme_input_gives_finite_probabilities(adapter, warm, case):
    examples = extreme_cases()[case]
    reference = stream(50, seed=6, start=11_000)
    assert_probabilities(adapter.predict(warm, examples), len(examples))
    one = adapter.predict_one(warm, examples[0])
    assert np.isfinite(one) and 0.0 <= one <= 1.0
    adapter.learn(warm, examples)
    assert_probabilities(adapter.predict(warm, examples), len(examples))
    # ... and the learner is still sound for ordinary examples afterwards.
    assert_probabilities(adapter.predict(warm, reference), len(reference))
    learn_stream(adapter, warm, stream(64, seed=7, start=12_000))
    assert_probabilities(adapter.predict(warm, reference), len(reference))


def test_learning_an_empty_batch_is_a_no_op(adapter, warm):
    before = adapter.dumps(warm)
    probe_set = stream(50, seed=8, start=13_000)
    p = adapter.predict(warm, probe_set)
    adapter.learn(warm, [])
    assert adapter.dumps(warm) == before
    np.testing.assert_array_equal(adapter.predict(warm, probe_set), p)
    assert_probabilities(adapter.predict(warm, []), 0)
