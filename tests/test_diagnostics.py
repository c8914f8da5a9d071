"""Kernel / non-kernel decomposition against a dense eigh reference (float64, tiny models)."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from cases import make_case
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import KernelDecomposition, LaplaceWrapper
from laplace_ggn._checks import Likelihood, Structure
from laplace_ggn.diagnostics import eigenbasis, gather_inputs, kernel_decomposition
from laplace_ggn.likelihoods import get_likelihood
from laplace_ggn.posteriors import make_prior
from laplace_ggn.testing import dense_ggn, dense_jacobian, flat_params, nll_per_sample

DT = torch.float64


def _prior_precision(kind: str, model: nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    if kind == "scalar":
        return 0.7
    if kind == "layerwise":
        return 0.3 + torch.rand(len(params), generator=g, dtype=DT)
    return 0.3 + torch.rand(sum(p.numel() for p in params), generator=g, dtype=DT)


def _fit(case, prior="scalar", *, sigma=0.6, temperature=1.0):
    sig = sigma if case.likelihood == "regression" else 1.0
    return LaplaceWrapper(
        case.model,
        case.likelihood,
        structure="full",
        prior_precision=_prior_precision(prior, case.model),
        sigma_noise=sig,
        temperature=temperature,
    ).fit(case.loader(4))


def _reference(case, la, x, tol):
    """Dense reference: eigh of G, explicit Σ, projectors, Jacobians by jacrev."""
    G = dense_ggn(case.model, case.X, case.y, case.likelihood)
    lam, U = torch.linalg.eigh(G)
    lam, U = lam.flip(0).clamp_min(0), U.flip(1)
    r = int((lam > tol * lam[0]).sum())
    s = float(la.posterior.scale)
    d = la.posterior.prior.diag()
    Sigma = torch.linalg.inv(s * G + torch.diag(d))
    P_perp = U[:, :r] @ U[:, :r].T
    P_ker = torch.eye(G.shape[0], dtype=DT) - P_perp
    J = dense_jacobian(case.model, x)
    var = lambda M: torch.einsum("bcp,pq,bcq->bc", J, M, J)
    return {
        "G": G,
        "lam": lam,
        "U": U,
        "r": r,
        "Sigma": Sigma,
        "P_ker": P_ker,
        "P_perp": P_perp,
        "J": J,
        "s": s,
        "kern": var(P_ker @ Sigma @ P_ker),
        "nonk": var(P_perp @ Sigma @ P_perp),
        "cross": var(P_ker @ Sigma @ P_perp + P_perp @ Sigma @ P_ker),
        "fraction": float(torch.trace(P_ker @ Sigma) / torch.trace(Sigma)),
    }


def _close(a, b, rtol=1e-6, scale=None):
    """|a - b| <= rtol·|b| + rtol·scale, with scale = max|b| unless given (e.g. a total)."""
    if scale is None:
        scale = float(torch.as_tensor(b).abs().max()) if torch.as_tensor(b).numel() else 1.0
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT), rtol=rtol, atol=rtol * scale
    )


# ---------------------------------------------------------------------------------------------
# numbers against the dense reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp_regression", "mlp_classification", "mlp_binary"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise", "diagonal"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_dense_eigh_reference(name, prior, seed):
    case = make_case(name, seed, n=6)
    la = _fit(case, prior, temperature=0.8)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(seed + 10), dtype=DT)
    rep = la.kernel_decomposition(x, n_samples=0)
    ref = _reference(case, la, x, rep.tol)
    P = la.n_params
    assert rep.rank == ref["r"] and rep.kernel_dim == P - ref["r"] and rep.n_params == P
    assert 0 < rep.rank < P  # both parts are non-trivial on these cases
    _close(rep.kernel_variance_fraction, ref["fraction"])
    _close(rep.trace_kernel, torch.trace(ref["P_ker"] @ ref["Sigma"]))
    _close(rep.trace_nonkernel, torch.trace(ref["P_perp"] @ ref["Sigma"]))
    tot = float(torch.einsum("bcp,pq,bcq->bc", ref["J"], ref["Sigma"], ref["J"]).max())
    _close(rep.predictive_variance_kernel, ref["kern"], scale=tot)
    _close(rep.predictive_variance_nonkernel, ref["nonk"], scale=tot)
    _close(rep.predictive_variance_cross, ref["cross"], scale=tot)
    _close(rep.eigenvalues, ref["lam"], rtol=1e-8)
    if prior == "scalar":
        # DESIGN's closed forms: ((P - r)/α) / tr Σ and α⁻¹ J P_ker Jᵀ
        alpha = float(la.prior_precision)
        _close(rep.kernel_variance_fraction, ((P - ref["r"]) / alpha) / torch.trace(ref["Sigma"]))
        J = ref["J"]
        _close(
            rep.predictive_variance_kernel,
            torch.einsum("bcp,pq,bcq->bc", J, ref["P_ker"], J) / alpha,
        )
        lam_r = ref["lam"][: ref["r"]]
        Ur = ref["U"][:, : ref["r"]]
        nonk = ((J @ Ur) ** 2 / (ref["s"] * lam_r + alpha)).sum(-1)
        _close(rep.predictive_variance_nonkernel, nonk)
        assert float(rep.predictive_variance_cross.abs().max()) == 0.0
    else:
        # Λ does not commute with P_ker: the cross part is really there
        assert float(ref["cross"].abs().max()) > 1e-6 * float(ref["nonk"].abs().max())


@pytest.mark.parametrize(
    "name",
    [
        "linear_regression",
        "mlp_regression",
        "mlp_classification",
        "mlp_binary",
        "mlp_nobias_classification",
    ],
)
@pytest.mark.parametrize("prior", ["scalar", "diagonal"])
def test_parts_sum_to_functional_variance(name, prior):
    case = make_case(name, 0)
    la = _fit(case, prior)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    x = torch.cat([x, case.X[:3]])
    rep = la.kernel_decomposition(x, n_samples=0)
    fvar = torch.diagonal(la.functional_covariance(x), dim1=1, dim2=2)
    _close(rep.predictive_variance, fvar, rtol=1e-9)
    _close(rep.trace_kernel + rep.trace_nonkernel, torch.trace(la.posterior_covariance()), 1e-9)
    assert bool((rep.predictive_variance_kernel >= -1e-12).all())
    assert bool((rep.predictive_variance_nonkernel >= -1e-12).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_part_vanishes_on_training_inputs_for_mse(seed):
    case = make_case("mlp_regression", seed, n=6)  # P = 26 > N·C = 12
    la = _fit(case)
    rep = la.kernel_decomposition(case.X, n_samples=0)
    ref = _reference(case, la, case.X, rep.tol)
    assert rep.kernel_dim >= la.n_params - 12
    total = rep.predictive_variance
    assert float(rep.predictive_variance_kernel.max()) <= 1e-8 * float(total.max())
    assert float(ref["kern"].max()) <= 1e-8 * float(total.max())
    # away from the data the kernel part is a sizeable share
    x = 3 * torch.randn(20, 3, generator=torch.Generator().manual_seed(seed), dtype=DT)
    away = la.kernel_decomposition(x, n_samples=0)
    assert float(away.predictive_variance_kernel.sum()) > 1e-2 * float(
        away.predictive_variance.sum()
    )


def test_kernel_part_nonzero_on_training_inputs_for_softmax():
    # Λ_n = diag(p) - ppᵀ annihilates the all-ones logit direction: J_nᵀ1 lies in the kernel
    case = make_case("mlp_classification", 0, n=6)
    la = _fit(case)
    rep = la.kernel_decomposition(case.X, n_samples=0)
    ref = _reference(case, la, case.X, rep.tol)
    _close(rep.predictive_variance_kernel, ref["kern"], scale=float(rep.predictive_variance.max()))
    assert float(rep.predictive_variance_kernel.max()) > 1e-3 * float(rep.predictive_variance.max())


class _Linear(nn.Module):
    def __init__(self, d: int, C: int):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d, C).to(DT)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize(
    ("N", "d", "C", "rank_deficient", "empty"),
    [
        (8, 3, 2, False, True),  # P = 8 <= N·C = 16, [X 1] full column rank
        (4, 3, 1, False, True),  # P = 4 = N·C, square and invertible
        (3, 3, 2, False, False),  # P = 8 > N·C = 6
        (8, 3, 2, True, False),  # P <= N·C but a repeated column
    ],
)
def test_linear_model_kernel_empty_iff_full_column_rank(N, d, C, rank_deficient, empty):
    g = torch.Generator().manual_seed(N + d)
    X = torch.randn(N, d, generator=g, dtype=DT)
    if rank_deficient:
        X[:, 2] = X[:, 0]
    y = torch.randn(N, C, generator=g, dtype=DT)
    model = _Linear(d, C)
    la = LaplaceWrapper(model, "regression", structure="full", prior_precision=0.5).fit(
        DataLoader(TensorDataset(X, y), batch_size=4)
    )
    rep = la.kernel_decomposition(X, y=y, n_samples=4, generator=torch.Generator().manual_seed(0))
    Xt = torch.cat([X, torch.ones(N, 1, dtype=DT)], 1)
    full_col_rank = int(torch.linalg.matrix_rank(Xt)) == d + 1
    P = la.n_params
    assert (P <= N * C and full_col_rank) == empty
    assert (rep.kernel_dim == 0) == empty
    assert rep.rank == C * int(torch.linalg.matrix_rank(Xt))
    if empty:
        assert rep.kernel_variance_fraction == 0.0
        assert float(rep.predictive_variance_kernel.abs().max()) == 0.0
    else:
        assert rep.kernel_variance_fraction > 0.1
    # linear in θ: network and linearised model agree for every kind of sample
    for kind in ("kernel", "non-kernel", "full"):
        net, lin = rep.fit_of(kind, "network"), rep.fit_of(kind, "linearised")
        assert net.metric_mean == pytest.approx(lin.metric_mean, rel=1e-10)
        assert net.nll_mean == pytest.approx(lin.nll_mean, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# the sample table against samples evaluated another way
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp_regression", "mlp_classification", "mlp_binary"])
def test_sample_table_matches_reference(name):
    case = make_case(name, 0, n=6)
    la = _fit(case)
    x = torch.cat([case.X, torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=DT)])
    yx = torch.cat([case.y, case.y[:4]])
    S = 6
    rep = la.kernel_decomposition(x, y=yx, n_samples=S, generator=torch.Generator().manual_seed(7))
    ref = _reference(case, la, x, rep.tol)
    delta = la.sample(S, generator=torch.Generator().manual_seed(7)) - la.posterior.mean
    names, theta = flat_params(case.model)
    shapes = {n: p.shape for n, p in case.model.named_parameters()}

    def net(th):
        out, i = {}, 0
        for n in names:
            k = shapes[n].numel()
            out[n] = th[i : i + k].view(shapes[n])
            i += k
        return functional_call(case.model, out, (x,))

    f0 = net(theta).detach()
    sigma = float(la.sigma_noise)

    def stats(F):
        nll = torch.stack([nll_per_sample(case.likelihood, f, yx, sigma).mean() for f in F])
        if case.likelihood == "regression":
            met = ((F - yx) ** 2).mean((1, 2)).sqrt()
        elif case.likelihood == "classification":
            met = (F.argmax(-1) == yx).to(DT).mean(-1)
        else:
            met = ((F[..., 0] > 0).to(DT) == yx).to(DT).mean(-1)
        return nll, met

    D = {"kernel": delta @ ref["P_ker"], "non-kernel": delta @ ref["P_perp"], "full": delta}
    for kind, Dk in D.items():
        F_net = torch.stack([net(theta + d).detach() for d in Dk])
        F_lin = f0 + torch.einsum("bcp,sp->sbc", ref["J"], Dk)
        for model, F in (("network", F_net), ("linearised", F_lin)):
            nll, met = stats(F)
            row = rep.fit_of(kind, model)
            assert row.nll_mean == pytest.approx(float(nll.mean()), rel=1e-6)
            assert row.nll_std == pytest.approx(float(nll.std()), rel=1e-6, abs=1e-10)
            assert row.metric_mean == pytest.approx(float(met.mean()), rel=1e-6)
            assert row.metric_std == pytest.approx(float(met.std()), rel=1e-6, abs=1e-10)
    nll0, met0 = stats(f0.unsqueeze(0))
    assert rep.fit_of("MAP", "network").nll_mean == pytest.approx(float(nll0), rel=1e-10)
    assert rep.fit_of("MAP", "linearised").metric_mean == pytest.approx(float(met0), rel=1e-10)


def test_kernel_samples_leave_linearised_training_fit_unchanged_for_mse():
    case = make_case("mlp_regression", 0, n=6)
    la = _fit(case)
    rep = la.kernel_decomposition(
        case.loader(3), n_samples=8, generator=torch.Generator().manual_seed(0)
    )
    assert rep.targets == "given"
    lin, base = rep.fit_of("kernel", "linearised"), rep.fit_of("MAP", "linearised")
    assert lin.metric_mean == pytest.approx(base.metric_mean, rel=1e-7)
    assert lin.metric_std < 1e-7 * base.metric_mean
    net = rep.fit_of("kernel", "network")
    assert net.metric_mean > base.metric_mean * (1 + 1e-3)  # the network itself does move


def test_loader_equals_tensors_and_map_targets():
    case = make_case("mlp_classification", 1, n=6)
    la = _fit(case)
    a = la.kernel_decomposition(
        case.loader(4), n_samples=5, generator=torch.Generator().manual_seed(2)
    )
    b = la.kernel_decomposition(
        case.X, y=case.y, n_samples=5, generator=torch.Generator().manual_seed(2)
    )
    assert a.sample_fit == b.sample_fit and a.rank == b.rank
    torch.testing.assert_close(a.predictive_variance_kernel, b.predictive_variance_kernel)
    c = la.kernel_decomposition(case.X, n_samples=3, generator=torch.Generator().manual_seed(2))
    assert c.targets == "MAP"
    assert c.fit_of("MAP", "network").metric_mean == 1.0  # argmax agrees with itself
    assert c.fit_of("kernel", "linearised").metric_std >= 0.0


def test_gather_inputs_dict_and_tuple_batches():
    xs = [
        {"a": torch.ones(2, 3), "b": torch.zeros(2, 1)},
        {"a": 2 * torch.ones(1, 3), "b": torch.ones(1, 1)},
    ]
    loader = [(x, torch.arange(x["a"].shape[0])) for x in xs]
    inputs, y = gather_inputs(b for b in loader)  # any iterable of batches that is not a list
    assert inputs["a"].shape == (3, 3) and inputs["b"].shape == (3, 1)
    torch.testing.assert_close(y, torch.tensor([0, 1, 0]))
    t = (torch.ones(2, 3), torch.ones(2, 1))
    assert gather_inputs(t) == (t, None)


def test_rank_override_and_tol():
    case = make_case("mlp_regression", 0, n=6)
    la = _fit(case)
    x = case.X[:3]
    exact = la.kernel_decomposition(x, n_samples=0)
    fixed = la.kernel_decomposition(x, rank=3, n_samples=0)
    assert fixed.rank == 3 and fixed.kernel_dim == la.n_params - 3
    _close(fixed.predictive_variance, exact.predictive_variance, rtol=1e-9)
    loose = la.kernel_decomposition(x, tol=0.5, n_samples=0)
    assert loose.rank == int((exact.eigenvalues > 0.5 * exact.eigenvalues[0]).sum()) < exact.rank
    assert la.kernel_decomposition(x, rank=0, n_samples=0).kernel_variance_fraction == 1.0


# ---------------------------------------------------------------------------------------------
# low-rank posteriors (kept subspace of k eigenpairs; the complement counts as kernel)
# ---------------------------------------------------------------------------------------------


class _EigenPosterior:
    """Dense stand-in with the low-rank interface: Λ = s U diag(λ) Uᵀ + Λ₀ from k eigenpairs."""

    def __init__(self, mean, lam, U, prior, scale):
        self.mean, self.eigenvalues, self.eigenvectors = mean, lam, U
        self.prior, self.scale = prior, torch.as_tensor(scale, dtype=DT)
        self.Sigma = torch.linalg.inv(scale * (U * lam) @ U.T + torch.diag(prior.diag()))

    def eigenbasis(self):
        return self.eigenvalues, self.eigenvectors

    def covariance_matvec(self, V):
        return self.Sigma @ V

    def covariance_sqrt_rows(self, X):
        return X @ torch.linalg.cholesky(self.Sigma)

    def variance(self):
        return self.Sigma.diagonal()

    def sample(self, n, *, generator=None):
        z = torch.randn(n, self.mean.shape[0], generator=generator, dtype=DT)
        return self.mean + z @ torch.linalg.cholesky(self.Sigma).T


@pytest.mark.parametrize("prior", ["scalar", "layerwise", "diagonal"])
@pytest.mark.parametrize("k", [3, 5, 12])
def test_topk_lowrank_posterior_against_dense(prior, k):
    case = make_case("mlp_regression", 0, n=6)
    la = _fit(case, prior)
    G = dense_ggn(case.model, case.X, case.y, case.likelihood)
    lam, U = torch.linalg.eigh(G)
    lam, U = lam.flip(0)[:k].clamp_min(0), U.flip(1)[:, :k]
    post = _EigenPosterior(
        la.posterior.mean,
        lam[torch.tensor([2, 0, 1] + list(range(3, k)))],
        U[:, torch.tensor([2, 0, 1] + list(range(3, k)))],
        la.posterior.prior,
        float(la.posterior.scale),
    )
    x = torch.cat([case.X, torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=DT)])
    rep = kernel_decomposition(
        post,
        la.fitted.fmodel,
        x,
        likelihood=Likelihood.REGRESSION,
        lik=get_likelihood(Likelihood.REGRESSION),
        structure=Structure.LOWRANK,
        y=torch.cat([case.y, case.y[:3]]),
        n_samples=4,
        kept_eigenpairs=k,
        generator=torch.Generator().manual_seed(0),
    )
    r = int((lam > 1e-9 * lam[0]).sum())
    P = U.shape[0]
    P_perp = U[:, :r] @ U[:, :r].T
    P_ker = torch.eye(P, dtype=DT) - P_perp
    Sigma, J = post.Sigma, dense_jacobian(case.model, x)
    var = lambda M: torch.einsum("bcp,pq,bcq->bc", J, M, J)
    assert rep.rank == r and rep.kernel_dim == P - r and rep.kept_eigenpairs == k
    _close(rep.kernel_variance_fraction, torch.trace(P_ker @ Sigma) / torch.trace(Sigma))
    tot = float(var(Sigma).max())
    _close(rep.predictive_variance_kernel, var(P_ker @ Sigma @ P_ker), scale=tot)
    _close(rep.predictive_variance_nonkernel, var(P_perp @ Sigma @ P_perp), scale=tot)
    _close(
        rep.predictive_variance_cross,
        var(P_ker @ Sigma @ P_perp + P_perp @ Sigma @ P_ker),
        scale=tot,
    )
    _close(rep.predictive_variance, var(Sigma), rtol=1e-9)
    if prior == "scalar":
        alpha = float(la.prior_precision)
        _close(rep.kernel_variance_fraction, ((P - r) / alpha) / torch.trace(Sigma))
    text = str(rep)
    assert f"top-{k} eigenpairs" in text and "complement of the kept subspace" in text


def test_eigenbasis_sorts_and_clamps():
    class Post:
        eigenvalues = torch.tensor([1.0, -1e-12, 3.0], dtype=DT)
        eigenvectors = torch.eye(3, dtype=DT)

        def eigenbasis(self):
            return self.eigenvalues, self.eigenvectors

    lam, U = eigenbasis(Post())
    torch.testing.assert_close(lam, torch.tensor([3.0, 1.0, 0.0], dtype=DT))
    torch.testing.assert_close(U[:, 0], torch.tensor([0.0, 0.0, 1.0], dtype=DT))


# ---------------------------------------------------------------------------------------------
# report text and figure
# ---------------------------------------------------------------------------------------------


def test_str_and_repr_state_tol_and_rank():
    case = make_case("mlp_regression", 0, n=6)
    la = _fit(case)
    rep = la.kernel_decomposition(
        case.X, y=case.y, tol=1e-7, n_samples=3, generator=torch.Generator().manual_seed(0)
    )
    assert isinstance(rep, KernelDecomposition)
    text = str(rep)
    assert "tol·λ_max = 1e-07" in text
    assert f"r = {rep.rank} of P = {la.n_params}" in text
    assert f"kernel dim P - r = {rep.kernel_dim}" in text
    assert "exact eigendecomposition" in text
    for kind in ("MAP", "kernel", "non-kernel", "full"):
        assert kind in text
    assert "RMSE" in text and "given targets" in text
    assert f"rank={rep.rank}" in repr(rep)


def test_plot_draws_the_numbers():
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case = make_case("mlp_classification", 0, n=6)
    la = _fit(case)
    rep = la.kernel_decomposition(
        case.X, y=case.y, n_samples=4, generator=torch.Generator().manual_seed(0)
    )
    fig = rep.plot()
    ax_var, ax_met, ax_nll = fig.axes[:3]
    B = case.X.shape[0]
    bars = ax_var.patches
    assert len(bars) == 2 * B
    total = rep.predictive_variance.sum(1)
    heights = torch.tensor([b.get_height() for b in bars[:B]]) + torch.tensor(
        [b.get_height() for b in bars[B:]]
    )
    torch.testing.assert_close(heights.to(DT), total.sort(descending=True).values)
    met_heights = sorted(round(b.get_height(), 10) for b in ax_met.patches)
    want = sorted(round(r.metric_mean, 10) for r in rep.sample_fit)
    assert met_heights == want
    assert ax_met.get_ylabel() == "accuracy" and ax_nll.get_ylabel() == "NLL per input"
    nll_heights = sorted(round(b.get_height(), 10) for b in ax_nll.patches)
    assert nll_heights == sorted(round(r.nll_mean, 10) for r in rep.sample_fit)
    plt.close(fig)
    on_axis = la.kernel_decomposition(case.X, n_samples=0)
    fig = on_axis.plot(x_axis=case.X[:, 0], output=1, train_x=case.X[:, 0])
    assert len(fig.axes) == 1
    assert len(fig.axes[0].collections) == 2
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    case = make_case("mlp_regression", 0, n=6)
    return case, _fit(case)


def test_error_structure_not_supported():
    case = make_case("mlp_regression", 0, n=6)
    la = LaplaceWrapper(case.model, "regression", structure="diag").fit(case.loader())
    with pytest.raises(
        ValueError, match=r"structure must be one of \['full', 'lowrank', 'gp'\].*got 'diag'"
    ):
        la.kernel_decomposition(case.X)


def test_error_not_fitted():
    case = make_case("mlp_regression", 0, n=6)
    la = LaplaceWrapper(case.model, "regression", structure="full")
    with pytest.raises(RuntimeError, match="kernel_decomposition.*call fit"):
        la.kernel_decomposition(case.X)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": 1.0}, r"tol must be a float in \[0, 1\); got 1.0"),
        ({"tol": -1e-3}, r"tol must be a float in \[0, 1\)"),
        ({"tol": "small"}, r"tol must be a float"),
        ({"rank": 27}, r"rank must be None or an int in \[0, 26\]"),
        ({"rank": -1}, r"rank must be None or an int"),
        ({"n_samples": -2}, r"n_samples must be an int >= 0"),
        ({"n_samples": 2.5}, r"n_samples must be an int >= 0"),
    ],
)
def test_error_bad_options(fitted, kwargs, match):
    case, la = fitted
    with pytest.raises(ValueError, match=match):
        la.kernel_decomposition(case.X, **kwargs)


def test_error_inputs_and_targets(fitted):
    case, la = fitted
    with pytest.raises(ValueError, match="y must be None when x is a loader"):
        la.kernel_decomposition(case.loader(), y=case.y)
    with pytest.raises(
        TypeError, match="x must be a tensor, a tuple or dict of tensors, or a DataLoader"
    ):
        la.kernel_decomposition(3.0)
    with pytest.raises(ValueError, match="x must yield at least one batch"):
        la.kernel_decomposition(DataLoader(TensorDataset(case.X[:0], case.y[:0]), batch_size=2))
    with pytest.raises(ValueError, match=r"y must have 6 rows like the inputs; got shape \(5, 2\)"):
        la.kernel_decomposition(case.X, y=case.y[:5])
    with pytest.raises(ValueError, match="regression targets .*must have the output's shape"):
        la.kernel_decomposition(case.X, y=case.y[:, :1])
    with pytest.raises(ValueError, match="input must be finite"):
        la.kernel_decomposition(torch.full((2, 3), float("nan"), dtype=DT))
    bad_y = case.y.clone()
    bad_y[0, 0] = float("inf")
    with pytest.raises(ValueError, match="y must be finite"):
        la.kernel_decomposition(case.X, y=bad_y)


def test_error_report_lookups_and_plot_args(fitted):
    case, la = fitted
    rep = la.kernel_decomposition(
        case.X, y=case.y, n_samples=2, generator=torch.Generator().manual_seed(0)
    )
    with pytest.raises(
        ValueError, match=r"\(samples, model\) must be one of .*got \('kernel', 'nn'\)"
    ):
        rep.fit_of("kernel", "nn")
    with pytest.raises(ValueError, match=r"output must be None or an int in \[0, 1\]; got 2"):
        rep.plot(output=2)
    with pytest.raises(ValueError, match=r"x_axis must have 6 entries \(one per input\); got 4"):
        rep.plot(x_axis=torch.zeros(4))


def test_error_posterior_without_eigenbasis(fitted):
    case, la = fitted
    with pytest.raises(
        ValueError, match="posterior must hold an eigendecomposition of G.*got object"
    ):
        eigenbasis(object())
    prior = make_prior(1.0, la.fitted.layout, dtype=DT, device=torch.device("cpu"))
    diag_post = type("Diagonal", (), {"prior": prior, "mean": la.posterior.mean})()
    with pytest.raises(
        ValueError, match="posterior must hold an eigendecomposition of G.*Diagonal"
    ):
        kernel_decomposition(
            diag_post,
            la.fitted.fmodel,
            case.X,
            likelihood=Likelihood.REGRESSION,
            lik=get_likelihood(Likelihood.REGRESSION),
            structure=Structure.FULL,
        )


# ---------------------------------------------------------------------------------------------
# the wrapper with structure="lowrank"
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp_regression", "mlp_classification"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise"])
def test_exact_lowrank_equals_full(name, prior):
    case = make_case(name, 0, n=6)
    kw = {
        "prior_precision": _prior_precision(prior, case.model),
        "sigma_noise": 0.6 if case.likelihood == "regression" else 1.0,
    }
    full = LaplaceWrapper(case.model, case.likelihood, structure="full", **kw).fit(case.loader(4))
    low = LaplaceWrapper(case.model, case.likelihood, structure="lowrank", **kw).fit(case.loader(4))
    x = torch.cat([case.X, torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=DT)])
    a = full.kernel_decomposition(x, n_samples=0)
    b = low.kernel_decomposition(x, n_samples=0)
    assert b.kept_eigenpairs is None and "exact eigendecomposition" in str(b)
    assert (a.rank, a.kernel_dim) == (b.rank, b.kernel_dim)
    _close(b.kernel_variance_fraction, a.kernel_variance_fraction)
    tot = float(a.predictive_variance.max())
    for part in ("kernel", "nonkernel", "cross"):
        _close(
            getattr(b, f"predictive_variance_{part}"),
            getattr(a, f"predictive_variance_{part}"),
            scale=tot,
        )
    fvar = torch.diagonal(low.functional_covariance(x), dim1=1, dim2=2)
    _close(b.predictive_variance, fvar, rtol=1e-9)


@pytest.mark.parametrize("prior", ["scalar", "diagonal"])
def test_topk_lowrank_wrapper_against_dense(prior):
    case = make_case("mlp_regression", 1, n=6)
    k = 4
    la = LaplaceWrapper(
        case.model,
        "regression",
        structure="lowrank",
        rank=k,
        prior_precision=_prior_precision(prior, case.model),
        sigma_noise=0.6,
    )
    la.fit(case.loader(4))
    rep = la.kernel_decomposition(
        case.X, y=case.y, n_samples=3, generator=torch.Generator().manual_seed(0)
    )
    lam, U = la.posterior.eigenvalues, la.posterior.eigenvectors
    s, d = float(la.posterior.scale), la.posterior.prior.diag()
    Sigma = torch.linalg.inv(s * (U * lam) @ U.T + torch.diag(d))
    r = int((lam > 1e-9 * lam.max()).sum())
    P_perp = U[:, :r] @ U[:, :r].T if bool((lam[:-1] >= lam[1:]).all()) else None
    assert P_perp is not None  # the posterior holds them in descending order
    P_ker = torch.eye(la.n_params, dtype=DT) - P_perp
    J = dense_jacobian(case.model, case.X)
    var = lambda M: torch.einsum("bcp,pq,bcq->bc", J, M, J)
    assert rep.rank == r == k and rep.kept_eigenpairs == k
    _close(rep.kernel_variance_fraction, torch.trace(P_ker @ Sigma) / torch.trace(Sigma))
    tot = float(var(Sigma).max())
    _close(rep.predictive_variance_kernel, var(P_ker @ Sigma @ P_ker), scale=tot)
    _close(rep.predictive_variance_nonkernel, var(P_perp @ Sigma @ P_perp), scale=tot)
    assert "top-4 eigenpairs of G; the kernel includes the" in str(rep)


def test_warns_when_tol_is_below_float32_accuracy():
    case = make_case("mlp_regression", 0, n=6)
    model = case.model.float()
    la = LaplaceWrapper(model, "regression", structure="full").fit(
        DataLoader(TensorDataset(case.X.float(), case.y.float()), batch_size=6)
    )
    with pytest.warns(
        RuntimeWarning,
        match=r"tol=1e-09 is below the accuracy of the eigenvalues of G in torch.float32",
    ):
        la.kernel_decomposition(case.X.float(), n_samples=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = la.kernel_decomposition(case.X.float(), tol=1e-4, n_samples=0)
        la.kernel_decomposition(case.X.float(), rank=3, n_samples=0)
    assert rep.predictive_variance.dtype == torch.float32


def test_supported_structures_follow_the_registry(monkeypatch):
    from dataclasses import replace

    import laplace_ggn.diagnostics as diagnostics
    from laplace_ggn.structures import STRUCTURES

    assert diagnostics.SUPPORTED_STRUCTURES == ("full", "lowrank", "gp")
    monkeypatch.setitem(STRUCTURES, "toy", replace(STRUCTURES["full"], name="toy"))
    monkeypatch.setitem(STRUCTURES, "toy_diag", replace(STRUCTURES["diag"], name="toy_diag"))
    assert diagnostics.supported_structures() == ("full", "lowrank", "gp", "toy")
    assert "toy" in diagnostics.SUPPORTED_STRUCTURES
    with pytest.raises(
        ValueError, match=r"structure must be one of \['full', 'lowrank', 'gp', 'toy'\]"
    ):
        kernel_decomposition(
            object(),
            None,
            torch.zeros(2, 3, dtype=DT),
            likelihood=Likelihood.REGRESSION,
            lik=get_likelihood(Likelihood.REGRESSION),
            structure="toy_diag",
        )


def test_a_registered_structure_with_an_eigenbasis_is_decomposed(monkeypatch):
    """One registry line: a posterior with eigenbasis() and spectrum() needs nothing else."""
    from laplace_ggn.collectors import FullGGNCollector
    from laplace_ggn.marglik import curvature_spectrum
    from laplace_ggn.posteriors import LowRankPosterior, PriorKind
    from laplace_ggn.structures import STRUCTURES, StructureSpec

    def build(G, mean, prior, scale, opts):
        lam, U = torch.linalg.eigh(G)
        return LowRankPosterior(mean, lam.flip(0).clamp_min(0), U.flip(1), prior, scale)

    spec = StructureSpec(
        name="eigh",
        make_collector=lambda fm, curv, opts: FullGGNCollector(fm, curv),
        build=build,
        posterior_cls=LowRankPosterior,
        memory_bytes=lambda P, dtype, opts: 2 * P * P * torch.finfo(dtype).bits // 8,
    )
    monkeypatch.setitem(STRUCTURES, "eigh", spec)
    case = make_case("mlp_regression", 0, n=6)
    kw = {"prior_precision": 0.7, "sigma_noise": 0.6}
    toy = LaplaceWrapper(case.model, "regression", structure="eigh", **kw).fit(case.loader(4))
    full = _fit(case)
    assert curvature_spectrum(toy.posterior, PriorKind.SCALAR) is not None
    torch.testing.assert_close(
        toy.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=1e-9, atol=1e-9
    )
    a = toy.kernel_decomposition(case.X, n_samples=0)
    b = full.kernel_decomposition(case.X, n_samples=0)
    assert a.rank == b.rank and a.kernel_dim == b.kernel_dim
    _close(a.kernel_variance_fraction, b.kernel_variance_fraction)
    _close(a.predictive_variance_nonkernel, b.predictive_variance_nonkernel)
