"""Evidence and tuning: closed-form Bayesian linear regression, the shared-spectrum evidence
against the posterior's own, gridsearch on a U-shaped validation curve built on purpose,
failures that leave the hyperparameters in place, every error, and the warning of a grid search
that chose the edge of its grid."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from cases import make_case
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn import marglik as ml
from laplace_ggn.marglik import GridsearchResult, grid_edge_warning
from laplace_ggn.posteriors import PriorKind
from laplace_ggn.structures import STRUCTURES

DT = torch.float64
STRUCT_NAMES = list(STRUCTURES)
EXACT_FOR_LINEAR = [s for s in ("full", "kfac", "lowrank") if s in STRUCT_NAMES]


# -- Bayesian linear regression in closed form ---------------------------------------------------


class BLR:
    """y = X w + b + noise; the exact evidence log N(y | 0, σ²I + X̃X̃ᵀ/α), X̃ = [X, 1]."""

    def __init__(self, seed=0, N=30, D=3):
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(N, D, generator=g, dtype=DT)
        w = torch.randn(D, generator=g, dtype=DT)
        self.y = (self.X @ w + 0.8 + 0.5 * torch.randn(N, generator=g, dtype=DT))[:, None]
        self.Xa = torch.cat([self.X, torch.ones(N, 1, dtype=DT)], 1)
        self.N, self.D = N, D
        ev, U = torch.linalg.eigh(self.Xa @ self.Xa.T)
        self._ev, self._r2 = ev.clamp_min(0), (U.T @ self.y[:, 0]) ** 2

    def evidence(self, alpha, sigma):
        """Exact log evidence (broadcasts over tensors of α and σ)."""
        a = torch.as_tensor(alpha, dtype=DT)[..., None]
        s = torch.as_tensor(sigma, dtype=DT)[..., None]
        d = s**2 + self._ev / a
        return -0.5 * (torch.log(2 * math.pi * d).sum(-1) + (self._r2 / d).sum(-1))

    def evidence_dense(self, alpha, sigma):
        """The same through a dense N×N Gaussian (independent check of the formula above)."""
        K = sigma**2 * torch.eye(self.N, dtype=DT) + self.Xa @ self.Xa.T / alpha
        return torch.distributions.MultivariateNormal(torch.zeros(self.N, dtype=DT), K).log_prob(
            self.y[:, 0]
        )

    def posterior(self, alpha, sigma):
        """Exact posterior mean and covariance of [w, b]."""
        Lam = self.Xa.T @ self.Xa / sigma**2 + alpha * torch.eye(self.D + 1, dtype=DT)
        S = torch.linalg.inv(Lam)
        return S @ self.Xa.T @ self.y[:, 0] / sigma**2, S

    def model_at_map(self, alpha, sigma):
        mean, _ = self.posterior(alpha, sigma)
        m = nn.Linear(self.D, 1).double()
        with torch.no_grad():
            m.weight.copy_(mean[: self.D][None])
            m.bias.copy_(mean[self.D :])
        return m

    def loader(self):
        return DataLoader(TensorDataset(self.X, self.y), batch_size=7)

    def maximiser(self, sigma=None):
        """Dense zooming grid search on the exact evidence (2-D, or 1-D in α at fixed σ)."""
        c = torch.tensor([0.0, 0.0 if sigma is None else math.log(sigma)], dtype=DT)
        w = torch.tensor([8.0, 4.0], dtype=DT)
        for _ in range(14):
            A = torch.linspace(float(c[0] - w[0]), float(c[0] + w[0]), 41, dtype=DT)
            S = (
                torch.linspace(float(c[1] - w[1]), float(c[1] + w[1]), 41, dtype=DT)
                if sigma is None
                else c[1:2]
            )
            E = self.evidence(A.exp()[:, None], S.exp()[None, :])
            i, j = divmod(int(E.argmax()), E.shape[1])
            c = torch.stack([A[i], S[j]])
            w = w / 5
        return float(c[0].exp()), float(c[1].exp())


def test_blr_closed_form_is_the_dense_gaussian():
    blr = BLR()
    for a, s in [(0.3, 0.5), (2.0, 1.3)]:
        torch.testing.assert_close(
            blr.evidence(a, s), blr.evidence_dense(a, s), rtol=1e-12, atol=1e-10
        )


@pytest.mark.parametrize("structure", EXACT_FOR_LINEAR)
def test_log_marginal_likelihood_equals_closed_form_evidence(structure):
    blr = BLR(seed=1)
    alpha, sigma = 0.7, 0.6
    la = LaplaceWrapper(
        blr.model_at_map(alpha, sigma),
        "regression",
        structure=structure,
        prior_precision=alpha,
        sigma_noise=sigma,
    ).fit(blr.loader())
    torch.testing.assert_close(
        la.log_marginal_likelihood(), blr.evidence(alpha, sigma), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("structure", EXACT_FOR_LINEAR)
def test_marglik_optimum_equals_closed_form_maximiser_2d(structure):
    blr = BLR()
    alpha, sigma = blr.maximiser()
    la = LaplaceWrapper(
        blr.model_at_map(alpha, sigma),
        "regression",
        structure=structure,
        prior_precision=1.0,
        sigma_noise=1.0,
    ).fit(blr.loader())
    la.optimize_prior_precision("marglik", tune_sigma_noise=True, n_steps=1000)
    assert abs(float(la.prior_precision) / alpha - 1) < 1e-3
    assert abs(float(la.sigma_noise) / sigma - 1) < 1e-3
    # the evidence curve ends at the maximum
    torch.testing.assert_close(
        la.marglik_result_.evidence[-1], blr.evidence(alpha, sigma), rtol=1e-8, atol=1e-8
    )


def test_marglik_optimum_equals_closed_form_maximiser_1d():
    blr = BLR(seed=2)
    sigma = 0.45
    alpha, _ = blr.maximiser(sigma=sigma)
    la = LaplaceWrapper(
        blr.model_at_map(alpha, sigma),
        "regression",
        structure="full",
        prior_precision=5.0,
        sigma_noise=sigma,
    ).fit(blr.loader())
    la.optimize_prior_precision(n_steps=1000)
    assert abs(float(la.prior_precision) / alpha - 1) < 1e-3
    assert float(la.sigma_noise) == pytest.approx(sigma, rel=1e-15)


@pytest.mark.parametrize("structure", EXACT_FOR_LINEAR)
def test_glm_predictive_equals_exact_posterior_predictive(structure):
    blr = BLR(seed=3)
    alpha, sigma = 1.3, 0.4
    la = LaplaceWrapper(
        blr.model_at_map(alpha, sigma),
        "regression",
        structure=structure,
        prior_precision=alpha,
        sigma_noise=sigma,
    ).fit(blr.loader())
    xs = torch.randn(5, blr.D, generator=torch.Generator().manual_seed(9), dtype=DT)
    xa = torch.cat([xs, torch.ones(5, 1, dtype=DT)], 1)
    mean, S = blr.posterior(alpha, sigma)
    pred = la.predict(xs)
    torch.testing.assert_close(pred.mean[:, 0], xa @ mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        pred.variance[:, 0], ((xa @ S) * xa).sum(-1) + sigma**2, rtol=1e-10, atol=1e-12
    )


# -- the shared-spectrum evidence is the posterior's evidence ------------------------------------


def _prior_for(kind, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind is PriorKind.SCALAR:
        return torch.tensor(0.8, dtype=DT)
    n = len(layout.names) if kind is PriorKind.LAYERWISE else layout.n_params
    return 0.3 + torch.rand(n, generator=g, dtype=DT)


SPECTRAL_PAIRS = [(s, PriorKind.SCALAR) for s in STRUCT_NAMES] + [
    ("diag", k) for k in (PriorKind.LAYERWISE, PriorKind.DIAGONAL) if "diag" in STRUCT_NAMES
]


@pytest.mark.parametrize("structure,kind", SPECTRAL_PAIRS)
@pytest.mark.parametrize("name", ["mlp_regression", "mlp_classification"])
def test_spectral_evidence_and_gradient_equal_the_posterior_evidence(name, structure, kind):
    case = make_case(name)
    la = LaplaceWrapper(case.model, case.likelihood, structure=structure).fit(case.loader())
    lam = ml.curvature_spectrum(la.posterior, kind)
    assert lam is not None and lam.shape == (la.n_params,)
    prec = _prior_for(kind, la.fitted.layout)
    sigma = torch.tensor(0.7 if case.likelihood == "regression" else 1.0, dtype=DT)
    spec = ml.SpectralEvidence(
        lam,
        la.posterior.mean,
        la.fitted.statistics,
        la.fitted.likelihood,
        kind=kind,
        layout=la.fitted.layout,
        temperature=1.0,
    )
    u = torch.log(prec).requires_grad_(True)
    ls = torch.log(sigma).requires_grad_(True)
    ref = ml.log_marginal_likelihood(
        la.fitted.posterior_at(torch.exp(u), torch.exp(ls)),
        la.fitted.statistics,
        la.fitted.likelihood,
        torch.exp(ls),
    )
    g_ref = torch.autograd.grad(ref, [u, ls], allow_unused=True)
    e, gu, gls = spec.value_and_grad(u.detach(), ls.detach())
    torch.testing.assert_close(e, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gu, g_ref[0], rtol=1e-9, atol=1e-10)
    if case.likelihood == "regression":
        torch.testing.assert_close(gls, g_ref[1], rtol=1e-9, atol=1e-10)
    if kind is PriorKind.SCALAR:
        ef, guf, glsf = spec.scalar_value_and_grad(float(u.detach()), float(ls.detach()))
        assert ef == pytest.approx(float(ref.detach()), rel=1e-10)
        assert guf == pytest.approx(float(g_ref[0]), rel=1e-9, abs=1e-10)
        if case.likelihood == "regression":
            assert glsf == pytest.approx(float(g_ref[1]), rel=1e-9)


@pytest.mark.parametrize("structure", STRUCT_NAMES)
def test_spectral_and_generic_paths_take_the_same_steps(structure, monkeypatch):
    case = make_case("mlp_regression")
    runs = []
    for patched in (False, True):
        la = LaplaceWrapper(case.model, "regression", structure=structure).fit(case.loader())
        if patched:
            monkeypatch.setattr(ml, "curvature_spectrum", lambda post, kind: None)
        la.optimize_prior_precision(tune_sigma_noise=True, n_steps=30)
        runs.append(la)
    assert runs[0].marglik_result_.shared_spectrum and not runs[1].marglik_result_.shared_spectrum
    torch.testing.assert_close(runs[0].prior_precision, runs[1].prior_precision, rtol=1e-8, atol=0)
    torch.testing.assert_close(runs[0].sigma_noise, runs[1].sigma_noise, rtol=1e-8, atol=0)
    torch.testing.assert_close(
        runs[0].marglik_result_.evidence, runs[1].marglik_result_.evidence, rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("structure", STRUCT_NAMES)
@pytest.mark.parametrize("prior_structure", ["layerwise", "diagonal"])
def test_marglik_with_non_scalar_priors_raises_the_evidence(structure, prior_structure):
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure=structure).fit(case.loader())
    if structure == "kfac" and prior_structure == "diagonal":
        with pytest.raises(ValueError, match="prior_precision must be a scalar or have shape"):
            la.optimize_prior_precision(prior_structure=prior_structure)
        return
    before = float(la.log_marginal_likelihood())
    la.optimize_prior_precision(prior_structure=prior_structure, n_steps=50)
    T, P = len(la.fitted.layout.names), la.n_params
    assert la.prior_precision.shape == ((T,) if prior_structure == "layerwise" else (P,))
    after = la.log_marginal_likelihood()
    assert float(after) > before
    torch.testing.assert_close(after, la.marglik_result_.evidence[-1], rtol=1e-10, atol=1e-10)


def test_convert_prior_between_structures():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="diag").fit(case.loader())
    lay = la.fitted.layout
    per_tensor = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=DT)
    full = ml.convert_prior(per_tensor, PriorKind.DIAGONAL, lay)
    torch.testing.assert_close(full, lay.expand_per_tensor(per_tensor))
    torch.testing.assert_close(ml.convert_prior(full, PriorKind.LAYERWISE, lay), per_tensor)
    gm = torch.exp(
        (torch.log(per_tensor) * torch.tensor(lay.numels, dtype=DT)).sum() / lay.n_params
    )
    torch.testing.assert_close(ml.convert_prior(per_tensor, PriorKind.SCALAR, lay), gm)
    torch.testing.assert_close(
        ml.convert_prior(torch.tensor(3.0, dtype=DT), PriorKind.LAYERWISE, lay),
        torch.full((4,), 3.0, dtype=DT),
    )


def test_no_shared_spectrum_for_non_scalar_priors_except_diag():
    case = make_case("mlp_classification")
    for structure in STRUCT_NAMES:
        la = LaplaceWrapper(case.model, "classification", structure=structure).fit(case.loader())
        for kind in (PriorKind.LAYERWISE, PriorKind.DIAGONAL):
            lam = ml.curvature_spectrum(la.posterior, kind)
            assert (lam is not None) == (structure == "diag")


# -- gridsearch -------------------------------------------------------------------------------------


def test_gridsearch_picks_the_minimum_of_a_u_shaped_validation_curve():
    # The predictive variance v(α) = x Σ(α) xᵀ + σ² falls monotonically in α; a validation
    # residual r with r² = v(α_true) makes NLL(α) = ½log(2πv) + r²/(2v) a U with its minimum
    # exactly at α_true, a grid point.
    blr = BLR(seed=4)
    sigma = 0.3
    la = LaplaceWrapper(
        blr.model_at_map(1.0, sigma),
        "regression",
        structure="full",
        prior_precision=1.0,
        sigma_noise=sigma,
    ).fit(blr.loader())
    grid = ml.default_grid((-4, 4), 41)
    k_true = 27
    x_val = torch.tensor([[3.0, -2.0, 1.5]], dtype=DT)
    xa = torch.cat([x_val, torch.ones(1, 1, dtype=DT)], 1)
    G = blr.Xa.T @ blr.Xa / sigma**2

    def v_of(alpha):
        S = torch.linalg.inv(G + alpha * torch.eye(4, dtype=DT))
        return float(xa @ S @ xa.T) + sigma**2

    with torch.no_grad():
        f = la.model(x_val)
    y_val = f + math.sqrt(v_of(float(grid[k_true])))
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=1)
    la.optimize_prior_precision("gridsearch", val_loader=val)
    res = la.gridsearch_result_
    assert res.best_index == k_true
    assert float(la.prior_precision) == pytest.approx(float(grid[k_true]), rel=1e-12)
    r2 = float((y_val - f) ** 2)
    ref = torch.tensor(
        [0.5 * math.log(2 * math.pi * v_of(float(a))) + r2 / (2 * v_of(float(a))) for a in grid],
        dtype=DT,
    )
    torch.testing.assert_close(res.scores, ref, rtol=1e-9, atol=1e-10)
    d = torch.diff(res.scores)
    assert bool((d[:k_true] < 0).all()) and bool((d[k_true:] > 0).all())
    # each point is evaluated on its own: a second run gives the same curve
    la.optimize_prior_precision("gridsearch", val_loader=val)
    torch.testing.assert_close(la.gridsearch_result_.scores, res.scores, rtol=0, atol=0)


def test_gridsearch_ties_go_to_the_larger_precision():
    # a bias-free linear model at x = 0 has J = 0: every precision scores the same
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    X = torch.randn(20, 3, generator=g, dtype=DT)
    y = torch.randn(20, 1, generator=g, dtype=DT)
    la = LaplaceWrapper(model, "regression", structure="diag").fit(
        DataLoader(TensorDataset(X, y), batch_size=10)
    )
    val = DataLoader(
        TensorDataset(torch.zeros(4, 3, dtype=DT), torch.ones(4, 1, dtype=DT)), batch_size=2
    )
    la.optimize_prior_precision("gridsearch", val_loader=val, grid=[0.5, 3.0, 2.0, 0.1])
    res = la.gridsearch_result_
    torch.testing.assert_close(res.grid, torch.tensor([0.1, 0.5, 2.0, 3.0], dtype=DT))
    assert res.best_index == 3 and float(la.prior_precision) == 3.0


@pytest.mark.parametrize(
    "predict_method,link", [("glm", "probit"), ("glm", "bridge"), ("glm", "mc"), ("nn", None)]
)
def test_gridsearch_classification_scores_are_validation_nll(predict_method, link):
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="kfac").fit(case.loader())
    xv = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    yv = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    val = DataLoader(TensorDataset(xv, yv), batch_size=3)
    grid = [0.1, 1.0, 10.0]
    la.optimize_prior_precision(
        "gridsearch",
        val_loader=val,
        grid=grid,
        predict_method=predict_method,
        link=link,
        n_samples=20,
        generator=torch.Generator().manual_seed(5),
    )
    res = la.gridsearch_result_
    assert float(la.prior_precision) == float(res.best)
    # recompute the curve point by point with predict (deterministic links only)
    if link in ("probit", "bridge"):
        for a, sc in zip(grid, res.scores):
            la.set_hyperparameters(prior_precision=a)
            p = la.predict(xv, link=link).mean
            ref = -torch.log(p[torch.arange(8), yv]).mean()
            assert float(sc) == pytest.approx(float(ref), rel=1e-10)


def test_gridsearch_uncached_jacobians_give_the_same_curve():
    case = make_case("mlp_binary")
    xv = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    yv = torch.randint(0, 2, (6,), generator=torch.Generator().manual_seed(2)).double()
    val = DataLoader(TensorDataset(xv, yv), batch_size=3)
    curves = []
    for budget in (1 << 30, 4 * 21 * 8 * 2):
        la = LaplaceWrapper(case.model, "binary", structure="diag", memory_budget=budget).fit(
            case.loader()
        )
        la.optimize_prior_precision("gridsearch", val_loader=val, log_range=(-2, 2), n_points=5)
        curves.append(la.gridsearch_result_.scores)
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-12, atol=1e-14)


# -- failures leave the hyperparameters in place ------------------------------------------------


def test_failed_marglik_leaves_hyperparameters_unchanged():
    case = make_case("mlp_regression")
    for structure in ("diag", "full"):
        la = LaplaceWrapper(
            case.model, "regression", structure=structure, prior_precision=2.0, sigma_noise=0.5
        ).fit(case.loader())
        with pytest.raises(
            RuntimeError, match="marginal-likelihood tuning must keep the evidence finite"
        ):
            la.optimize_prior_precision(tune_sigma_noise=True, lr=1e4, n_steps=50)
        assert float(la.prior_precision) == 2.0 and float(la.sigma_noise) == 0.5
        assert float(la.posterior.prior.precision) == 2.0
        assert not hasattr(la, "marglik_result_")
    # generic path (full with a layerwise prior)
    la = LaplaceWrapper(
        case.model, "regression", structure="full", prior_precision=torch.full((4,), 2.0, dtype=DT)
    ).fit(case.loader())
    with pytest.raises(
        RuntimeError, match="marginal-likelihood tuning must keep the evidence finite"
    ):
        la.optimize_prior_precision(lr=1e4, n_steps=50)
    torch.testing.assert_close(la.prior_precision, torch.full((4,), 2.0, dtype=DT))


def test_failed_gridsearch_leaves_hyperparameters_unchanged():
    case = make_case("mlp_regression")
    la = LaplaceWrapper(case.model, "regression", structure="diag", prior_precision=2.0).fit(
        case.loader()
    )
    val = DataLoader(
        TensorDataset(case.X[:4], torch.full((4, 2), float("nan"), dtype=DT)), batch_size=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the error alone reports the failures
        with pytest.raises(
            RuntimeError,
            match=r"gridsearch must find a grid point with a finite.*First failure: gridsearch "
            r"scored prior_precision=0\.0001 as inf: its validation NLL is nan\. 40 more",
        ):
            la.optimize_prior_precision("gridsearch", val_loader=val)
    assert float(la.prior_precision) == 2.0 and not hasattr(la, "gridsearch_result_")


# -- errors ----------------------------------------------------------------------------------------


def test_tuning_errors():
    cls = make_case("mlp_classification")
    la = LaplaceWrapper(cls.model, "classification", structure="diag").fit(cls.loader())
    val = cls.loader()
    with pytest.raises(
        ValueError,
        match=r"method must be one of \['marglik', 'gridsearch', 'marglik_temperature', 'temperature'\]",
    ):
        la.optimize_prior_precision("grid")
    with pytest.raises(ValueError, match="val_loader must be given with method='gridsearch'"):
        la.optimize_prior_precision("gridsearch")
    with pytest.raises(ValueError, match="val_loader must be left unset with method='marglik'"):
        la.optimize_prior_precision("marglik", val_loader=val)
    with pytest.raises(ValueError, match="n_steps, lr must be left unset with method='gridsearch'"):
        la.optimize_prior_precision("gridsearch", val_loader=val, n_steps=3, lr=0.1)
    with pytest.raises(ValueError, match="tune_sigma_noise=True needs likelihood='regression'"):
        la.optimize_prior_precision(tune_sigma_noise=True)
    with pytest.raises(ValueError, match="n_steps must be a positive integer; got 0"):
        la.optimize_prior_precision(n_steps=0)
    with pytest.raises(ValueError, match="lr must be a finite float > 0; got -1"):
        la.optimize_prior_precision(lr=-1.0)
    with pytest.raises(
        ValueError,
        match=r"prior_structure must be one of \['scalar', 'layerwise', "
        r"'diagonal'\]",
    ):
        la.optimize_prior_precision(prior_structure="per_layer")
    with pytest.raises(ValueError, match="grid must not be combined with log_range / n_points"):
        la.optimize_prior_precision("gridsearch", val_loader=val, grid=[1.0], n_points=3)
    with pytest.raises(ValueError, match="grid values must be finite and > 0"):
        la.optimize_prior_precision("gridsearch", val_loader=val, grid=[1.0, -2.0])
    with pytest.raises(ValueError, match="grid must be a non-empty 1-D sequence"):
        la.optimize_prior_precision("gridsearch", val_loader=val, grid=[])
    with pytest.raises(ValueError, match=r"log_range must be two finite numbers \(lo, hi\)"):
        la.optimize_prior_precision("gridsearch", val_loader=val, log_range=(2, -2))
    with pytest.raises(ValueError, match="n_points must be a positive integer; got 0"):
        la.optimize_prior_precision("gridsearch", val_loader=val, n_points=0)
    with pytest.raises(ValueError, match="n_samples must be a positive integer; got 0"):
        la.optimize_prior_precision("gridsearch", val_loader=val, n_samples=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None; got str"):
        la.optimize_prior_precision("gridsearch", val_loader=val, generator="seed")
    with pytest.raises(ValueError, match=r"link must be 'mc' \(or None\) with method='nn'"):
        la.optimize_prior_precision(
            "gridsearch", val_loader=val, predict_method="nn", link="bridge"
        )
    with pytest.raises(ValueError, match="val_loader must yield at least one batch"):
        la.optimize_prior_precision("gridsearch", val_loader=[])
    fresh = LaplaceWrapper(cls.model, "classification", structure="diag")
    with pytest.raises(
        RuntimeError, match=r"optimize_prior_precision\(\) needs a fitted posterior"
    ):
        fresh.optimize_prior_precision()
    reg = make_case("mlp_regression")
    lr_ = LaplaceWrapper(reg.model, "regression", structure="diag").fit(reg.loader())
    with pytest.raises(
        ValueError, match="tune_sigma_noise must be left unset with method='gridsearch'"
    ):
        lr_.optimize_prior_precision("gridsearch", val_loader=reg.loader(), tune_sigma_noise=True)


def test_tuning_objects_equal_their_strings():
    case = make_case("mlp_classification")
    val = case.loader()
    runs = []
    for method in (ml.GridSearch(val, n_points=5), ("gridsearch", {"n_points": 5})):
        la = LaplaceWrapper(case.model, "classification", structure="diag").fit(case.loader())
        if isinstance(method, tuple):
            la.optimize_prior_precision(method[0], val_loader=val, **method[1])
        else:
            la.optimize_prior_precision(method)
        runs.append(la)
    torch.testing.assert_close(
        runs[0].gridsearch_result_.scores, runs[1].gridsearch_result_.scores, rtol=0, atol=0
    )
    la = runs[0]
    la.optimize_prior_precision(ml.Marglik(n_steps=3, lr=0.05))
    assert la.marglik_result_.evidence.shape == (4,)  # the start and 3 steps
    tuned = ml.MarglikTemperature(val, n_steps=2).tune(la.fitted)
    assert float(tuned.hyperparameters.predictive_temperature) == float(
        tuned.temperature.temperature
    )
    assert la.fitted.hyperparameters.predictive_temperature == 1  # tune() changes nothing


def test_tuning_objects_validate_their_options_at_construction():
    with pytest.raises(ValueError, match="n_steps must be a positive integer; got 0"):
        ml.Marglik(n_steps=0)
    with pytest.raises(ValueError, match=r"prior_structure must be one of \['scalar'"):
        ml.Marglik(prior_structure="blockwise")
    with pytest.raises(ValueError, match="val_loader must be given with method='gridsearch'"):
        ml.GridSearch(None)
    with pytest.raises(ValueError, match="grid must not be combined with log_range"):
        ml.GridSearch([], grid=[1.0], n_points=3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None; got int"):
        ml.MarglikTemperature([], generator=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_steps'"):
        ml.GridSearch([], n_steps=3)
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="diag").fit(case.loader())
    with pytest.raises(
        ValueError,
        match=r"n_steps must be left unset with method='gridsearch'.*GridSearch takes val_loader, "
        r"grid, log_range, n_points",
    ):
        la.optimize_prior_precision("gridsearch", val_loader=[], n_steps=3)
    with pytest.raises(ValueError, match="lr must be left unset with a tuning object"):
        la.optimize_prior_precision(ml.Marglik(), lr=0.5)


def test_gridsearch_warns_once_naming_numerical_failures_and_raises_other_errors(monkeypatch):
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="diag").fit(case.loader())
    fitted = la.fitted

    def failing(prior_precision=None, sigma_noise=None):
        if prior_precision is not None and float(prior_precision) > 1:
            raise RuntimeError("Cholesky failed")
        return type(fitted).posterior_at(fitted, prior_precision, sigma_noise)

    object.__setattr__(fitted, "posterior_at", failing)
    with pytest.warns(
        RuntimeWarning, match=r"gridsearch scored prior_precision=10 as inf: .*Cholesky failed"
    ):
        tuned = ml.GridSearch(case.loader(), grid=[0.1, 10.0]).tune(fitted)
    assert tuned.gridsearch.scores[1] == math.inf and float(tuned.gridsearch.best) == 0.1
    # several failing points: one warning naming the first failure and the other points
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = ml.GridSearch(case.loader(), grid=[0.1, 10.0, 100.0, 1000.0]).tune(fitted)
    failed = [w for w in caught if "scored" in str(w.message)]
    assert len(failed) == 1, [str(w.message) for w in caught]
    assert re.search(
        r"prior_precision=10 as inf: .*Cholesky failed.*2 more grid points scored inf "
        r"likewise: 100, 1e\+03",
        str(failed[0].message),
    )
    assert tuned.gridsearch.scores[1:].isinf().all() and float(tuned.gridsearch.best) == 0.1

    def wrong(prior_precision=None, sigma_noise=None):
        raise ValueError("a bug, not a numerical failure")

    object.__setattr__(fitted, "posterior_at", wrong)
    with pytest.raises(ValueError, match="a bug, not a numerical failure"):
        ml.GridSearch(case.loader(), grid=[0.1, 10.0]).tune(fitted)


# -- grid search: empty validation batches, the edge of the grid -----------------------------------


def test_gridsearch_skips_empty_validation_batches():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure="diag").fit(case.loader())
    grid = [0.5, 1.0, 2.0]
    zero = (case.X[:0], case.y[:0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.optimize_prior_precision("gridsearch", val_loader=[(case.X, case.y)], grid=grid)
        ref = la.gridsearch_result_.scores
        la.optimize_prior_precision(
            "gridsearch", val_loader=[zero, (case.X, case.y), zero], grid=grid
        )
    torch.testing.assert_close(la.gridsearch_result_.scores, ref, rtol=0, atol=0)


def test_gridsearch_at_the_edge_of_its_grid_warns_how_to_widen_it():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure="full").fit(case.loader())
    with torch.no_grad():
        logits = case.model(case.X)
    # labels = the MAP's own predictions: less posterior spread scores better, top edge wins
    right = DataLoader(TensorDataset(case.X, logits.argmax(-1)), batch_size=6)
    with pytest.warns(
        UserWarning,
        match=r"gridsearch chose prior_precision=0\.01, the largest value of its grid "
        r"0\.0001\.\.0\.01; the best precision may lie beyond it\. To search further, widen the "
        r"grid with log_range=\(-4, 0\) \(powers of 10\)\.",
    ):
        la.optimize_prior_precision("gridsearch", val_loader=right, log_range=(-4, -2))
    assert la.gridsearch_result_.best_index == 40
    # labels = the MAP's least likely classes: more spread scores better, the bottom edge wins
    wrong = DataLoader(TensorDataset(case.X, logits.argmin(-1)), batch_size=6)
    with pytest.warns(
        UserWarning,
        match=r"the smallest value of its grid 100\.\.1e\+04; .* pass grid= reaching further, "
        r"e\.g\. grid=torch\.logspace\(0, 4, 17\)\.",
    ):
        la.optimize_prior_precision("gridsearch", val_loader=wrong, grid=[1e2, 1e3, 1e4])
    assert la.gridsearch_result_.best_index == 0
    # a grid of one point, or a choice inside the grid: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la.optimize_prior_precision("gridsearch", val_loader=right, grid=[0.1])
    grid = torch.tensor([0.1, 1.0, 10.0], dtype=DT)
    scores = torch.tensor([2.0, 1.0, 3.0], dtype=DT)
    assert grid_edge_warning(GridsearchResult(grid, scores, 1), explicit_grid=True) is None
    assert "largest" in grid_edge_warning(GridsearchResult(grid, scores, 2), explicit_grid=False)
