"""BOPR: Bayesian online learning for the probit regression model (Graepel, Candela, Borchert,
Herbrich, ICML 2010, "Web-scale Bayesian click-through rate prediction ... in Bing").

Each coordinate has an independent Gaussian belief ``N(mu_i, var_i)``; a click is
``y = sign(sum_i w_i + noise)`` with noise ``N(0, beta^2)``, over the active (binary) features.
With ``y`` in {-1, +1} and the active coordinates::

    S^2 = beta^2 + sum var_i        t = y sum(mu_i) / S
    v = pdf(t) / cdf(t)             w = v (v + t)
    mu_i  += y (var_i / S) v
    var_i *= 1 - (var_i / S^2) w
    p(click) = cdf(sum(mu_i) / S)

``v`` and ``w`` are computed stably for very negative ``t`` (a confident wrong prediction):
``pdf/cdf`` underflows to 0/0 there, so a continued fraction of the Mills ratio gives ``v - |t|``
directly. ``0 < w < 1`` in exact arithmetic; it is clipped there and variances are floored at
a tiny fraction of the prior, so no input makes a variance 0, negative or NaN.

Dynamics (paper section 3.4 style) pull beliefs back toward the prior so the model keeps
learning when the world drifts: in natural parameters, precision ``1/var`` and ``mu/var``
become ``(1 - e)`` of themselves plus ``e`` of the prior's. They are applied per interval of
time (``apply_dynamics(elapsed)``, ``e = 1 - (1 - dynamics_epsilon) ** elapsed``), not per
example, so the forgetting rate does not depend on the traffic. The bias (coordinate 0) gets
its variance inflated but its mean kept: pulling it toward 0 would pull every prediction
toward 50 %.

The prior variance is per coordinate; the prior of a score is ``active features x
prior_variance``, so with more active features the prior variance should shrink.

``learn_many`` learns in micro-batches, as ``FTRLProximal.learn_many`` does: within a chunk
every example is scored with the beliefs at the chunk's start, each coordinate's mean moves by
the sum of its examples' steps and its variance by the product of their factors
``1 - var_i w / S^2`` (so it stays positive). The chunk length adapts the same way (from 1,
doubling up to ``max_batch`` while a chunk moves its examples' scores by less than 0.1 on
average, halving above 0.3). On bench/learners.py's 1M-example 3-day stream: one at a time
NE 0.9543 at ~25k examples/s (the figure of issue 16); chunks of up to 64 NE 0.9543 at 174k/s,
up to 256 NE 0.9544 at 238k/s (first 300k: 0.9678 one at a time, 0.9681 / 0.9686 chunked).

>>> import numpy as np
>>> model = BOPR(beta=1.0, prior_variance=0.1, bits=4)
>>> x_a, x_b = np.array([0, 3]), np.array([0, 5])
>>> for _ in range(300):
...     _ = model.learn_one(x_a, 1)
...     _ = model.learn_one(x_b, 0)
>>> model.predict_one(x_a) > 0.9, model.predict_one(x_b) < 0.1
(True, True)
>>> mean, std = model.predict_spread(x_a)
>>> bool(mean > 0 and 0 < std < np.sqrt(2 * 0.1))   # learning shrank the spread
True
>>> 0.0 <= model.thompson_sample(x_a, np.random.default_rng(0)) <= 1.0
True
"""

from __future__ import annotations

import math

import numpy as np

from learners.ftrl import CHUNK_MOVE_HIGH, CHUNK_MOVE_LOW, csr_rows

STATE_VERSION = 1
SQRT2 = math.sqrt(2.0)
SQRT2PI = math.sqrt(2.0 * math.pi)
# Below this t, v comes from the continued fraction: pdf/cdf loses digits as t falls (1e-11 at
# t = -20, 0/0 below -38) and v + t cancels; 40 terms are exact to 1e-16 for t <= -4.
CF_BELOW = -4.0
CF_TERMS = 40
MIN_VARIANCE_FRACTION = 1e-9  # of the prior variance: variances never reach 0
_erfc = np.frompyfunc(math.erfc, 1, 1)


def _mills_tail(x):
    """``v(-x) - x`` for large ``x`` (scalar or array): ``1 / (x + 2 / (x + 3 / (x + ...)))``,
    the tail of the Mills-ratio continued fraction ``v(-x) = x + 1 / (x + 2 / (x + ...))``."""
    f = x
    for k in range(CF_TERMS, 1, -1):
        f = x + k / f
    return 1.0 / f


def v_w(t: float) -> tuple[float, float]:
    """The truncated-Gaussian corrections ``v(t) = pdf(t) / cdf(t)`` and ``w = v (v + t)``."""
    if t >= CF_BELOW:
        cdf = 0.5 * math.erfc(-t / SQRT2)
        v = math.exp(-0.5 * t * t) / SQRT2PI / cdf
        w = v * (v + t)
    else:
        tail = _mills_tail(-t)  # v + t, without the cancellation
        v = tail - t
        w = v * tail
    return v, min(max(w, 0.0), 1.0)


