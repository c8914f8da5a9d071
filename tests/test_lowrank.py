"""Low-rank (Woodbury) posterior: exact and top-k (Nyström) eigenpairs, priors, memory refusal,
failed factorisations."""

from __future__ import annotations

import pytest
import torch
from cases import (
    CASE_NAMES,
    make_case,
)

from laplace_ggn import LaplaceWrapper
from laplace_ggn._checks import Likelihood
from laplace_ggn.collectors import ExactLowRankCollector, NystromCollector
from laplace_ggn.functional import FunctionalModel, resolve_subset
from laplace_ggn.likelihoods import get_likelihood
from laplace_ggn.posteriors import LowRankPosterior, make_prior
from laplace_ggn.testing import check_posterior, dense_ggn, dense_posterior_covariance

TOL = {"rtol": 1e-7, "atol": 1e-9}
CPU = torch.device("cpu")


def _prior(kind: str, layout, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "scalar":
        prec = 0.9
    elif kind == "layerwise":
        prec = 0.3 + torch.rand(len(layout.names), generator=g, dtype=torch.float64)
    else:
        prec = 0.3 + torch.rand(layout.n_params, generator=g, dtype=torch.float64)
    return make_prior(prec, layout, dtype=torch.float64, device=CPU)


def _fit(case, rank, *, batch=5, oversampling=10):
    layout = resolve_subset(case.model, "all")
    fm = FunctionalModel(case.model, layout)
    lik = get_likelihood(Likelihood(case.likelihood))
    if rank is None:
        col = ExactLowRankCollector(fm, lik, memory_budget=1 << 30)
    else:
        col = NystromCollector(fm, lik, rank=rank, oversampling=oversampling)
    for i in range(0, case.X.shape[0], batch):
        col.update(case.X[i : i + batch])
    return col.finalize(), fm


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise", "diagonal"])
def test_exact_lowrank_equals_full(case, prior_kind):
    E, fm = _fit(case, None)
    prior = _prior(prior_kind, fm.layout)
    post = LowRankPosterior(fm.theta, E.eigenvalues, E.eigenvectors, prior, scale=0.7)
    G = dense_ggn(case.model, case.X, case.y, case.likelihood)
    check_posterior(post, dense_posterior_covariance(G, prior.diag(), 0.7), **TOL)


def test_exact_eigenpairs_are_those_of_the_ggn_range(case):
    E, _ = _fit(case, None)
    G = dense_ggn(case.model, case.X, case.y, case.likelihood)
    lam, U = torch.linalg.eigh(G)
    r = int((lam > 1e-10 * lam.max()).sum())
    assert E.eigenvalues.shape == (r,) and E.eigenvectors.shape == (G.shape[0], r)
    torch.testing.assert_close(E.eigenvalues, lam.flip(0)[:r], rtol=1e-8, atol=1e-10)
    # the spanned subspace is the range of G; U Uᵀ is the projector on it (its error grows
    # like eps·λ_max/λ_r, the conditioning of the smallest kept eigenvalue)
    Ur = U[:, -r:]
    tol = 1e-13 * float(lam.max() / lam[-r])
    torch.testing.assert_close(
        E.eigenvectors @ E.eigenvectors.T, Ur @ Ur.T, rtol=0, atol=max(tol, 1e-9)
    )
    torch.testing.assert_close(
        E.eigenvectors @ torch.diag(E.eigenvalues) @ E.eigenvectors.T, G, rtol=1e-8, atol=1e-10
    )


@pytest.mark.parametrize("prior_kind", ["scalar", "diagonal"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_topk_with_k_equal_rank_equals_full(name, prior_kind):
    case = make_case(name)
    G = dense_ggn(case.model, case.X, case.y, case.likelihood)
    lam = torch.linalg.eigvalsh(G)
    r = int((lam > 1e-10 * lam.max()).sum())
    E, fm = _fit(case, r, oversampling=0)
    prior = _prior(prior_kind, fm.layout)
    post = LowRankPosterior(fm.theta, E.eigenvalues, E.eigenvectors, prior, scale=1.3)
    check_posterior(post, dense_posterior_covariance(G, prior.diag(), 1.3), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["mlp_regression", "mlp_classification"])
def test_topk_eigenpairs_match_eigh(name):
    case = make_case(name, n=30)
    G = dense_ggn(case.model, case.X, case.y, case.likelihood)
    lam, U = torch.linalg.eigh(G)
    lam, U = lam.flip(0), U.flip(1)
    k = 3
    E, _ = _fit(case, k, batch=7, oversampling=20)
    torch.testing.assert_close(E.eigenvalues, lam[:k], rtol=1e-3, atol=0)
    cos = (E.eigenvectors.T @ U[:, :k]).diagonal().abs()
    assert float(cos.min()) > 0.999, cos
    torch.testing.assert_close(
        E.eigenvectors.T @ E.eigenvectors, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10
    )
    # more sketch columns than rank(G): the eigenpairs are exact
    r = int((lam > 1e-10 * lam[0]).sum())
    E2, _ = _fit(case, k, batch=7, oversampling=r)
    torch.testing.assert_close(E2.eigenvalues, lam[:k], rtol=1e-8, atol=0)
    torch.testing.assert_close(
        (E2.eigenvectors.T @ U[:, :k]).diagonal().abs(),
        torch.ones(k, dtype=torch.float64),
        rtol=0,
        atol=1e-8,
    )


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise", "diagonal"])
def test_topk_posterior_matches_its_dense_form(prior_kind):
    case = make_case("mlp_classification", seed=1)
    E, fm = _fit(case, 4)
    prior = _prior(prior_kind, fm.layout, seed=2)
    post = LowRankPosterior(fm.theta, E.eigenvalues, E.eigenvectors, prior, scale=0.5)
    U, lam = E.eigenvectors, E.eigenvalues
    Sigma = dense_posterior_covariance(U @ torch.diag(lam) @ U.T, prior.diag(), 0.5)
    check_posterior(post, Sigma, **TOL)
    assert post.rank == 4
    # with_prior reuses the eigenpairs
    p2 = _prior("scalar", fm.layout)
    torch.testing.assert_close(
        post.with_prior(p2, 1.0).to_dense(),
        dense_posterior_covariance(U @ torch.diag(lam) @ U.T, p2.diag(), 1.0),
        **TOL,
    )
    assert post.with_prior(p2).eigenvectors is post.eigenvectors


def test_wrapper_exposes_eigenpairs_and_round_trips():
    case = make_case("mlp_regression")
    la = LaplaceWrapper(
        case.model, "regression", structure="lowrank", rank=5, sigma_noise=0.7, prior_precision=0.4
    ).fit(case.loader())
    post = la.posterior
    assert post.eigenvalues.shape == (5,) and post.eigenvectors.shape == (la.n_params, 5)
    assert bool((post.eigenvalues[:-1] >= post.eigenvalues[1:]).all())
    la2 = LaplaceWrapper.from_state_dict(case.model, la.state_dict())
    torch.testing.assert_close(la2.posterior.to_dense(), post.to_dense(), rtol=0, atol=0)


def test_exact_lowrank_memory_refusal_names_the_figure_and_rank():
    case = make_case("mlp_classification")
    P = sum(p.numel() for p in case.model.parameters())
    # room for the first batch of 5·3 rows, not for the second
    budget = 20 * P * 8
    la = LaplaceWrapper(case.model, "classification", structure="lowrank", memory_budget=budget)
    with pytest.raises(ValueError, match=r"rows.*GB.*Pass rank=k") as err:
        la.fit(case.loader(batch_size=5))
    assert "batch 1" in str(err.value)
    assert not la.is_fitted
    # the suggested top-k structure needs 2·P·(k + 10) numbers, independent of N
    la_k = LaplaceWrapper(
        case.model, "classification", structure="lowrank", rank=3, memory_budget=2 * P * 13 * 8
    ).fit(case.loader(batch_size=5))
    assert la_k.sample(2).shape == (2, P)


def test_collectors_refuse_finalize_before_data():
    case = make_case("mlp_regression")
    fm = FunctionalModel(case.model, resolve_subset(case.model, "all"))
    lik = get_likelihood(Likelihood.REGRESSION)
    with pytest.raises(RuntimeError, match="needs at least one update"):
        ExactLowRankCollector(fm, lik, memory_budget=1 << 20).finalize()
    with pytest.raises(RuntimeError, match="needs at least one update"):
        NystromCollector(fm, lik, rank=2).finalize()


@pytest.mark.parametrize("rank", [None, 4])
def test_distributed_state_reduces_to_single_process_fit(rank):
    case = make_case("mlp_classification", n=13)
    layout = resolve_subset(case.model, "all")
    lik = get_likelihood(Likelihood.CLASSIFICATION)

    def make():
        fm = FunctionalModel(case.model, layout)
        if rank is None:
            return ExactLowRankCollector(fm, lik, memory_budget=1 << 30)
        return NystromCollector(fm, lik, rank=rank)

    single = make()
    single.update(case.X)
    ranks = [make(), make()]
    ranks[0].update(case.X[:6])
    ranks[1].update(case.X[6:])
    states = [r.distributed_state() for r in ranks]
    reduced = {}
    for k, (t, op) in states[0].items():
        other = states[1][k][0]
        reduced[k] = t + other if op == "sum" else torch.cat([t, other])
    empty = make()  # a rank with an empty shard: zeros / zero rows of the same shapes
    for k, (t, op) in empty.distributed_state().items():
        ref = states[0][k][0]
        assert op == states[0][k][1] and float(t.abs().sum()) == 0
        assert t.shape[1:] == ref.shape[1:] and (
            t.shape[0] == 0 if op == "gather" else t.shape == ref.shape
        )
    empty.load_distributed_state(reduced)
    ranks[0].load_distributed_state(reduced)
    a, b = ranks[0].finalize(), single.finalize()
    c = empty.finalize()
    torch.testing.assert_close(c.eigenvalues, b.eigenvalues, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        a.eigenvectors @ torch.diag(a.eigenvalues) @ a.eigenvectors.T,
        b.eigenvectors @ torch.diag(b.eigenvalues) @ b.eigenvectors.T,
        rtol=1e-8,
        atol=1e-10,
    )


# -- float32 with small prior precisions: squared forms, no cancellation ------------------------


def _float32_lowrank(prec, dtype):
    """Posterior with exact eigenpairs (R = 10 of P = 40) and Jacobians in and outside range(U)."""
    from laplace_ggn.functional import ParamLayout

    P, R = 40, 10
    layout = ParamLayout(("w", "b"), (torch.Size([30]), torch.Size([10])))
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(P, R, generator=g, dtype=torch.float64))[0]
    lam = torch.logspace(0, 2, R, dtype=torch.float64)
    J_in = torch.randn(4, 2, R, generator=g, dtype=torch.float64) @ U.T  # training-like rows
    J_out = torch.randn(2, 2, P, generator=g, dtype=torch.float64)
    prior = make_prior(prec, layout, dtype=dtype, device=CPU)
    post = LowRankPosterior(torch.zeros(P, dtype=dtype), lam.to(dtype), U.to(dtype), prior)
    return post, torch.cat([J_in, J_out]).to(dtype)


@pytest.mark.parametrize(
    "prec,accurate",
    [
        (1e-12, False),
        (1e-6, True),
        (1e-3, True),
        (1e12, True),
        (torch.tensor([1e6, 1e-6]), True),
        (torch.tensor([1e-12, 1e2]), False),
    ],
    ids=["1e-12", "1e-6", "1e-3", "1e12", "layerwise-1e6-1e-6", "layerwise-1e-12-1e2"],
)
def test_float32_small_prior_gives_psd_covariances_without_cancellation(prec, accurate):
    post, J = _float32_lowrank(prec, torch.float32)
    ref, J64 = _float32_lowrank(prec, torch.float64)
    fc = post.functional_covariance(J)
    var = torch.diagonal(fc, dim1=1, dim2=2)
    assert bool((var >= 0).all()), var  # J J^T - J U U^T J^T gave -1.9e6 at alpha = 1e-12
    assert float(torch.linalg.eigvalsh(fc.double()).min()) >= -1e-5 * float(var.max())
    assert bool((post.variance() >= 0).all()) and bool((post.to_dense().diagonal() >= 0).all())
    S64 = ref.covariance_sqrt_rows(J64.reshape(-1, J64.shape[-1]))  # S S^T = Sigma
    torch.testing.assert_close(
        S64 @ S64.T,
        J64.reshape(-1, 40) @ ref.covariance_matvec(J64.reshape(-1, 40).T),
        rtol=1e-9,
        atol=1e-9 * float((S64**2).sum(-1).max()),
    )
    assert bool(torch.isfinite(post.sample(3, generator=torch.Generator().manual_seed(0))).all())
    if accurate:  # the float32 result is the float64 one to float32 rounding
        fc64 = ref.functional_covariance(J64)
        torch.testing.assert_close(
            fc.double(), fc64, rtol=1e-4, atol=1e-4 * float(fc64.abs().max())
        )
        torch.testing.assert_close(
            post.to_dense().diagonal().double(), ref.to_dense().diagonal(), rtol=1e-4, atol=0
        )


# -- factorisation failures ------------------------------------------------------------------------


def test_failed_factorisation_of_the_curvature_is_a_named_runtime_error(monkeypatch):
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure="lowrank", rank=3)

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    with pytest.raises(
        RuntimeError,
        match=r"curvature of structure='lowrank' must be factorisable; torch\.linalg failed "
        r"\(linalg\.eigh: The algorithm failed to converge\)\.",
    ) as info:
        la.fit(case.loader())
    assert type(info.value) is RuntimeError and not la.is_fitted
