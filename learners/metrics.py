"""Progressive validation: score each example with the model as it was before learning it.

* Normalized entropy (He et al. 2014): the log loss divided by the entropy of the empirical
  CTR, i.e. relative to always predicting the observed CTR; lower is better, 1 is no skill.
* Calibration: mean prediction / empirical CTR; 1 is calibrated.
* AUC: ranking quality, blind to calibration.
* Calibration by slice (``slices``, e.g. ``{"position": 10, "hour": 24}``): the same ratio
  within each value of a small integer key given with each example; an overall 1.0 can hide
  0.5 at one position and 1.2 at another.

Each is kept over the whole stream and over a sliding window of the last ``window`` examples.
The window's AUC is exact (ranks of the window, ties averaged). The whole stream's AUC comes
from histograms of the logit in ``auc_bins`` bins over ``[-16, 16]``: pairs in the same bin
count half, so its error is at most half the share of positive/negative pairs sharing a bin
(width 0.008 in logit by default). river's ``ROCAUC`` was not used for it: its thresholds
are spread evenly over [0, 1], ten by default, so at a 3 % CTR nearly all predictions fall
below the first one. river's ``RollingROCAUC`` is exact; the tests check the window AUC
against it.

>>> m = ProgressiveMetrics(window=4)
>>> m.update_many([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
>>> s = m.summary()
>>> s["n"], s["window_auc"], round(s["calibration"], 3)
(4, 0.75, 0.825)
>>> m.update(0.9, 0)  # the window drops 0.1 and takes a negative ranked first
>>> m.summary()["window_n"], round(m.summary()["window_auc"], 3)
(4, 0.25)
>>> s = ProgressiveMetrics(window=4, slices={"position": 2})
>>> s.update_many([0.25, 0.5, 0.125, 0.25], [1, 0, 0, 1], {"position": [0, 0, 1, 1]})
>>> s.summary()["calibration_by"], slice_range(s.summary(), "position")
({'position': [0.75, 0.375]}, (0.375, 0.75))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

EPS = 1e-15  # predictions are clipped to [EPS, 1 - EPS] for the log loss
LOGIT_RANGE = 16.0


def entropy(ctr: float) -> float:
    if not 0.0 < ctr < 1.0:
        return float("nan")
    return -(ctr * math.log(ctr) + (1.0 - ctr) * math.log(1.0 - ctr))


def log_loss(p, y) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    y = np.asarray(y, dtype=np.float64)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def normalized_entropy(p, y) -> float:
    """Mean log loss / entropy of the empirical CTR of ``y``."""
    y = np.asarray(y, dtype=np.float64)
    return float(log_loss(p, y).mean()) / entropy(float(y.mean())) if len(y) else float("nan")


def exact_auc(p, y) -> float:
    """Mann-Whitney AUC with ties counted half; NaN without both classes."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y) != 0
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    # The average 1-based rank of each distinct value: ties share it.
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = float(avg_rank[inv][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def slice_range(summary: dict, name: str) -> tuple[float, float]:
    """The lowest and highest calibration over the slices of ``name`` in a ``summary()``
    (NaN, NaN without them: no slice with a click yet, or a summary from before slices)."""
    values = [v for v in (summary.get("calibration_by") or {}).get(name, [])
              if v is not None and not math.isnan(v)]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


class ProgressiveMetrics:
    """NE, calibration and AUC over the whole stream and the last ``window`` examples.

    Feed it the prediction made before learning each example (``learn_many`` of the
    learners returns those) and the label.
    """

    def __init__(self, window: int = 100_000, auc_bins: int = 4096,
                 slices: Mapping[str, int] | None = None):
        if window < 1 or auc_bins < 2:
            raise ValueError("window must be >= 1 and auc_bins >= 2")
        self.window = window
        self.auc_bins = auc_bins
        self.slices = dict(slices or {})  # name -> number of values (keys 0..n-1)
        # [sum of p, clicks] of every slice value, the slices one after the other
        self.slice_sums = np.zeros((2, sum(self.slices.values())))
        self.n = 0
        self.clicks = 0.0
        self.sum_p = 0.0
        self.sum_loss = 0.0
        self._hist = np.zeros((2, auc_bins))  # [negatives, positives] per logit bin
        self._p = np.zeros(window)
        self._y = np.zeros(window)
        self._next = 0  # ring position of the next example

    def _bins(self, p: np.ndarray) -> np.ndarray:
        p = np.clip(p, EPS, 1.0 - EPS)
        logit = np.log(p) - np.log1p(-p)
        scaled = (logit + LOGIT_RANGE) * (self.auc_bins / (2.0 * LOGIT_RANGE))
        return np.clip(scaled, 0, self.auc_bins - 1).astype(np.int64)

    def update(self, p: float, y) -> None:
        self.update_many(np.array([p], dtype=np.float64), np.array([y], dtype=np.float64))

    def update_many(self, p, y, slice_keys: Mapping[str, Sequence[int]] | None = None) -> None:
        """``slice_keys``: for each slice, the key of each example (0..n-1 counted, anything
        else not)."""
        p = np.asarray(p, dtype=np.float64).ravel()
        y = (np.asarray(y).ravel() != 0).astype(np.float64)
        if len(p) != len(y):
            raise ValueError(f"{len(p)} predictions for {len(y)} labels")
        offset = 0
        for name, size in self.slices.items():
            if slice_keys is not None and name in slice_keys:
                k = np.asarray(slice_keys[name], dtype=np.int64).ravel()
                ok = (k >= 0) & (k < size)
                at, n = offset + k[ok], self.slice_sums.shape[1]
                self.slice_sums[0] += np.bincount(at, weights=p[ok], minlength=n)
                self.slice_sums[1] += np.bincount(at, weights=y[ok], minlength=n)
            offset += size
        self.n += len(p)
        self.clicks += float(y.sum())
        self.sum_p += float(p.sum())
        self.sum_loss += float(log_loss(p, y).sum())
        # bincount, not np.add.at (several times slower): the [negatives, positives] rows
        # of the histogram as one flat array.
        flat = y.astype(np.int64) * self.auc_bins + self._bins(p)
        self._hist += np.bincount(flat, minlength=2 * self.auc_bins).reshape(2, -1)
        # Ring buffer: only the last `window` of this batch can survive in it.
        p, y = p[-self.window :], y[-self.window :]
        pos = (self._next + np.arange(len(p))) % self.window
        self._p[pos], self._y[pos] = p, y
        self._next = (self._next + len(p)) % self.window

    def _binned_auc(self) -> float:
        neg, pos = self._hist
        n_neg, n_pos = neg.sum(), pos.sum()
        if n_neg == 0 or n_pos == 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # negatives in lower bins
        return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))

    def summary(self) -> dict[str, float]:
        nan = float("nan")
        out: dict[str, float] = {"n": self.n}
        ctr = self.clicks / self.n if self.n else nan
        loss = self.sum_loss / self.n if self.n else nan
        out.update(
            ctr=ctr,
            log_loss=loss,
            ne=loss / entropy(ctr) if self.n else nan,
            calibration=(self.sum_p / self.n) / ctr if self.n and ctr > 0 else nan,
            auc=self._binned_auc(),
        )
        k = min(self.n, self.window)
        p, y = (self._p, self._y) if k == self.window else (self._p[:k], self._y[:k])
        w_ctr = float(y.mean()) if k else nan
        w_loss = float(log_loss(p, y).mean()) if k else nan
        out.update(
            window_n=k,
            window_ctr=w_ctr,
            window_log_loss=w_loss,
            window_ne=w_loss / entropy(w_ctr) if k else nan,
            window_calibration=float(p.mean()) / w_ctr if k and w_ctr > 0 else nan,
            window_auc=exact_auc(p, y) if k else nan,
        )
        if self.slices:
            by, offset = {}, 0
            sum_p, clicks = self.slice_sums
            for name, size in self.slices.items():
                c = clicks[offset:offset + size]
                by[name] = [float(a / b) if b > 0 else nan
                            for a, b in zip(sum_p[offset:offset + size], c, strict=True)]
                offset += size
            out["calibration_by"] = by
        return out
