"""learners/: FTRL against river and the paper, BOPR against the paper's equations computed by
hand, sampling and its correction, progressive metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.bopr import BOPR, v_w, v_w_many
from learners.ftrl import FTRLProximal
from learners.metrics import ProgressiveMetrics, exact_auc, normalized_entropy
from learners.sampling import keep, keep_many, negative_weight, recalibrate, unit_hash

# -- a synthetic stream with known weights ----------------------------------------------------


def synthetic(n, d=30, k=5, bias=-2.5, seed=0, link="logit"):
    """Bias (index 0) + each of ``d`` features with probability ``k / d`` (a varying count, so
    the bias and the features are identifiable), true weights known; CSR rows."""
    rng = np.random.default_rng(seed)
    true_w = rng.normal(0, 1.0, d + 1)
    true_w[0] = bias
    active = np.concatenate([np.ones((n, 1), bool), rng.random((n, d)) < k / d], axis=1)
    indices = np.nonzero(active)[1].astype(np.int64)  # row-major: rows in order, sorted
    indptr = np.concatenate([[0], np.cumsum(active.sum(1))])
    score = active @ true_w
    if link == "logit":
        p = 1 / (1 + np.exp(-score))
    else:
        p = 0.5 * np.vectorize(math.erfc)(-score / math.sqrt(2))
    y = (rng.random(n) < p).astype(np.float64)
    return indptr, indices, y, p, true_w


def rows(indptr, indices):
    return [indices[indptr[i] : indptr[i + 1]] for i in range(len(indptr) - 1)]


def mean_log_loss(p, y):
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


# -- FTRL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha,beta,l2", [(0.1, 1.0, 1.0), (0.5, 0.3, 0.0), (0.05, 2.0, 5.0)])
def test_ftrl_matches_river(alpha, beta, l2):
    """river 0.26.1 differs from the paper in two ways, both read in river/optim/ftrl.py:
    it predicts (and takes the gradient) with each weight as computed at that coordinate's
    previous step, one update behind; and when |z| <= l1 it keeps the old weight instead of
    0. Refreshing the weights with river's own step at gradient 0 (z and n unchanged) before
    each prediction removes the first; l1 = 0 removes the second. The bias is feature "0"
    through the optimizer, as in ours; river's separate intercept is switched off."""
    from river import linear_model, optim

    river = linear_model.LogisticRegression(
        optim.FTRLProximal(alpha, beta, 0.0, l2), intercept_lr=0.0
    )
    ours = FTRLProximal(alpha, beta, 0.0, l2, bits=6)
    indptr, indices, y, _, _ = synthetic(1500, d=40, seed=1)
    worst, moved = 0.0, 0.0
    for x, label in zip(rows(indptr, indices), y, strict=True):
        xd = dict.fromkeys(map(str, x.tolist()), 1.0)
        river.optimizer._step_with_dict(river._weights, dict.fromkeys(xd, 0.0))
        p_river = river.predict_proba_one(xd)[True]
        p_ours = ours.predict_one(x)
        worst = max(worst, abs(p_ours - p_river))
        moved = max(moved, abs(p_ours - 0.5))
        river.learn_one(xd, bool(label))
        ours.learn_one(x, label)
    assert worst < 1e-6
    assert moved > 0.3  # the stream did teach something


def test_ftrl_l1_gives_exact_zeros():
    m = FTRLProximal(alpha=0.1, beta=1.0, l1=1.0, l2=1.0, bits=4)
    m.z[:] = [0.0, 0.5, -1.0, 1.0, 1.0000001, -3.0, 2.0, 0.9] + [0.0] * 8
    m.n[:] = 4.0
    w = m.weights(np.arange(8))
    assert (w[[0, 1, 2, 3, 7]] == 0.0).all() and not np.signbit(w[[0, 1, 2, 3, 7]]).any()
    # w = -(z - sign(z) l1) / ((beta + sqrt(n)) / alpha + l2) = -(z -+ 1) / 31
    assert w[5] == pytest.approx(2.0 / 31) and w[6] == pytest.approx(-1.0 / 31)
    assert w[4] < 0 and m.nonzero().tolist() == [4, 5, 6]


