"""Full and diagonal posteriors against their dense forms, for every prior structure."""

import pytest
import torch

from laplace_ggn.functional import ParamLayout
from laplace_ggn.posteriors import DiagPosterior, FullPosterior, make_prior
from laplace_ggn.testing import check_posterior, dense_posterior_covariance

LAYOUT = ParamLayout(("a", "b", "c"), (torch.Size([3, 2]), torch.Size([3]), torch.Size([2])))
P = LAYOUT.n_params


def _prior(kind, g):
    if kind == "scalar":
        return make_prior(0.7, LAYOUT, dtype=torch.float64, device=torch.device("cpu"))
    if kind == "layerwise":
        prec = torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64)
    else:
        prec = 0.3 + torch.rand(P, dtype=torch.float64, generator=g)
    return make_prior(prec, LAYOUT, dtype=torch.float64, device=torch.device("cpu"))


def _ggn(g, rank=None):
    A = torch.randn(P, rank or P, dtype=torch.float64, generator=g)
    return A @ A.T


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise", "diagonal"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eigenbasis", [False, True], ids=["cholesky", "eigh"])
def test_full_posterior_battery(prior_kind, scale, seed, eigenbasis):
    g = torch.Generator().manual_seed(seed)
    G = _ggn(g, rank=4)  # singular G: the prior must regularise
    prior = _prior(prior_kind, g)
    mean = torch.randn(P, dtype=torch.float64, generator=g)
    post = FullPosterior(mean, G, prior, scale)
    if eigenbasis:
        _ = post.eig  # computed for another caller: must change nothing below
    Sigma = dense_posterior_covariance(G, prior.diag(), scale)
    check_posterior(post, Sigma, rtol=1e-6, atol=1e-9, seed=seed)


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise", "diagonal"])
@pytest.mark.parametrize("seed", [0, 1])
def test_diag_posterior_battery(prior_kind, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(P, dtype=torch.float64, generator=g) * 3
    prior = _prior(prior_kind, g)
    mean = torch.randn(P, dtype=torch.float64, generator=g)
    post = DiagPosterior(mean, d, prior, 0.5)
    Sigma = dense_posterior_covariance(torch.diag(d), prior.diag(), 0.5)
    check_posterior(post, Sigma, seed=seed)


def test_with_prior_reuses_eigendecomposition_and_is_new_object():
    g = torch.Generator().manual_seed(0)
    G = _ggn(g)
    mean = torch.zeros(P, dtype=torch.float64)
    post = FullPosterior(mean, G, _prior("scalar", g))
    _ = post.log_det()
    assert "eig" not in post._cache  # the log determinant needs eigenvalues only
    new = post.with_prior(make_prior(3.0, LAYOUT, dtype=torch.float64, device=torch.device("cpu")))
    assert new.eigenvalues is post.eigenvalues
    assert new is not post and new.eig is post.eig
    Sigma = dense_posterior_covariance(G, 3.0)
    torch.testing.assert_close(new.to_dense(), Sigma, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(post.to_dense(), dense_posterior_covariance(G, 0.7))


def test_log_det_differentiable_in_prior_and_scale():
    g = torch.Generator().manual_seed(0)
    G = _ggn(g)
    mean = torch.zeros(P, dtype=torch.float64)
    for prec in [
        torch.tensor(0.8, dtype=torch.float64),
        torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64),
    ]:
        prec = prec.clone().requires_grad_(True)
        scale = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        post = FullPosterior(
            mean,
            G,
            make_prior(prec, LAYOUT, dtype=torch.float64, device=torch.device("cpu")),
            scale,
        )
        gp, gs = torch.autograd.grad(post.log_det(), (prec, scale))
        Lam = lambda p, s: (
            s * G + torch.diag(LAYOUT.expand_per_tensor(p.expand(3)) if p.ndim else p.expand(P))
        )  # noqa: E731
        ref = torch.autograd.functional.jacobian(
            lambda p, s: torch.logdet(Lam(p, s)), (prec.detach(), scale.detach())
        )
        torch.testing.assert_close(gp, ref[0], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(gs, ref[1], rtol=1e-8, atol=1e-10)


def test_prior_validation():
    dev, dt = torch.device("cpu"), torch.float64
    with pytest.raises(ValueError, match=r"scalar, or have shape \(3,\).*or \(11,\).*got \(4,\)"):
        make_prior(torch.ones(4), LAYOUT, dtype=dt, device=dev)
    with pytest.raises(ValueError, match=r"prior_precision must be finite and > 0; got \[-1.0\]"):
        make_prior(-1.0, LAYOUT, dtype=dt, device=dev)
    with pytest.raises(TypeError, match="prior_precision must be a float or a tensor; got str"):
        make_prior("1", LAYOUT, dtype=dt, device=dev)


def test_posterior_shape_errors():
    g = torch.Generator().manual_seed(0)
    post = FullPosterior(torch.zeros(P, dtype=torch.float64), _ggn(g), _prior("scalar", g))
    with pytest.raises(ValueError, match=r"J must have shape \(B, C, 11\); got \(2, 3, 10\)"):
        post.functional_covariance(torch.zeros(2, 3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"V must have shape \(11,\) or \(11, K\); got \(5,\)"):
        post.covariance_matvec(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="n must be a positive integer; got 0"):
        post.sample(0)


def test_robust_cholesky_jitter_then_error():
    from laplace_ggn.posteriors._common import robust_cholesky

    A = torch.diag(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="not positive definite; added jitter"):
        L = robust_cholesky(A, "test matrix")
    assert torch.isfinite(L).all()
    with pytest.raises(RuntimeError, match="test matrix must be positive definite"):
        robust_cholesky(-torch.eye(3, dtype=torch.float64), "test matrix")


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise"])
def test_full_results_ignore_which_factorisation_was_computed_before(prior_kind):
    # the scalar-prior posterior used to switch to the eigenbasis once `eig` was known
    g = torch.Generator().manual_seed(0)
    G = _ggn(g, rank=4)
    prior = _prior(prior_kind, g)
    mean = torch.randn(P, dtype=torch.float64, generator=g)
    J = torch.randn(2, 3, P, dtype=torch.float64, generator=g)
    V = torch.randn(P, 2, dtype=torch.float64, generator=g)

    def outputs(post):
        gen = torch.Generator().manual_seed(1)
        return [
            post.sample(5, generator=gen),
            post.functional_covariance(J),
            post.covariance_matvec(V),
            post.to_dense(),
            post.log_det(),
        ]

    ref = outputs(FullPosterior(mean, G, prior, 0.5))
    post = FullPosterior(mean, G, prior, 0.5)
    _ = post.eig
    seen = FullPosterior(mean, G, prior, 0.5, eig=post.eig)
    derived = FullPosterior(mean, G, _prior("scalar", g), 2.0, eig=post.eig).with_prior(prior, 0.5)
    for other in (post, seen, derived):
        for a, b in zip(ref, outputs(other)):
            assert torch.equal(a, b)
