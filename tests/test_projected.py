"""Projected (null-space) posterior against dense references, and alternating projections.

References are computed another way than the library: the kernel of the stacked Jacobian from
``torch.func.jacrev`` (``dense_jacobian``) and an SVD, the GGN from ``dense_ggn``, and the
covariance of a non-scalar prior by conditioning, K (Kᵀ D K)⁻¹ Kᵀ with K a kernel basis.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import make_case
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.collectors import KernelMetric, ProjectedExactCollector
from laplace_ggn.functional import FunctionalModel, resolve_subset
from laplace_ggn.marglik import SpectralEvidence
from laplace_ggn.posteriors import PriorKind, ProjectedPosterior
from laplace_ggn.posteriors.alternating import alternating_projection
from laplace_ggn.testing import check_posterior, dense_ggn, dense_jacobian

DT = torch.float64


def _dead_unit_case(n: int = 20) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Tanh MLP 3-4-3 whose last hidden unit feeds nothing: N·C > P and a kernel of 4."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[2].weight[:, 3] = 0.0
    g = torch.Generator().manual_seed(4)
    X = torch.randn(n, 3, generator=g, dtype=DT)
    return model, X, torch.randint(0, 3, (n,), generator=g)


def _kernel_basis(model, X, tol=1e-10):
    """Orthonormal basis of the kernel of the stacked jacrev Jacobian, ``(P, P - R)``."""
    J = dense_jacobian(model, X).reshape(-1, sum(p.numel() for p in model.parameters()))
    _, S, Vh = torch.linalg.svd(J, full_matrices=True)
    r = int((S > tol * S[0]).sum())
    return Vh[r:].T, r


def _prior(kind, P, T):
    g = torch.Generator().manual_seed(7)
    if kind == "scalar":
        return torch.tensor(0.6, dtype=DT)
    return 0.3 + torch.rand(T if kind == "layerwise" else P, generator=g, dtype=DT)


PROBLEMS = {
    # name: (model, X, y, likelihood); rows N·C below P except for the last (Gram path)
    "regression": lambda: (*_case_xy("mlp_regression", 5), "regression"),
    "classification": lambda: (*_case_xy("mlp_classification", 4), "classification"),
    "binary": lambda: (*_case_xy("mlp_binary", 7), "binary"),
    "classification-gram": lambda: (*_dead_unit_case(), "classification"),
}


def _case_xy(name, n):
    case = make_case(name, 0, n=n)
    return case.model, case.X, case.y


@pytest.mark.parametrize("kind", ["scalar", "layerwise", "diagonal"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_projected_posterior_equals_the_dense_kernel_reference(problem, kind):
    model, X, y, lik = PROBLEMS[problem]()
    K, r = _kernel_basis(model, X)
    P = K.shape[0]
    assert 0 < K.shape[1] < P
    n_tensors = len(list(model.parameters()))
    prec = _prior(kind, P, n_tensors)
    la = LaplaceWrapper(model, lik, structure="projected", prior_precision=prec)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=3))
    post = la.posterior
    assert isinstance(post, ProjectedPosterior) and post.rank == r
    d = la.fitted.posterior.prior.diag()
    Sigma = K @ torch.linalg.solve(K.T @ (d[:, None] * K), K.T)  # prior conditioned on U^T θ = 0
    check_posterior(post, Sigma, rank=P - r, rtol=1e-8, atol=1e-10)
    G = dense_ggn(model, X, y, lik)
    # supported on the kernel of the GGN; for Gaussian and Bernoulli likelihoods it is all of it
    torch.testing.assert_close(G @ Sigma, torch.zeros_like(G), rtol=0, atol=1e-9)
    if lik != "classification":
        lam, U = torch.linalg.eigh(G)
        Pker = (
            torch.eye(P, dtype=DT) - U[:, lam > 1e-10 * lam.max()] @ U[:, lam > 1e-10 * lam.max()].T
        )
        torch.testing.assert_close(K @ K.T, Pker, rtol=0, atol=1e-9)
        if kind == "scalar":  # the limit of (sG + αI)⁻¹ as s grows
            limit = torch.linalg.inv(1e9 * G + 0.6 * torch.eye(P, dtype=DT))
            torch.testing.assert_close(la.posterior_covariance(), limit, rtol=0, atol=1e-6)


def test_training_predictions_of_every_sample_are_the_maps():
    model, X, y, _ = PROBLEMS["classification-gram"]()
    la = LaplaceWrapper(model, "classification", structure="projected", prior_precision=0.1)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=7))
    J = dense_jacobian(model, X)
    thetas = la.sample(50, generator=torch.Generator().manual_seed(0))
    delta = thetas - la.posterior.mean
    assert float(delta.abs().max()) > 1.0  # the samples do move
    torch.testing.assert_close(
        torch.einsum("bcp,sp->sbc", J, delta),
        torch.zeros(50, *J.shape[:2], dtype=DT),
        atol=1e-10,
        rtol=0,
    )
    torch.testing.assert_close(
        la.functional_covariance(X), torch.zeros(len(X), 3, 3, dtype=DT), atol=1e-12, rtol=0
    )
    with torch.no_grad():
        p_map = torch.softmax(model(X), -1)
    torch.testing.assert_close(la.predict(X).mean, p_map, rtol=1e-10, atol=1e-12)


def test_empty_kernel_gives_exactly_zero_covariance():
    case = make_case("mlp_classification")  # 36 rows, P = 31: J has full column rank
    la = LaplaceWrapper(case.model, "classification", structure="projected").fit(case.loader())
    assert la.posterior.rank == la.n_params
    assert bool((la.posterior_covariance() == 0).all())
    assert bool((la.sample(3) == la.posterior.mean).all())
    assert float(la.log_marginal_likelihood()) == pytest.approx(
        -la.fitted.statistics.loss_sum - 0.5 * float((la.posterior.mean**2).sum())
    )


def test_top_k_range_is_the_dense_top_k_eigenspace():
    model, X, y = _case_xy("mlp_regression", 6)  # 12 rows, P = 26: rank 12 <= k + 10
    la = LaplaceWrapper(model, "regression", structure="projected", rank=5).fit(
        DataLoader(TensorDataset(X, y), batch_size=4)
    )
    J = dense_jacobian(model, X).reshape(-1, 26)
    lam, V = torch.linalg.eigh(J.T @ J)
    top = V[:, -5:]
    U = la.posterior.eigenvectors
    assert U.shape == (26, 5)
    torch.testing.assert_close(U @ U.T, top @ top.T, rtol=0, atol=1e-8)
    torch.testing.assert_close(la.posterior.eigenvalues, lam[-5:].flip(0), rtol=1e-8, atol=1e-10)


def test_evidence_is_the_limit_and_its_maximum_is_closed_form():
    model, X, y = _case_xy("mlp_classification", 4)
    la = LaplaceWrapper(model, "classification", structure="projected").fit(
        DataLoader(TensorDataset(X, y), batch_size=4)
    )
    R, P = la.posterior.rank, la.n_params
    th2 = float((la.posterior.mean**2).sum())
    for a in (0.3, 2.0):
        ref = -la.fitted.statistics.loss_sum - 0.5 * a * th2 + 0.5 * R * math.log(a)
        assert float(la.log_marginal_likelihood(a)) == pytest.approx(ref, rel=1e-12)
    la.optimize_prior_precision(n_steps=400, lr=0.05)
    assert float(la.prior_precision) == pytest.approx(R / th2, rel=1e-3)
    assert la.marglik_result_.shared_spectrum
    assert P - R > 0


def test_spectral_evidence_refuses_infinite_curvature_with_a_non_scalar_prior():
    model, X, y = _case_xy("mlp_classification", 4)
    la = LaplaceWrapper(model, "classification", structure="projected").fit(
        DataLoader(TensorDataset(X, y), batch_size=4)
    )
    lam = torch.full((la.n_params,), math.inf, dtype=DT)
    with pytest.raises(
        ValueError,
        match="lam may hold infinite curvatures with a scalar prior only; got kind='layerwise'",
    ):
        SpectralEvidence(
            lam,
            la.posterior.mean,
            la.fitted.statistics,
            la.fitted.likelihood,
            kind=PriorKind.LAYERWISE,
            layout=la.fitted.layout,
            temperature=1.0,
        )


# -- alternating projections ------------------------------------------------------------------


def _spread_case(lik: str):
    """Tanh MLP 8-4-C on 6 spread-out inputs: rows of different batches far from parallel."""
    C = 2 if lik == "regression" else 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, C)).double()
    g = torch.Generator().manual_seed(1)
    X = 2 * torch.randn(6, 8, generator=g, dtype=DT)
    if lik == "regression":
        return model, X, torch.randn(6, C, generator=g, dtype=DT)
    return model, X, torch.randint(0, C, (6,), generator=g)


@pytest.mark.parametrize("kind", ["scalar", "diagonal"])
@pytest.mark.parametrize("lik", ["regression", "classification"])
def test_alternating_projections_converge_to_the_exact_samples(lik, kind):
    model, X, y = _spread_case(lik)
    P = sum(p.numel() for p in model.parameters())
    la = LaplaceWrapper(model, lik, structure="projected", prior_precision=_prior(kind, P, 4))
    la.fit(DataLoader(TensorDataset(X, y), batch_size=6))
    assert 0 < la.posterior.rank < P
    exact = la.sample(5, generator=torch.Generator().manual_seed(11))
    shuffled = DataLoader(
        TensorDataset(X, y), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    streamed = la.sample_projected(
        5, shuffled, n_iterations=400, tol=1e-13, generator=torch.Generator().manual_seed(11)
    )
    torch.testing.assert_close(streamed, exact, rtol=0, atol=1e-9)


def test_alternating_projection_reports_its_convergence_and_splits_batches():
    model, X, y = _spread_case("regression")
    la = LaplaceWrapper(model, "regression", structure="projected").fit([(X, y)])
    V = torch.randn(la.n_params, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    U = la.posterior.eigenvectors
    # a budget of one sample's rows per step: the batch of 6 is projected in 6 sub-batches
    fm = FunctionalModel(model, la.fitted.layout, memory_budget=3 * 2 * la.n_params * 8)
    res = alternating_projection(fm, la.fitted.likelihood, [(X, y)], V, n_iterations=400, tol=1e-13)
    torch.testing.assert_close(res.projected, V - U @ (U.T @ V), rtol=0, atol=1e-9)
    assert res.converged and res.changes.ndim == 1 and float(res.changes[-1]) <= 1e-13
    whole = alternating_projection(
        la.fitted.fmodel, la.fitted.likelihood, [(X, y)], V, n_iterations=3
    )
    assert whole.converged and len(whole.changes) == 2  # one batch: exact after one cycle
    with pytest.warns(RuntimeWarning, match="alternating projections stopped after 1 cycles"):
        short = alternating_projection(
            fm, la.fitted.likelihood, [(X, y)], V, n_iterations=1, tol=0.0
        )
    assert not short.converged


def test_sample_projected_errors():
    model, X, y, lik = PROBLEMS["regression"]()
    loader = DataLoader(TensorDataset(X, y), batch_size=2)
    la = LaplaceWrapper(model, lik, structure="projected")
    with pytest.raises(RuntimeError, match=r"sample_projected\(\) needs a fitted posterior"):
        la.sample_projected(2, loader)
    la.fit(loader)
    with pytest.raises(ValueError, match="n must be a positive integer; got 0"):
        la.sample_projected(0, loader)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None; got int"):
        la.sample_projected(2, loader, generator=3)
    with pytest.raises(TypeError, match="train_loader must be re-iterable"):
        la.sample_projected(2, iter(loader))
    with pytest.raises(ValueError, match="n_iterations must be a positive integer; got 0"):
        la.sample_projected(2, loader, n_iterations=0)
    with pytest.raises(ValueError, match="tol must be a float >= 0; got -1"):
        la.sample_projected(2, loader, tol=-1.0)
    with pytest.raises(ValueError, match="train_loader must yield at least one batch"):
        la.sample_projected(2, [])
    with pytest.raises(ValueError, match="input in batch 0 must have the model's dtype"):
        la.sample_projected(2, [(X.float(), y)])
    bad = X.clone()
    bad[1, 0] = math.nan
    with pytest.raises(ValueError, match="input in batch 0 must be finite"):
        la.sample_projected(2, [(bad, y)])
    with pytest.raises(ValueError, match=r"V must have shape \(26, K\); got \(26,\)"):
        alternating_projection(
            la.fitted.fmodel, la.fitted.likelihood, loader, torch.zeros(26, dtype=DT)
        )
    other = LaplaceWrapper(model, lik, structure="diag").fit(loader)
    with pytest.raises(
        ValueError, match="sample_projected\\(\\) needs structure='projected'; got structure='diag'"
    ):
        other.sample_projected(2, loader)


# -- collectors ---------------------------------------------------------------------------------


def test_exact_collector_memory_budget_and_errors():
    model, X, y, lik = PROBLEMS["classification-gram"]()  # P = 31, 60 rows
    loader = DataLoader(TensorDataset(X, y), batch_size=5)
    with pytest.raises(
        ValueError, match=r"must keep all \d+ rows of length P=31 within the memory budget"
    ):
        LaplaceWrapper(model, lik, structure="projected", memory_budget=25 * 31 * 8).fit(loader)
    with pytest.raises(
        ValueError, match=r"must keep its \(31, 31\) Gram matrix within the memory budget"
    ):
        LaplaceWrapper(model, lik, structure="projected", memory_budget=30 * 31 * 8).fit(loader)
    fm = FunctionalModel(model, resolve_subset(model, "all"))
    col = ProjectedExactCollector(fm, KernelMetric(), memory_budget=1 << 20)
    with pytest.raises(RuntimeError, match="needs at least one update"):
        col.finalize()
    # rows gathered from two ranks whose Gram matrix is over the budget
    small = ProjectedExactCollector(fm, KernelMetric(), memory_budget=31 * 31 * 8 - 1)
    small.load_distributed_state(
        {"rows": torch.randn(40, 31, dtype=DT), "n_rows": torch.tensor([40.0])}
    )
    with pytest.raises(ValueError, match=r"Gram matrix within the memory budget .* by the ranks"):
        small.finalize()


def test_rows_and_gram_paths_give_the_same_range():
    model, X, y, _ = PROBLEMS["classification-gram"]()
    fm = FunctionalModel(model, resolve_subset(model, "all"))
    a = ProjectedExactCollector(fm, KernelMetric(), memory_budget=1 << 20)
    for i in range(0, 20, 5):
        a.update(X[i : i + 5])
    assert a.gram is not None and a.n_rows == 60
    b = ProjectedExactCollector(fm, KernelMetric(), memory_budget=1 << 20)
    b.load_distributed_state(
        {
            "rows": torch.cat(dense_jacobian(model, X).reshape(-1, 31).split(10))[:30],
            "n_rows": torch.tensor([30.0]),
        }
    )
    ea, eb = a.finalize(), b.finalize()  # 60 rows (Gram) and the first 10 points' 30 rows (SVD)
    Ka, _ = _kernel_basis(model, X)
    Kb, _ = _kernel_basis(model, X[:10])
    torch.testing.assert_close(
        ea.eigenvectors @ ea.eigenvectors.T, torch.eye(31, dtype=DT) - Ka @ Ka.T, rtol=0, atol=1e-9
    )
    torch.testing.assert_close(
        eb.eigenvectors @ eb.eigenvectors.T, torch.eye(31, dtype=DT) - Kb @ Kb.T, rtol=0, atol=1e-9
    )


# -- the predictive temperature -------------------------------------------------------------------


def _fit_clf(structure="kfac", n=12):
    case = make_case("mlp_classification", 2, n=n)
    return case, LaplaceWrapper(case.model, "classification", structure=structure).fit(
        case.loader()
    )


def _val_loader(model, n=30, seed=5):
    """Inputs labelled by the model's arg-max, a third of them at random: a finite best T."""
    g = torch.Generator().manual_seed(seed)
    X = 3 * torch.randn(n, 3, generator=g, dtype=DT)
    with torch.no_grad():
        y = model(X).argmax(-1)
    y[: n // 3] = torch.randint(0, 3, (n // 3,), generator=g)
    return X, y


def test_marglik_temperature_tunes_the_evidence_and_the_validation_nll():
    case, la = _fit_clf("full")
    Xv, yv = _val_loader(case.model)
    ref = LaplaceWrapper(case.model, "classification", structure="full").fit(case.loader())
    ref.optimize_prior_precision("marglik")
    la.optimize_prior_precision(
        "marglik_temperature", val_loader=DataLoader(TensorDataset(Xv, yv), batch_size=10)
    )
    assert torch.equal(la.prior_precision, ref.prior_precision)
    T = float(la.predictive_temperature)
    assert T == float(la.temperature_result_.temperature) and T != 1.0
    untempered = ref.predict(Xv).mean
    nll = lambda t: float(
        -torch.log(torch.softmax(torch.log(untempered) / t, -1)[range(30), yv]).mean()
    )

    def objective(t):  # summed NLL + half a uniform-label point + N(0, 1) prior on log T
        p_t = torch.softmax(torch.log(untempered) / t, -1)
        return 30 * nll(t) - 0.5 * float(p_t.log().mean()) + 0.5 * math.log(t) ** 2

    grid = torch.logspace(-2, 2, 2001).tolist()
    assert objective(T) <= min(objective(t) for t in grid) + 1e-9
    assert la.temperature_result_.regularized and la.temperature_result_.at_edge is None
    assert la.temperature_result_.nll == pytest.approx(nll(T), rel=1e-10)
    assert la.temperature_result_.nll_untempered == pytest.approx(nll(1.0), rel=1e-10)
    p = la.predict(Xv)
    torch.testing.assert_close(
        p.mean, torch.softmax(torch.log(untempered) / T, -1), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(p.mean.argmax(-1), untempered.argmax(-1))
    torch.testing.assert_close(p.mean.sum(-1), torch.ones(30, dtype=DT))
    assert bool((p.variance >= 0).all()) and bool((p.variance <= p.mean * (1 - p.mean)).all())
    state = la.state_dict()
    assert state["predictive_temperature"] == T
    again = LaplaceWrapper.from_state_dict(case.model, state)
    assert torch.equal(again.predict(Xv).mean, p.mean)
    la.optimize_prior_precision("marglik")  # tunes the posterior alone: T back to 1
    assert float(la.predictive_temperature) == 1.0


def test_binary_temperature_and_nn_predictive():
    case = make_case("mlp_binary", 1, n=16)
    la = LaplaceWrapper(case.model, "binary", structure="diag").fit(case.loader())
    val = make_case("mlp_binary", 6, n=20)
    la.optimize_prior_precision(
        "marglik_temperature",
        val_loader=val.loader(),
        predict_method="nn",
        n_samples=20,
        generator=torch.Generator().manual_seed(0),
    )
    T = float(la.predictive_temperature)
    base = la.predict(val.X, "nn", n_samples=20, generator=torch.Generator().manual_seed(1))
    la.set_hyperparameters(predictive_temperature=1.0)
    raw = la.predict(val.X, "nn", n_samples=20, generator=torch.Generator().manual_seed(1))
    logit = torch.log(raw.mean) - torch.log1p(-raw.mean)
    torch.testing.assert_close(base.mean, torch.sigmoid(logit / T), rtol=1e-10, atol=1e-12)


def test_temperature_errors_leave_the_state_unchanged(monkeypatch):
    case, la = _fit_clf("diag")
    val = case.loader()
    with pytest.raises(
        ValueError, match="val_loader must be given with method='marglik_temperature'"
    ):
        la.optimize_prior_precision("marglik_temperature")
    with pytest.raises(
        ValueError,
        match="grid must be left unset with method='marglik_temperature'.*method='gridsearch'",
    ):
        la.optimize_prior_precision("marglik_temperature", val_loader=val, grid=[1.0])
    with pytest.raises(
        ValueError,
        match="tune_sigma_noise must be left unset with method='marglik_temperature'.*method='marglik'",
    ):
        la.optimize_prior_precision("marglik_temperature", val_loader=val, tune_sigma_noise=True)
    with pytest.raises(ValueError, match="val_loader must yield at least one batch"):
        la.optimize_prior_precision("marglik_temperature", val_loader=[])
    with pytest.raises(TypeError, match="val_loader must be an iterable of batches"):
        la.optimize_prior_precision("marglik_temperature", val_loader=3)
    reg = make_case("mlp_regression")
    lr_ = LaplaceWrapper(reg.model, "regression", structure="diag").fit(reg.loader())
    with pytest.raises(
        ValueError,
        match="method='marglik_temperature' needs likelihood 'classification' or 'binary'",
    ):
        lr_.optimize_prior_precision("marglik_temperature", val_loader=reg.loader())
    with pytest.raises(
        ValueError,
        match="predictive_temperature applies to likelihood 'classification' or 'binary'",
    ):
        lr_.set_hyperparameters(predictive_temperature=2.0)
    with pytest.raises(TypeError, match="predictive_temperature must be a float; got str"):
        la.set_hyperparameters(predictive_temperature="hot")
    with pytest.raises(
        ValueError, match=r"predictive_temperature must be a scalar; got shape \(2,\)"
    ):
        la.set_hyperparameters(predictive_temperature=torch.ones(2))
    with pytest.raises(
        ValueError, match=r"predictive_temperature must be finite and > 0; got \[0.0\]"
    ):
        la.set_hyperparameters(predictive_temperature=0.0)
    import laplace_ggn.marglik.tempering as ml

    la.set_hyperparameters(prior_precision=2.0, predictive_temperature=0.5)

    def fail(*args, **kwargs):
        raise RuntimeError("predictive temperature tuning must find a finite validation NLL")

    monkeypatch.setattr(ml, "tune_predictive_temperature", fail)
    with pytest.raises(RuntimeError, match="finite validation NLL"):
        la.optimize_prior_precision("marglik_temperature", val_loader=val)
    assert float(la.prior_precision) == 2.0 and float(la.predictive_temperature) == 0.5
    assert not hasattr(la, "temperature_result_")


def test_tune_predictive_temperature_errors():
    from laplace_ggn.marglik import tune_predictive_temperature

    with pytest.raises(ValueError, match="val_loader must hold at least one data point"):
        tune_predictive_temperature(torch.zeros(0, 3, dtype=DT), torch.zeros(0, dtype=torch.long))
    nan = torch.full((2, 2), math.nan, dtype=DT)
    with pytest.raises(
        RuntimeError, match="predictive temperature tuning must find a finite validation NLL"
    ):
        tune_predictive_temperature(nan, torch.tensor([0, 1]))


def test_state_dict_round_trip_with_a_layerwise_prior():
    case = make_case("mlp_regression", 0, n=5)
    prec = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=DT)
    la = LaplaceWrapper(case.model, "regression", structure="projected", prior_precision=prec)
    la.fit(case.loader(2))
    again = LaplaceWrapper.from_state_dict(case.model, la.state_dict())
    assert again.posterior.rank == la.posterior.rank
    assert torch.equal(again.posterior_covariance(), la.posterior_covariance())
    assert torch.equal(again.log_marginal_likelihood(), la.log_marginal_likelihood())
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert torch.equal(again.sample(3, generator=g1), la.sample(3, generator=g2))


def test_saved_states_of_the_projected_structure_are_validated():
    case = make_case("mlp_regression", 0, n=5)
    la = LaplaceWrapper(case.model, "regression", structure="projected", rank=3)
    state = la.fit(case.loader(2)).state_dict()
    again = LaplaceWrapper.from_state_dict(case.model, state)
    assert again.rank == 3 and torch.equal(again.posterior_covariance(), la.posterior_covariance())
    bad = dict(
        state, posterior=dict(state["posterior"], eigenvalues=-state["posterior"]["eigenvalues"])
    )
    with pytest.raises(ValueError, match=r"state\['posterior'\]\['eigenvalues'\] must be a vector"):
        LaplaceWrapper.from_state_dict(case.model, bad)
    with pytest.raises(TypeError, match=r"state\['predictive_temperature'\] must be a float"):
        LaplaceWrapper.from_state_dict(case.model, dict(state, predictive_temperature="hot"))
    with pytest.raises(
        ValueError, match=r"state\['predictive_temperature'\] must be finite and > 0"
    ):
        LaplaceWrapper.from_state_dict(case.model, dict(state, predictive_temperature=-1.0))
    with pytest.raises(ValueError, match="predictive_temperature applies to likelihood"):
        LaplaceWrapper.from_state_dict(case.model, dict(state, predictive_temperature=2.0))
    old = {k: v for k, v in state.items() if k != "predictive_temperature"}  # written before T
    assert float(LaplaceWrapper.from_state_dict(case.model, old).predictive_temperature) == 1.0
