"""Monte-Carlo curvature, Linear-head products and the exact path's memory refusal."""

import math
from dataclasses import replace

import pytest
import torch
from cases import make_case
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn._checks import Curvature, Likelihood, Link
from laplace_ggn.fit_options import FitOptions
from laplace_ggn.likelihoods import OutputCurvature, get_likelihood
from laplace_ggn.posteriors._output import KronHeadOutputCovariance
from laplace_ggn.predictive import glm_from_moments
from laplace_ggn.testing import dense_ggn, dense_jacobian

TOL = {"rtol": 1e-9, "atol": 1e-12}


def _curvature(la):
    post = la.posterior
    if la.structure == "full":
        return post.ggn
    if la.structure == "diag":
        return torch.diag(post.ggn_diag)
    if la.structure == "kfac":
        return post.curvature.to_dense()
    return post.eigenvectors @ torch.diag(post.eigenvalues) @ post.eigenvectors.T


# ---------------------------------------------------------------------------------------------
# Monte-Carlo curvature
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "lowrank"])
def test_mc_curvature_is_unbiased(structure):
    """Mean of R seeded fits (S draws each) vs the exact curvature, entry by entry."""
    case = make_case("mlp_classification")
    exact = LaplaceWrapper(case.model, "classification", structure=structure).fit(case.loader())
    ref = _curvature(exact)
    if structure != "kfac":  # the exact reference is the dense GGN (or its diagonal)
        G = dense_ggn(case.model, case.X, case.y, "classification")
        torch.testing.assert_close(ref, torch.diag(G.diagonal()) if structure == "diag" else G)
    R, S = 40, 25
    draws = []
    for seed in range(R):
        la = LaplaceWrapper(
            case.model, "classification", structure=structure, curvature="mc", n_mc_samples=S
        )
        la.fit(case.loader(), generator=torch.Generator().manual_seed(seed))
        draws.append(_curvature(la))
    D = torch.stack(draws)
    se = D.std(0) / math.sqrt(R)
    live = se > 1e-9 * float(ref.abs().max())
    z = (D.mean(0) - ref)[live] / se[live]
    assert float(z.abs().max()) < 5.0  # honest: the SE is estimated from the R fits
    assert 0.4 < float(z.pow(2).mean()) < 2.5
    assert float(se.max()) < 0.02 * float(ref.abs().max())  # power: a 5% bias would fail
    assert bool((ref[~live] == 0).all())  # entries without variance are exact zeros


@pytest.mark.parametrize("likelihood", ["regression", "binary"])
def test_mc_other_likelihoods_are_unbiased(likelihood):
    case = make_case("mlp_regression" if likelihood == "regression" else "mlp_binary")
    G = dense_ggn(case.model, case.X, case.y, likelihood)
    draws = [
        LaplaceWrapper(case.model, likelihood, structure="full", curvature="mc", n_mc_samples=25)
        .fit(case.loader(), generator=torch.Generator().manual_seed(seed))
        .posterior.ggn
        for seed in range(40)
    ]
    D = torch.stack(draws)
    se = D.std(0) / math.sqrt(len(draws))
    live = se > 1e-12
    z = (D.mean(0) - G)[live] / se[live]
    assert float(z.abs().max()) < 5.0
    assert 0.4 < float(z.pow(2).mean()) < 2.5


def test_mc_structures_share_the_draws():
    """One seed: every structure sees the same sampled factor, so they agree exactly."""
    case = make_case("mlp_classification")

    def fit(structure, rank=None):
        la = LaplaceWrapper(
            case.model,
            "classification",
            structure=structure,
            rank=rank,
            curvature="mc",
            n_mc_samples=3,
        )
        return _curvature(la.fit(case.loader(), generator=torch.Generator().manual_seed(7)))

    G = fit("full")
    P = G.shape[0]
    torch.testing.assert_close(fit("diag"), torch.diag(G.diagonal()), **TOL)
    torch.testing.assert_close(fit("lowrank"), G, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fit("lowrank", rank=P), G, rtol=1e-7, atol=1e-9)
    assert not torch.equal(G, G.new_zeros(P, P))


