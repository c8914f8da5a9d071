"""Predictives: GLM against a hand-built linearised model, links against their formulas and
quadrature, the sampled-network predictive against the MAP network, randomness, errors,
inputs of 0 rows, and overflow reported instead of returned."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from cases import make_case, quiet_fit, same_state, saturated_model
from torch import nn

from laplace_ggn import LaplaceWrapper, Prediction
from laplace_ggn.predictive import laplace_bridge, mc_link, predictive_nll, probit, psd_sqrt
from laplace_ggn.structures import STRUCTURES
from laplace_ggn.testing import dense_jacobian

DT = torch.float64
STRUCT_NAMES = list(STRUCTURES)
CASES = ["mlp_regression", "mlp_classification", "mlp_binary"]


def _fit(case, structure, **kw):
    return LaplaceWrapper(case.model, case.likelihood, structure=structure, **kw).fit(case.loader())


def _x_test(seed=5, n=6):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=DT)


# -- hand-written link formulas ------------------------------------------------------------------


def _probit_ref(f, cov, binary):
    v = torch.diagonal(cov, dim1=1, dim2=2)
    k = 1 / torch.sqrt(1 + math.pi * v / 8)
    if binary:
        p = 1 / (1 + torch.exp(-k * f))
        s = 1 / (1 + torch.exp(-f))
        var = (s * (1 - s)) ** 2 * v
    else:
        p = torch.exp(k * f) / torch.exp(k * f).sum(-1, keepdim=True)
        s = torch.exp(f) / torch.exp(f).sum(-1, keepdim=True)
        A = torch.stack([torch.diag(si) - torch.outer(si, si) for si in s])
        var = torch.stack([torch.diag(a @ c @ a.T) for a, c in zip(A, cov)])
    return p, torch.minimum(var, p * (1 - p))


def _bridge_ref(f, cov, binary):
    if binary:
        f = torch.cat([-f / 2, f / 2], 1)
        v = cov[:, 0, 0] / 4
        cov = torch.stack([vi * torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=DT) for vi in v])
    means, variances = [], []
    for mu, S in zip(f, cov):
        # projection onto the zero-sum subspace, P = I - 11ᵀ/K, written out
        K = mu.shape[0]
        Pm = torch.eye(K, dtype=DT) - torch.ones(K, K, dtype=DT) / K
        mu, S = Pm @ mu, Pm @ S @ Pm
        alpha = (1 - 2 / K + torch.exp(mu) / K**2 * torch.exp(-mu).sum()) / torch.diag(S)
        a0 = alpha.sum()
        means.append(alpha / a0)
        variances.append(alpha * (a0 - alpha) / (a0**2 * (a0 + 1)))
    m, v = torch.stack(means), torch.stack(variances)
    return (m[:, 1:], v[:, 1:]) if binary else (m, v)


# -- GLM predictive = hand-built linearised model with the dense Σ -------------------------------


@pytest.mark.parametrize("structure", STRUCT_NAMES)
@pytest.mark.parametrize("name", CASES)
def test_glm_equals_dense_linearised_model(structure, name):
    case = make_case(name, seed=1)
    kw = {"sigma_noise": 0.7} if case.likelihood == "regression" else {}
    la = _fit(case, structure, prior_precision=0.5, **kw)
    Sigma = la.posterior.to_dense()
    x = _x_test()
    J = dense_jacobian(case.model, x)
    with torch.no_grad():
        f = case.model(x)
    cov = torch.einsum("bcp,pq,bdq->bcd", J, Sigma, J)
    tol = {"rtol": 1e-9, "atol": 1e-11}
    if case.likelihood == "regression":
        pred = la.predict(x)
        torch.testing.assert_close(pred.mean, f, **tol)
        torch.testing.assert_close(pred.variance, torch.diagonal(cov, dim1=1, dim2=2) + 0.49, **tol)
        torch.testing.assert_close(la.predict(x, link="probit").variance, pred.variance, **tol)
        return
    binary = case.likelihood == "binary"
    pred = la.predict(x, "glm", link="probit")
    p_ref, v_ref = _probit_ref(f, cov, binary)
    torch.testing.assert_close(pred.mean, p_ref, **tol)
    torch.testing.assert_close(pred.variance, v_ref, **tol)
    if bool(cov.abs().max() > 0):  # the reference divides by the variances (projected: Σ = 0
        # when the training Jacobian has no kernel)
        pred = la.predict(x, "glm", link="bridge")
        m_ref, v_ref = _bridge_ref(f, cov, binary)
        torch.testing.assert_close(pred.mean, m_ref, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(pred.variance, v_ref, rtol=1e-8, atol=1e-10)
    pred = la.predict(x, "glm", link="mc", n_samples=50, generator=torch.Generator().manual_seed(3))
    ref = mc_link(f, cov, n_samples=50, binary=binary, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(pred.mean, ref.mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(pred.variance, ref.variance, rtol=1e-7, atol=1e-9)


def test_default_link_is_probit_and_prediction_shapes():
    case = make_case("mlp_classification")
    la = _fit(case, "diag")
    x = _x_test()
    p = la.predict(x)
    assert isinstance(p, Prediction)
    assert p.mean.shape == p.variance.shape == (6, 3)
    torch.testing.assert_close(p.mean, la.predict(x, "glm", link="probit").mean)
    torch.testing.assert_close(p.mean.sum(-1), torch.ones(6, dtype=DT))
    with pytest.raises(AttributeError):
        p.mean = p.variance  # frozen


def test_glm_chunked_equals_unchunked():
    case = make_case("mlp_classification")
    x = _x_test(n=9)
    big = _fit(case, "kfac").predict(x)
    small = _fit(case, "kfac", memory_budget=4 * 3 * 31 * 8).predict(x)  # 1 sample per chunk
    torch.testing.assert_close(small.mean, big.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(small.variance, big.variance, rtol=1e-12, atol=1e-14)


# -- links against formulas and quadrature ---------------------------------------------------------


def _random_cov(B, C, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, C, C, generator=g, dtype=DT)
    return scale * A @ A.transpose(1, 2) / C


def test_probit_formula_multiclass_and_binary():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 4, generator=g, dtype=DT)
    cov = _random_cov(5, 4, 1)
    p = probit(f, cov)
    p_ref, v_ref = _probit_ref(f, cov, False)
    torch.testing.assert_close(p.mean, p_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.variance, v_ref, rtol=1e-12, atol=1e-14)
    # only the diagonal matters for the mean; a (B, C) variance is accepted
    torch.testing.assert_close(probit(f, torch.diagonal(cov, dim1=1, dim2=2)).mean, p.mean)
    fb, cb = f[:, :1], cov[:, :1, :1]
    pb = probit(fb, cb, binary=True)
    pb_ref, vb_ref = _probit_ref(fb, cb, True)
    torch.testing.assert_close(pb.mean, pb_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pb.variance, vb_ref, rtol=1e-12, atol=1e-14)
    # zero variance: the MAP probabilities, zero variance
    z = probit(f, torch.zeros(5, 4, 4, dtype=DT))
    torch.testing.assert_close(z.mean, torch.softmax(f, -1))
    assert float(z.variance.abs().max()) == 0.0


def test_bridge_formula_multiclass_and_binary():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(6, 5, generator=g, dtype=DT)
    cov = _random_cov(6, 5, 3)
    b = laplace_bridge(f, cov)
    m_ref, v_ref = _bridge_ref(f, cov, False)
    torch.testing.assert_close(b.mean, m_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.variance, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.mean.sum(-1), torch.ones(6, dtype=DT))
    fb, cb = f[:, :1], cov[:, :1, :1]
    bb = laplace_bridge(fb, cb, binary=True)
    mb_ref, vb_ref = _bridge_ref(fb, cb, True)
    torch.testing.assert_close(bb.mean, mb_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bb.variance, vb_ref, rtol=1e-10, atol=1e-12)
    # huge logits stay finite (log-space evaluation)
    big = laplace_bridge(
        torch.tensor([[800.0, -800.0, 0.0]], dtype=DT), torch.eye(3, dtype=DT)[None]
    )
    assert bool(torch.isfinite(big.mean).all()) and bool(torch.isfinite(big.variance).all())


def _quadrature_sigmoid(m, v, n=120):
    x, w = np.polynomial.hermite_e.hermegauss(n)
    a = m + math.sqrt(v) * x
    s = 1 / (1 + np.exp(-a))
    w = w / w.sum()
    mean = float((w * s).sum())
    return mean, float((w * s**2).sum()) - mean**2


@pytest.mark.parametrize("seed", [0, 1])
def test_mc_link_converges_to_quadrature_for_two_classes(seed):
    S = 40_000
    g = torch.Generator().manual_seed(seed)
    # binary: p = E[sigmoid(a)], a ~ N(m, v)
    m = torch.tensor([[0.7], [-1.5], [2.0]], dtype=DT)
    v = torch.tensor([0.5, 2.0, 4.0], dtype=DT)
    pred = mc_link(m, v[:, None, None], n_samples=S, binary=True, generator=g)
    for b in range(3):
        mean, var = _quadrature_sigmoid(float(m[b, 0]), float(v[b]))
        se = math.sqrt(var / S)
        assert abs(float(pred.mean[b, 0]) - mean) < 5 * se
        assert abs(float(pred.variance[b, 0]) - var) < 0.05 * var
    # 2-class softmax: p_2 = sigmoid(f2 - f1), f2 - f1 ~ N(m2 - m1, S11 + S22 - 2 S12)
    f = torch.tensor([[0.3, -0.4], [1.0, 2.0]], dtype=DT)
    cov = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[2.0, -0.5], [-0.5, 1.0]]], dtype=DT)
    pred = mc_link(f, cov, n_samples=S, generator=g)
    for b in range(2):
        d = float(f[b, 1] - f[b, 0])
        dv = float(cov[b, 0, 0] + cov[b, 1, 1] - 2 * cov[b, 0, 1])
        mean, var = _quadrature_sigmoid(d, dv)
        se = math.sqrt(var / S)
        assert abs(float(pred.mean[b, 1]) - mean) < 5 * se
        assert abs(float(pred.mean[b, 0]) - (1 - mean)) < 5 * se
        assert abs(float(pred.variance[b, 1]) - var) < 0.05 * var


def test_probit_variance_matches_quadrature_for_small_variance():
    m, v = 0.8, 0.01
    mean, var = _quadrature_sigmoid(m, v)
    p = probit(torch.tensor([[m]], dtype=DT), torch.tensor([[v]], dtype=DT), binary=True)
    assert abs(float(p.variance) - var) < 0.02 * var
    assert abs(float(p.mean) - mean) < 1e-3


def test_psd_sqrt_of_singular_matrix():
    u = torch.tensor([1.0, -1.0, 2.0], dtype=DT)
    cov = torch.outer(u, u)[None]
    L = psd_sqrt(cov)
    torch.testing.assert_close(L @ L.transpose(1, 2), cov, rtol=1e-12, atol=1e-12)


# -- randomness -------------------------------------------------------------------------------------


def test_mc_draws_reproducible_and_independent_across_inputs():
    case = make_case("mlp_classification")
    la = _fit(case, "full")
    x = _x_test(n=2)
    a = la.predict(x, link="mc", n_samples=30, generator=torch.Generator().manual_seed(7))
    b = la.predict(x, link="mc", n_samples=30, generator=torch.Generator().manual_seed(7))
    c = la.predict(x, link="mc", n_samples=30, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    assert not torch.equal(a.mean, c.mean)
    # B copies of one input: independent draws make the per-row estimates scatter with
    # variance Var[p]/S (shared draws would make every row equal)
    B, S = 400, 10
    xr = x[:1].expand(B, 3)
    pred = la.predict(xr, link="mc", n_samples=S, generator=torch.Generator().manual_seed(1))
    spread = pred.mean[:, 0].var()
    expected = pred.variance[:, 0].mean() / S
    assert 0.7 < float(spread / expected) < 1.4


def test_nn_reproducible_and_shares_network_samples_across_inputs():
    case = make_case("mlp_regression")
    la = _fit(case, "diag", prior_precision=2.0)
    x = _x_test(n=3)
    a = la.predict(x, "nn", n_samples=20, generator=torch.Generator().manual_seed(4))
    b = la.predict(x, "nn", n_samples=20, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    torch.testing.assert_close(a.variance, b.variance, rtol=0, atol=0)
    # the same draws, network by network, as la.sample with that generator
    thetas = la.sample(20, generator=torch.Generator().manual_seed(4))
    outs = torch.stack([la.fitted.fmodel(t, x) for t in thetas])
    torch.testing.assert_close(a.mean, outs.mean(0), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(a.variance, outs.var(0) + la.sigma_noise**2, rtol=1e-12, atol=1e-13)


# -- sampled network ---------------------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCT_NAMES)
@pytest.mark.parametrize("name", CASES)
def test_nn_with_vanishing_covariance_is_the_map_network(structure, name):
    case = make_case(name)
    kw = {"sigma_noise": 0.3} if case.likelihood == "regression" else {}
    la = _fit(case, structure, prior_precision=1e14, **kw)
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    x = _x_test()
    pred = la.predict(x, "nn", n_samples=7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = case.model(x)
    if case.likelihood == "regression":
        torch.testing.assert_close(pred.mean, f, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pred.variance, torch.full_like(f, 0.09), rtol=1e-6, atol=1e-8)
    else:
        p = torch.softmax(f, -1) if case.likelihood == "classification" else torch.sigmoid(f)
        torch.testing.assert_close(pred.mean, p, rtol=1e-6, atol=1e-6)
        assert float(pred.variance.max()) < 1e-10
    for k, v in case.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in case.model.parameters())


def test_nn_chunked_over_samples_and_inputs_equals_unchunked():
    case = make_case("mlp_classification")
    x = _x_test(n=7)
    big = _fit(case, "diag")
    small = _fit(case, "diag", memory_budget=4096)
    a = big.predict(x, "nn", n_samples=9, generator=torch.Generator().manual_seed(2))
    b = small.predict(x, "nn", n_samples=9, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.variance, b.variance, rtol=1e-12, atol=1e-14)


class _NotVmappable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        if float(self.lin.weight.detach().abs().sum()) > 1e9:  # value-dependent: vmap refuses it
            x = x * 0
        return self.lin(x)


def test_nn_falls_back_to_a_loop_when_vmap_fails():
    torch.manual_seed(0)
    model = _NotVmappable().double()
    case = make_case("linear_regression")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = LaplaceWrapper(model, "regression", structure="full").fit(case.loader())
    x = _x_test()
    with pytest.warns(RuntimeWarning, match="vmap over parameter samples failed"):
        pred = la.predict(x, "nn", n_samples=5, generator=torch.Generator().manual_seed(0))
    thetas = la.sample(5, generator=torch.Generator().manual_seed(0))
    outs = torch.stack([la.fitted.fmodel(t, x) for t in thetas])
    torch.testing.assert_close(pred.mean, outs.mean(0), rtol=1e-12, atol=1e-13)


# -- validation NLL ------------------------------------------------------------------------------


def test_predictive_nll_formulas():
    m = torch.tensor([[0.2, -1.0]], dtype=DT)
    v = torch.tensor([[0.5, 2.0]], dtype=DT)
    y = torch.tensor([[1.0, 0.0]], dtype=DT)
    from laplace_ggn._checks import Likelihood

    ref = sum(
        0.5 * math.log(2 * math.pi * vi) + (yi - mi) ** 2 / (2 * vi)
        for mi, vi, yi in zip(m[0].tolist(), v[0].tolist(), y[0].tolist())
    )
    torch.testing.assert_close(
        predictive_nll(Prediction(m, v), y, Likelihood.REGRESSION), torch.tensor([ref], dtype=DT)
    )
    p = torch.tensor([[0.2, 0.5, 0.3]], dtype=DT)
    torch.testing.assert_close(
        predictive_nll(Prediction(p, p), torch.tensor([2]), Likelihood.CLASSIFICATION),
        torch.tensor([-math.log(0.3)], dtype=DT),
    )
    pb = torch.tensor([[0.8]], dtype=DT)
    torch.testing.assert_close(
        predictive_nll(Prediction(pb, pb), torch.tensor([[0.0]], dtype=DT), Likelihood.BINARY),
        torch.tensor([-math.log(0.2)], dtype=DT),
    )
    with pytest.raises(ValueError, match="y must have batch size 1"):
        predictive_nll(Prediction(pb, pb), torch.zeros(3, 1, dtype=DT), Likelihood.BINARY)


# -- errors -----------------------------------------------------------------------------------------


def test_predict_errors():
    cls = make_case("mlp_classification")
    reg = make_case("mlp_regression")
    la = _fit(cls, "diag")
    lr = _fit(reg, "diag")
    x = _x_test()
    with pytest.raises(ValueError, match=r"method must be one of \['glm', 'nn'\]; got 'glmm'"):
        la.predict(x, "glmm")
    with pytest.raises(
        ValueError, match=r"link must be one of \['probit', 'bridge', 'bridge_norm', 'mc'\]"
    ):
        la.predict(x, link="logit")
    with pytest.raises(
        ValueError,
        match=r"link must be 'mc' \(or None\) with method='nn'; got "
        r"link='probit'.*valid combinations",
    ):
        la.predict(x, "nn", link="probit")
    with pytest.raises(
        ValueError,
        match=r"link must be None .* for likelihood='regression'; got "
        r"link='bridge'.*valid combinations",
    ):
        lr.predict(x, link="bridge")
    with pytest.raises(ValueError, match="n_samples must be a positive integer; got 0"):
        la.predict(x, link="mc", n_samples=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None; got int"):
        la.predict(x, link="mc", generator=3)
    with pytest.raises(ValueError, match="input must be finite"):
        la.predict(torch.full((2, 3), float("nan"), dtype=DT))
    fresh = LaplaceWrapper(cls.model, "classification", structure="diag")
    with pytest.raises(RuntimeError, match=r"predict\(\) needs a fitted posterior"):
        fresh.predict(x)
    with pytest.raises(ValueError, match="n_samples must be a positive integer; got 0"):
        mc_link(torch.zeros(1, 2), torch.zeros(1, 2, 2), n_samples=0)
    # the nn default link is mc, regression accepts the default 'probit'
    assert la.predict(x, "nn", n_samples=3).mean.shape == (6, 3)
    assert lr.predict(x, "nn", link="probit", n_samples=3).mean.shape == (6, 2)


def test_mc_link_chunks_inputs_to_the_memory_budget():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 3, generator=g, dtype=DT)
    cov = _random_cov(5, 3, 4)
    S = 6
    one_row = 4 * S * 3 * 8  # bytes of one input's draws
    pred = mc_link(
        f, cov, n_samples=S, generator=torch.Generator().manual_seed(1), memory_budget=2 * one_row
    )
    g = torch.Generator().manual_seed(1)
    means = []
    for start in range(0, 5, 2):
        mu, L = f[start : start + 2], psd_sqrt(cov[start : start + 2])
        z = torch.randn((S, *mu.shape), generator=g, dtype=DT)
        means.append(torch.softmax(mu + torch.einsum("bcd,sbd->sbc", L, z), -1).mean(0))
    torch.testing.assert_close(pred.mean, torch.cat(means), rtol=1e-12, atol=1e-14)


# -- inputs of 0 rows and 0-dim inputs -------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCT_NAMES)
@pytest.mark.parametrize("name", ["mlp_regression", "mlp_classification", "mlp_binary"])
def test_zero_rows_give_empty_results_of_the_right_shape(structure, name):
    case = make_case(name)
    la = quiet_fit(LaplaceWrapper(case.model, case.likelihood, structure=structure), case.loader())
    C, P = la.predict(case.X[:1]).mean.shape[1], la.n_params
    x0 = case.X[:0]
    links = [None] if case.likelihood == "regression" else ["probit", "bridge", "mc"]
    g = torch.Generator().manual_seed(0)
    for link in links:
        pred = la.predict(x0, "glm", link=link, generator=g)
        assert pred.mean.shape == pred.variance.shape == (0, C)
        assert pred.mean.dtype == DT
    pred = la.predict(x0, "nn", n_samples=3, generator=g)
    assert pred.mean.shape == pred.variance.shape == (0, C)
    assert la.functional_covariance(x0).shape == (0, C, C)
    J, f = la.jacobians(x0)
    assert J.shape == (0, C, P) and f.shape == (0, C)
    # the same calls with rows still work afterwards
    assert la.predict(case.X[:2]).mean.shape == (2, C)


def test_zero_dim_input_is_a_value_error():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure="kfac").fit(case.loader())
    x = torch.tensor(1.0, dtype=DT)
    msg = r"model input must have a leading batch dimension; got a 0-dim tensor\. Add one with"
    for call in (
        lambda: la.predict(x),
        lambda: la.predict(x, "nn"),
        lambda: la.functional_covariance(x),
        lambda: la.jacobians(x),
    ):
        with pytest.raises(ValueError, match=msg):
            call()
    before = la.state_dict()
    with pytest.raises(ValueError, match=r"model input in batch 1 must have a leading batch"):
        la.fit([(case.X[:4], case.y[:4]), (x, case.y[0])])
    assert same_state(la.state_dict(), before)


# -- overflow is reported, not returned ------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCT_NAMES)
@pytest.mark.parametrize("likelihood", ["classification", "binary"])
def test_saturated_logits_reported_not_returned(structure, likelihood):
    model, X, y = saturated_model(likelihood)
    la = LaplaceWrapper(model, likelihood, structure=structure)
    quiet_fit(la, [(X[:6], y[:6]), (X[6:], y[6:])])
    before = la.state_dict()
    with pytest.raises(
        RuntimeError,
        match=r"log marginal likelihood must be finite; got -inf in torch\.float32: the prior term "
        r"½\(θ\*−θ₀\)ᵀΛ₀\(θ\*−θ₀\) = inf\.",
    ):
        la.log_marginal_likelihood()
    with pytest.raises(RuntimeError, match=r"log marginal likelihood must be finite"):
        la.optimize_prior_precision("marglik", n_steps=3)
    assert same_state(la.state_dict(), before)
    with pytest.raises(RuntimeError, match=r"functional covariance J Σ Jᵀ must be finite; got"):
        la.functional_covariance(X[:3])
    for link in ("probit", "bridge", "mc"):
        with pytest.raises(
            RuntimeError,
            match=r"functional covariance J Σ Jᵀ \(GLM predictive\) must be finite; got \d+ NaN "
            r"and \d+ Inf values out of \d+ \(shape \(3, \d, \d\), torch\.float32\)\. The "
            r"computation overflowed",
        ):
            la.predict(X[:3], link=link, generator=torch.Generator().manual_seed(0))
    # the sampled-network predictive is stable here (softmax / sigmoid of huge logits)
    pred = la.predict(X[:3], "nn", n_samples=8, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(pred.mean).all()) and bool(torch.isfinite(pred.variance).all())
    if likelihood == "classification":
        torch.testing.assert_close(pred.mean.sum(-1), torch.ones(3), rtol=0, atol=1e-6)
    assert same_state(la.state_dict(), before)


def test_overflowing_curvature_and_sampled_outputs_reported():
    model, X, y = saturated_model("regression", scale=1e20)
    with pytest.raises(ValueError, match=r"curvature eigenvalues must be finite; got 0 NaN and"):
        LaplaceWrapper(model, "regression", structure="lowrank").fit([(X, y)])
    # σ = 1e20 is a float32 number, σ² is not: both predictives report the overflow
    model, X, y = saturated_model("regression", scale=1.0)
    la = LaplaceWrapper(model, "regression", structure="diag", sigma_noise=1e20).fit([(X, y)])
    for method in ("glm", "nn"):
        with pytest.raises(
            RuntimeError,
            match=rf"predictive variance \(method='{method}'\) must be finite; got 0 NaN and 6 "
            r"Inf values out of 6 \(shape \(3, 2\), torch\.float32\)\. The computation overflowed",
        ):
            la.predict(X[:3], method, n_samples=4, generator=torch.Generator().manual_seed(0))


class _Steep(nn.Module):
    """f = 1e20·tanh(1e20·w·x) + b: finite outputs, Jacobians that overflow float32 at |x| ~ 1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return 1e20 * torch.tanh(1e20 * self.w * x) + self.b


