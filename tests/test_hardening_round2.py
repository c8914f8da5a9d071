"""Labels of every integer dtype, target types, 0-row inputs, empty batches, saturated logits,
integer scalars as counts, the grid-edge warning and the shift-invariant Laplace bridge."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from cases import make_case
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.marglik import GridsearchResult, grid_edge_warning
from laplace_ggn.predictive import laplace_bridge, mc_link, probit, psd_sqrt
from laplace_ggn.structures import STRUCTURES

STRUCTS = list(STRUCTURES)
DT = torch.float64


def _same_state(a, b) -> bool:
    """Recursive exact equality of state dicts (tensors bit for bit)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _quiet_fit(la: LaplaceWrapper, loader) -> LaplaceWrapper:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return la.fit(loader)


# -- item 8: labels of every integer dtype, target types, non-finite labels ---------------------


@pytest.mark.parametrize("structure", STRUCTS)
def test_class_labels_of_every_integer_dtype_equal_the_int64_fit(structure):
    case = make_case("mlp_classification")
    ref = _quiet_fit(
        LaplaceWrapper(case.model, case.likelihood, structure=structure), case.loader()
    )
    for dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        loader = DataLoader(TensorDataset(case.X, case.y.to(dtype)), batch_size=5)
        la = _quiet_fit(LaplaceWrapper(case.model, case.likelihood, structure=structure), loader)
        assert _same_state(la.state_dict(), ref.state_dict()), dtype
    # bool labels are classes 0 and 1
    yb = case.y % 2
    ref_b = _quiet_fit(
        LaplaceWrapper(case.model, case.likelihood, structure=structure),
        DataLoader(TensorDataset(case.X, yb), batch_size=5),
    )
    la = _quiet_fit(
        LaplaceWrapper(case.model, case.likelihood, structure=structure),
        DataLoader(TensorDataset(case.X, yb.bool()), batch_size=5),
    )
    assert _same_state(la.state_dict(), ref_b.state_dict())


def test_binary_targets_of_integer_and_bool_dtype_accepted():
    case = make_case("mlp_binary")
    ref = LaplaceWrapper(case.model, "binary", structure="full").fit(case.loader())
    for y in (case.y.long(), case.y.int(), case.y.bool(), case.y.to(torch.uint8)):
        la = LaplaceWrapper(case.model, "binary", structure="full").fit(
            DataLoader(TensorDataset(case.X, y), batch_size=5)
        )
        assert _same_state(la.state_dict(), ref.state_dict())


@pytest.mark.parametrize(
    ("targets", "name"),
    [
        (np.zeros(4, dtype=np.int64), "ndarray"),
        ([0, 1, 2, 0], "list"),
        (None, "NoneType"),
        (3, "int"),
    ],
)
def test_targets_that_are_not_tensors_raise_type_error_naming_the_type(targets, name):
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure="diag")
    msg = rf"targets in batch 0 must be a torch\.Tensor; got {name}\. Convert them with torch\.as_tensor"
    with pytest.raises(TypeError, match=msg):
        la.fit([(case.X[:4], targets)])
    assert not la.is_fitted
    la.fit(case.loader())
    before = la.state_dict()
    with pytest.raises(TypeError, match=msg):
        la.fit([(case.X[:4], targets)])
    assert _same_state(la.state_dict(), before)
    # the validation loader of the grid search is checked the same way
    with pytest.raises(TypeError, match=r"targets in val_loader batch 0 must be a torch\.Tensor"):
        la.optimize_prior_precision("gridsearch", val_loader=[(case.X[:4], targets)])
    assert _same_state(la.state_dict(), before)
    with pytest.raises(TypeError, match=r"targets in batch 0 must be real-valued; got dtype"):
        la.fit([(case.X[:4], torch.zeros(4, dtype=torch.complex64))])


