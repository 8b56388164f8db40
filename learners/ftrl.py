"""FTRL-Proximal logistic regression over hashed binary features (McMahan et al., KDD 2013,
"Ad click prediction: a view from the trenches", Algorithm 1).

Per coordinate i the state is ``z_i`` and ``n_i`` (the sum of squared gradients); the weight is
computed from them when needed::

    w_i = 0                                                     if |z_i| <= l1
    w_i = -(z_i - sign(z_i) l1) / ((beta + sqrt(n_i)) / alpha + l2)   otherwise

and after a prediction ``p`` with gradient ``g = p - y`` (times the example's weight)::

    sigma_i = (sqrt(n_i + g^2) - sqrt(n_i)) / alpha
    z_i += g - sigma_i w_i;  n_i += g^2

The bias is coordinate 0 (``features.hashing`` always sets it) and goes through the same
update, so it gets the same per-coordinate learning rate.

z and n are float64: n of the bias grows with every example (to ~0.03 * examples here) and
float32's 24-bit mantissa would stop adding the ~1e-3 squared gradients to it after a few
million examples. 2 x 8 bytes x 2**20 = 16 MB. Serving weights (``weights()``) can be cast to
float32 by whoever stores them.

``learn_many`` is a micro-batch: within a chunk the weights are those at the chunk's start and
each coordinate's gradients and squared gradients are summed, which is exactly sequential FTRL
with the weights frozen for the chunk (sigma telescopes). Every example of a chunk then moves
the coordinates active in most examples (the bias, count buckets of "0 clicks") on the same
stale prediction: fixed chunks of 256 from a cold start overshoot (measured on 200k simulated
examples, 40 active features each: NE 1.034 against 0.970 one by one). So the chunk length
adapts: it starts at 1, doubles up to ``max_batch`` while a chunk's updates move its examples'
scores by less than 0.1 on average, and halves above 0.3 (same stream: NE 0.970, chunks of
256 after the first ~10k examples).

>>> import numpy as np
>>> model = FTRLProximal(alpha=0.5, beta=1.0, l1=0.0, l2=0.0, bits=4)
>>> x_a, x_b = np.array([0, 3]), np.array([0, 5])   # bias + one feature each
>>> for _ in range(200):
...     _ = model.learn_one(x_a, 1)
...     _ = model.learn_one(x_b, 0)
>>> model.predict_one(x_a) > 0.9, model.predict_one(x_b) < 0.1
(True, True)
>>> sorted(model.pop_touched().tolist()), model.pop_touched().tolist()
([0, 3, 5], [])
>>> indptr, indices = np.array([0, 2, 4]), np.array([0, 3, 0, 5])
>>> model.predict_many(indptr, indices).round(3).tolist() == [
...     round(model.predict_one(x_a), 3), round(model.predict_one(x_b), 3)]
True
"""

from __future__ import annotations

import numpy as np

STATE_VERSION = 1
# learn_many's chunks double while a chunk's updates move its examples' scores by less than
# LOW on average, and halve above HIGH (logit units): a 0.1 stale score costs ~0.1^2 p (1 - p)
# / 2 in log loss, nothing measurable.
CHUNK_MOVE_LOW, CHUNK_MOVE_HIGH = 0.1, 0.3
MAX_LOGIT = 35.0  # sigmoid(35) is 1 - 6e-16: beyond it exp() only risks overflow


def sigmoid(s):
    return 1.0 / (1.0 + np.exp(-np.clip(s, -MAX_LOGIT, MAX_LOGIT)))


def csr_rows(indptr: np.ndarray) -> np.ndarray:
    """The row of each entry of a CSR ``indices`` array."""
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


