"""The validation-tuned predictive temperature: safe on tiny and error-free splits, the
default method with a validation loader, temperature-only calibration, and σ of the diag
structure from the training residuals.

References are computed another way than the library: the regularised objective summed by
hand over a dense grid of T, the residual σ from the network's outputs, the coverage of
Gaussian intervals counted directly.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import make_case
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper, MarglikTemperature, Temperature
from laplace_ggn.marglik import temperature_edge_warning, tune_predictive_temperature

DT = torch.float64


def _objective(probs, y, t):
    """Summed NLL + half a uniform-label pseudo-observation + N(0, 1) prior on log T."""
    p_t = torch.softmax(torch.log(probs) / t, -1)
    nll = -torch.log(p_t[range(len(y)), y]).sum()
    return float(nll - 0.5 * p_t.log().mean() + 0.5 * math.log(t) ** 2)


def _error_free(n=40, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, C, generator=g, dtype=DT), -1)
    return probs, probs.argmax(-1)  # every arg-max right: zero errors


def test_error_free_split_regularised_not_one_hot():
    probs, y = _error_free()
    plain = tune_predictive_temperature(probs, y, regularize=False)
    assert plain.n_errors == 0 and plain.at_edge == "smallest"
    assert float(plain.temperature) < 0.0101  # the plain search collapses
    msg = temperature_edge_warning(plain)
    assert "smallest value of its range 0.01..100" in msg and "0 of 40" in msg
    assert "Pass a larger val_loader" in msg and "method='marglik'" in msg
    res = tune_predictive_temperature(probs, y)
    T = float(res.temperature)
    assert res.at_edge is None and temperature_edge_warning(res) is None
    grid = torch.logspace(-2, 2, 1601).tolist()
    assert _objective(probs, y, T) <= min(_objective(probs, y, t) for t in grid) + 1e-9
    tempered = torch.softmax(torch.log(probs) / T, -1)
    # not one-hot: the mean confidence stays below 1 - 1/(2N)
    assert 0.01 < T < 1 and float(tempered.max(-1).values.mean()) < 1 - 1 / 80


def test_single_point_splits_keep_T_near_one():
    probs = torch.tensor([[0.7, 0.2, 0.1]], dtype=DT)
    for label in (0, 2):  # right, then wrong
        res = tune_predictive_temperature(probs, torch.tensor([label]))
        T = float(res.temperature)
        assert res.at_edge is None and math.exp(-2.5) < T < math.exp(2.5)
        grid = torch.logspace(-2, 2, 1601).tolist()
        y = torch.tensor([label])
        assert _objective(probs, y, T) <= min(_objective(probs, y, t) for t in grid) + 1e-9
    plain = tune_predictive_temperature(probs, torch.tensor([2]), regularize=False)
    assert plain.at_edge == "largest"


@pytest.mark.parametrize("regularize", [False, True])
def test_the_search_refines_between_grid_points(regularize):
    """Both objectives are refined by the golden-section search: the chosen T beats a fine grid."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 5, generator=g, dtype=torch.float64) * 3
    y = torch.multinomial((logits / 1.7).softmax(-1), 1, generator=g).reshape(-1)
    probs = logits.softmax(-1)
    res = tune_predictive_temperature(probs, y, regularize=regularize)
    coarse = torch.logspace(-2, 2, 81, dtype=torch.float64)
    assert not bool(torch.isclose(coarse, res.temperature.double(), rtol=1e-6).any())
    fine = tune_predictive_temperature(probs, y, regularize=regularize, n_points=4001)
    assert abs(math.log(float(res.temperature) / float(fine.temperature))) < 1e-3
    if not regularize:  # the validation NLL itself is the objective
        assert res.nll <= fine.nll + 1e-9


