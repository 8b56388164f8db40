"""The learner protocol: the surface every online learner offers, in its two input shapes.

FTRL and BOPR learn on hashed binary features (``features.hashing.FeatureHasher`` turns an
example into sorted indices, a batch into CSR ``indptr``/``indices``): ``HashedLearner``. The
embedding model reads the example dicts themselves (its IDs are table keys, not hashes):
``ExampleLearner``. Whatever the shape, a learner promises the same things, which
tests/unit/learners/test_contract.py checks for each through a small adapter:

* a prediction is a click probability in ``[0, 1]``, finite, for any input the joiner emits
  (huge or tiny counts and values, very long IDs, no features at all);
* learning positives raises the prediction of those examples, negatives lower it; learning an
  empty batch changes nothing;
* its state round-trips (``state``/``from_state`` or ``to_bytes``/``from_bytes``) to a learner
  that predicts, and goes on learning, exactly as the original;
* the same seed and the same stream give bit-identical predictions.

The two shapes differ where the models do: hashed learners return, from ``learn_one`` and
``learn_many``, the predictions made before learning (progressive validation) and track touched
coordinates; the embedding model learns micro-batches only (``learn_batch`` returns counts)
and tracks dirty rows by ID.

>>> from learners.bopr import BOPR
>>> from learners.embeddings import EmbeddingLearner
>>> from learners.ftrl import FTRLProximal
>>> isinstance(FTRLProximal(bits=4), HashedLearner), isinstance(BOPR(bits=4), HashedLearner)
(True, True)
>>> isinstance(EmbeddingLearner(dim=2, fallback_rows=2), ExampleLearner)
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np


@runtime_checkable
class HashedLearner(Protocol):
    """A learner on hashed binary features: ``x`` is an array of unique indices, a batch is
    CSR (``indices[indptr[k]:indptr[k + 1]]`` is example k), labels are 0/1."""

    def predict_one(self, x: np.ndarray) -> float: ...

    def predict_many(self, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray: ...

    def learn_one(self, x: np.ndarray, y: float) -> float:
        """Learn one example; return the prediction made before learning it."""
        ...

    def learn_many(self, indptr: np.ndarray, indices: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Learn a batch in order; return the predictions made before learning each."""
        ...

    def touched(self) -> np.ndarray:
        """Coordinates changed since the last ``pop_touched()`` (to publish)."""
        ...

    def pop_touched(self) -> np.ndarray: ...

    def state(self) -> dict[str, Any]:
        """Hyperparameters and arrays (not copies): everything ``from_state`` needs."""
        ...

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Self: ...


@runtime_checkable
class ExampleLearner(Protocol):
    """A learner on example dicts as the joiner emits them (``impression_id``, ``ts``,
    ``user_id``, ``item_id``, ``features``, ``counts``, ``label``)."""

    def predict_batch(self, examples: Sequence[Mapping]) -> np.ndarray: ...

    def learn_batch(self, examples: Sequence[Mapping]) -> dict[str, float]:
        """One micro-batch step; returns counts (examples learned, skipped, ...)."""
        ...

    def pop_dirty(self) -> dict[str, Any]:
        """What changed since the previous call (to publish), and reset the tracking."""
        ...

    def to_bytes(self) -> bytes: ...

    @classmethod
    def from_bytes(cls, data: bytes) -> Self: ...