def test_overflowing_jacobians_outputs_and_covariance_reported():
    la = LaplaceWrapper(_Steep(), "regression", structure="full")
    la.fit([(torch.full((4, 1), 1e-25), torch.zeros(4, 1))])
    assert bool(torch.isfinite(la.jacobians(torch.full((2, 1), 1e-25))[0]).all())
    with pytest.raises(
        RuntimeError,
        match=r"Jacobians J\(x\) must be finite; got 0 NaN and 2 Inf values out of 4 "
        r"\(shape \(2, 1, 2\), torch\.float32\)",
    ):
        la.jacobians(torch.ones(2, 1))
    # outputs that overflow at the test inputs
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight.mul_(1e20)
    X = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    la = quiet_fit(LaplaceWrapper(model, "classification", structure="diag"), [(X, X[:, 0] > 0)])
    with pytest.raises(RuntimeError, match=r"model output at the inputs must be finite; got 0 NaN"):
        la.jacobians(X * 1e19)
    # a prior precision of 1e-45 in float32: Σ = α⁻¹ in the kernel of G is not representable
    la = LaplaceWrapper(nn.Linear(3, 2), "regression", structure="lowrank", prior_precision=1e-45)
    la.fit([(torch.randn(1, 3), torch.randn(1, 2))])
    with pytest.raises(RuntimeError, match=r"posterior covariance Σ must be finite; got 0 NaN and"):
        la.posterior_covariance()


