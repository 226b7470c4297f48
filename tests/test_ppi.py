"""Fed-PPI (fedsim.ppi): one client equals ppi_py for every estimand and lam, lam = 0 is the classical
interval, the parallel-variance pooling equals the concatenated data's variance, the server computes the
same result from the summaries alone (whose size does not grow with the data), a global lam reproduces the
centralized estimate, and one-line refusals of bad input."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from fedsim.core.errors import FedsimError
from fedsim.ppi import (
    fed_ppi_logistic_ci,
    fed_ppi_logistic_pointestimate,
    fed_ppi_mean_ci,
    fed_ppi_mean_pointestimate,
    fed_ppi_ols_ci,
    fed_ppi_ols_pointestimate,
    fed_ppi_quantile_ci,
    fed_ppi_quantile_pointestimate,
)
from fedsim.ppi.clients import check_clients
from fedsim.ppi.mean import mean_server, mean_summary
from fedsim.ppi.moments import Moments, pool, weighted_covariance
from fedsim.ppi.quantile import make_grid, quantile_server, quantile_summary, value_range
from fedsim.ppi.regression import OLS, _objective, newton_summary, regression_server, regression_summary, solve

with warnings.catch_warnings():  # ppi_py turns every warning off at import
    ppi_py = pytest.importorskip("ppi_py")

TIGHT = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 100000, "maxls": 100}
LAMS = [None, 0.0, 1.0, 0.3]


def mean_client(rng, n, big_n, d=None, shift=0.0, noise=0.5):
    shape = (lambda m: (m,)) if d is None else (lambda m: (m, d))
    y, y_u = rng.normal(size=shape(n)) + shift, rng.normal(size=shape(big_n)) + shift
    return {"y": y, "yhat": y + noise * rng.normal(size=y.shape),
            "yhat_unlabeled": y_u + noise * rng.normal(size=y_u.shape)}  # fmt: skip


def regression_client(rng, n, big_n, logistic=False, d=3, shift=0.0):
    x = np.c_[np.ones(n + big_n), rng.normal(size=(n + big_n, d - 1)) + shift]
    beta = 0.5 * np.arange(1, d + 1)
    if logistic:
        p = 1 / (1 + np.exp(-(x @ beta)))
        y = (rng.random(n + big_n) < p).astype(float)
        yhat = np.clip(p + 0.2 * rng.normal(size=n + big_n), 0, 1)
    else:
        y = x @ beta + rng.normal(size=n + big_n)
        yhat = y + 0.7 * rng.normal(size=n + big_n)
    return {"x": x[:n], "y": y[:n], "yhat": yhat[:n], "x_unlabeled": x[n:], "yhat_unlabeled": yhat[n:]}


def args(c, *keys):
    return [c[k] for k in keys]


REG = ("x", "y", "yhat", "x_unlabeled", "yhat_unlabeled")
MEAN = ("y", "yhat", "yhat_unlabeled")


# --- one client is ppi_py -----------------------------------------------------------------------------


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("d", [None, 3])
def test_one_client_mean_equals_ppi_py(lam, d):
    c = mean_client(np.random.default_rng(0), 40, 400, d)
    lower, upper = fed_ppi_mean_ci([c], alpha=0.1, lam=lam)
    ref = ppi_py.ppi_mean_ci(*args(c, *MEAN), alpha=0.1, lam=lam)
    np.testing.assert_allclose(np.ravel([lower, upper]), np.ravel(ref), rtol=0, atol=1e-8)
    ref = ppi_py.ppi_mean_pointestimate(*args(c, *MEAN), lam=lam)
    np.testing.assert_allclose(np.ravel(fed_ppi_mean_pointestimate([c], lam=lam)), np.ravel(ref), atol=1e-8)
    if d is None:
        assert isinstance(lower, float)


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("discrete", [False, True])
def test_one_client_quantile_equals_ppi_py(q, discrete):
    rng = np.random.default_rng(1)
    c = mean_client(rng, 30, 300)
    if discrete:  # ties everywhere
        c = {k: np.round(v) for k, v in c.items()}
    try:
        ref = ppi_py.ppi_quantile_ci(*args(c, *MEAN), q, alpha=0.1)
    except IndexError:  # no grid point has p > alpha: ppi_py fails, fedsim gives the value where F reaches q
        lower, upper = fed_ppi_quantile_ci([c], q, alpha=0.1)
        assert lower == upper == fed_ppi_quantile_pointestimate([c], q) or lower == upper
        return
    assert np.allclose(fed_ppi_quantile_ci([c], q, alpha=0.1), ref, rtol=0, atol=1e-8)
    assert fed_ppi_quantile_pointestimate([c], q) == ppi_py.ppi_quantile_pointestimate(*args(c, *MEAN), q)


@pytest.mark.parametrize("lam", LAMS)
def test_one_client_ols_equals_ppi_py(lam):
    c = regression_client(np.random.default_rng(2), 60, 600)
    ref = ppi_py.ppi_ols_ci(*args(c, *REG), alpha=0.1, lam=lam)
    np.testing.assert_allclose(np.ravel(fed_ppi_ols_ci([c], alpha=0.1, lam=lam)), np.ravel(ref), rtol=0, atol=1e-8)
    np.testing.assert_allclose(fed_ppi_ols_pointestimate([c], lam=lam),
                               ppi_py.ppi_ols_pointestimate(*args(c, *REG), lam=lam), rtol=0, atol=1e-8)  # fmt: skip


@pytest.mark.parametrize("lam", LAMS)
def test_one_client_logistic_equals_ppi_py(lam):
    """ppi_py's L-BFGS-B stops at a gradient near 1e-9 (fedsim's Newton at 1e-13), so on some draws the two
    differ by 1e-8; this draw is one where ppi_py converges (the gradient check below is the fair one)."""
    c = regression_client(np.random.default_rng(5), 300, 3000, logistic=True)
    ref = ppi_py.ppi_logistic_ci(*args(c, *REG), alpha=0.1, lam=lam, optimizer_options=dict(TIGHT))
    np.testing.assert_allclose(np.ravel(fed_ppi_logistic_ci([c], alpha=0.1, lam=lam)), np.ravel(ref), rtol=0, atol=1e-8)
    ref = ppi_py.ppi_logistic_pointestimate(*args(c, *REG), lam=lam, optimizer_options=dict(TIGHT))
    ours = fed_ppi_logistic_pointestimate([c], lam=lam)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-8)
    if lam is not None:  # the rectified loss's gradient is smaller at fedsim's solution than at ppi_py's
        data = check_clients([c], covariates=True)
        gradient = lambda theta: np.abs(_objective([newton_summary(data[0], theta, lam)])[1]).max()  # noqa: E731
        assert gradient(ours) <= max(gradient(ref), 1e-12)


def test_lam_zero_is_the_classical_interval():
    rng = np.random.default_rng(4)
    c = mean_client(rng, 50, 500)
    assert np.allclose(fed_ppi_mean_ci([c], lam=0.0), ppi_py.classical_mean_ci(c["y"], alpha=0.1), atol=1e-12)
    clients = [mean_client(rng, 10 + 5 * i, 100, shift=i) for i in range(4)]
    assert fed_ppi_mean_ci(clients, lam=0.0) == fed_ppi_mean_ci(clients, method="classical")
    regs = [regression_client(rng, 40, 200, shift=0.3 * i) for i in range(3)]
    np.testing.assert_array_equal(fed_ppi_ols_ci(regs, lam=0.0), fed_ppi_ols_ci(regs, method="classical"))


def test_torch_tensors_and_numpy_agree():
    c = mean_client(np.random.default_rng(5), 30, 200)
    as_torch = {k: torch.as_tensor(v) for k, v in c.items()}
    assert fed_ppi_mean_ci([as_torch]) == fed_ppi_mean_ci([c])


# --- pooling and the server's view ------------------------------------------------------------------------


@pytest.mark.parametrize("diagonal", [False, True])
def test_parallel_variance_equals_the_concatenated_data(diagonal):
    rng = np.random.default_rng(6)
    parts = [rng.normal(loc=i, scale=1 + i, size=(rng.integers(1, 40), 3)) for i in range(6)]
    pooled = pool([Moments.of(p, diagonal) for p in parts])
    whole = np.concatenate(parts)
    expected = np.var(whole, axis=0) if diagonal else np.cov(whole.T, ddof=0)
    np.testing.assert_allclose(pooled.covariance(), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(pooled.mean, whole.mean(axis=0), atol=1e-12)


def test_mean_server_rectifier_variance_is_the_pooled_variance():
    rng = np.random.default_rng(7)
    clients = check_clients([mean_client(rng, 5 + 3 * i, 50, shift=i) for i in range(5)])
    summaries = [mean_summary(c, 0.6) for c in clients]
    rect = np.concatenate([c.y - 0.6 * c.yhat for c in clients])
    assert abs(pool([s.rectifier for s in summaries]).variance()[0] - rect.var()) < 1e-10
    # the imputed variance: the clients' own variances averaged by p_i = D_i / sum D (no between-client term)
    p = np.array([c.size for c in clients]) / sum(c.size for c in clients)
    own = sum(w * (0.6 * c.yhat_unlabeled).var() for w, c in zip(p, clients, strict=True))
    assert abs(weighted_covariance([s.imputed for s in summaries], p)[0] - own) < 1e-12


def _walk(value):
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name))
    elif isinstance(value, tuple):
        for v in value:
            yield from _walk(v)
    else:
        yield np.asarray(value)


def _summary_sizes(summaries):
    return [sum(a.size for a in _walk(s)) for s in summaries]


def test_the_server_needs_only_the_summaries():
    rng = np.random.default_rng(8)
    small = [mean_client(rng, 10, 100, shift=i) for i in range(4)]
    big = [mean_client(rng, 1000, 10000, shift=i) for i in range(4)]
    for clients in (small, big):
        summaries = [mean_summary(c, None) for c in check_clients(clients)]
        _, lower, upper = mean_server(summaries, 0.1)  # nothing but the summaries reaches the server
        assert (float(lower[0]), float(upper[0])) == fed_ppi_mean_ci(clients)
    assert _summary_sizes([mean_summary(c, None) for c in check_clients(small)]) == _summary_sizes(
        [mean_summary(c, None) for c in check_clients(big)]
    )
    data = check_clients(small)
    grid = make_grid([value_range(c) for c in data], 200)  # round 1: ranges only
    quantile = quantile_server([quantile_summary(c, grid) for c in data], grid, 0.5, 0.1)
    assert quantile[1:] == fed_ppi_quantile_ci(small, 0.5, grid_size=200)
    regs = [regression_client(rng, 30, 300, shift=0.2 * i) for i in range(3)]
    data = check_clients(regs, covariates=True)
    theta = solve(OLS, data, [0.5] * 3)
    summaries = [regression_summary(OLS, c, theta, 0.5) for c in data]
    np.testing.assert_array_equal(regression_server(summaries, theta, 0.1), fed_ppi_ols_ci(regs, lam=0.5))
    big = check_clients([regression_client(rng, 3000, 30000)], covariates=True)  # Hessians and moments, no rows
    assert set(_summary_sizes(summaries)) == set(_summary_sizes([regression_summary(OLS, big[0], theta, 0.5)]))


def test_per_client_and_centralized_methods():
    rng = np.random.default_rng(9)
    clients = [mean_client(rng, 20, 200, shift=i) for i in range(3)]
    lower, upper = fed_ppi_mean_ci(clients, method="per_client")
    assert lower.shape == (3,)
    for i, c in enumerate(clients):
        assert (lower[i], upper[i]) == pytest.approx(fed_ppi_mean_ci([c]))
    whole = {k: np.concatenate([c[k] for c in clients]) for k in MEAN}
    assert fed_ppi_mean_ci(clients, method="centralized") == pytest.approx(
        tuple(float(v[0]) for v in ppi_py.ppi_mean_ci(*args(whole, *MEAN), alpha=0.1)), abs=1e-12
    )
    regs = [regression_client(rng, 30, 300, logistic=True) for _ in range(3)]
    lower, upper = fed_ppi_logistic_ci(regs, method="per_client")
    assert lower.shape == (3, 3) and np.all(lower < upper)


def test_a_global_lam_reproduces_the_centralized_point_estimate():
    """Same labelled fraction on every client: Fed-PPI with one pooled lam is the centralized estimate (mean:
    sum p_i theta_i; regressions: the pooled problem)."""
    rng = np.random.default_rng(10)
    clients = [mean_client(rng, 10 * (i + 1), 100 * (i + 1), shift=i) for i in range(4)]
    assert fed_ppi_mean_pointestimate(clients, lam_mode="global") == pytest.approx(
        fed_ppi_mean_pointestimate(clients, method="centralized"), abs=1e-12
    )
    for logistic, fn in ((False, fed_ppi_ols_pointestimate), (True, fed_ppi_logistic_pointestimate)):
        regs = [regression_client(rng, 80, 400 + 100 * i, logistic=logistic, shift=0.3 * i) for i in range(3)]
        np.testing.assert_allclose(fn(regs, lam_mode="global"), fn(regs, method="centralized"), atol=1e-7)
        # per-client lam tuning differs from the pooled one
        assert not np.allclose(fn(regs), fn(regs, lam_mode="global"), atol=1e-9)


# --- bad input: one line each ------------------------------------------------------------------------------


def _one_line(fn, *a, match, **kw):
    with pytest.raises(FedsimError, match=match) as e:
        fn(*a, **kw)
    assert "\n" not in str(e.value)


def test_bad_input_is_refused_in_one_line():
    rng = np.random.default_rng(11)
    good = mean_client(rng, 10, 50)
    _one_line(fed_ppi_mean_ci, [good, {**good, "y": good["y"][:0], "yhat": good["yhat"][:0]}],
              match="client 1 has no labelled points")  # fmt: skip
    _one_line(fed_ppi_mean_ci, [{**good, "yhat": good["yhat"][:-1]}], match="client 0: y has 10 rows but yhat has 9")
    nan = good["yhat_unlabeled"].copy()
    nan[3] = np.nan
    _one_line(fed_ppi_mean_ci, [{**good, "yhat_unlabeled": nan}], match="yhat_unlabeled has NaN")
    for alpha in (0, 1, -0.1, 1.5):
        _one_line(fed_ppi_mean_ci, [good], alpha=alpha, match="alpha must be in")
    for q in (0, 1, 1.2):
        _one_line(fed_ppi_quantile_ci, [good], q, match="q must be in")
    _one_line(fed_ppi_mean_ci, [good], method="classical", lam=0.5, match="classical")
    _one_line(fed_ppi_mean_ci, [good], lam=0.5, lam_mode="global", match="lam_mode")
    _one_line(fed_ppi_mean_ci, [good], method="per_client", lam_mode="global", match="lam_mode")
    _one_line(fed_ppi_mean_ci, [good], method="fedppi", match="did you mean 'fed_ppi'")
    _one_line(fed_ppi_mean_ci, [{**good, "x": good["y"]}], match="x is not used")
    _one_line(fed_ppi_mean_ci, [], match="non-empty list")
    _one_line(fed_ppi_logistic_ci, [regression_client(rng, 30, 100, logistic=True)], lam=1.5, match=r"\[0, 1\]")


def test_a_singular_hessian_names_the_client():
    rng = np.random.default_rng(12)
    ok = regression_client(rng, 40, 200)
    collinear = regression_client(rng, 40, 200)
    collinear["x"][:, 2] = collinear["x"][:, 1]
    _one_line(fed_ppi_ols_ci, [ok, collinear], match="client 1: .*singular")
    _one_line(fed_ppi_ols_ci, [ok, collinear], method="per_client", match="client 1: .*singular")
    few = regression_client(rng, 2, 200)  # 2 labelled points, 3 coefficients
    _one_line(fed_ppi_ols_ci, [ok, few], match="client 1: .*singular")
    binary = regression_client(rng, 40, 200, logistic=True)
    few = regression_client(rng, 2, 200, logistic=True)
    _one_line(fed_ppi_logistic_ci, [binary, few], match="client 1: .*singular")
    _one_line(fed_ppi_logistic_ci, [ok], match="client 0: logistic regression needs y in")
    # a global lam needs no client's own solution
    lower, upper = fed_ppi_ols_ci([ok, few], lam_mode="global")
    assert np.all(lower < upper)


def test_unequal_labelled_fractions_warn_and_the_stratified_variance_is_exact():
    """The combined variance assumes every client labels the same fraction; otherwise fedsim warns, and
    ``variance="stratified"`` is ``sum p_i^2 (v_imp,i / N_i + v_rect,i / n_i)``."""
    from fedsim.core.errors import FedsimWarning

    rng = np.random.default_rng(13)
    clients = [mean_client(rng, 500, 500), mean_client(rng, 5, 995)]
    with pytest.warns(FedsimWarning, match="label different fractions"):
        fed_ppi_mean_ci(clients, lam=0.5)
    lower, upper = fed_ppi_mean_ci(clients, lam=0.5, variance="stratified")
    p = np.array([0.5, 0.5])
    own = [(0.5 * c["yhat_unlabeled"]).var() / len(c["yhat_unlabeled"]) + (c["y"] - 0.5 * c["yhat"]).var() / len(c["y"])
           for c in clients]  # fmt: skip
    v = sum(w**2 * o for w, o in zip(p, own, strict=True))
    assert (upper - lower) / 2 == pytest.approx(1.6448536269514722 * np.sqrt(v), rel=1e-12)
    one = [mean_client(rng, 30, 300)]  # one client: the two variances agree
    assert fed_ppi_mean_ci(one, variance="stratified") == pytest.approx(fed_ppi_mean_ci(one), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal fractions: no warning
        fed_ppi_mean_ci([mean_client(rng, 10, 90), mean_client(rng, 20, 180)])
    _one_line(fed_ppi_mean_ci, clients, variance="stratified", imputed_variance="pooled", match="drop imputed_variance")
    _one_line(fed_ppi_mean_ci, clients, method="classical", variance="stratified", match="variance applies")
    strat = fed_ppi_quantile_ci(clients, 0.5, variance="stratified", grid_size=500)
    assert strat[0] < strat[1]


def test_degenerate_input_is_refused_in_one_line():
    rng = np.random.default_rng(14)
    good = mean_client(rng, 10, 50)
    _one_line(fed_ppi_mean_ci, [{**good, "y": np.zeros((10, 0)), "yhat": np.zeros((10, 0)),
                                 "yhat_unlabeled": np.zeros((50, 0))}], match="y has no columns")  # fmt: skip
    _one_line(fed_ppi_mean_ci, [{**good, "y": np.array(["1"] * 10)}], match="must hold real numbers")
    _one_line(fed_ppi_mean_ci, [{**good, "yhat": good["yhat"] + 1j}], match="must hold real numbers")
    _one_line(fed_ppi_mean_ci, [good], lam=1e308, match="lam must be")
    assert fed_ppi_mean_ci([good], lam=np.float32(0.5), alpha=np.float32(0.1))  # numpy scalars are numbers
    reg = regression_client(rng, 20, 100)
    _one_line(fed_ppi_ols_ci, [{**reg, "x": reg["x"][:, :0], "x_unlabeled": reg["x_unlabeled"][:, :0]}],
              match="x has no columns")  # fmt: skip
    ones = {"x": np.ones((20, 1)), "y": np.ones(20), "yhat": np.ones(20), "x_unlabeled": np.ones((50, 1)),
            "yhat_unlabeled": np.ones(50)}  # fmt: skip
    _one_line(fed_ppi_logistic_ci, [ones], match="separable")
    single = {
        **reg,
        "x": reg["x"][:1, :1],
        "y": reg["y"][:1],
        "yhat": reg["yhat"][:1],
        "x_unlabeled": reg["x_unlabeled"][:, :1],
    }
    _one_line(fed_ppi_ols_ci, [single], lam=0.5, match="2 labelled and 2 unlabelled")
