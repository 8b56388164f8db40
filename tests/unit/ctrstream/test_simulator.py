"""The simulator against its own promises: calibration, delays, faults, ordering, determinism."""

from __future__ import annotations

import math
from collections import Counter
from itertools import islice
from statistics import NormalDist

import numpy as np
import orjson
import pytest

from ctrstream.simulator import (
    CLICKS,
    EARLY_CLICK_MAX_DELAY_MS,
    IMPRESSIONS,
    MS_PER_DAY,
    RESEND_MAX_MS,
    EventStream,
    Faults,
    StreamSpec,
    bayes_log_loss,
    coverage,
    default_start_ms,
    expected_labels,
    read_manifest,
    read_truth,
)
from flows.config import GeneratorConfig
from joiner.events import BadEvent, parse_click, parse_impression

GEN = GeneratorConfig()
Z999 = NormalDist().inv_cdf(0.9995)  # two-sided 99.9 %


def collect(spec: StreamSpec, gen: GeneratorConfig = GEN, truth_dir=None):
    """The stream as (topic, key, value, arrival ms) in arrival order, and the stream object."""
    stream = EventStream(gen, spec, truth_dir)
    msgs = [m for c in stream
            for m in zip(c.topic.tolist(), c.keys, c.values, c.at.tolist(), strict=True)]
    return stream, msgs


def parse(topic: int, value: bytes):
    try:
        return (parse_impression if topic == IMPRESSIONS else parse_click)(value)
    except BadEvent:
        return None


@pytest.fixture(scope="module")
def big():
    """200k impressions over more than a day of event time, so every time effect is averaged."""
    gen = GeneratorConfig(impressions_per_s=2.0)
    stream, msgs = collect(StreamSpec(seed=11, impressions=200_000), gen)
    return gen, stream, [(*m, parse(m[0], m[2])) for m in msgs], stream.truth()


@pytest.fixture(scope="module")
def faulty():
    faults = Faults(duplicate_impressions=37, duplicate_clicks=23, early_clicks=19,
                    orphan_clicks=11, malformed_impressions=13, malformed_clicks=17)
    stream, msgs = collect(StreamSpec(seed=5, impressions=60_000, faults=faults))
    return faults, stream, [(*m, parse(m[0], m[2])) for m in msgs]


def test_ctr_within_confidence_interval_of_mean_p(big):
    gen, stream, _, truth = big
    p = np.asarray(truth["p"])
    clicks = int(np.asarray(truth["clicked"]).sum())
    sd = math.sqrt(float((p * (1 - p)).sum()))
    assert abs(clicks - p.sum()) <= Z999 * sd
    assert stream.counts["clicks"] == clicks
    # The intercept is calibrated so the mean true probability is the configured base rate.
    assert p.mean() == pytest.approx(gen.base_ctr, rel=0.1)
    assert stream.manifest()["mean_p"] == pytest.approx(p.mean())


def truncated_lognormal_quantile(gen: GeneratorConfig, q: float) -> float:
    d = NormalDist(math.log(gen.click_delay_median_s), gen.click_delay_sigma)
    return math.exp(d.inv_cdf(q * d.cdf(math.log(gen.max_click_delay_s)))) * 1000


def test_delay_quantiles_match_truncated_lognormal(big):
    gen, _, _, truth = big
    delay = np.asarray(truth["delay_ms"])[np.asarray(truth["clicked"])]
    assert len(delay) > 5000
    for q in (0.5, 0.9):
        assert np.quantile(delay, q) == pytest.approx(truncated_lognormal_quantile(gen, q),
                                                      rel=0.2)
    assert delay.max() <= gen.max_click_delay_s * 1000
    assert (np.asarray(truth["delay_ms"])[~np.asarray(truth["clicked"])] == -1).all()


def test_truncation_resamples_below_the_maximum():
    gen = GeneratorConfig(max_click_delay_s=60.0, base_ctr=0.2)
    stream, _ = collect(StreamSpec(seed=3, impressions=30_000), gen)
    truth = stream.truth()
    delay = np.asarray(truth["delay_ms"])[np.asarray(truth["clicked"])]
    assert delay.max() <= 60_000
    # Resampling keeps the shape: the median is that of the log-normal cut at 60 s.
    assert np.median(delay) == pytest.approx(truncated_lognormal_quantile(gen, 0.5), rel=0.1)


def test_click_ts_is_impression_ts_plus_delay(big):
    _, _, msgs, truth = big
    by_id = {i: (t, d) for i, t, d in zip(truth["impression_id"].to_pylist(),
                                          truth["ts"].to_pylist(),
                                          truth["delay_ms"].to_pylist(), strict=True)}
    clicks = [e for t, *_, e in msgs if t == CLICKS]
    assert len(clicks) == sum(d >= 0 for _, d in by_id.values())
    for c in clicks:
        ts, delay = by_id[c.impression_id]
        assert c.ts == ts + delay