def test_ftrl_learn_one_is_the_paper_step():
    m = FTRLProximal(alpha=0.2, beta=1.0, l1=0.5, l2=0.3, bits=4)
    m.z[[0, 2]] = [-2.0, 0.1]
    m.n[[0, 2]] = [9.0, 1.0]
    x = np.array([0, 2])
    w0 = -(-2.0 + 0.5) / ((1 + 3) / 0.2 + 0.3)  # |z_2| <= l1: w_2 = 0
    p = 1 / (1 + math.exp(-w0))
    assert m.learn_one(x, 1) == pytest.approx(p, abs=1e-15)
    g = p - 1
    sigma0 = (math.sqrt(9 + g * g) - 3) / 0.2
    sigma2 = (math.sqrt(1 + g * g) - 1) / 0.2
    assert m.z[0] == pytest.approx(-2.0 + g - sigma0 * w0, abs=1e-15)
    assert m.z[2] == pytest.approx(0.1 + g - sigma2 * 0.0, abs=1e-15)
    assert m.n[[0, 2]] == pytest.approx([9 + g * g, 1 + g * g], abs=1e-15)


def test_ftrl_learn_many_chunk_is_sequential_with_frozen_weights():
    indptr, indices, y, _, _ = synthetic(300, d=8, k=3, seed=2)
    weights = np.random.default_rng(3).uniform(0.5, 3.0, len(y))
    model = FTRLProximal(alpha=0.3, beta=1.0, l1=0.2, l2=0.5, bits=5, max_batch=64)
    model.chunk = 64  # one chunk (the controller starts at 1)
    z, n = model.z.copy(), model.n.copy()
    p = model.learn_many(indptr[:65], indices[: indptr[64]], y[:64], weights[:64])
    # Reference: one example at a time, weights computed once from the starting z and n.
    frozen = np.where(np.abs(z) > 0.2, -(z - np.sign(z) * 0.2) / ((1 + np.sqrt(n)) / 0.3 + 0.5), 0)
    for k, x in enumerate(rows(indptr[:65], indices)):
        pk = 1 / (1 + math.exp(-frozen[x].sum()))
        assert p[k] == pytest.approx(pk, abs=1e-12)
        g = weights[k] * (pk - y[k])
        z[x] += g - (np.sqrt(n[x] + g * g) - np.sqrt(n[x])) / 0.3 * frozen[x]
        n[x] += g * g
    assert np.allclose(model.z, z, atol=1e-12) and np.allclose(model.n, n, atol=1e-12)


def test_ftrl_learn_many_with_batch_1_is_learn_one():
    indptr, indices, y, _, _ = synthetic(400, seed=4)
    w = np.random.default_rng(5).uniform(0.5, 2.0, len(y))
    a = FTRLProximal(bits=6, max_batch=1)
    b = FTRLProximal(bits=6)
    pa = a.learn_many(indptr, indices, y, w)
    pb = [
        b.learn_one(x, label, wk) for x, label, wk in zip(rows(indptr, indices), y, w, strict=True)
    ]
    assert np.allclose(pa, pb, atol=1e-12) and np.allclose(a.z, b.z, atol=1e-12)
    assert np.allclose(
        a.predict_many(indptr, indices), [b.predict_one(x) for x in rows(indptr, indices)]
    )


def test_ftrl_cold_start_chunks_do_not_overshoot():
    """A dozen always-active features (count buckets of 0 clicks look like this): 256
    examples on one stale prediction would each push them all the same way."""
    n, always = 20_000, 12
    indptr, indices, y, _, _ = synthetic(n, d=200, k=5, seed=6)
    extra = np.arange(201, 201 + always)
    rows_ = [np.concatenate([x, extra]) for x in rows(indptr, indices)]
    indptr2 = np.concatenate([[0], np.cumsum([len(r) for r in rows_])])
    indices2 = np.concatenate(rows_)
    seq = FTRLProximal(bits=9, max_batch=1).learn_many(indptr2, indices2, y)
    batched = FTRLProximal(bits=9, max_batch=256).learn_many(indptr2, indices2, y)
    assert mean_log_loss(batched, y) < mean_log_loss(seq, y) * 1.01