def test_links_of_a_collapsed_posterior():
    """Prior precision 1e12: probit and mc give the MAP softmax, the normalised bridge the
    one-hot arg-max, and the bridge a value that does not depend on the posterior's scale (not
    the MAP softmax)."""
    case = make_case("mlp_classification")
    fits = [_fit(case, "kfac", prior_precision=p) for p in (1e12, 1e10)]
    with torch.no_grad():
        f = case.model(case.X)
    map_softmax = torch.softmax(f, -1)
    g = torch.Generator().manual_seed(0)
    la = fits[0]
    torch.testing.assert_close(la.predict(case.X).mean, map_softmax, rtol=0, atol=1e-10)
    mc = la.predict(case.X, link="mc", n_samples=50, generator=g).mean
    torch.testing.assert_close(mc, map_softmax, rtol=0, atol=1e-5)
    one_hot = torch.nn.functional.one_hot(f.argmax(-1), 3).to(DT)
    norm = la.predict(case.X, link="bridge_norm").mean
    torch.testing.assert_close(norm, one_hot, rtol=0, atol=1e-10)
    # Σ_f ≈ J Jᵀ/α for both precisions: the same bridge, away from the MAP softmax
    bridges = [fit.predict(case.X, link="bridge").mean for fit in fits]
    torch.testing.assert_close(bridges[0], bridges[1], rtol=1e-6, atol=0)
    assert float((bridges[0] - map_softmax).abs().max()) > 0.05


