"""One observation noise per output: evidence, curvature, tuning and saved states."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.testing import dense_jacobian

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
NOISE = torch.tensor([0.1, 0.5, 1.0], dtype=DT)


def _linear_problem(n: int = 300, seed: int = 0):
    """3-output linear regression with noise (0.1, 0.5, 1.0); the model is the least-squares fit."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=DT)
    W = torch.randn(3, 4, generator=g, dtype=DT)
    y = X @ W.T + torch.randn(n, 3, generator=g, dtype=DT) * NOISE
    model = nn.Linear(4, 3).double()
    Xb = torch.cat([X, torch.ones(n, 1, dtype=DT)], 1)
    sol = torch.linalg.lstsq(Xb, y).solution
    with torch.no_grad():
        model.weight.copy_(sol[:4].T)
        model.bias.copy_(sol[4])
    return model, X, y


def _mlp_problem():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=g, dtype=DT)
    y = torch.randn(12, 3, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    return model, X, y


def _dense_evidence(model, X, y, sigma, alpha):
    J = dense_jacobian(model, X)  # (N, C, P)
    with torch.no_grad():
        f = model(X)
    G = torch.einsum("ncp,c,ncq->pq", J, sigma**-2, J)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    P = theta.shape[0]
    nll = (0.5 * (y - f) ** 2 / sigma**2 + 0.5 * torch.log(2 * math.pi * sigma**2)).sum()
    Lam = G + alpha * torch.eye(P, dtype=DT)
    return -nll - 0.5 * alpha * theta @ theta - 0.5 * torch.logdet(Lam) + 0.5 * P * math.log(alpha)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac"])
def test_evidence_and_covariance_with_one_sigma_per_output_equal_the_dense_reference(structure):
    model, X, y = _mlp_problem()
    sigma = torch.tensor([0.3, 0.8, 1.7], dtype=DT)
    la = LaplaceWrapper(model, "regression", structure=structure, sigma_noise=sigma)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=5))
    assert la.sigma_noise.shape == (3,)
    if structure == "full":
        torch.testing.assert_close(
            la.log_marginal_likelihood(), _dense_evidence(model, X, y, sigma, 1.0), **TOL
        )
        s2 = torch.tensor([0.5, 0.4, 2.0], dtype=DT)
        torch.testing.assert_close(
            la.log_marginal_likelihood(0.7, s2), _dense_evidence(model, X, y, s2, 0.7), **TOL
        )
    ref = LaplaceWrapper(model, "regression", structure=structure, sigma_noise=1.0)
    ref.fit(DataLoader(TensorDataset(X, y), batch_size=5))
    # with equal σ per output the per-output fit is the scalar fit
    same = LaplaceWrapper(
        model, "regression", structure=structure, sigma_noise=torch.ones(3, dtype=DT)
    )
    same.fit(DataLoader(TensorDataset(X, y), batch_size=5))
    torch.testing.assert_close(same.posterior_covariance(), ref.posterior_covariance(), **TOL)
    torch.testing.assert_close(same.log_marginal_likelihood(), ref.log_marginal_likelihood(), **TOL)
    pred = la.predict(X[:4])
    torch.testing.assert_close(
        pred.variance - la.functional_covariance(X[:4]).diagonal(dim1=-2, dim2=-1),
        (sigma**2).expand(4, 3),
        **TOL,
    )