def test_ftrl_recovers_known_weights():
    indptr, indices, y, p_true, true_w = synthetic(60_000, d=20, k=5, seed=7)
    m = FTRLProximal(alpha=0.5, beta=1.0, l1=0.0, l2=0.0, bits=5)
    p = m.learn_many(indptr, indices, y)
    w = m.weights(np.arange(21))
    big = np.abs(true_w) > 0.3
    assert (np.sign(w[big]) == np.sign(true_w[big])).all()
    assert np.corrcoef(w, true_w)[0, 1] > 0.95
    tail = slice(30_000, None)  # progressive log loss of the second half, near Bayes
    assert mean_log_loss(p[tail], y[tail]) < mean_log_loss(p_true[tail], y[tail]) + 0.01


def test_ftrl_touched_and_state():
    indptr, indices, y, _, _ = synthetic(200, d=10, k=2, seed=8)
    m = FTRLProximal(bits=5)
    m.learn_many(indptr[:51], indices[: indptr[50]], y[:50])
    assert m.touched().tolist() == np.unique(indices[: indptr[50]]).tolist()
    first = m.pop_touched()
    assert len(first) and len(m.pop_touched()) == 0
    m.learn_one(np.array([0, 31]), 1)
    snap = FTRLProximal.from_state(m.state())
    assert snap.touched().tolist() == [0, 31]  # a pending push survives a snapshot
    assert m.pop_touched().tolist() == [0, 31]
    a = m.learn_many(indptr, indices, y)
    b = snap.learn_many(indptr, indices, y)
    assert np.array_equal(a, b) and np.array_equal(m.z, snap.z)
    with pytest.raises(ValueError):
        FTRLProximal.from_state({**m.state(), "kind": "bopr"})


# -- BOPR ------------------------------------------------------------------------------------


def phi(t):
    return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def Phi(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


@pytest.mark.parametrize("y", [1, 0])
def test_bopr_update_by_hand(y):
    m = BOPR(beta=0.7, prior_variance=0.3, bits=4)
    m.mu[[0, 3, 9]] = [0.2, -0.5, 0.9]
    m.var[[0, 3, 9]] = [0.3, 0.1, 0.05]
    x = np.array([0, 3, 9])
    sign = 1 if y else -1
    s2 = 0.7**2 + 0.3 + 0.1 + 0.05
    s = math.sqrt(s2)
    t = sign * (0.2 - 0.5 + 0.9) / s
    v = phi(t) / Phi(t)
    w = v * (v + t)
    assert m.predict_one(x) == pytest.approx(Phi(0.6 / s), abs=1e-14)
    assert m.learn_one(x, y) == pytest.approx(Phi(0.6 / s), abs=1e-14)
    for i, mu0, var0 in ((0, 0.2, 0.3), (3, -0.5, 0.1), (9, 0.9, 0.05)):
        assert m.mu[i] == pytest.approx(mu0 + sign * var0 / s * v, abs=1e-14)
        assert m.var[i] == pytest.approx(var0 * (1 - var0 / s2 * w), abs=1e-14)
    untouched = np.setdiff1d(np.arange(16), x)
    assert (m.mu[untouched] == 0).all() and (m.var[untouched] == 0.3).all()


def test_v_w_stable_for_very_negative_t():
    # Direct where pdf/cdf is exact enough, the asymptotic series of the Mills ratio far out.
    for t in (-3.0, -1.0, 0.0, 2.0, 6.0):
        v, w = v_w(t)
        assert v == pytest.approx(phi(t) / Phi(t), rel=1e-12)
        assert w == pytest.approx(v * (v + t), rel=1e-10, abs=1e-300)
    for x in (200.0, 1e3, 1e6, 1e12):  # the series' next term, 74 / x^7, is below 1e-14
        v, w = v_w(-x)
        assert v == pytest.approx(x + 1 / x - 2 / x**3 + 10 / x**5, rel=1e-14)
        # w = v (v - x) = 1 - 1/x^2 + ...: in (0, 1), never 0/0 or > 1
        assert w == pytest.approx(1 - 1 / x**2 + 6 / x**4, rel=1e-12) and 0 < w <= 1
    ts = np.array([-1e9, -40.0, -4.0, -3.999, 0.0, 10.0, 50.0])
    v, w = v_w_many(ts)
    assert np.array_equal(v, [v_w(t)[0] for t in ts])
    assert np.array_equal(w, [v_w(t)[1] for t in ts])
    assert np.isfinite(v).all() and ((w >= 0) & (w <= 1)).all()


@settings(max_examples=200, deadline=None)
@given(
    mu=st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3),
    var=st.lists(st.floats(1e-9, 1e6), min_size=3, max_size=3),  # 1e-9: the variance floor
    beta=st.floats(1e-3, 1e3),
    labels=st.lists(st.booleans(), min_size=1, max_size=20),
)
def test_bopr_variance_stays_positive_and_finite(mu, var, beta, labels):
    m = BOPR(beta=beta, prior_variance=1.0, bits=2)
    x = np.array([0, 1, 3])
    m.mu[x], m.var[x] = mu, var
    for y in labels:
        p = m.learn_one(x, y)
        assert 0.0 <= p <= 1.0
        assert np.isfinite(m.mu).all() and np.isfinite(m.var).all() and (m.var > 0).all()
        assert (m.var[x] <= np.asarray(var) * (1 + 1e-12)).all()  # learning never adds doubt
    m.dynamics_epsilon = 0.3
    m.apply_dynamics(5.0)
    assert np.isfinite(m.mu).all() and (m.var > 0).all()