def test_messages_follow_the_contract(big):
    _, _, msgs, truth = big
    ids = truth["impression_id"].to_pylist()
    assert len(set(ids)) == len(ids)
    imps = [(k, e) for t, k, _, _, e in msgs if t == IMPRESSIONS]
    assert [i.impression_id for _, i in imps] == ids
    for key, imp in imps[:5000]:
        assert key == imp.impression_id.encode() and len(imp.impression_id) == 16
        assert imp.user_id[0] == "u" and imp.item_id[0] == "i"
        f = imp.features
        assert set(f) == {"category", "device", "position", "hour"}
        assert f["category"].startswith("c") and f["device"] in ("mobile", "desktop", "tablet")
        assert 0 <= f["position"] <= 9 and f["hour"] == imp.ts % MS_PER_DAY // 3_600_000
    assert orjson.loads(msgs[0][2]) == msgs[0][4]._asdict()


def test_no_fault_stream_is_in_ts_order(big):
    _, _, msgs, _ = big
    ts = [e.ts for *_, e in msgs]
    assert ts == sorted(ts)
    assert [a for *_, a, _ in msgs] == ts


def test_position_bias_and_popularity(big):
    _, _, msgs, truth = big
    pos = np.array([e.features["position"] for t, *_, e in msgs if t == IMPRESSIONS])
    p = np.asarray(truth["p"])
    means = [p[pos == k].mean() for k in range(10)]
    assert all(a > b for a, b in zip(means, means[1:], strict=False))
    for col, n in (("item_id", GEN.items), ("user_id", GEN.users)):
        counts = np.sort(np.array(list(Counter(truth[col].to_pylist()).values())))[::-1]
        top = counts[: n // 100].sum() / counts.sum()
        assert top > 0.3, (col, top)  # uniform would be 0.01


def test_fault_counts_are_exact_and_detectable(faulty):
    faults, stream, msgs = faulty
    c = stream.counts
    for kind in ("duplicate_impressions", "duplicate_clicks", "early_clicks", "orphan_clicks",
                 "malformed_impressions", "malformed_clicks"):
        assert c[kind] == getattr(faults, kind), kind

    parsed = msgs
    bad = Counter(t for t, *_, e in parsed if e is None)
    assert bad[IMPRESSIONS] == faults.malformed_impressions
    assert bad[CLICKS] == faults.malformed_clicks
    kinds = stream.manifest()["malformed_kinds"]
    assert sum(kinds["impressions"].values()) == faults.malformed_impressions

    imps = Counter(e.impression_id for t, *_, e in parsed if t == IMPRESSIONS and e)
    clicks = Counter(e.impression_id for t, *_, e in parsed if t == CLICKS and e)
    assert len(imps) == c["impressions"]
    assert sum(n - 1 for n in imps.values()) == faults.duplicate_impressions
    orphans = [i for i in clicks if i not in imps]
    assert len(orphans) == faults.orphan_clicks
    assert sum(n - 1 for n in clicks.values()) == faults.duplicate_clicks
    assert len(clicks) - len(orphans) == c["clicks"]

    per_topic = Counter(t for t, *_ in msgs)
    assert per_topic[IMPRESSIONS] == c["impression_messages"] == (
        c["impressions"] + faults.duplicate_impressions + faults.malformed_impressions)
    assert per_topic[CLICKS] == c["click_messages"] == (
        c["clicks"] + faults.duplicate_clicks + faults.orphan_clicks + faults.malformed_clicks)

    truth_faults = Counter(stream.truth()["fault"].to_pylist())
    assert truth_faults["duplicate_impression"] == faults.duplicate_impressions
    assert truth_faults["duplicate_click"] == faults.duplicate_clicks
    assert truth_faults["early_click"] == faults.early_clicks


def test_duplicates_are_resent_shortly_after(faulty):
    _, _, msgs = faulty
    first: dict[tuple, tuple] = {}
    resent = 0
    for t, k, v, a, _ in msgs:
        if (t, v) in first:
            resent += 1
            assert first[(t, v)][0] == k and 0 < a - first[(t, v)][1] <= RESEND_MAX_MS
        else:
            first[(t, v)] = (k, a)
    assert resent == 37 + 23


def test_early_clicks_precede_their_impression(faulty):
    faults, stream, msgs = faulty
    first_imp, first_click = {}, {}
    for pos, (t, *_, e) in enumerate(msgs):
        if e is not None:
            (first_imp if t == IMPRESSIONS else first_click).setdefault(e.impression_id,
                                                                        (pos, e.ts))
    early = [i for i, (pos, _) in first_click.items() if i in first_imp and pos < first_imp[i][0]]
    assert len(early) == faults.early_clicks
    truth = stream.truth()
    rows = {i: (ts, d) for i, ts, d, f in zip(*(truth[c].to_pylist() for c in
                                                  ("impression_id", "ts", "delay_ms", "fault")),
                                              strict=True) if f == "early_click"}
    assert set(early) == set(rows)
    for i in early:
        ts, delay = rows[i]
        assert first_imp[i][1] == ts  # the impression keeps its event time
        assert first_click[i][1] == ts + delay and 0 <= delay <= EARLY_CLICK_MAX_DELAY_MS


def test_stream_is_in_ts_order_apart_from_faults(faulty):
    _, _, msgs = faulty
    seen_imp: set = set()
    seen: set = set()
    clicked_first: set = set()
    ts = []
    arrivals = [a for *_, a, _ in msgs]
    assert arrivals == sorted(arrivals)
    for t, _, v, _, e in msgs:
        if e is None or (t, v) in seen:  # malformed, or a resent duplicate
            continue
        seen.add((t, v))
        if t == CLICKS and e.impression_id not in seen_imp:
            clicked_first.add(e.impression_id)
        if t == IMPRESSIONS:
            seen_imp.add(e.impression_id)
            if e.impression_id in clicked_first:  # held back behind its click
                continue
        ts.append(e.ts)
    assert ts == sorted(ts)


def test_deterministic_under_seed():
    spec = StreamSpec(seed=42, impressions=60_000, start_ms=1_700_000_000_000,
                      faults=Faults(5, 5, 5, 5, 5, 5))
    a = collect(spec)[1]
    assert a == collect(spec)[1]
    other = collect(StreamSpec(seed=43, impressions=60_000, start_ms=1_700_000_000_000))[1]
    assert a[0] != other[0]


def test_duration_poisson_arrivals_and_default_start():
    stream, msgs = collect(StreamSpec(seed=2, duration_s=600))
    ts = np.array([parse(t, v).ts for t, _, v, _ in msgs if t == IMPRESSIONS])
    start = default_start_ms()
    assert stream.start_ms == start and start % MS_PER_DAY == 0
    assert ts.min() >= start and ts.max() < start + 600_000
    expected = GEN.impressions_per_s * 600
    assert abs(len(ts) - expected) <= 5 * math.sqrt(expected)
    gaps = np.diff(ts)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential gaps


def test_rates_on_an_unbounded_stream():
    with pytest.raises(ValueError, match="bounded"):
        EventStream(GEN, StreamSpec(faults=Faults(orphan_clicks=10)))
    stream = EventStream(GEN, StreamSpec(seed=1, faults=Faults(duplicate_impressions=0.01,
                                                               malformed_clicks=0.001)))
    chunks = list(islice(stream, 4))
    n = stream.counts["impressions"]
    assert n >= 150_000
    assert stream.counts["duplicate_impressions"] == pytest.approx(0.01 * n, rel=0.2)
    dup = sum(len(c) for c in chunks) - stream.counts["click_messages"] - n
    assert dup == stream.counts["duplicate_impressions"]


def test_not_enough_candidates_is_an_error():
    with pytest.raises(ValueError, match="not enough candidates"):
        collect(StreamSpec(seed=1, impressions=1000, faults=Faults(early_clicks=500)))


def test_truth_files_and_helpers(tmp_path, big):
    _, _, msgs, truth_mem = big
    stream, _ = collect(StreamSpec(seed=4, impressions=30_000, faults=Faults(orphan_clicks=3)),
                        truth_dir=tmp_path)
    truth = read_truth(tmp_path)
    manifest = read_manifest(tmp_path)
    assert truth.num_rows == manifest["counts"]["impressions"] == 30_000
    assert manifest["complete"] and manifest["counts"]["orphan_clicks"] == 3
    assert manifest["seed"] == 4 and manifest["config"]["base_ctr"] == GEN.base_ctr
    assert truth.equals(stream.truth())

    window = 15 * 60_000
    labels = expected_labels(truth_mem, window)
    clicked = np.asarray(truth_mem["clicked"])
    assert labels.sum() <= clicked.sum()
    assert coverage(truth_mem, window) == pytest.approx(labels.sum() / clicked.sum())
    # Bayes loss: the expected loss of p, near the realized loss of p, below a constant's.
    p = np.asarray(truth_mem["p"])
    realized = -np.mean(np.where(clicked, np.log(p), np.log1p(-p)))
    assert bayes_log_loss(truth_mem) == pytest.approx(realized, rel=0.03)
    m = p.mean()
    assert bayes_log_loss(truth_mem) < -(m * math.log(m) + (1 - m) * math.log(1 - m))
    assert bayes_log_loss(truth_mem, window) < bayes_log_loss(truth_mem)