def v_w_many(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``v_w`` over an array."""
    t = np.asarray(t, dtype=np.float64)
    direct = t >= CF_BELOW
    td = np.where(direct, t, 0.0)
    cdf = 0.5 * _erfc(-td / SQRT2).astype(np.float64)
    v = np.exp(-0.5 * td * td) / SQRT2PI / cdf
    vt = v + td
    if not direct.all():
        tail = _mills_tail(np.where(direct, -CF_BELOW, -t))
        v = np.where(direct, v, tail - t)
        vt = np.where(direct, vt, tail)
    return v, np.clip(v * vt, 0.0, 1.0)


def norm_cdf(s):
    """Standard normal cdf of a scalar or an array."""
    if np.ndim(s) == 0:
        return 0.5 * math.erfc(-float(s) / SQRT2)
    return 0.5 * _erfc(-np.asarray(s, dtype=np.float64) / SQRT2).astype(np.float64)


class BOPR:
    """Bayesian online probit regression; see the module docstring.

    ``x`` is an array of unique feature indices in ``[0, 2**bits)`` (binary features), labels
    are 0/1 (or -1/+1). Downsampled negatives: use ``learners.sampling.recalibrate`` on the
    predictions; the update has no importance weight.
    """

    def __init__(
        self,
        beta: float = 1.0,
        prior_variance: float = 0.01,
        bits: int = 20,
        dynamics_epsilon: float = 0.0,
        max_batch: int = 256,
    ):
        if beta <= 0 or prior_variance <= 0:
            raise ValueError("beta and prior_variance must be > 0")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 0.0 <= dynamics_epsilon < 1.0:
            raise ValueError(f"dynamics_epsilon must be in [0, 1), got {dynamics_epsilon}")
        self.beta = float(beta)
        self.prior_variance = float(prior_variance)
        self.bits = bits
        self.dynamics_epsilon = float(dynamics_epsilon)
        self.mu = np.zeros(1 << bits)
        self.var = np.full(1 << bits, self.prior_variance)
        self._touched = np.zeros(1 << bits, dtype=bool)
        self._min_var = self.prior_variance * MIN_VARIANCE_FRACTION
        self.max_batch = max_batch
        self.chunk = 1  # examples in learn_many's next chunk, adapted up to max_batch
        self._slot = np.zeros(1 << bits, dtype=np.int64)  # scratch for learn_many

    # -- prediction ---------------------------------------------------------------------------

    def params(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """Serving parameters ``(mu, var)`` of coordinates ``idx`` (copies)."""
        return self.mu[idx].copy(), self.var[idx].copy()

    def predict_one(self, x) -> float:
        return norm_cdf(self.mu[x].sum() / math.sqrt(self.beta**2 + self.var[x].sum()))

    def predict_many(self, indptr, indices) -> np.ndarray:
        mean, var = self._score_many(indptr, indices)
        return norm_cdf(mean / np.sqrt(self.beta**2 + var))

    def predict_spread(self, x) -> tuple[float, float]:
        """Posterior mean and standard deviation of the score ``sum w_i`` (the noise ``beta``
        not included): how unsure the model is about this example, for exploration."""
        return float(self.mu[x].sum()), math.sqrt(self.var[x].sum())

    def predict_spread_many(self, indptr, indices) -> tuple[np.ndarray, np.ndarray]:
        mean, var = self._score_many(indptr, indices)
        return mean, np.sqrt(var)

    def thompson_sample(self, x, rng: np.random.Generator) -> float:
        """The click probability under one draw of the weights from the posterior,
        ``cdf(sum w_i / beta)``: rank by it to explore in proportion to the uncertainty."""
        w = rng.normal(self.mu[x], np.sqrt(self.var[x]))
        return norm_cdf(w.sum() / self.beta)

    def _score_many(self, indptr, indices):
        indptr = np.asarray(indptr)
        rows, m = csr_rows(indptr), len(indptr) - 1
        return (
            np.bincount(rows, weights=self.mu[indices], minlength=m),
            np.bincount(rows, weights=self.var[indices], minlength=m),
        )

    # -- learning -----------------------------------------------------------------------------

    def learn_one(self, x, y) -> float:
        """One update; returns the prediction made before it (progressive validation)."""
        sign = 1.0 if y > 0 else -1.0
        mu, var = self.mu[x], self.var[x]
        s2 = self.beta**2 + var.sum()
        s = math.sqrt(s2)
        score = mu.sum() / s
        v, w = v_w(sign * score)
        self.mu[x] = mu + (sign * v / s) * var
        self.var[x] = np.maximum(var * (1.0 - (w / s2) * var), self._min_var)
        self._touched[x] = True
        return norm_cdf(score)

    def learn_many(self, indptr, indices, y) -> np.ndarray:
        """Learn a batch in chunks (see the module docstring); returns the prediction made
        before learning each example (with its chunk's starting beliefs). ``max_batch`` 1 is
        ``learn_one`` on each in turn."""
        indptr, indices = np.asarray(indptr), np.asarray(indices)
        y = np.asarray(y, dtype=np.float64)
        m = len(indptr) - 1
        out = np.empty(m)
        a = 0
        while a < m:
            b = min(a + self.chunk, m)
            if b - a == 1:
                out[a] = self.learn_one(indices[indptr[a]:indptr[b]], y[a])
                moved = 0.0
            else:
                lo, hi = indptr[a], indptr[b]
                out[a:b], moved = self._chunk(indptr[a:b + 1] - lo, indices[lo:hi], y[a:b])
            if moved > CHUNK_MOVE_HIGH:
                self.chunk = max(1, self.chunk // 2)
            elif moved < CHUNK_MOVE_LOW and b - a == self.chunk:
                self.chunk = min(self.max_batch, 2 * self.chunk)
            a = b
        return out

    def _chunk(self, indptr, indices, y) -> tuple[np.ndarray, float]:
        rows = csr_rows(indptr)
        slot, k = self._slot, np.arange(len(indices))  # unique coordinates, as FTRL's _chunk
        slot[indices] = k
        uniq = indices[slot[indices] == k]
        slot[uniq] = np.arange(len(uniq))
        inv = slot[indices]
        mu, var = self.mu[uniq], self.var[uniq]
        m = len(y)
        s2 = self.beta**2 + np.bincount(rows, weights=var[inv], minlength=m)
        s = np.sqrt(s2)
        score = np.bincount(rows, weights=mu[inv], minlength=m) / s
        sign = np.where(y > 0, 1.0, -1.0)
        v, w = v_w_many(sign * score)
        var_e = var[inv]
        new_mu = mu + np.bincount(inv, weights=var_e * (sign * v / s)[rows], minlength=len(uniq))
        shrink = np.bincount(inv, weights=np.log1p(-var_e * (w / s2)[rows]), minlength=len(uniq))
        new_var = np.maximum(var * np.exp(shrink), self._min_var)
        self.mu[uniq], self.var[uniq] = new_mu, new_var
        self._touched[uniq] = True
        moved = np.abs(np.bincount(rows, weights=(new_mu - mu)[inv], minlength=m) / s).mean()
        return norm_cdf(score), float(moved)

    def apply_dynamics(self, elapsed: float = 1.0) -> None:
        """Forget toward the prior for ``elapsed`` intervals (of whatever unit
        ``dynamics_epsilon`` is per): ``e = 1 - (1 - dynamics_epsilon) ** elapsed``."""
        if self.dynamics_epsilon == 0.0 or elapsed <= 0:
            return
        e = 1.0 - (1.0 - self.dynamics_epsilon) ** elapsed
        changed = (self.mu != 0.0) | (self.var != self.prior_variance)
        idx = np.flatnonzero(changed)
        mu, var = self.mu[idx], self.var[idx]
        precision = (1.0 - e) / var + e / self.prior_variance
        new_var = 1.0 / precision
        new_mu = (1.0 - e) * (mu / var) * new_var  # the prior's mean is 0
        if len(idx) and idx[0] == 0:
            new_mu[0] = mu[0]  # the bias keeps its mean
        self.mu[idx], self.var[idx] = new_mu, new_var
        self._touched[idx] = True

    # -- publishing and snapshots -------------------------------------------------------------

    def touched(self) -> np.ndarray:
        """Coordinates changed since the last ``pop_touched()``, sorted; never truncated."""
        return np.flatnonzero(self._touched)

    def pop_touched(self) -> np.ndarray:
        idx = np.flatnonzero(self._touched)
        self._touched[idx] = False
        return idx

    def state(self) -> dict:
        """Hyperparameters and arrays (not copies), pending touched coordinates included."""
        return {
            "kind": "bopr",
            "version": STATE_VERSION,
            "beta": self.beta,
            "prior_variance": self.prior_variance,
            "bits": self.bits,
            "dynamics_epsilon": self.dynamics_epsilon,
            "max_batch": self.max_batch,
            "chunk": self.chunk,
            "mu": self.mu,
            "var": self.var,
            "touched": self._touched,
        }

    @classmethod
    def from_state(cls, state: dict) -> BOPR:
        if state.get("kind") != "bopr" or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a BOPR state of version {STATE_VERSION}")
        model = cls(
            state["beta"], state["prior_variance"], int(state["bits"]), state["dynamics_epsilon"],
            int(state.get("max_batch", 256)),
        )
        model.chunk = int(state.get("chunk", 1))
        size = 1 << model.bits
        for name in ("mu", "var"):
            arr = np.asarray(state[name], dtype=np.float64)
            if arr.shape != (size,):
                raise ValueError(f"{name}: expected shape ({size},), got {arr.shape}")
            setattr(model, name, arr.copy())
        model._touched = np.asarray(state["touched"], dtype=bool).copy()
        return model
