"""Join-health monitor (the KDD 2014 paper's anomaly detection for the online joiner).

If the click stream breaks, the joiner keeps closing windows and emits false negatives;
a model that learns them drifts toward zero. The monitor watches how far the watermark has run past
the last click seen and the labeled CTR of the examples against a slow baseline,
and quarantines the examples emitted while either looks broken, so learners skip them.
"""

from __future__ import annotations

import logging
from collections import deque

log = logging.getLogger(__name__)


class JoinHealthMonitor:
    """Decides, per emitted example, whether it is quarantined.

    >>> m = JoinHealthMonitor(max_click_lag_ms=1000, window_examples=100, min_expected_clicks=5)
    >>> m.observe_lag(watermark=9_499, clk_max_ts=9_500)
    False
    >>> m.observe_lag(watermark=20_000, clk_max_ts=9_500)  # closing windows clicks never saw
    True
    >>> m.observe_lag(watermark=20_000, clk_max_ts=20_100)  # caught up: healthy again
    False
    >>> m.transitions
    2
    """

    def __init__(self, max_click_lag_ms: int = 120_000, ctr_collapse_ratio: float = 0.3,
                 window_examples: int = 2000, min_expected_clicks: float = 20.0,
                 baseline_halflife_examples: int = 50_000, name: str = "") -> None:
        self.max_click_lag_ms = max_click_lag_ms
        self.ratio = ctr_collapse_ratio
        self.min_expected = min_expected_clicks
        self.decay = 0.5 ** (1.0 / baseline_halflife_examples)
        self.name = name
        self._window: deque[int] = deque(maxlen=window_examples)
        self._window_pos = 0
        # Baseline CTR as a decayed ratio; seeded empty, so the CTR rule waits for data.
        self._base_pos = 0.0
        self._base_n = 0.0
        self.lagging = False
        self.collapsed = False
        self.transitions = 0
        self.reason = ""

    @property
    def quarantined(self) -> bool:
        return self.lagging or self.collapsed

    @property
    def baseline_ctr(self) -> float | None:
        return self._base_pos / self._base_n if self._base_n >= 1 else None

    def _set(self, lagging: bool, collapsed: bool, why: str) -> None:
        before = self.quarantined
        self.lagging, self.collapsed = lagging, collapsed
        if self.quarantined != before:
            self.transitions += 1
            self.reason = why if self.quarantined else ""
            if self.quarantined:
                log.warning("join health %s: quarantine ON (%s)", self.name, why)
            else:
                log.warning("join health %s: quarantine OFF (%s)", self.name, why)

    def observe_lag(self, watermark: int, clk_max_ts: int) -> bool:
        """While the click stream is active the watermark waits for it, so labels are safe
        however far behind it is; the risk is windows closing past the last click seen,
        which happens once the click stream is idle."""
        lag = watermark - clk_max_ts
        lagging = lag > self.max_click_lag_ms
        if lagging != self.lagging:
            why = f"watermark {lag / 1000:.0f} s past the last click"
            self._set(lagging, self.collapsed, why)
        return self.quarantined

    def observe_label(self, label: int) -> bool:
        """Record one emitted example; returns whether it is quarantined."""
        w = self._window
        if len(w) == w.maxlen:
            self._window_pos -= w[0]
        w.append(label)
        self._window_pos += label
        base = self.baseline_ctr
        collapsed = False
        if base is not None and len(w) == w.maxlen:
            expected = base * len(w)
            collapsed = expected >= self.min_expected and self._window_pos < self.ratio * expected
        if collapsed != self.collapsed:
            why = (f"labeled CTR {self._window_pos / len(w):.4f} over the last {len(w)} "
                   f"examples vs baseline {base:.4f}")
            self._set(self.lagging, collapsed, why)
        if not self.quarantined:
            # Only healthy labels teach the baseline, so an outage cannot drag it down.
            self._base_pos = self._base_pos * self.decay + label
            self._base_n = self._base_n * self.decay + 1.0
        return self.quarantined

    def state(self) -> dict:
        return {"window": list(self._window), "base": (self._base_pos, self._base_n),
                "lagging": self.lagging, "collapsed": self.collapsed,
                "transitions": self.transitions, "reason": self.reason}

    def restore(self, s: dict) -> None:
        self._window.clear()
        self._window.extend(s["window"])
        self._window_pos = sum(self._window)
        self._base_pos, self._base_n = s["base"]
        self.lagging, self.collapsed = s["lagging"], s["collapsed"]
        self.transitions, self.reason = s["transitions"], s["reason"]
