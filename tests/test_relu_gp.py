"""The DSCS residual (``laplace_ggn.relu_gp``) against references computed another way.

The kernel against a Bayesian linear model on finitely many ReLU features (a Riemann sum of the
integral that defines it); the predictive against a dense reference: Jacobians by
``torch.func.jacrev``, Σ = (G + αI)⁻¹ from ``dense_ggn``, the probit link written out.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.glm import glm_from_moments
from laplace_ggn.relu_gp import dscs_kernel, dscs_variance, predict_relu_gp
from laplace_ggn.testing import dense_ggn, dense_jacobian

DT = torch.float64


def _relu_features(x: torch.Tensor, step: float, c_max: float) -> torch.Tensor:
    """ReLU(x_i − c) for c ≥ 0 and ReLU(c − x_i) for c ≤ 0 on a midpoint grid, weight √step."""
    c = torch.arange(step / 2, c_max, step, dtype=DT)
    pos = torch.relu(x[:, :, None] - c)
    neg = torch.relu(-c - x[:, :, None])
    return torch.cat([pos, neg], -1).reshape(x.shape[0], -1) * math.sqrt(step)


def test_kernel_equals_infinitely_many_relu_features():
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(7, 3, generator=g, dtype=DT)
    x[0, 0], x[1, 0] = 0.0, -0.0  # zeros and opposite signs on one coordinate
    phi = _relu_features(x, step=1e-3, c_max=float(x.abs().max()) + 1)
    ref = 2.5 * phi @ phi.T / x.shape[1]  # weights N(0, σ²/d), σ² = 2.5
    K = dscs_kernel(x, x, variance=2.5)
    torch.testing.assert_close(K, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dscs_variance(x, 2.5), torch.diagonal(K))
    assert torch.linalg.eigvalsh(K).min() > -1e-10


def test_variance_grows_cubically_and_scales_with_sigma2():
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    v = dscs_variance(x, 1.0)
    assert v.shape == (5,)
    torch.testing.assert_close(dscs_variance(7.0 * x, 1.0), 343.0 * v)
    torch.testing.assert_close(dscs_variance(x, 0.3), 0.3 * v)
    torch.testing.assert_close(v, x.reshape(5, -1).abs().pow(3).mean(-1) / 3)


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4)).to(DT)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 3, generator=g, dtype=DT)
    y = torch.randint(0, 4, (30,), generator=g)
    la = LaplaceWrapper(model, "classification", structure="full", prior_precision=2.0)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    return la, model, X, y


def _reference(model, X, y, x, alpha, sigma2, T=1.0):
    G = dense_ggn(model, X, y, "classification")
    Sigma = torch.linalg.inv(G + alpha * torch.eye(G.shape[0], dtype=DT))
    J = dense_jacobian(model, x)
    with torch.no_grad():
        f = model(x)
    v = (
        torch.einsum("bcp,pq,bcq->bc", J, Sigma, J)
        + sigma2 * x.abs().pow(3).mean(-1, keepdim=True) / 3
    )
    p = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * v), -1)
    p = p ** (1 / T)
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("sigma2", [0.0, 0.5, 20.0])
def test_probit_predictive_equals_dense_reference(fitted, sigma2):
    la, model, X, y = fitted
    x = 3.0 * torch.randn(9, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    x0 = x.clone()
    got = predict_relu_gp(la, x, variance=sigma2).mean
    torch.testing.assert_close(got, _reference(model, X, y, x, 2.0, sigma2), rtol=1e-9, atol=1e-12)
    assert torch.equal(x, x0)


def test_tempered_and_other_links(fitted):
    la, model, X, y = fitted
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(6), dtype=DT)
    try:
        la.set_hyperparameters(predictive_temperature=0.5)
        got = predict_relu_gp(la, x, variance=1.0).mean
        torch.testing.assert_close(
            got, _reference(model, X, y, x, 2.0, 1.0, T=0.5), rtol=1e-9, atol=1e-12
        )
        for link in ("bridge", "bridge_norm"):
            torch.testing.assert_close(
                predict_relu_gp(la, x, variance=0.0, link=link).mean, la.predict(x, link=link).mean
            )
    finally:
        la.set_hyperparameters(predictive_temperature=1.0)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    torch.testing.assert_close(
        predict_relu_gp(la, x, variance=0.0, link="mc", generator=gen()).mean,
        la.predict(x, link="mc", generator=gen()).mean,
    )


def test_far_away_tends_to_uniform_while_the_glm_does_not(fitted):
    la, *_ = fitted
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(7), dtype=DT)
    far = 1e4 * x
    glm = la.predict(far).mean.max(-1).values
    gp = predict_relu_gp(la, far, variance=1.0).mean.max(-1).values
    assert float((gp - 0.25).abs().max()) < 0.02
    # without the residual the confidence has reached its limit, away from 1/C (Kristiadi et al. 2020)
    torch.testing.assert_close(glm, la.predict(10 * far).mean.max(-1).values, rtol=0, atol=1e-3)
    assert float((glm - 0.25).max()) > 0.15


def test_glm_from_moments_takes_link_names(fitted):
    la, *_ = fitted
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(8), dtype=DT)
    f, cov = la.jacobians(x)[1], la.functional_covariance(x)
    for name in ("probit", "bridge", "bridge_norm"):
        got = glm_from_moments(f, cov, likelihood="classification", link=name).mean
        torch.testing.assert_close(got, la.predict(x, link=name).mean)


def test_features_and_errors(fitted):
    la, model, X, y = fitted
    x = torch.randn(4, 3, dtype=DT)
    same = predict_relu_gp(la, x, variance=1.0, features=lambda t: t * 1.0).mean
    torch.testing.assert_close(same, predict_relu_gp(la, x, variance=1.0).mean)
    with pytest.raises(ValueError, match="variance must be a finite float ≥ 0; got -1"):
        predict_relu_gp(la, x, variance=-1.0)
    with pytest.raises(TypeError, match="variance must be a float"):
        predict_relu_gp(la, x, variance="1")
    with pytest.raises(ValueError, match="B feature rows"):
        predict_relu_gp(la, x, variance=1.0, features=lambda t: t[:2])
    with pytest.raises(TypeError, match="features\\(x\\) must be a floating tensor"):
        predict_relu_gp(la, x, variance=1.0, features=lambda t: t.long())
    with pytest.raises(ValueError, match="link"):
        predict_relu_gp(la, x, variance=1.0, link="nope")
    with pytest.raises(ValueError, match="fitted LaplaceWrapper"):
        predict_relu_gp(LaplaceWrapper(model, "classification"), x, variance=1.0)
    with pytest.raises(ValueError, match="same number of features"):
        dscs_kernel(x, torch.randn(2, 5, dtype=DT))