def test_evidence_is_differentiable_in_each_sigma():
    model, X, y = _mlp_problem()
    la = LaplaceWrapper(model, "regression", structure="full", sigma_noise=torch.ones(3, dtype=DT))
    la.fit(DataLoader(TensorDataset(X, y), batch_size=5))
    s = torch.tensor([0.4, 0.9, 1.3], dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(la.log_marginal_likelihood(sigma_noise=s), s)
    s_ref = s.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(_dense_evidence(model, X, y, s_ref, 1.0), s_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("structure", ["full", "kfac"])
def test_evidence_recovers_each_sigma_within_15_percent(structure):
    model, X, y = _linear_problem()
    la = LaplaceWrapper(
        model, "regression", structure=structure, sigma_noise=torch.ones(3, dtype=DT)
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=100))
    la.optimize_prior_precision(tune_sigma_noise=True, n_steps=200)
    rel = (la.sigma_noise - NOISE).abs() / NOISE
    assert bool((rel < 0.15).all()), la.sigma_noise


def test_state_round_trip_with_one_sigma_per_output():
    model, X, y = _mlp_problem()
    for structure in ("full", "diag", "kfac"):
        la = LaplaceWrapper(
            model,
            "regression",
            structure=structure,
            sigma_noise=torch.tensor([0.3, 0.8, 1.7], dtype=DT),
        ).fit(DataLoader(TensorDataset(X, y), batch_size=5))
        back = LaplaceWrapper.from_state_dict(model, la.state_dict())
        torch.testing.assert_close(back.sigma_noise, la.sigma_noise, rtol=0, atol=0)
        torch.testing.assert_close(
            back.log_marginal_likelihood(), la.log_marginal_likelihood(), **TOL
        )
        torch.testing.assert_close(back.predict(X).variance, la.predict(X).variance, **TOL)
    bad = la.state_dict()
    stats = {**bad["fit_statistics"], "output_loss_sums": [1.0, -2.0, 0.5]}
    with pytest.raises(
        ValueError, match=r"\['output_loss_sums'\] must be None or a list of finite"
    ):
        LaplaceWrapper.from_state_dict(model, {**bad, "fit_statistics": stats})
    bad["posterior"] = {**bad["posterior"], "n_outputs": 0}
    with pytest.raises(
        ValueError, match=r"state\['posterior'\]\['n_outputs'\] must be a positive int"
    ):
        LaplaceWrapper.from_state_dict(model, bad)


def test_per_output_sigma_errors():
    model, X, y = _mlp_problem()
    loader = DataLoader(TensorDataset(X, y), batch_size=5)
    s3 = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match=r"applies to structures \['full', 'diag', 'kfac'\]"):
        LaplaceWrapper(model, "regression", structure="lowrank", sigma_noise=s3)
    with pytest.raises(ValueError, match="needs curvature='ggn'; got curvature='mc'"):
        LaplaceWrapper(model, "regression", structure="diag", curvature="mc", sigma_noise=s3)
    with pytest.raises(ValueError, match=r"sigma_noise must be a scalar or have shape \(D,\)"):
        LaplaceWrapper(model, "regression", sigma_noise=torch.ones(3, 1, dtype=DT))
    with pytest.raises(ValueError, match=r"sigma_noise must have one entry per model output"):
        LaplaceWrapper(
            model, "regression", structure="full", sigma_noise=torch.ones(2, dtype=DT)
        ).fit(loader)
    scalar = LaplaceWrapper(model, "regression", structure="full").fit(loader)
    with pytest.raises(ValueError, match=r"sigma_noise must have the shape of the fit's σ, \(\)"):
        scalar.log_marginal_likelihood(sigma_noise=s3)
    per = LaplaceWrapper(model, "regression", structure="full", sigma_noise=s3).fit(loader)
    with pytest.raises(ValueError, match=r"sigma_noise must have the shape of the fit's σ, \(3,\)"):
        per.set_hyperparameters(sigma_noise=torch.ones(2, dtype=DT))
    per.set_hyperparameters(sigma_noise=0.5)  # a scalar is every output's σ
    torch.testing.assert_close(per.sigma_noise, torch.full((3,), 0.5, dtype=DT))
    from laplace_ggn.likelihoods import FitStatistics, Gaussian

    with pytest.raises(ValueError, match=r"sigma_noise of shape \(3,\) needs the squared error"):
        Gaussian.nll_from_statistics(FitStatistics(4, 3, 1.0), s3)