def test_binary_error_free_split():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(30, 1, generator=g, dtype=DT) * 0.4 + 0.55
    res = tune_predictive_temperature(p, torch.ones(30, dtype=DT), binary=True)
    plain = tune_predictive_temperature(p, torch.ones(30, dtype=DT), binary=True, regularize=False)
    assert plain.at_edge == "smallest" and res.at_edge is None and res.n_errors == 0

    def objective(t):
        q = torch.sigmoid(torch.logit(p) / t)
        uniform = -0.5 * (q.log() + (1 - q).log()).mean()
        return float(-q.log().sum() + 0.5 * uniform + 0.5 * math.log(t) ** 2)

    grid = torch.logspace(-2, 2, 1601).tolist()
    assert objective(float(res.temperature)) <= min(objective(t) for t in grid) + 1e-9


def _fit():
    case = make_case("mlp_classification", 0, n=16)
    la = LaplaceWrapper(case.model, "classification", structure="full").fit(case.loader())
    return case, la


def test_the_default_with_a_loader_is_evidence_and_temperature():
    case, la = _fit()
    g = torch.Generator().manual_seed(5)
    Xv = torch.randn(25, 3, generator=g, dtype=DT)
    ref = LaplaceWrapper(case.model, "classification", structure="full").fit(case.loader())
    ref.optimize_prior_precision("marglik")
    alpha = ref.prior_precision.clone()
    assert torch.equal(LaplaceWrapper(case.model, "classification", structure="full").fit(
        case.loader()).optimize_prior_precision().prior_precision, alpha)  # fmt: skip
    yv = ref.predict(Xv).mean.argmax(-1)  # a split without errors at the evidence's α
    val = DataLoader(TensorDataset(Xv, yv), batch_size=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la.optimize_prior_precision(val_loader=val)
    assert torch.equal(la.prior_precision, alpha)
    res = la.temperature_result_
    assert res.n_errors == 0 and res.at_edge is None and float(la.predictive_temperature) > 0.0101
    again = LaplaceWrapper(case.model, "classification", structure="full").fit(case.loader())
    again.optimize_prior_precision(MarglikTemperature(val_loader=val))
    assert float(again.predictive_temperature) == float(la.predictive_temperature)
    one = DataLoader(TensorDataset(Xv[:1], yv[:1]), batch_size=1)  # a single point
    la.optimize_prior_precision(val_loader=one)
    assert math.exp(-2.5) < float(la.predictive_temperature) < math.exp(2.5)


def test_temperature_alone_keeps_the_prior_precision():
    case, la = _fit()
    g = torch.Generator().manual_seed(6)
    Xv, yv = torch.randn(30, 3, generator=g, dtype=DT), torch.randint(0, 3, (30,), generator=g)
    val = DataLoader(TensorDataset(Xv, yv), batch_size=7)
    la.set_hyperparameters(prior_precision=3.0)
    untempered = la.predict(Xv).mean
    la.optimize_prior_precision("temperature", val_loader=val)
    assert float(la.prior_precision) == 3.0 and not hasattr(la, "marglik_result_")
    expected = tune_predictive_temperature(untempered, yv)
    assert float(la.predictive_temperature) == pytest.approx(float(expected.temperature), rel=1e-12)
    T = float(la.predictive_temperature)
    torch.testing.assert_close(la.predict(Xv).mean, torch.softmax(untempered.log() / T, -1))
    la.set_hyperparameters(predictive_temperature=1.0)
    la.optimize_prior_precision(Temperature(val_loader=val))
    assert float(la.predictive_temperature) == T


def test_tuning_errors_of_the_default_and_temperature():
    case, la = _fit()
    with pytest.raises(ValueError, match="val_loader must be given with method='temperature'"):
        la.optimize_prior_precision("temperature")
    with pytest.raises(ValueError, match="n_steps must be left unset with method='temperature'"):
        la.optimize_prior_precision("temperature", val_loader=case.loader(), n_steps=3)
    reg = make_case("mlp_regression")
    lr_ = LaplaceWrapper(reg.model, "regression", structure="diag").fit(reg.loader())
    with pytest.raises(ValueError, match="method='temperature' needs likelihood 'classification'"):
        lr_.optimize_prior_precision("temperature", val_loader=reg.loader())
    with pytest.raises(
        ValueError, match="val_loader without a method selects method='marglik_temperature'.*"
        "method='gridsearch'.*tune_sigma_noise=True"
    ):  # fmt: skip
        lr_.optimize_prior_precision(val_loader=reg.loader())


def test_an_edge_temperature_warns(monkeypatch):
    import functools

    import laplace_ggn.marglik.tempering as tp

    case, la = _fit()
    ref = LaplaceWrapper(case.model, "classification", structure="full").fit(case.loader())
    Xv = torch.randn(20, 3, generator=torch.Generator().manual_seed(8), dtype=DT)
    val = DataLoader(TensorDataset(Xv, ref.predict(Xv).mean.argmax(-1)), batch_size=20)
    plain = functools.partial(tune_predictive_temperature, regularize=False)
    monkeypatch.setattr(tp, "tune_predictive_temperature", plain)
    with pytest.warns(UserWarning, match="smallest value of its range.*Pass a larger val_loader"):
        la.optimize_prior_precision("temperature", val_loader=val)


# ------------------------------------------------------------------ σ of a regression


def _gap(seed, n):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 1, generator=g, dtype=DT) * 1.5 - 0.75
    x = torch.where(u < 0, u - 0.25, u + 0.25)  # [-1, -0.25] ∪ [0.25, 1]
    return x, torch.sin(3 * x) + 0.2 * torch.randn(n, 1, generator=g, dtype=DT)


