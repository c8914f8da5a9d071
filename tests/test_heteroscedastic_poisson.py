"""Heteroscedastic Gaussian and Poisson: predictives against dense and closed-form references."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.likelihoods import HeteroscedasticGaussian, Poisson, Prediction
from laplace_ggn.testing import dense_jacobian

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _mlp(C: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C)).double()


def _data(n: int = 12, D: int = 2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, D, generator=g, dtype=DT)


def test_heteroscedastic_glm_predictive_splits_epistemic_and_aleatoric():
    X, y = _data()
    model = _mlp(4)
    la = LaplaceWrapper(model, "heteroscedastic", structure="full")
    la.fit(DataLoader(TensorDataset(X, y), batch_size=5))
    Xt = torch.randn(5, 3, dtype=DT)
    J = dense_jacobian(model, Xt)
    cov = torch.einsum("bcp,pq,bdq->bcd", J, la.posterior_covariance(), J)
    with torch.no_grad():
        f = model(Xt)
    v = cov.diagonal(dim1=-2, dim2=-1)
    pred = la.predict(Xt)
    torch.testing.assert_close(pred.mean, f[:, :2], **TOL)
    torch.testing.assert_close(pred.epistemic, v[:, :2], **TOL)
    torch.testing.assert_close(pred.aleatoric, torch.exp(f[:, 2:] + 0.5 * v[:, 2:]), **TOL)
    torch.testing.assert_close(pred.variance, pred.epistemic + pred.aleatoric, **TOL)
    # the sampled-network predictive: Var[μ_s] + mean of σ²_s over the same draws
    g = torch.Generator().manual_seed(0)
    nn_pred = la.predict(Xt, "nn", n_samples=50, generator=g)
    thetas = la.sample(50, generator=torch.Generator().manual_seed(0))
    outs = torch.stack([_call(model, th, Xt) for th in thetas])
    torch.testing.assert_close(nn_pred.epistemic, outs[..., :2].var(0), **TOL)
    torch.testing.assert_close(nn_pred.aleatoric, outs[..., 2:].exp().mean(0), **TOL)


def _call(model, theta, x):
    params = dict(model.named_parameters())
    out, i = {}, 0
    for n, p in params.items():
        out[n] = theta[i : i + p.numel()].view(p.shape)
        i += p.numel()
    return torch.func.functional_call(model, out, (x,))


def test_heteroscedastic_fisher_is_the_expected_hessian_and_mc_scores_have_it_as_covariance():
    lik = HeteroscedasticGaussian()
    f = torch.tensor([[0.3, -0.2, 0.5, -1.0]], dtype=DT)  # μ (2), log σ² (2)
    # the expected Hessian over y ~ N(μ, σ²): autograd Hessians at y = μ + σe, e ∈ {±1}², whose
    # average is the expectation of any function quadratic in y - μ (as the Hessian is)
    mu, sd = f[0, :2], torch.exp(0.5 * f[0, 2:])
    signs = torch.tensor([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=DT)
    H = torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda z, y=(mu + sd * e)[None]: lik.per_sample_nll(z[None], y)[0], f[0]
            )
            for e in signs
        ]
    ).mean(0)
    torch.testing.assert_close(lik.hessian(f)[0], H, **TOL)
    ys = lik.sample(f.expand(3, 4), generator=torch.Generator().manual_seed(0))
    s = lik.neg_scores(f, 20000, torch.Generator().manual_seed(1))[:, 0]
    torch.testing.assert_close(s.T @ s / s.shape[0], lik.hessian(f)[0], rtol=0, atol=0.05)
    # the closed-form gradient is autograd's
    y = ys[:3]
    F = f.expand(3, 4).clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(lik.per_sample_nll(F, y).sum(), F)
    torch.testing.assert_close(lik.grad_f(f.expand(3, 4), y), auto, **TOL)


def test_heteroscedastic_nll_is_gaussian_nll_loss():
    X, y = _data(6)
    f = torch.randn(6, 4, dtype=DT)
    ref = nn.GaussianNLLLoss(full=True, reduction="sum")(f[:, :2], y, f[:, 2:].exp())
    torch.testing.assert_close(HeteroscedasticGaussian().nll(f, y), ref, **TOL)


def test_heteroscedastic_errors():
    lik = HeteroscedasticGaussian()
    with pytest.raises(
        ValueError, match=r"heteroscedastic likelihood needs model outputs \(B, 2·D\)"
    ):
        lik.check_targets(torch.zeros(4, 3), torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"heteroscedastic targets must have shape \(4, 2\)"):
        lik.check_targets(torch.zeros(4, 4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"heteroscedastic targets must have shape \(4, 5, 2\)"):
        lik.position_targets(torch.zeros(4, 5, 4), torch.zeros(4, 5, 3))
    model = _mlp(3)
    X, y = _data()
    la = LaplaceWrapper(model, "heteroscedastic", structure="diag")
    with pytest.raises(ValueError, match="got 3 outputs \\(odd\\)"):
        la.fit(DataLoader(TensorDataset(X, y[:, :1]), batch_size=5))
    with pytest.raises(ValueError, match="link must be None .* for likelihood='heteroscedastic'"):
        LaplaceWrapper(_mlp(2), "heteroscedastic").predict(X, link="mc")
    with pytest.raises(ValueError, match="sigma_noise applies to likelihood='regression' only"):
        LaplaceWrapper(_mlp(2), "heteroscedastic", sigma_noise=0.5)


def test_poisson_glm_predictive_is_the_lognormal_rate_in_closed_form():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 3, generator=g, dtype=DT)
    y = torch.poisson(torch.full((12, 2), 3.0, dtype=DT), generator=g)
    model = _mlp(2)
    la = LaplaceWrapper(model, "poisson", structure="full")
    la.fit(DataLoader(TensorDataset(X, y), batch_size=5))
    Xt = torch.randn(4, 3, dtype=DT)
    J = dense_jacobian(model, Xt)
    v = torch.einsum("bcp,pq,bcq->bc", J, la.posterior_covariance(), J)
    with torch.no_grad():
        m = model(Xt)
    pred = la.predict(Xt)
    rate = torch.exp(m + v / 2)
    torch.testing.assert_close(pred.mean, rate, **TOL)
    torch.testing.assert_close(pred.epistemic, (torch.exp(v) - 1) * torch.exp(2 * m + v), **TOL)
    torch.testing.assert_close(pred.variance, rate + pred.epistemic, **TOL)
    # a Monte-Carlo check of the lognormal moments
    z = torch.randn(200000, *m.shape, generator=g, dtype=DT)
    lam = torch.exp(m + v.sqrt() * z)
    torch.testing.assert_close(pred.mean, lam.mean(0), rtol=0.02, atol=0)
    torch.testing.assert_close(pred.epistemic, lam.var(0), rtol=0.1, atol=1e-6)


def test_poisson_predictive_nll_is_the_negative_binomial_and_tends_to_poisson():
    lik = Poisson()
    m = torch.tensor([[2.0, 0.5]], dtype=DT)
    v = torch.tensor([[3.0, 0.5]], dtype=DT)  # the second has no excess variance: Poisson
    y = torch.tensor([[4.0, 1.0]], dtype=DT)
    got = lik.predictive_nll(Prediction(m, v), y)
    r, p = 2.0**2 / (3.0 - 2.0), 2.0 / 3.0
    want = -stats.nbinom.logpmf(4, r, p) - stats.poisson.logpmf(1, 0.5)
    torch.testing.assert_close(got, torch.tensor([want], dtype=DT), **TOL)


def test_poisson_errors():
    lik = Poisson()
    with pytest.raises(ValueError, match=r"poisson targets must be counts \(whole numbers >= 0\)"):
        lik.check_targets(torch.zeros(2, 1), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"poisson targets must have the output's shape \(2, 2\)"):
        lik.check_targets(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(
        ValueError, match="link must be 'mc' \\(or None\\) for likelihood 'poisson'"
    ):
        LaplaceWrapper(_mlp(1), "poisson").predict(torch.zeros(1, 3, dtype=DT), link="bridge")


def test_poisson_nll_matches_torch():
    f = torch.randn(5, 2, dtype=DT)
    y = torch.poisson(torch.full((5, 2), 2.0, dtype=DT))
    ref = nn.PoissonNLLLoss(log_input=True, full=False, reduction="sum")(f, y)
    ref = ref + torch.lgamma(y + 1).sum()
    torch.testing.assert_close(Poisson().nll(f, y), ref, **TOL)
    assert math.isfinite(float(Poisson().loss_statistic(f, y)))
