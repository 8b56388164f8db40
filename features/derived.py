"""Features derived from the window counts: Beta-smoothed CTRs and log-scale count buckets.

A raw CTR of a rarely seen entity is noise (1 click in 1 impression is not 100 %). With a
Beta(alpha, beta) prior centred on the global CTR the posterior mean
``(clicks + alpha) / (imps + alpha + beta)`` starts at the global CTR and moves to the entity's
own rate as its impressions outnumber the prior's pseudo-count ``alpha + beta``.

>>> prior = BetaPrior.from_ctr(0.03, strength=100)
>>> round(prior.smoothed_ctr(1, 1), 4), round(prior.smoothed_ctr(300, 10_000), 4)
(0.0396, 0.03)
>>> derived_features({"imp_5m": 5, "clk_5m": 1}, prior)
{'imp_5m': 5, 'clk_5m': 1, 'ctr_5m': 0.0381, 'imp_5m_lb': 3, 'clk_5m_lb': 1}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_STRENGTH = 100.0  # pseudo-impressions: a 3 % CTR prior is worth 3 clicks in 100
MAX_STRENGTH = 1e6  # when entities do not differ measurably, the prior is the global CTR


@dataclass(frozen=True)
class BetaPrior:
    alpha: float
    beta: float

    def __post_init__(self) -> None:
        if not (self.alpha > 0 and self.beta > 0):
            raise ValueError(f"alpha and beta must be > 0, got {self.alpha}, {self.beta}")

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @classmethod
    def from_ctr(cls, ctr: float, strength: float = DEFAULT_STRENGTH) -> BetaPrior:
        """A fixed pseudo-count: ``strength`` impressions at the global ``ctr``."""
        if not 0 < ctr < 1 or strength <= 0:
            raise ValueError(f"need 0 < ctr < 1 and strength > 0, got {ctr}, {strength}")
        return cls(ctr * strength, (1 - ctr) * strength)

    @classmethod
    def fit(cls, clicks, imps, min_imps: int = 1) -> BetaPrior:
        """Method of moments over entities (arrays of per-entity clicks and impressions).

        The spread of observed rates is the spread of true rates plus binomial noise; the
        noise part, ``m (1 - m) mean(1/n)``, is subtracted before solving
        ``var = m (1 - m) / (strength + 1)``. Entities with fewer than ``min_imps`` are left
        out; when the true rates do not measurably differ the strength is ``MAX_STRENGTH``.
        """
        c, n = np.asarray(clicks, float), np.asarray(imps, float)
        keep = n >= max(min_imps, 1)
        c, n = c[keep], n[keep]
        if n.sum() == 0:
            raise ValueError("no entity with impressions to fit a prior on")
        m = float(np.clip(c.sum() / n.sum(), 1e-6, 1 - 1e-6))
        # Impression-weighted variance, so a few one-impression entities do not dominate.
        w = n / n.sum()
        var_obs = float((w * (c / n - m) ** 2).sum())
        var_noise = m * (1 - m) * float((w / n).sum())
        var_true = var_obs - var_noise
        strength = MAX_STRENGTH if var_true <= 0 else min(m * (1 - m) / var_true - 1,
                                                          MAX_STRENGTH)
        strength = max(strength, 1e-3)
        return cls(m * strength, (1 - m) * strength)

    def smoothed_ctr(self, clicks: float, imps: float) -> float:
        return (clicks + self.alpha) / (imps + self.alpha + self.beta)


def log_bucket(n: int) -> int:
    """0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, ...: the bit length of a non-negative count."""
    return int(n).bit_length() if n > 0 else 0


def derived_features(values: dict[str, int], prior: BetaPrior,
                     digits: int | None = 4) -> dict[str, float | int]:
    """``values`` plus ``ctr_<window>`` for each imp/clk pair and ``<feature>_lb`` for each
    count. CTRs are rounded to ``digits`` (None: not rounded) so stored values stay short."""
    out: dict[str, float | int] = dict(values)
    for name, n in values.items():
        if name.startswith("imp_"):
            label = name[4:]
            clicks = values.get(f"clk_{label}", 0)
            ctr = prior.smoothed_ctr(clicks, n)
            out[f"ctr_{label}"] = ctr if digits is None else round(ctr, digits)
    for name, n in values.items():
        out[f"{name}_lb"] = log_bucket(n)
    return out