def test_mc_is_seeded_and_reproducible():
    case = make_case("mlp_classification")

    def ggn(seed):
        la = LaplaceWrapper(case.model, "classification", structure="kfac", curvature="mc")
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return la.fit(case.loader(), generator=gen).posterior.curvature.to_dense()

    torch.testing.assert_close(ggn(3), ggn(3), rtol=0, atol=0)
    assert not torch.equal(ggn(3), ggn(4))
    assert ggn(None).shape == ggn(3).shape


def test_mc_factor_columns_and_expectation():
    f = torch.randn(5, 4, dtype=torch.float64)
    lik = get_likelihood(Likelihood.CLASSIFICATION)
    exact = OutputCurvature(lik).factor(f)
    assert exact.shape == (5, 4, 4)
    mc = OutputCurvature(
        lik, curvature=Curvature.MC, n_samples=20000, generator=torch.Generator().manual_seed(0)
    ).factor(f)
    assert mc.shape == (5, 4, 20000)  # K = S columns: cost grows with S, not C
    Lam = lik.hessian(f)
    torch.testing.assert_close(exact @ exact.transpose(1, 2), Lam, **TOL)
    torch.testing.assert_close(mc @ mc.transpose(1, 2), Lam, rtol=0, atol=0.02)


def test_curvature_options_are_validated():
    model = make_case("mlp_classification").model
    with pytest.raises(ValueError, match=r"curvature must be one of \['ggn', 'mc'\]; got 'fisher'"):
        LaplaceWrapper(model, curvature="fisher")
    with pytest.raises(
        ValueError, match=r"n_mc_samples applies to curvature='mc' only; got n_mc_samples=4"
    ):
        LaplaceWrapper(model, n_mc_samples=4)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"n_mc_samples must be a positive integer"):
            LaplaceWrapper(model, curvature="mc", n_mc_samples=bad)
    with pytest.raises(ValueError, match=r"n_mc_samples must be a positive integer; got 0"):
        OutputCurvature(get_likelihood(Likelihood.CLASSIFICATION), n_samples=0)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None; got int"):
        OutputCurvature(get_likelihood(Likelihood.CLASSIFICATION), generator=3)
    la = LaplaceWrapper(model, curvature="mc")
    case = make_case("mlp_classification")
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None; got int"):
        la.fit(case.loader(), generator=0)
    opts = FitOptions.create(model, curvature="mc")
    meta = replace(opts, reader=replace(opts.reader, device=torch.device("meta")))
    with pytest.raises(ValueError, match=r"generator must be on the model's device meta"):
        meta.check_generator(torch.Generator())  # a generator on another device than the model


def test_curvature_option_round_trips_state_dict():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, structure="diag", curvature="mc", n_mc_samples=2)
    la.fit(case.loader(), generator=torch.Generator().manual_seed(0))
    state = la.state_dict()
    assert (state["curvature"], state["n_mc_samples"], state["ignore_index"]) == ("mc", 2, -100)
    back = LaplaceWrapper.from_state_dict(case.model, state)
    assert back.curvature is Curvature.MC and back.n_mc_samples == 2
    torch.testing.assert_close(back.posterior.ggn_diag, la.posterior.ggn_diag, rtol=0, atol=0)
    for key in ("curvature", "n_mc_samples", "ignore_index"):  # states written before them
        del state[key]
    old = LaplaceWrapper.from_state_dict(case.model, state)
    assert old.curvature is Curvature.GGN and old.n_mc_samples is None