def test_nonfinite_float_labels_reported_as_such():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure="diag")
    y = case.y.double()
    y[2] = float("inf")
    y[3] = -float("inf")
    with pytest.raises(
        ValueError,
        match=r"classification targets \(batch 0\) must be finite class indices; got 0 NaN and "
        r"2 Inf values\.",
    ):
        la.fit([(case.X, y)])
    y[2] = float("nan")
    with pytest.raises(ValueError, match=r"got 1 NaN and 1 Inf values"):
        la.fit([(case.X, y)])
    assert not la.is_fitted


# -- item 9: 0 rows and 0-dim inputs -------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("name", ["mlp_regression", "mlp_classification", "mlp_binary"])
def test_zero_rows_give_empty_results_of_the_right_shape(structure, name):
    case = make_case(name)
    la = _quiet_fit(LaplaceWrapper(case.model, case.likelihood, structure=structure), case.loader())
    C, P = la.predict(case.X[:1]).mean.shape[1], la.n_params
    x0 = case.X[:0]
    links = [None] if case.likelihood == "regression" else ["probit", "bridge", "mc"]
    g = torch.Generator().manual_seed(0)
    for link in links:
        pred = la.predict(x0, "glm", link=link, generator=g)
        assert pred.mean.shape == pred.variance.shape == (0, C)
        assert pred.mean.dtype == DT
    pred = la.predict(x0, "nn", n_samples=3, generator=g)
    assert pred.mean.shape == pred.variance.shape == (0, C)
    assert la.functional_covariance(x0).shape == (0, C, C)
    J, f = la.jacobians(x0)
    assert J.shape == (0, C, P) and f.shape == (0, C)
    # the same calls with rows still work afterwards
    assert la.predict(case.X[:2]).mean.shape == (2, C)


def test_mc_link_and_psd_sqrt_on_zero_rows():
    out = mc_link(torch.zeros(0, 3, dtype=DT), torch.zeros(0, 3, 3, dtype=DT), n_samples=4)
    assert out.mean.shape == out.variance.shape == (0, 3)
    assert psd_sqrt(torch.zeros(0, 3, 3, dtype=DT)).shape == (0, 3, 3)


def test_zero_dim_input_is_a_value_error():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure="kfac").fit(case.loader())
    x = torch.tensor(1.0, dtype=DT)
    msg = r"model input must have a leading batch dimension; got a 0-dim tensor\. Add one with"
    for call in (
        lambda: la.predict(x),
        lambda: la.predict(x, "nn"),
        lambda: la.functional_covariance(x),
        lambda: la.jacobians(x),
    ):
        with pytest.raises(ValueError, match=msg):
            call()
    before = la.state_dict()
    with pytest.raises(ValueError, match=r"model input in batch 1 must have a leading batch"):
        la.fit([(case.X[:4], case.y[:4]), (x, case.y[0])])
    assert _same_state(la.state_dict(), before)


# -- item 10: batches of 0 rows ------------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_empty_batches_are_skipped_anywhere(structure, subset):
    case = make_case("mlp_classification")
    X, y = case.X, case.y
    zero = (X[:0], y[:0])
    ref = LaplaceWrapper(case.model, case.likelihood, structure=structure, subset=subset)
    ref = _quiet_fit(ref, [(X[:5], y[:5]), (X[5:], y[5:])])
    la = LaplaceWrapper(case.model, case.likelihood, structure=structure, subset=subset)
    la = _quiet_fit(la, [zero, (X[:5], y[:5]), zero, zero, (X[5:], y[5:]), zero])
    assert _same_state(la.state_dict(), ref.state_dict())