@pytest.fixture(scope="module")
def gap_fit():
    x, y = _gap(0, 120)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1)).double()  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(2000):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model.eval(), x, y


def test_diag_sigma_comes_from_the_residuals(gap_fit):
    model, x, y = gap_fit
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    la = LaplaceWrapper(model, "regression", structure="diag").fit(loader)
    la.optimize_prior_precision("marglik", tune_sigma_noise=True)
    with torch.no_grad():
        rmse = float(((model(x) - y) ** 2).mean().sqrt())
    assert float(la.sigma_noise) == pytest.approx(rmse, rel=1e-10)
    assert 0.15 < float(la.sigma_noise) < 0.25  # the true σ is 0.2
    ref = LaplaceWrapper(model, "regression", structure="diag", sigma_noise=rmse).fit(loader)
    ref.optimize_prior_precision("marglik")
    assert float(la.prior_precision) == pytest.approx(float(ref.prior_precision), rel=1e-10)


def _coverage(la, x, y):
    p = la.predict(x)
    return float(((y - p.mean).abs() <= 1.6448536269514722 * p.variance.sqrt()).double().mean())


@pytest.mark.parametrize("structure", ["full", "kfac", "lowrank", "diag"])
def test_gap_coverage(gap_fit, structure):
    model, x, y = gap_fit
    la = LaplaceWrapper(model, "regression", structure=structure)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=50))
    la.optimize_prior_precision("marglik", tune_sigma_noise=True)
    xt, yt = _gap(1, 400)
    g = torch.Generator().manual_seed(2)
    xo = torch.cat([torch.rand(200, 1, generator=g, dtype=DT) * 0.5 - 0.25,  # the gap
                    torch.rand(200, 1, generator=g, dtype=DT) * 0.5 + 1])  # beyond 1  # fmt: skip
    yo = torch.sin(3 * xo) + 0.2 * torch.randn(400, 1, generator=g, dtype=DT)
    inside, outside = _coverage(la, xt, yt), _coverage(la, xo, yo)
    assert outside >= 0.85
    if structure == "diag":  # no correlations: over-dispersed where the data are (docs)
        assert inside >= 0.85
    else:
        assert 0.85 <= inside <= 0.95


def test_diag_sigma_per_output_from_the_residuals():
    case = make_case("mlp_regression", 1, n=20)
    la = LaplaceWrapper(case.model, "regression", structure="diag", sigma_noise=torch.ones(2))
    la.fit(case.loader()).optimize_prior_precision(tune_sigma_noise=True)
    with torch.no_grad():
        rmse = ((case.model(case.X) - case.y) ** 2).mean(0).sqrt()
    torch.testing.assert_close(la.sigma_noise, rmse, rtol=1e-10, atol=0)