def test_exact_curvature_refuses_before_allocating():
    case = make_case("mlp_classification")  # C = 3, P = 31, float64: 744 bytes of rows
    la = LaplaceWrapper(case.model, structure="diag", memory_budget=600)
    with pytest.raises(
        ValueError,
        match=r"curvature='ggn' must fit one sample's exact square-root rows \(M=3 outputs x "
        r"P=31 parameters.*Pass curvature='mc'",
    ):
        la.fit(case.loader())
    assert not la.is_fitted
    la = LaplaceWrapper(case.model, structure="diag", curvature="mc", memory_budget=600)
    assert la.fit(case.loader(), generator=torch.Generator().manual_seed(0)).is_fitted


# ---------------------------------------------------------------------------------------------
# Linear heads: J Σ Jᵀ from the features, never from (B, C, P) Jacobians
# ---------------------------------------------------------------------------------------------

HEAD_CASES = [
    ("full", None, 0.7),
    ("diag", None, "layerwise"),
    ("kfac", None, 0.7),
    ("kfac", None, "layerwise"),
    ("kfac", None, "layerwise_equal"),
    ("lowrank", None, 0.7),
    ("lowrank", 4, "layerwise"),
    ("lowrank", None, "diagonal"),
]


def _prior(kind, n_tensors, P):
    g = torch.Generator().manual_seed(5)
    if kind == "layerwise":
        return 0.3 + torch.rand(n_tensors, generator=g, dtype=torch.float64)
    if kind == "layerwise_equal":  # the same precision for weight and bias: no bias correction
        return torch.full((n_tensors,), 0.7, dtype=torch.float64)
    if kind == "diagonal":
        return 0.3 + torch.rand(P, generator=g, dtype=torch.float64)
    return kind


@pytest.mark.parametrize(("structure", "rank", "prior"), HEAD_CASES)
@pytest.mark.parametrize("subset", ["last_layer", ["2.weight"], ["2.bias"]])
def test_linear_head_covariance_equals_dense(structure, rank, prior, subset):
    case = make_case("mlp_classification")
    names = ["2.weight", "2.bias"] if subset == "last_layer" else subset
    P = sum(dict(case.model.named_parameters())[n].numel() for n in names)
    if structure == "lowrank" and rank is not None:
        rank = min(rank, P)
    la = LaplaceWrapper(
        case.model,
        structure=structure,
        subset=subset,
        rank=rank,
        prior_precision=_prior(prior, len(names), P),
    ).fit(case.loader())
    assert la.fitted.head is not None
    Xt = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = dense_jacobian(case.model, Xt, names)
    ref = torch.einsum("bcp,pq,bdq->bcd", J, la.posterior_covariance(), J)
    phi, f = la.fitted.head.features(Xt)
    op = la.posterior.linear_head_covariance(phi, la.fitted.head.index)
    torch.testing.assert_close(op.to_dense(), ref, **TOL)
    torch.testing.assert_close(op.diagonal(), torch.diagonal(ref, dim1=1, dim2=2), **TOL)
    v = torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), (ref @ v.unsqueeze(-1)).squeeze(-1), **TOL)
    torch.testing.assert_close(op.row_sums(), ref.sum(-1), **TOL)
    torch.testing.assert_close(la.functional_covariance(Xt), ref, **TOL)
    # the Kronecker head's O(N·D·C) diagonal and row sums, unless a bias correction applies
    fast = structure == "kfac" and (prior != "layerwise" or subset != "last_layer")
    assert isinstance(op, KronHeadOutputCovariance) == fast
    for link in ("probit", "bridge", "bridge_norm"):
        pred = la.predict(Xt, link=link)
        want = glm_from_moments(f, ref, likelihood=la.likelihood, link=Link(link))
        torch.testing.assert_close(pred.mean, want.mean, **TOL)
        torch.testing.assert_close(pred.variance, want.variance, **TOL)


