"""Negative downsampling and its correction.

Keep every positive and a negative with probability ``rate``. Whether a negative is kept is a
hash of its example id, not a random draw, so a replay after a crash (or the daily retrain
reading the archive) keeps exactly the same examples.

A model trained on the kept examples predicts ``p'`` = the CTR of the downsampled stream; the
CTR of the real one is ``q = p' / (p' + (1 - p') / rate)``. Alternatively train with weight
``1 / rate`` on kept negatives and use ``p'`` as it is; never both (NOTES.md). Either way,
measure NE and calibration on the unsampled stream.

>>> recalibrate(0.5, 0.1)  # 1 positive per 1 kept negative = 1 per 10 negatives
0.09090909090909091
>>> keep("3f2a9c", 1, 0.01), keep("3f2a9c", 0, 1.0)
(True, True)
>>> import numpy as np
>>> ids = [f"id{i}" for i in range(100_000)]
>>> kept = keep_many(ids, np.zeros(100_000), 0.25)
>>> round(float(kept.mean()), 2), bool((kept == keep_many(ids, 0, 0.25)).all())
(0.25, True)
"""

from __future__ import annotations

import hashlib

import numpy as np

_KEY = b"ctrstream-negative-sampling"  # keyed: independent of the feature hashes' crc32
_SCALE = 2.0**-64


def unit_hash(example_id: str) -> float:
    """A stable hash of an id, uniform in [0, 1)."""
    digest = hashlib.blake2b(example_id.encode(), digest_size=8, key=_KEY).digest()
    return int.from_bytes(digest, "little") * _SCALE


def keep(example_id: str, label, rate: float = 1.0) -> bool:
    """Keep this example? Positives always; negatives when ``unit_hash(id) < rate``."""
    return bool(label) or rate >= 1.0 or unit_hash(example_id) < rate


def keep_many(example_ids, labels, rate) -> np.ndarray:
    """``keep`` over arrays (``labels`` and ``rate`` may be scalars)."""
    u = np.fromiter((unit_hash(i) for i in example_ids), dtype=np.float64)
    return (np.asarray(labels) != 0) | (u < np.asarray(rate, dtype=np.float64))


def recalibrate(p, rate):
    """The CTR on the unsampled stream from a prediction ``p`` learned on a stream whose
    negatives were kept at ``rate``: ``p / (p + (1 - p) / rate)``. Scalars or arrays."""
    return p / (p + (1.0 - p) / rate)


def negative_weight(label, rate):
    """The importance weight that corrects the sampling in training instead: ``1 / rate`` for
    a kept negative, 1 for a positive. Do not also recalibrate."""
    w = np.where(np.asarray(label) != 0, 1.0, 1.0 / np.asarray(rate, dtype=np.float64))
    return float(w) if w.ndim == 0 else w