@pytest.mark.parametrize("structure", STRUCTS)
def test_loader_of_only_empty_batches_refused_and_previous_fit_kept(structure):
    case = make_case("mlp_regression")
    zero = (case.X[:0], case.y[:0])
    la = LaplaceWrapper(case.model, case.likelihood, structure=structure)
    msg = r"train_loader must yield at least one non-empty batch; got 3 batch\(es\), all with 0 rows\."
    with pytest.raises(ValueError, match=msg):
        la.fit([zero, zero, zero])
    assert not la.is_fitted
    la.fit(case.loader())
    before = la.state_dict()
    with pytest.raises(ValueError, match=msg):
        la.fit([zero, zero, zero])
    assert _same_state(la.state_dict(), before)
    with pytest.raises(
        ValueError,
        match=r"targets in batch 1 must have as many rows as the input \(0\); got shape \(3, 2\)",
    ):
        la.fit([(case.X[:3], case.y[:3]), (case.X[:0], case.y[:3])])
    assert _same_state(la.state_dict(), before)


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


# -- item 11: saturated logits ---------------------------------------------------------------------


def _saturated(
    likelihood: str, scale: float = 1e20
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    C = {"classification": 3, "binary": 1, "regression": 2}[likelihood]
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C))
    with torch.no_grad():
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 3, generator=g)
    y = torch.randint(0, C, (12,), generator=g)
    if likelihood == "binary":
        y = torch.randint(0, 2, (12,), generator=g).float()
    elif likelihood == "regression":
        y = torch.randn(12, C, generator=g)
    return model, X, y


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("likelihood", ["classification", "binary"])
def test_saturated_logits_reported_not_returned(structure, likelihood):
    model, X, y = _saturated(likelihood)
    la = LaplaceWrapper(model, likelihood, structure=structure)
    _quiet_fit(la, [(X[:6], y[:6]), (X[6:], y[6:])])
    before = la.state_dict()
    with pytest.raises(
        RuntimeError,
        match=r"log marginal likelihood must be finite; got -inf in torch\.float32: the prior term "
        r"½\(θ\*−θ₀\)ᵀΛ₀\(θ\*−θ₀\) = inf\.",
    ):
        la.log_marginal_likelihood()
    with pytest.raises(RuntimeError, match=r"log marginal likelihood must be finite"):
        la.optimize_prior_precision("marglik", n_steps=3)
    assert _same_state(la.state_dict(), before)
    with pytest.raises(RuntimeError, match=r"functional covariance J Σ Jᵀ must be finite; got"):
        la.functional_covariance(X[:3])
    for link in ("probit", "bridge", "mc"):
        with pytest.raises(
            RuntimeError,
            match=r"functional covariance J Σ Jᵀ \(GLM predictive\) must be finite; got \d+ NaN "
            r"and \d+ Inf values out of \d+ \(shape \(3, \d, \d\), torch\.float32\)\. The "
            r"computation overflowed",
        ):
            la.predict(X[:3], link=link, generator=torch.Generator().manual_seed(0))
    # the sampled-network predictive is stable here (softmax / sigmoid of huge logits)
    pred = la.predict(X[:3], "nn", n_samples=8, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(pred.mean).all()) and bool(torch.isfinite(pred.variance).all())
    if likelihood == "classification":
        torch.testing.assert_close(pred.mean.sum(-1), torch.ones(3), rtol=0, atol=1e-6)
    assert _same_state(la.state_dict(), before)


def test_regression_loss_accumulated_in_float64():
    # outputs ~1e20 through a bias outside the subset: Σ(y - f)² overflows float32 only
    model, X, y = _saturated("regression", scale=1.0)
    with torch.no_grad():
        model[2].bias.fill_(1e20)
    la = LaplaceWrapper(model, "regression", structure="diag", subset=["2.weight"])
    la.fit([(X, y)])
    loss = la.state_dict()["fit_statistics"]["loss_sum"]
    ref = float(((y.double() - model(X).detach().double()) ** 2).sum())
    assert math.isfinite(loss) and abs(loss - ref) <= 1e-12 * ref
    # the evidence itself cannot be represented in float32: reported, naming the term
    with pytest.raises(
        RuntimeError,
        match=r"log marginal likelihood must be finite; got -inf in torch\.float32: the training "
        r"loss ℓ\(θ\*\) = inf\.",
    ):
        la.log_marginal_likelihood()
    # the predictive does not involve the loss and stays finite
    assert bool(torch.isfinite(la.predict(X[:2]).variance).all())