def test_head_predict_forms_no_jacobian(monkeypatch):
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, structure="kfac", subset="last_layer").fit(case.loader())
    want = la.predict(case.X, link="probit")

    def refuse(*args, **kwargs):
        raise AssertionError("Jacobians were computed")

    monkeypatch.setattr(la.fitted.fmodel, "jacobians", refuse)
    monkeypatch.setattr(la.fitted.fmodel, "jacobians_wrt", refuse)
    got = la.predict(case.X, link="probit")
    torch.testing.assert_close(got.mean, want.mean, rtol=0, atol=0)
    la.functional_covariance(case.X)
    with pytest.raises(AssertionError, match="Jacobians were computed"):
        la.jacobians(case.X)


def test_head_regression_and_binary():
    for name in ("mlp_regression", "mlp_binary"):
        case = make_case(name)
        la = LaplaceWrapper(
            case.model, case.likelihood, structure="kfac", subset="last_layer", sigma_noise=1.0
        ).fit(case.loader())
        J = dense_jacobian(case.model, case.X, ["2.weight", "2.bias"])
        ref = torch.einsum("bcp,pq,bdq->bcd", J, la.posterior_covariance(), J)
        torch.testing.assert_close(la.functional_covariance(case.X), ref, **TOL)
        with torch.no_grad():
            f = case.model(case.X)
        want = glm_from_moments(f, ref, likelihood=la.likelihood, link=Link.PROBIT)
        torch.testing.assert_close(la.predict(case.X).variance, want.variance, **TOL)


class _Scaled(nn.Module):
    """The head's output is not the model output (scaled): the Jacobian path must be used."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2.0 * self.inner(x)


class _Twice(nn.Module):
    """The head runs twice per forward pass."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.head(x)))


@pytest.mark.parametrize("make", [lambda c: _Scaled(c.model), lambda c: _Twice().double()])
def test_head_falls_back_to_jacobians_when_it_does_not_apply(make):
    case = make_case("mlp_classification")
    model = make(case)
    la = LaplaceWrapper(model, structure="full", subset="last_layer").fit(case.loader())
    names = list(la.fitted.layout.names)
    J = dense_jacobian(model, case.X, names)
    ref = torch.einsum("bcp,pq,bdq->bcd", J, la.posterior_covariance(), J)
    torch.testing.assert_close(la.functional_covariance(case.X), ref, **TOL)
    assert la.fitted.head is None or la.fitted.head.features(case.X) is None


def test_head_is_found_only_for_one_untied_linear():
    case = make_case("mlp_classification")
    for subset, found in (("all", False), (["0.weight"], True), (["0.weight", "2.bias"], False)):
        la = LaplaceWrapper(case.model, structure="diag", subset=subset).fit(case.loader())
        assert (la.fitted.head is not None) is found

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    la = LaplaceWrapper(Tied().double(), structure="diag", subset=["a.weight"])
    assert la.fit(case.loader()).fitted.head is None


def test_head_features_are_thread_local():
    """Concurrent head predictions each see their own features."""
    import threading

    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, structure="kfac", subset="last_layer").fit(case.loader())
    inputs = [torch.randn(5 + i, 3, dtype=torch.float64) for i in range(6)]
    want = [la.predict(x).mean for x in inputs]
    got = [None] * len(inputs)

    def run(i):
        for _ in range(20):
            got[i] = la.predict(inputs[i]).mean

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_head_feature_errors():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, structure="diag", subset="last_layer").fit(case.loader())
    phi, _ = la.fitted.head.features(case.X)
    with pytest.raises(ValueError, match=r"index must have shape \(C, D\) with C·D = P = 15"):
        la.posterior.linear_head_covariance(phi, la.fitted.head.index[:, :2])
    with pytest.raises(ValueError, match=r"phi must have shape \(N, 5\)"):
        la.posterior.linear_head_covariance(phi[:, :3], la.fitted.head.index)


def test_kfac_head_covariance_needs_the_single_block():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, structure="kfac").fit(case.loader())
    P = la.n_params
    phi = torch.ones(2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"index must be the Kronecker index of the posterior's"):
        la.posterior.linear_head_covariance(phi, torch.arange(P).reshape(P, 1))