def test_bopr_dynamics():
    m = BOPR(beta=1.0, prior_variance=0.5, bits=3, dynamics_epsilon=0.1)
    m.mu[[0, 2]] = [-3.0, 1.0]
    m.var[[0, 2]] = [0.01, 0.02]
    twice = BOPR.from_state(m.state())
    m.apply_dynamics(2.0)
    twice.apply_dynamics(1.0)
    twice.apply_dynamics(1.0)
    assert np.allclose(m.mu, twice.mu, rtol=1e-12) and np.allclose(m.var, twice.var)
    e = 1 - 0.9**2
    prec = (1 - e) / 0.02 + e / 0.5
    assert m.var[2] == pytest.approx(1 / prec) and m.mu[2] == pytest.approx((1 - e) * 50 / prec)
    assert m.mu[0] == -3.0 and 0.01 < m.var[0] < 0.5  # the bias keeps its mean
    assert (m.mu[[1, 3, 4, 5, 6, 7]] == 0).all() and (m.var[[1, 3, 4, 5, 6, 7]] == 0.5).all()
    assert m.pop_touched().tolist() == [0, 2]
    m.apply_dynamics(0.0)
    assert len(m.touched()) == 0


def test_bopr_learn_many_spread_thompson_state():
    indptr, indices, y, _, _ = synthetic(500, d=12, k=3, seed=9, link="probit")
    a, b = BOPR(bits=5, max_batch=1), BOPR(bits=5)
    pa = a.learn_many(indptr, indices, y)
    pb = [b.learn_one(x, label) for x, label in zip(rows(indptr, indices), y, strict=True)]
    assert np.array_equal(pa, pb) and np.array_equal(a.var, b.var)
    assert np.allclose(
        a.predict_many(indptr, indices),
        [a.predict_one(x) for x in rows(indptr, indices)],
        atol=1e-15,
    )
    x = np.array([0, 3, 7])
    mean, std = a.predict_spread(x)
    assert mean == pytest.approx(a.mu[x].sum()) and std == pytest.approx(math.sqrt(a.var[x].sum()))
    # E[cdf(s / beta)] over s ~ N(mean, std^2) is cdf(mean / sqrt(beta^2 + std^2)): predict_one
    rng = np.random.default_rng(10)
    draws = np.array([a.thompson_sample(x, rng) for _ in range(20_000)])
    assert draws.mean() == pytest.approx(a.predict_one(x), abs=0.01)
    assert draws.std() > 0.001
    c = BOPR.from_state(a.state())
    assert np.array_equal(c.params(x)[0], a.params(x)[0])
    assert c.learn_one(x, 1) == a.learn_one(x, 1)