def test_overflowing_curvature_and_sampled_outputs_reported():
    model, X, y = _saturated("regression", scale=1e20)
    with pytest.raises(ValueError, match=r"curvature eigenvalues must be finite; got 0 NaN and"):
        LaplaceWrapper(model, "regression", structure="lowrank").fit([(X, y)])
    # σ = 1e20 is a float32 number, σ² is not: both predictives report the overflow
    model, X, y = _saturated("regression", scale=1.0)
    la = LaplaceWrapper(model, "regression", structure="diag", sigma_noise=1e20).fit([(X, y)])
    for method in ("glm", "nn"):
        with pytest.raises(
            RuntimeError,
            match=rf"predictive variance \(method='{method}'\) must be finite; got 0 NaN and 6 "
            r"Inf values out of 6 \(shape \(3, 2\), torch\.float32\)\. The computation overflowed",
        ):
            la.predict(X[:3], method, n_samples=4, generator=torch.Generator().manual_seed(0))


def test_links_stable_for_huge_finite_covariances():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 3, 3, generator=g)
    cov = 1e37 * A @ A.transpose(1, 2) / 3  # finite in float32, products of it are not
    f = torch.randn(4, 3, generator=g)
    for out in (
        probit(f, cov),
        laplace_bridge(f, cov),
        mc_link(f, cov, n_samples=16, generator=g),
    ):
        assert bool(torch.isfinite(out.mean).all()) and bool(torch.isfinite(out.variance).all())
        torch.testing.assert_close(out.mean.sum(-1), torch.ones(4), rtol=0, atol=1e-5)
    L = psd_sqrt(cov)
    torch.testing.assert_close(L @ L.transpose(1, 2) / 1e37, cov / 1e37, rtol=1e-3, atol=1e-3)


# -- item 12: option types, integer scalars as counts, the grid-edge warning ----------------------


def test_sigma_noise_and_memory_budget_types():
    case = make_case("mlp_regression")
    with pytest.raises(
        TypeError, match=r"sigma_noise must be a float or a 0-dim tensor; got str\."
    ):
        LaplaceWrapper(case.model, "regression", sigma_noise="a")
    la = LaplaceWrapper(case.model, "regression", structure="diag").fit(case.loader())
    with pytest.raises(TypeError, match=r"sigma_noise must be a float or a 0-dim tensor; got list"):
        la.set_hyperparameters(sigma_noise=[0.5])
    with pytest.raises(TypeError, match=r"sigma_noise must be a float or a 0-dim tensor; got bool"):
        la.log_marginal_likelihood(sigma_noise=True)
    assert (
        float(LaplaceWrapper(case.model, "regression", sigma_noise=np.float32(0.5)).sigma_noise)
        == 0.5
    )
    for bad in (True, False, 0, -3, 1.5, "1GB"):
        with pytest.raises(
            ValueError,
            match=re.escape(f"memory_budget must be a positive int (bytes); got {bad!r}."),
        ):
            LaplaceWrapper(case.model, "regression", memory_budget=bad)
    for good in (np.int64(2**30), np.int32(2**20), torch.tensor(2**30)):
        la = LaplaceWrapper(case.model, "regression", memory_budget=good)
        assert la.memory_budget == int(good) and type(la.memory_budget) is int


