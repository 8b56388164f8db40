"""What the flows export to Prometheus, from one report (no flow, no HTTP)."""

from __future__ import annotations

import math

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry

from flows import metrics
from learners.metrics import ProgressiveMetrics


def test_calibration_by_slice_is_exported_per_model_slice_and_value():
    m = ProgressiveMetrics(window=10, slices={"position": 2, "hour": 24})
    m.update_many([0.25, 0.5, 0.1, 0.2], [1, 0, 0, 0], {"position": [0, 0, 1, 1],
                                                       "hour": [3, 3, 3, 3]})
    latest = metrics._Latest()
    latest.learn = {"counts": {"learned": 4}, "metrics": {"emb": m.summary()}, "version": "7"}
    registry = CollectorRegistry()
    registry.register(latest)
    text = generate_latest(registry).decode()
    want = {'position="0"': 0.75, 'position="1"': math.nan, 'hour="3"': 1.05}
    for labels, value in want.items():
        name, v = labels.split("=")
        line = next(x for x in text.splitlines() if x.startswith(
            "ctrstream_learn_calibration_by_slice{") and f'slice="{name}"' in x
            and f"value={v}" in x)
        got = float(line.rsplit(" ", 1)[1])
        assert math.isnan(got) if math.isnan(value) else math.isclose(got, value), line
    assert 'ctrstream_learn_calibration_by_slice{model="emb",slice="hour",value="23"}' in text


def test_feature_figures_are_exported_once_reported():
    latest = metrics._Latest()
    registry = CollectorRegistry()
    registry.register(latest)
    assert "ctrstream_features_examples_dropped" not in generate_latest(registry).decode()
    latest.features.update(entities=5, writes=7, dropped=2)
    text = generate_latest(registry).decode().splitlines()
    assert {"ctrstream_features_entities 5.0", "ctrstream_features_store_writes_total 7.0",
            "ctrstream_features_examples_dropped_total 2.0"} <= set(text)