def test_bopr_chunks_learn_as_well_as_one_at_a_time():
    indptr, indices, y, _, _ = synthetic(20_000, d=40, k=8, seed=12, link="probit")
    seq = BOPR(prior_variance=0.1, bits=6, max_batch=1)
    chunked = BOPR(prior_variance=0.1, bits=6)
    p_seq = seq.learn_many(indptr, indices, y)
    p_chunk = chunked.learn_many(indptr, indices, y)
    assert chunked.chunk > 8  # it did batch
    assert abs(mean_log_loss(p_chunk, y) - mean_log_loss(p_seq, y)) < 0.003
    assert (chunked.var > 0).all() and (chunked.var <= 0.1).all()
    np.testing.assert_allclose(chunked.mu, seq.mu, atol=0.15)


def test_bopr_chunk_scores_with_the_beliefs_at_its_start():
    indptr, indices, y, _, _ = synthetic(64, d=12, k=3, seed=13, link="probit")
    m = BOPR(prior_variance=0.1, bits=5)
    m.mu[:] = np.linspace(-0.2, 0.2, 32)
    before = m.predict_many(indptr, indices)
    m.chunk = 64
    np.testing.assert_allclose(m.learn_many(indptr, indices, y), before, rtol=0, atol=1e-12)


def test_bopr_recovers_known_weights():
    indptr, indices, y, p_true, true_w = synthetic(30_000, d=20, k=5, seed=11, link="probit")
    m = BOPR(beta=1.0, prior_variance=1.0, bits=5)
    p = m.learn_many(indptr, indices, y)
    mu = m.mu[:21]
    # the data are probit(true_w . x): BOPR's own model with beta = 1
    big = np.abs(true_w) > 0.3
    assert (np.sign(mu[big]) == np.sign(true_w[big])).all()
    assert np.corrcoef(mu, true_w)[0, 1] > 0.95
    tail = slice(15_000, None)
    assert mean_log_loss(p[tail], y[tail]) < mean_log_loss(p_true[tail], y[tail]) + 0.01


# -- sampling --------------------------------------------------------------------------------


def test_keep_is_deterministic_and_keeps_positives():
    ids = [f"{i:016x}" for i in range(50_000)]
    kept = keep_many(ids, np.zeros(len(ids)), 0.1)
    assert kept.mean() == pytest.approx(0.1, abs=0.005)
    assert np.array_equal(kept, [keep(i, 0, 0.1) for i in ids])
    assert keep_many(ids, np.ones(len(ids)), 0.1).all()
    smaller = keep_many(ids, np.zeros(len(ids)), 0.05)
    assert not (smaller & ~kept).any()  # a lower rate keeps a subset: replays nest
    assert unit_hash("abc") == unit_hash("abc") != unit_hash("abd")