def test_numpy_and_torch_integer_scalars_accepted_as_counts():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure="full").fit(case.loader())
    ref = la.sample(3, generator=torch.Generator().manual_seed(1))
    for n in (np.int64(3), np.int32(3), torch.tensor(3)):
        torch.testing.assert_close(
            la.sample(n, generator=torch.Generator().manual_seed(1)), ref, rtol=0, atol=0
        )
    for bad in (True, np.bool_(True), torch.tensor(3.0), 3.0, torch.tensor([3])):
        with pytest.raises(ValueError, match=r"n must be a positive integer; got"):
            la.sample(bad)
    x = case.X[:4]
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    ref = la.predict(x, link="mc", n_samples=5, generator=g())
    got = la.predict(x, link="mc", n_samples=np.int64(5), generator=g())
    torch.testing.assert_close(got.mean, ref.mean, rtol=0, atol=0)
    assert la.predict(x, "nn", n_samples=torch.tensor(2)).mean.shape == (4, 3)
    low = LaplaceWrapper(case.model, case.likelihood, structure="lowrank", rank=np.int64(3))
    assert low.rank == 3 and type(low.rank) is int
    la.optimize_prior_precision(n_steps=np.int64(3))
    assert la.marglik_result_.evidence.shape == (4,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.optimize_prior_precision(
            "gridsearch", val_loader=case.loader(), n_points=np.int64(3), n_samples=np.int64(2)
        )
    assert la.gridsearch_result_.grid.shape == (3,)
    rep = la.kernel_decomposition(case.X, n_samples=np.int64(2), rank=np.int64(2))
    assert rep.rank == 2


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


# -- item 13: the Laplace bridge is invariant to shifting every logit ------------------------------


def _bridge_of_dirichlet(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian over logits that the Laplace bridge matches to Dirichlet(α) (its inverse map)."""
    K = alpha.shape[1]
    la = alpha.log()
    mu = la - la.mean(-1, keepdim=True)
    v = (1 / alpha) * (1 - 2 / K) + (1 / alpha).sum(-1, keepdim=True) / K**2
    return mu, torch.diag_embed(v)


def test_bridge_of_the_reported_example_is_shift_invariant():
    mu = torch.tensor([[3.0, 0.0, 0.0]], dtype=DT)
    cov = torch.diag(torch.tensor([20.0, 1.0, 1.0], dtype=DT))[None]
    ref = laplace_bridge(mu, cov)
    for shift in (-10.0, 10.0):
        out = laplace_bridge(mu + shift, cov)
        torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.variance, ref.variance, rtol=0, atol=1e-12)
    # the bridge of the projected Gaussian, written out: μ' = (2, -1, -1), diag(PΣP)
    v = torch.tensor([20 * 4 / 9 + 2 / 9, 20 / 9 + 4 / 9 + 1 / 9, 20 / 9 + 1 / 9 + 4 / 9], dtype=DT)
    m = torch.tensor([2.0, -1.0, -1.0], dtype=DT)
    a = (1 - 2 / 3 + m.exp() / 9 * (-m).exp().sum()) / v
    torch.testing.assert_close(ref.mean[0], a / a.sum(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("C", [2, 3, 5, 10])
def test_bridge_invariant_to_shifts_of_every_logit_and_sample(C):
    g = torch.Generator().manual_seed(C)
    mu = torch.randn(20, C, generator=g, dtype=DT) * 2
    A = torch.randn(20, C, C, generator=g, dtype=DT)
    cov = A @ A.transpose(1, 2) / C
    ref = laplace_bridge(mu, cov)
    one = torch.ones(C, C, dtype=DT)
    for shift in (-1e3, -10.0, -0.5, 3.0, 50.0):
        out = laplace_bridge(mu + shift, cov)
        torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(out.variance, ref.variance, rtol=0, atol=1e-10)
    # a random shift common to all logits of a sample (Σ + τ 11ᵀ) changes nothing either
    for tau in (0.1, 10.0):
        out = laplace_bridge(mu, cov + tau * one)
        torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(ref.mean.sum(-1), torch.ones(20, dtype=DT), rtol=0, atol=1e-12)


def test_binary_bridge_equals_the_two_class_bridge_of_any_shifted_pair():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(10, 1, generator=g, dtype=DT) * 3
    v = torch.rand(10, generator=g, dtype=DT) * 2 + 0.1
    binary = laplace_bridge(a, v[:, None, None], binary=True)
    for shift in (-5.0, 0.0, 7.0):
        # logits (s, s + a): the second class has probability sigmoid(a)
        mu = torch.cat([torch.full_like(a, shift), a + shift], 1)
        cov = torch.zeros(10, 2, 2, dtype=DT)
        cov[:, 1, 1] = v
        two = laplace_bridge(mu, cov)
        torch.testing.assert_close(two.mean[:, 1:], binary.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(two.variance[:, 1:], binary.variance, rtol=0, atol=1e-12)


@pytest.mark.parametrize("C", [2, 3, 5, 10])
def test_bridge_agrees_with_mc_where_the_bridge_is_accurate(C):
    """Gaussians of the Laplace-bridge family (the inverse map of a Dirichlet, α in [5, 50]).

    Measured over 3 seeds of 100 points per C: |bridge − MC| up to 0.005 for C = 2 (the MC
    error of 40,000 samples; median 0.0013), up to 0.071 for C = 3..10 (10,000 samples; median
    at most 0.023). The tolerances below (C = 2: 0.015 max / 0.004 median, with 20,000 samples;
    C > 2: 0.08 / 0.025) leave that margin. The projection onto the zero-sum subspace costs
    accuracy on this family for C > 2 (the bridge of the unprojected diagonal reproduces the
    Dirichlet to 0.009), the price of the shift invariance.
    """
    g = torch.Generator().manual_seed(100 + C)
    alpha = 5 + 45 * torch.rand(100, C, generator=g, dtype=DT)
    mu, cov = _bridge_of_dirichlet(alpha)
    S = 20_000 if C == 2 else 10_000
    ref = mc_link(mu, cov, n_samples=S, generator=torch.Generator().manual_seed(1)).mean
    err = (laplace_bridge(mu, cov).mean - ref).abs()
    tol_max, tol_median = (0.015, 0.004) if C == 2 else (0.08, 0.025)
    assert float(err.max()) <= tol_max, float(err.max())
    assert float(err.median()) <= tol_median, float(err.median())
    # the same after shifting every logit, and with a shared random shift (Σ + 11ᵀ)
    shifted = laplace_bridge(mu + 4.0, cov + torch.ones(C, C, dtype=DT)).mean
    assert float((shifted - ref).abs().max()) <= tol_max


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


class _Steep(nn.Module):
    """f = 1e20·tanh(1e20·w·x) + b: finite outputs, Jacobians that overflow float32 at |x| ~ 1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return 1e20 * torch.tanh(1e20 * self.w * x) + self.b


def test_overflowing_jacobians_outputs_and_covariance_reported():
    la = LaplaceWrapper(_Steep(), "regression", structure="full")
    la.fit([(torch.full((4, 1), 1e-25), torch.zeros(4, 1))])
    assert bool(torch.isfinite(la.jacobians(torch.full((2, 1), 1e-25))[0]).all())
    with pytest.raises(
        RuntimeError,
        match=r"Jacobians J\(x\) must be finite; got 0 NaN and 2 Inf values out of 4 "
        r"\(shape \(2, 1, 2\), torch\.float32\)",
    ):
        la.jacobians(torch.ones(2, 1))
    # outputs that overflow at the test inputs
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight.mul_(1e20)
    X = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    la = _quiet_fit(LaplaceWrapper(model, "classification", structure="diag"), [(X, X[:, 0] > 0)])
    with pytest.raises(RuntimeError, match=r"model output at the inputs must be finite; got 0 NaN"):
        la.jacobians(X * 1e19)
    # a prior precision of 1e-45 in float32: Σ = α⁻¹ in the kernel of G is not representable
    la = LaplaceWrapper(nn.Linear(3, 2), "regression", structure="lowrank", prior_precision=1e-45)
    la.fit([(torch.randn(1, 3), torch.randn(1, 2))])
    with pytest.raises(RuntimeError, match=r"posterior covariance Σ must be finite; got 0 NaN and"):
        la.posterior_covariance()


def test_training_loss_that_overflows_float64_refused():
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.bias.fill_(1e200)
    la = LaplaceWrapper(model, "regression", structure="diag", subset=["weight"])
    with pytest.raises(
        ValueError,
        match=r"training loss in batch 0 must be finite; got inf\. The model's outputs are too "
        r"large for the loss",
    ):
        la.fit([(torch.randn(4, 3, dtype=DT), torch.zeros(4, 1, dtype=DT))])
    assert not la.is_fitted


def test_mc_factor_retried_in_float64_then_named(monkeypatch):
    cov = torch.eye(3).expand(2, 3, 3)
    eigh = torch.linalg.eigh
    calls = []

    def flaky(A, *args, **kwargs):
        calls.append(A.dtype)
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    L = psd_sqrt(cov)
    assert calls == [torch.float32, torch.float64] and L.dtype == torch.float32
    torch.testing.assert_close(L @ L.transpose(1, 2), cov)

    def broken(A, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(
        RuntimeError,
        match=r"functional covariance J Σ Jᵀ must have an eigendecomposition for the mc link; "
        r"torch\.linalg\.eigh failed \(linalg\.eigh: failed to converge\)",
    ):
        mc_link(torch.zeros(2, 3), cov, n_samples=2)


def test_generator_val_loader_and_kernel_inputs_checked():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure="full").fit(case.loader())
    before = la.state_dict()
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None; got int\."):
        la.sample(2, generator=5)
    with pytest.raises(
        TypeError,
        match=r"val_loader must be an iterable of batches \(e\.g\. a DataLoader\); got int\.",
    ):
        la.optimize_prior_precision("gridsearch", val_loader=3)
    with pytest.raises(ValueError, match=r"x must hold at least one input; got 0 rows\."):
        la.kernel_decomposition(case.X[:0])
    assert _same_state(la.state_dict(), before)


def test_integer_scalars_accepted_by_linalg_calibration_operators_and_optim():
    from laplace_ggn.calibration import expected_calibration_error
    from laplace_ggn.linalg import cg, hutchinson_trace, lanczos, spectral_density
    from laplace_ggn.operators import MCFisherOperator
    from laplace_ggn.optim import NaturalGradient

    A = torch.diag(torch.arange(1.0, 7.0, dtype=DT))
    b = torch.ones(6, dtype=DT)
    torch.testing.assert_close(
        cg(A, b, max_iter=np.int64(6)).solution, cg(A, b, max_iter=6).solution
    )
    torch.testing.assert_close(lanczos(A, np.int64(2), n_iter=torch.tensor(6))[0], lanczos(A, 2)[0])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(
        hutchinson_trace(A, np.int32(4), generator=g()), hutchinson_trace(A, 4, generator=g())
    )
    assert spectral_density(A, n_probes=np.int64(2), n_lanczos=np.int64(3)).density.ndim == 1
    p = torch.softmax(torch.randn(8, 3, dtype=DT), -1)
    labels = torch.arange(8) % 3
    torch.testing.assert_close(
        expected_calibration_error(p, labels, n_bins=np.int64(5)),
        expected_calibration_error(p, labels, n_bins=5),
    )
    case = make_case("mlp_classification")
    F = MCFisherOperator(
        case.model, case.loader(), likelihood=case.likelihood, mc_samples=np.int64(2)
    )
    assert F.mc_samples == 2 and type(F.mc_samples) is int
    opt = NaturalGradient(
        case.model.parameters(), likelihood="classification", cg_max_iter=np.int64(5)
    )
    assert opt.cg_max_iter == 5
    with pytest.raises(ValueError, match=r"max_iter must be an integer >= 0; got True\."):
        cg(A, b, max_iter=True)