def test_many_class_head_memory_does_not_grow_with_c_times_p():
    """C = 500 classes, P = 16,500: the KFAC head's predict runs without (B, C, P) Jacobians."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 500))
    X, y = torch.randn(64, 4), torch.randint(0, 500, (64,))
    budget = 1 << 22  # 4 MiB: one sample's (C, P) Jacobian alone would take 33 MB
    la = LaplaceWrapper(
        model, structure="kfac", subset="last_layer", curvature="mc", memory_budget=budget
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=32), generator=torch.Generator())
    pred = la.predict(X[:16])
    assert pred.mean.shape == (16, 500)
    torch.testing.assert_close(pred.mean.sum(-1), torch.ones(16), rtol=0, atol=1e-5)


def test_exact_lowrank_refusal_names_mc_and_top_k_is_not_refused():
    case = make_case("mlp_classification")  # one sample's rows: 3 x 31 x 8 = 744 bytes
    la = LaplaceWrapper(case.model, structure="lowrank", memory_budget=2000)
    with pytest.raises(ValueError, match=r"Pass rank=k .* curvature='mc' keeps n_mc_samples rows"):
        la.fit(case.loader())
    # matrix-free top-k: the budget limits its sketch (2·P·(k+p)), not the outputs
    la = LaplaceWrapper(case.model, structure="lowrank", rank=2, memory_budget=6000)
    assert la.fit(case.loader()).is_fitted


def test_saved_curvature_options_are_validated():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, structure="diag", curvature="mc", n_mc_samples=2)
    state = la.fit(case.loader(), generator=torch.Generator().manual_seed(0)).state_dict()
    with pytest.raises(ValueError, match=r"state\['curvature'\] must be one of \['ggn', 'mc'\]"):
        LaplaceWrapper.from_state_dict(case.model, {**state, "curvature": "fisher"})
    with pytest.raises(
        ValueError,
        match=r"state\['n_mc_samples'\] must be None, or a positive int with curvature 'mc'; got "
        r"2 \(int\) with curvature 'ggn'",
    ):
        LaplaceWrapper.from_state_dict(case.model, {**state, "curvature": "ggn"})
    with pytest.raises(TypeError, match=r"state\['ignore_index'\] must be an int; got '-100'"):
        LaplaceWrapper.from_state_dict(case.model, {**state, "ignore_index": "-100"})
    stats = {**state["fit_statistics"], "output_ndim": 4}
    with pytest.raises(
        ValueError, match=r"state\['fit_statistics'\]\['output_ndim'\] must be 2 .* or 3"
    ):
        LaplaceWrapper.from_state_dict(case.model, {**state, "fit_statistics": stats})
    stats = {**state["fit_statistics"], "extra": 1}
    with pytest.raises(
        ValueError, match=r"and optionally \['output_ndim', 'output_loss_sums'\]\); got unexpected"
    ):
        LaplaceWrapper.from_state_dict(case.model, {**state, "fit_statistics": stats})


def test_projected_refuses_mc_and_skips_ignored_positions():
    case = make_case("mlp_classification")
    with pytest.raises(ValueError, match=r"curvature='mc' applies to structures 'full', 'diag'"):
        LaplaceWrapper(case.model, structure="projected", curvature="mc")
    # an ignored target removes its input's Jacobian rows from the kernel's constraints
    y = case.y.clone()
    y[:4] = -100
    loader = DataLoader(TensorDataset(case.X, y), batch_size=5)
    la = LaplaceWrapper(case.model, structure="projected").fit(loader)
    ref = LaplaceWrapper(case.model, structure="projected").fit(
        DataLoader(TensorDataset(case.X[4:], case.y[4:]), batch_size=5)
    )
    torch.testing.assert_close(la.posterior_covariance(), ref.posterior_covariance(), **TOL)