# -- a Linear head whose weight is also used elsewhere; allocations over the budget -----------------


class _HeadReuse(nn.Module):
    """The head's weight also enters the body (``x @ head.weight``): J is not I ⊗ φᵀ."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x) + x @ self.head.weight))


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "lowrank"])
def test_head_weight_used_elsewhere_is_predicted_from_jacobians(structure):
    torch.manual_seed(0)
    case = make_case("mlp_classification")
    case.model = _HeadReuse().double()
    la = quiet_fit(
        LaplaceWrapper(case.model, "classification", structure=structure, subset="last_layer"),
        case.loader(),
    )
    assert la.fitted.layout.names == ("head.weight", "head.bias")
    x = _x_test()
    J = dense_jacobian(case.model, x, ["head.weight", "head.bias"])
    Sigma = la.posterior_covariance()
    ref = torch.einsum("bcp,pq,bdq->bcd", J, Sigma, J)
    torch.testing.assert_close(la.functional_covariance(x), ref, rtol=1e-8, atol=1e-11)
    assert la.fitted.head is not None and la.fitted.head._shared
    v = torch.diagonal(ref, dim1=1, dim2=2)
    f = case.model(x).detach()
    torch.testing.assert_close(
        la.predict(x).mean, torch.softmax(f / (1 + math.pi / 8 * v).sqrt(), -1)
    )


def test_predict_allocations_are_checked_against_the_budget():
    case = make_case("mlp_classification")  # C = 3, P = 31: one sample's J is 744 bytes
    la = _fit(case, "diag", curvature="mc", memory_budget=600)  # hooks: no Jacobian to fit
    x = _x_test()
    with pytest.raises(
        ValueError,
        match=r"one sample's Jacobian J\(x\) \(M=3 outputs x P=31 parameters\) must fit in the "
        r"memory budget of 5.59e-07 GB; got 6.93e-07 GB\. .*subset='last_layer'",
    ):
        la.predict(x)
    with pytest.raises(ValueError, match=r"one sample's Jacobian \(M=3 outputs x P=31 parameters"):
        la.jacobians(x)
    la = _fit(case, "diag", memory_budget=1000)
    with pytest.raises(
        ValueError,
        match=r"the 5 parameter draws of method='nn' \(P=31\) must fit in the memory budget of "
        r".*Pass fewer n_samples",
    ):
        la.predict(x, "nn", n_samples=5)
    assert la.predict(x, "nn", n_samples=4).mean.shape == (6, 3)
    with pytest.raises(
        ValueError,
        match=r"the dense output covariances J Σ Jᵀ of 14 rows \(shape \(14, 3, 3\)\) must fit in "
        r"the memory budget .*Pass fewer inputs per call",
    ):
        la.functional_covariance(_x_test(n=14))
    assert la.functional_covariance(_x_test(n=13)).shape == (13, 3, 3)