class FTRLProximal:
    """FTRL-Proximal logistic regression; see the module docstring.

    ``x`` is always an array of unique feature indices in ``[0, 2**bits)`` (binary features),
    as ``features.hashing.FeatureHasher`` makes them; labels are 0/1.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 1.0,
        l1: float = 1.0,
        l2: float = 1.0,
        bits: int = 20,
        max_batch: int = 256,
    ):
        if alpha <= 0 or beta < 0 or l1 < 0 or l2 < 0:
            raise ValueError("need alpha > 0 and beta, l1, l2 >= 0")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.alpha, self.beta, self.l1, self.l2 = float(alpha), float(beta), float(l1), float(l2)
        self.bits = bits
        self.max_batch = max_batch
        self.z = np.zeros(1 << bits)
        self.n = np.zeros(1 << bits)
        self._touched = np.zeros(1 << bits, dtype=bool)
        self._slot = np.zeros(1 << bits, dtype=np.int64)  # scratch for learn_many
        self.chunk = 1  # examples in learn_many's next chunk, adapted up to max_batch

    # -- serving ------------------------------------------------------------------------------

    def weights(self, idx) -> np.ndarray:
        """Serving weights of coordinates ``idx``: exactly 0.0 where ``|z| <= l1``."""
        z, n = self.z[idx], self.n[idx]
        shrunk = np.maximum(np.abs(z) - self.l1, 0.0)
        # copysign makes -0.0 where shrunk is 0; + 0.0 turns it into 0.0 for the serving store.
        return np.copysign(shrunk, -z) / ((self.beta + np.sqrt(n)) / self.alpha + self.l2) + 0.0

    def predict_one(self, x) -> float:
        return float(sigmoid(self.weights(x).sum()))

    def predict_many(self, indptr, indices) -> np.ndarray:
        indptr = np.asarray(indptr)
        s = np.bincount(csr_rows(indptr), weights=self.weights(indices), minlength=len(indptr) - 1)
        return sigmoid(s)

    # -- learning -----------------------------------------------------------------------------

    def learn_one(self, x, y, weight: float = 1.0) -> float:
        """One FTRL step; returns the prediction made before it (progressive validation)."""
        w = self.weights(x)
        p = float(sigmoid(w.sum()))
        g = weight * (p - y)
        n = self.n[x]
        n_new = n + g * g
        self.z[x] += g - (np.sqrt(n_new) - np.sqrt(n)) / self.alpha * w
        self.n[x] = n_new
        self._touched[x] = True
        return p

    def learn_many(self, indptr, indices, y, weights=None) -> np.ndarray:
        """Learn a batch in chunks (see the module docstring); returns the predictions made
        before learning each example (with its chunk's starting weights)."""
        indptr, indices = np.asarray(indptr), np.asarray(indices)
        y = np.asarray(y, dtype=np.float64)
        wt = None if weights is None else np.asarray(weights, dtype=np.float64)
        m = len(indptr) - 1
        out = np.empty(m)
        a = 0
        while a < m:
            b = min(a + self.chunk, m)
            lo, hi = indptr[a], indptr[b]
            p, moved = self._chunk(
                indptr[a : b + 1] - lo, indices[lo:hi], y[a:b], None if wt is None else wt[a:b]
            )
            out[a:b] = p
            # The chunk's own updates moved its examples' scores by `moved` on average: the
            # staleness the later ones were learned with. Keep it small (< CHUNK_MOVE_HIGH).
            if moved > CHUNK_MOVE_HIGH:
                self.chunk = max(1, self.chunk // 2)
            elif moved < CHUNK_MOVE_LOW and b - a == self.chunk:
                self.chunk = min(self.max_batch, 2 * self.chunk)
            a = b
        return out

    def _chunk(self, indptr, indices, y, wt) -> tuple[np.ndarray, float]:
        rows = csr_rows(indptr)
        # Unique coordinates and each entry's position among them, through a scratch array
        # (5x faster than np.unique here). Whichever duplicate's write lands, exactly one
        # entry per coordinate then reads its own position back.
        slot, k = self._slot, np.arange(len(indices))
        slot[indices] = k
        uniq = indices[slot[indices] == k]
        slot[uniq] = np.arange(len(uniq))
        inv = slot[indices]
        w = self.weights(uniq)
        p = sigmoid(np.bincount(rows, weights=w[inv], minlength=len(y)))
        g = p - y if wt is None else wt * (p - y)
        g_entry = g[rows]
        g_sum = np.bincount(inv, weights=g_entry, minlength=len(uniq))
        g2_sum = np.bincount(inv, weights=g_entry * g_entry, minlength=len(uniq))
        n = self.n[uniq]
        n_new = n + g2_sum
        self.z[uniq] += g_sum - (np.sqrt(n_new) - np.sqrt(n)) / self.alpha * w
        self.n[uniq] = n_new
        self._touched[uniq] = True
        dw = self.weights(uniq) - w
        moved = np.abs(np.bincount(rows, weights=dw[inv], minlength=len(y))).mean()
        return p, float(moved)

    # -- publishing and snapshots -------------------------------------------------------------

    def touched(self) -> np.ndarray:
        """Coordinates learned since the last ``pop_touched()``, sorted; never truncated."""
        return np.flatnonzero(self._touched)

    def pop_touched(self) -> np.ndarray:
        """``touched()``, and forget them: call after their weights are pushed."""
        idx = np.flatnonzero(self._touched)
        self._touched[idx] = False
        return idx

    def nonzero(self) -> np.ndarray:
        """Coordinates whose serving weight is not 0 (``|z| > l1``)."""
        return np.flatnonzero(np.abs(self.z) > self.l1)

    def state(self) -> dict:
        """Hyperparameters and arrays (not copies), touched ones included: a snapshot taken
        between pushes keeps the pending pushes."""
        return {
            "kind": "ftrl",
            "version": STATE_VERSION,
            "alpha": self.alpha,
            "beta": self.beta,
            "l1": self.l1,
            "l2": self.l2,
            "bits": self.bits,
            "max_batch": self.max_batch,
            "chunk": self.chunk,
            "z": self.z,
            "n": self.n,
            "touched": self._touched,
        }

    @classmethod
    def from_state(cls, state: dict) -> FTRLProximal:
        if state.get("kind") != "ftrl" or state.get("version") != STATE_VERSION:
            raise ValueError(f"not an FTRL state of version {STATE_VERSION}")
        model = cls(
            state["alpha"],
            state["beta"],
            state["l1"],
            state["l2"],
            int(state["bits"]),
            int(state["max_batch"]),
        )
        size = 1 << model.bits
        for name in ("z", "n"):
            arr = np.asarray(state[name], dtype=np.float64)
            if arr.shape != (size,):
                raise ValueError(f"{name}: expected shape ({size},), got {arr.shape}")
            setattr(model, name, arr.copy())
        model._touched = np.asarray(state["touched"], dtype=bool).copy()
        model.chunk = int(state["chunk"])
        return model
