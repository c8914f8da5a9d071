"""Continual Laplace: fit(accumulate=True), prior_mean (a tensor or a fitted wrapper), log_prob.

Every check is against a dense reference computed another way (``dense_ggn`` from
``torch.func.jacrev``, explicit inverses and log-determinants, torch's MultivariateNormal) on
tiny float64 models.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import make_case
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.testing import dense_ggn

STRUCTURES = ["full", "diag", "kfac", "lowrank"]
PREC = torch.tensor([0.5, 1.5, 0.7, 3.0])  # layerwise: weight and bias of each layer differ


def _loader(X, y, batch_size=4) -> DataLoader:
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def _fit(case, structure, X=None, y=None, **kwargs) -> LaplaceWrapper:
    X = case.X if X is None else X
    y = case.y if y is None else y
    la = LaplaceWrapper(case.model, case.likelihood, structure=structure, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return la.fit(_loader(X, y))


def _dense_precision(la: LaplaceWrapper) -> torch.Tensor:
    return torch.linalg.inv(la.posterior_covariance())


@pytest.mark.parametrize("structure", ["full", "diag", "lowrank"])
@pytest.mark.parametrize("name", ["mlp_classification", "mlp_regression"])
def test_accumulate_equals_one_fit_on_the_union(name, structure):
    case = make_case(name, 0, n=14)
    kw = {"prior_precision": PREC, "sigma_noise": 0.7} if case.likelihood == "regression" else {}
    kw.setdefault("prior_precision", PREC)
    la = _fit(case, structure, case.X[:6], case.y[:6], **kw)
    la.fit(_loader(case.X[6:], case.y[6:]), accumulate=True)
    ref = _fit(case, structure, **kw)
    torch.testing.assert_close(
        la.posterior_covariance(), ref.posterior_covariance(), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=0, atol=1e-10
    )
    a, b = la.fitted.statistics, ref.fitted.statistics
    assert (a.n_data, a.n_outputs) == (b.n_data, b.n_outputs)
    assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-13)


def test_accumulate_kfac_is_the_kfac_of_the_union_and_states_its_difference():
    case = make_case("mlp_classification", 0, n=14)
    a = _fit(case, "kfac", case.X[:6], case.y[:6], prior_precision=PREC)
    b = _fit(case, "kfac", case.X[6:], case.y[6:], prior_precision=PREC)
    acc = _fit(case, "kfac", case.X[:6], case.y[:6], prior_precision=PREC)
    acc.fit(_loader(case.X[6:], case.y[6:]), accumulate=True)
    union = _fit(case, "kfac", prior_precision=PREC)
    torch.testing.assert_close(
        acc.posterior_covariance(), union.posterior_covariance(), rtol=0, atol=1e-10
    )
    # against the sum of the two KFAC curvatures: the stated difference, block by block
    n1, n2 = 6, 8
    G = acc.posterior.curvature.to_dense()
    Gsum = a.posterior.curvature.to_dense() + b.posterior.curvature.to_dense()
    expect = torch.zeros_like(G)
    layout = acc.fitted.layout
    for ba, bb in zip(a.posterior.curvature.blocks, b.posterior.curvature.blocks):
        idx = ba.index(layout)
        diff = -n1 * n2 / (n1 + n2) * torch.kron(ba.B - bb.B, ba.A / n1 - bb.A / n2)
        expect[idx.unsqueeze(1), idx.unsqueeze(0)] = diff
    torch.testing.assert_close(G - Gsum, expect, rtol=0, atol=1e-10)
    assert float((G - Gsum).abs().max()) > 1e-6  # the approximation is not the sum


def test_accumulate_topk_lowrank_keeps_the_top_k_of_the_sum():
    case = make_case("mlp_regression", 0, n=14)
    a = _fit(case, "lowrank", case.X[:6], case.y[:6], rank=5)
    b = _fit(case, "lowrank", case.X[6:], case.y[6:], rank=5)
    acc = _fit(case, "lowrank", case.X[:6], case.y[:6], rank=5)
    acc.fit(_loader(case.X[6:], case.y[6:]), accumulate=True)
    post = acc.posterior
    Ga = a.posterior.eigenvectors @ torch.diag(a.posterior.eigenvalues) @ a.posterior.eigenvectors.T
    Gb = b.posterior.eigenvectors @ torch.diag(b.posterior.eigenvalues) @ b.posterior.eigenvectors.T
    lam, U = torch.linalg.eigh(Ga + Gb)
    top = lam.flip(0)[:5]
    torch.testing.assert_close(post.eigenvalues, top, rtol=1e-9, atol=1e-10)
    proj = U[:, -5:] @ U[:, -5:].T
    torch.testing.assert_close(post.eigenvectors @ post.eigenvectors.T, proj, rtol=0, atol=1e-8)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_log_prob_is_the_dense_gaussian_density(structure):
    case = make_case("mlp_classification", 1)
    la = _fit(case, structure, prior_precision=PREC)
    mean, Sigma = la.posterior.mean, la.posterior_covariance()
    g = torch.Generator().manual_seed(0)
    theta = mean + 0.3 * torch.randn(3, la.n_params, generator=g, dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(mean, covariance_matrix=Sigma).log_prob(theta)
    torch.testing.assert_close(la.log_prob(theta), ref, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(la.log_prob(theta[0]), ref[0], rtol=1e-10, atol=1e-9)
    # differentiable: the gradient is -Λ(θ - θ*)
    t = theta[0].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(la.log_prob(t), t)
    torch.testing.assert_close(
        grad, -torch.linalg.solve(Sigma, theta[0] - mean), rtol=1e-8, atol=1e-9
    )


def test_log_prob_of_a_topk_lowrank_posterior_and_regression():
    case = make_case("mlp_regression", 2)
    la = _fit(case, "lowrank", rank=4, sigma_noise=0.5, prior_precision=2.0)
    mean, Sigma = la.posterior.mean, la.posterior_covariance()
    theta = mean + 0.2 * torch.randn(2, la.n_params, dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(mean, covariance_matrix=Sigma).log_prob(theta)
    torch.testing.assert_close(la.log_prob(theta), ref, rtol=1e-10, atol=1e-9)


def test_log_prob_errors():
    case = make_case("mlp_classification", 0)
    la = _fit(case, "diag")
    with pytest.raises(ValueError, match=r"theta must be a floating tensor of shape \(31,\)"):
        la.log_prob(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="theta must be a tensor"):
        la.log_prob([0.0] * 31)
    with pytest.raises(RuntimeError, match="log_prob\\(\\) needs a fitted posterior"):
        LaplaceWrapper(case.model, "classification").log_prob(torch.zeros(31))
    proj = _fit(case, "projected")
    with pytest.raises(ValueError, match="log_prob\\(\\) needs structure 'full', 'diag'"):
        proj.log_prob(proj.posterior.mean)


def test_accumulate_errors_leave_the_fit_unchanged():
    case = make_case("mlp_classification", 0)
    la = LaplaceWrapper(case.model, "classification", structure="diag")
    with pytest.raises(RuntimeError, match="fit\\(accumulate=True\\) needs a stored fit"):
        la.fit(case.loader(), accumulate=True)
    proj = _fit(case, "projected")
    before = proj.fitted
    with pytest.raises(ValueError, match="fit\\(accumulate=True\\) needs structure 'full'"):
        proj.fit(case.loader(), accumulate=True)
    assert proj.fitted is before


def test_accumulate_keeps_tuned_hyperparameters():
    case = make_case("mlp_classification", 0)
    la = _fit(case, "full", case.X[:6], case.y[:6])
    la.set_hyperparameters(prior_precision=3.0)
    la.fit(_loader(case.X[6:], case.y[6:]), accumulate=True)
    assert float(la.prior_precision) == 3.0


# -- the prior mean -------------------------------------------------------------------------


def _dense_evidence(la, G, prec_diag, theta0, nll):
    P = G.shape[0]
    Lam0 = torch.diag(prec_diag.expand(P))
    Lam = la.fitted.hyperparameters.scale() * G + Lam0
    d = la.posterior.mean - theta0
    return -nll - 0.5 * d @ Lam0 @ d - 0.5 * torch.logdet(Lam) + 0.5 * torch.logdet(Lam0)


def test_prior_mean_tensor_enters_the_evidence_only():
    case = make_case("mlp_classification", 0)
    P = sum(p.numel() for p in case.model.parameters())
    theta0 = 0.1 * torch.arange(P, dtype=torch.float64) / P
    la = _fit(case, "full", prior_precision=2.0, prior_mean=theta0)
    plain = _fit(case, "full", prior_precision=2.0)
    torch.testing.assert_close(la.posterior_covariance(), plain.posterior_covariance())
    G = dense_ggn(case.model, case.X, case.y, "classification")
    nll = torch.nn.functional.cross_entropy(case.model(case.X), case.y, reduction="sum")
    ref = _dense_evidence(la, G, torch.tensor(2.0, dtype=torch.float64), theta0, nll.detach())
    torch.testing.assert_close(la.log_marginal_likelihood(), ref, rtol=1e-10, atol=1e-9)
    assert float(la.log_marginal_likelihood()) != float(plain.log_marginal_likelihood())


def test_prior_mean_evidence_is_exact_for_bayesian_linear_regression():
    """At the exact MAP of a linear model the Laplace evidence is the exact evidence."""
    torch.manual_seed(0)
    X = torch.randn(20, 3, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(
        20, dtype=torch.float64
    )
    alpha, sigma = 2.0, 0.4
    m0 = torch.tensor([0.5, -1.0, 0.2, 0.1], dtype=torch.float64)  # weight, then bias
    Phi = torch.cat([X, torch.ones(20, 1, dtype=torch.float64)], 1)
    A = Phi.T @ Phi / sigma**2 + alpha * torch.eye(4, dtype=torch.float64)
    w = torch.linalg.solve(A, Phi.T @ y / sigma**2 + alpha * m0)
    model = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(w[:3].reshape(1, 3))
        model.bias.copy_(w[3:])
    for structure in ("full", "kfac", "lowrank"):
        la = LaplaceWrapper(
            model,
            "regression",
            structure=structure,
            prior_precision=alpha,
            sigma_noise=sigma,
            prior_mean=m0,
        ).fit(_loader(X, y.unsqueeze(1)))
        cov = sigma**2 * torch.eye(20, dtype=torch.float64) + Phi @ Phi.T / alpha
        exact = torch.distributions.MultivariateNormal(Phi @ m0, cov).log_prob(y)
        torch.testing.assert_close(la.log_marginal_likelihood(), exact, rtol=1e-10, atol=1e-9)


def test_prior_mean_tuning_uses_the_centred_weights():
    case = make_case("mlp_regression", 0)
    P = sum(p.numel() for p in case.model.parameters())
    theta0 = torch.linspace(-0.5, 0.5, P, dtype=torch.float64)
    la = _fit(case, "kfac", prior_mean=theta0)
    la.optimize_prior_precision("marglik", n_steps=300, lr=0.1)  # scalar: the spectral path
    a = float(la.prior_precision)
    f = [float(la.log_marginal_likelihood(a * math.exp(e))) for e in (-1e-3, 0.0, 1e-3)]
    assert f[1] >= max(f[0], f[2]) - 1e-9  # the tuned α maximises the centred evidence


def test_prior_mean_errors():
    case = make_case("mlp_classification", 0)
    with pytest.raises(ValueError, match=r"prior_mean must have shape \(31,\)"):
        LaplaceWrapper(case.model, "classification", prior_mean=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="prior_mean must be a floating tensor of shape"):
        LaplaceWrapper(case.model, "classification", prior_mean=torch.zeros(3, 9))
    with pytest.raises(ValueError, match="prior_mean must be finite"):
        LaplaceWrapper(case.model, "classification", prior_mean=torch.full((31,), math.nan))
    with pytest.raises(
        TypeError, match="prior_mean must be a tensor of shape \\(P,\\) or a fitted"
    ):
        LaplaceWrapper(case.model, "classification", prior_mean=[0.0] * 31)
    unfitted = LaplaceWrapper(case.model, "classification")
    with pytest.raises(ValueError, match="got an unfitted LaplaceWrapper"):
        LaplaceWrapper(case.model, "classification", prior_mean=unfitted)


# -- a fitted wrapper as the prior ----------------------------------------------------------


@pytest.mark.parametrize("structure", ["full", "diag", "lowrank"])
def test_fitted_wrapper_prior_is_exact(structure):
    """Posterior precision sG₂ + Λ₁ and the evidence log p(D₂ | D₁), against dense algebra."""
    case = make_case("mlp_regression", 0, n=14)
    X1, y1, X2, y2 = case.X[:6], case.y[:6], case.X[6:], case.y[6:]
    first = _fit(case, structure, X1, y1, prior_precision=PREC, sigma_noise=0.8)
    second = LaplaceWrapper(case.model, "regression", structure=structure, prior_mean=first)
    second.fit(_loader(X2, y2))
    Lam1 = _dense_precision(first)
    s = 1 / 0.8**2
    G2 = dense_ggn(case.model, X2, y2, "regression") if structure == "full" else None
    if structure == "full":
        torch.testing.assert_close(_dense_precision(second), s * G2 + Lam1, rtol=1e-9, atol=1e-8)
    # the evidence of D₂ given D₁, with the same weights θ₂ = θ₁ here
    Lam = _dense_precision(second)
    d = second.posterior.mean - first.posterior.mean
    sse = float(((case.model(X2).detach() - y2) ** 2).sum())
    nll = 0.5 * sse * s + 0.5 * y2.numel() * math.log(2 * math.pi * 0.8**2)
    ref = -nll - 0.5 * d @ Lam1 @ d - 0.5 * torch.logdet(Lam) + 0.5 * torch.logdet(Lam1)
    torch.testing.assert_close(second.log_marginal_likelihood(), ref, rtol=1e-9, atol=1e-8)
    # and the chain: log p(D₁) + log p(D₂ | D₁) = log p(D₁ ∪ D₂) at the same weights
    union = _fit(case, structure, prior_precision=PREC, sigma_noise=0.8)
    total = first.log_marginal_likelihood() + second.log_marginal_likelihood()
    torch.testing.assert_close(total, union.log_marginal_likelihood(), rtol=1e-9, atol=1e-8)
    # tuning moves D in both Λ₁ and Λ (the evidence stays finite and consistent)
    val = second.log_marginal_likelihood(prior_precision=PREC * 2)
    first_alt = _fit(case, structure, X1, y1, prior_precision=PREC * 2, sigma_noise=0.8)
    union_alt = _fit(case, structure, prior_precision=PREC * 2, sigma_noise=0.8)
    torch.testing.assert_close(
        first_alt.log_marginal_likelihood() + val,
        union_alt.log_marginal_likelihood(),
        rtol=1e-9,
        atol=1e-8,
    )


def test_fitted_wrapper_prior_mean_is_its_posterior_mean():
    case = make_case("mlp_classification", 0)
    first = _fit(case, "diag", prior_precision=2.0)
    with torch.no_grad():
        for p in case.model.parameters():
            p.add_(0.05)
    second = LaplaceWrapper(case.model, "classification", structure="diag", prior_mean=first)
    second.fit(case.loader())
    hp = second.fitted.hyperparameters
    torch.testing.assert_close(hp.prior_mean, first.posterior.mean)
    assert float(second.prior_precision) == 2.0
    # round trip of the state, the carried curvature included
    again = LaplaceWrapper.from_state_dict(case.model, second.state_dict())
    torch.testing.assert_close(again.log_marginal_likelihood(), second.log_marginal_likelihood())
    again.fit(case.loader())  # a refit carries the prior's curvature again
    torch.testing.assert_close(again.posterior_covariance(), second.posterior_covariance())


def test_fitted_wrapper_prior_refusals():
    case = make_case("mlp_classification", 0)
    kfac = _fit(case, "kfac")
    with pytest.raises(ValueError, match="becomes a prior exactly for structure 'full', 'diag'"):
        LaplaceWrapper(case.model, "classification", structure="kfac", prior_mean=kfac)
    topk = _fit(case, "lowrank", rank=3)
    with pytest.raises(ValueError, match="with rank=3"):
        LaplaceWrapper(case.model, "classification", structure="lowrank", rank=3, prior_mean=topk)
    full = _fit(case, "full")
    with pytest.raises(ValueError, match="prior_mean must be a wrapper of the same structure"):
        LaplaceWrapper(case.model, "classification", structure="diag", prior_mean=full)
    with pytest.raises(ValueError, match="are taken from the prior wrapper"):
        LaplaceWrapper(
            case.model, "classification", structure="full", prior_mean=full, prior_precision=2.0
        )
    other = make_case("mlp_binary", 0)
    binary = _fit(other, "full")
    with pytest.raises(ValueError, match="prior_mean must be a wrapper of the same likelihood"):
        LaplaceWrapper(other.model, "classification", structure="full", prior_mean=binary)
    with pytest.raises(ValueError, match="prior_mean must be a wrapper of the same parameters"):
        LaplaceWrapper(
            case.model, "classification", structure="full", subset=["2.weight"], prior_mean=full
        )


def test_state_round_trip_with_prior_mean_and_logit_temperature():
    case = make_case("mlp_classification", 0)
    theta0 = torch.full((31,), 0.1, dtype=torch.float64)
    la = _fit(case, "kfac", prior_mean=theta0, logit_temperature=1.7)
    again = LaplaceWrapper.from_state_dict(case.model, la.state_dict())
    assert again.logit_temperature == 1.7
    torch.testing.assert_close(again.fitted.hyperparameters.prior_mean, theta0)
    torch.testing.assert_close(
        again.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=0, atol=0
    )
    torch.testing.assert_close(again.predict(case.X).mean, la.predict(case.X).mean, rtol=0, atol=0)
    bad = dict(la.state_dict(), prior_mean=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"state\['prior_mean'\] must have shape \(31,\)"):
        LaplaceWrapper.from_state_dict(case.model, bad)
    bad = dict(la.state_dict(), logit_temperature=-1.0)
    with pytest.raises(
        ValueError, match=r"state\['logit_temperature'\] must be a finite float > 0"
    ):
        LaplaceWrapper.from_state_dict(case.model, bad)
    bad = dict(la.state_dict(), prior_curvature={})
    del bad["prior_mean"]
    with pytest.raises(ValueError, match=r"state\['prior_curvature'\] must come with"):
        LaplaceWrapper.from_state_dict(case.model, bad)


def test_one_sigma_per_output_is_refused():
    case = make_case("mlp_regression", 0)
    la = _fit(case, "full", sigma_noise=torch.tensor([0.5, 1.0], dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"log_prob\(\) needs one observation noise for every output"
    ):
        la.log_prob(la.posterior.mean)
    with pytest.raises(ValueError, match=r"fit\(accumulate=True\) needs one observation noise"):
        la.fit(case.loader(), accumulate=True)
    with pytest.raises(
        ValueError, match="a fitted wrapper as prior_mean needs one observation noise"
    ):
        LaplaceWrapper(case.model, "regression", structure="full", prior_mean=la)