def test_recalibration_restores_the_ctr():
    """Downsample negatives at 10 %, learn on what is kept, score every example: recalibrated
    predictions match the unsampled CTR; the raw ones do not. Weighting the kept negatives by
    1 / rate instead (not both) also does."""
    n, rate = 400_000, 0.1  # the kept stream is ~2 % of this in negatives: noise ~0.5 %
    indptr, indices, y, _, _ = synthetic(n, d=40, k=5, bias=-3.0, seed=12)
    ids = [f"ex{i}" for i in range(n)]
    kept = keep_many(ids, y, rate)
    raw = np.empty(n)
    weighted = np.empty(n)
    # Unregularized and fast, so the learners themselves are calibrated (alpha 0.1 with
    # l1 = l2 = 1 is 1-2 % off on the full stream here, downsampling or not).
    by_recal = FTRLProximal(alpha=0.3, l1=0.0, l2=0.0, bits=6)
    by_weight = FTRLProximal(alpha=0.3, l1=0.0, l2=0.0, bits=6)
    step = 256
    for a in range(0, n, step):  # score every example, learn the kept ones
        b = min(a + step, n)
        ptr, ind = indptr[a : b + 1] - indptr[a], indices[indptr[a] : indptr[b]]
        raw[a:b] = by_recal.predict_many(ptr, ind)
        weighted[a:b] = by_weight.predict_many(ptr, ind)
        k = np.flatnonzero(kept[a:b])
        sub = [ind[ptr[i] : ptr[i + 1]] for i in k]
        sub_ptr = np.concatenate([[0], np.cumsum([len(s) for s in sub])])
        by_recal.learn_many(sub_ptr, np.concatenate(sub), y[a:b][k])
        by_weight.learn_many(
            sub_ptr, np.concatenate(sub), y[a:b][k], negative_weight(y[a:b][k], rate)
        )
    tail = slice(n // 4, None)
    ctr = y[tail].mean()
    assert raw[tail].mean() / ctr > 3  # uncorrected: the downsampled stream's CTR
    assert 0.97 < recalibrate(raw[tail], rate).mean() / ctr < 1.03
    assert 0.97 < weighted[tail].mean() / ctr < 1.03


def test_recalibrate_inverts_downsampling():
    p = np.array([0.001, 0.03, 0.5, 0.99])
    rate = np.array([0.01, 0.1, 0.5, 1.0])
    downsampled = p / (p + (1 - p) * rate)  # the CTR once negatives are kept at `rate`
    assert np.allclose(recalibrate(downsampled, rate), p)
    assert recalibrate(0.5, 1.0) == 0.5
    assert negative_weight(0, 0.25) == 4.0 and negative_weight(1, 0.25) == 1.0


# -- metrics ---------------------------------------------------------------------------------


def test_ne_and_calibration():
    rng = np.random.default_rng(13)
    y = (rng.random(20_000) < 0.04).astype(float)
    m = ProgressiveMetrics(window=5000)
    m.update_many(np.full(len(y), y.mean()), y)
    s = m.summary()
    assert s["ne"] == pytest.approx(1.0) and s["calibration"] == pytest.approx(1.0)
    assert s["auc"] == pytest.approx(0.5)  # all tied
    twice = ProgressiveMetrics(window=5000)
    twice.update_many(np.full(len(y), 2 * y.mean()), y)
    assert twice.summary()["calibration"] == pytest.approx(2.0)
    assert twice.summary()["ne"] > 1.0
    tail = y[-5000:]
    assert s["window_calibration"] == pytest.approx(y.mean() / tail.mean())
    assert s["window_ne"] == pytest.approx(normalized_entropy(np.full(5000, y.mean()), tail))


def test_auc_window_exact_and_cumulative_close():
    from river import metrics

    rng = np.random.default_rng(14)
    n, window = 6000, 1000
    p = 1 / (1 + np.exp(-rng.normal(-3, 1, n)))
    p[::7] = p[3]  # ties
    y = (rng.random(n) < p * 1.5).astype(float)
    ours, river = ProgressiveMetrics(window=window), metrics.RollingROCAUC(window_size=window)
    for pk, yk in zip(p, y, strict=True):
        ours.update(pk, yk)
        river.update(bool(yk), pk)
    s = ours.summary()
    assert s["window_auc"] == pytest.approx(river.get(), abs=1e-12)
    pos, neg = p[y == 1], p[y == 0]
    brute = ((pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()) / (len(pos) * len(neg))
    assert exact_auc(p, y) == pytest.approx(brute)
    assert s["auc"] == pytest.approx(brute, abs=2e-3)  # binned
    batched = ProgressiveMetrics(window=window)
    batched.update_many(p, y)
    assert batched.summary() == pytest.approx(s)


def test_calibration_by_slice():
    rng = np.random.default_rng(15)
    n = 20_000
    pos = rng.integers(0, 3, n)
    y = (rng.random(n) < 0.05).astype(float)
    p = np.where(pos == 0, 0.025, 0.05)  # position 0 under-predicted twice over
    keys = {"position": np.where(np.arange(n) % 100 == 0, -1, pos)}  # some keys missing
    m = ProgressiveMetrics(window=1000, slices={"position": 4, "hour": 24})
    m.update_many(p[:5000], y[:5000], {k: v[:5000] for k, v in keys.items()})
    m.update_many(p[5000:], y[5000:], {k: v[5000:] for k, v in keys.items()})
    by = m.summary()["calibration_by"]
    ok = keys["position"] >= 0
    for k in range(3):
        sl = ok & (pos == k)
        assert by["position"][k] == pytest.approx(p[sl].sum() / y[sl].sum())
    assert 0.4 < by["position"][0] < 0.6 and 0.9 < by["position"][1] < 1.1
    assert np.isnan(by["position"][3])  # never seen: no ratio
    assert all(np.isnan(by["hour"]))  # no keys given for it
    assert "calibration_by" not in ProgressiveMetrics(window=10).summary()
