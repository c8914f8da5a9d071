"""marglik_training: the loss it trains on, the evidence steps, T in the curvature and predictive.

Tiny float64 models; each check against a quantity computed another way (a hand-written SGD
step, ``dense_ggn`` of the model divided by T, explicit log-determinants).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import make_case
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laplace_ggn
from laplace_ggn import LaplaceWrapper, marglik_training
from laplace_ggn.testing import dense_ggn
from laplace_ggn.training.hyper import HyperState, TemperatureTerm

FAST = {"n_hypersteps": 3, "progress": False}


def _loader(case, batch_size=6, shuffle=False) -> DataLoader:
    return DataLoader(TensorDataset(case.X, case.y), batch_size=batch_size, shuffle=shuffle)


class _Scaled(nn.Module):
    def __init__(self, model, T):
        super().__init__()
        self.model, self.T = model, T

    def forward(self, x):
        return self.model(x) / self.T


def test_public_name():
    assert laplace_ggn.marglik_training is marglik_training
    assert "marglik_training" in laplace_ggn.__all__


def test_the_loss_is_the_mean_nll_plus_the_prior_over_n():
    """One SGD step equals -lr·∇(mean NLL + ½ Σ δ_t ‖θ_t‖² / N), δ the starting layerwise prior."""
    case = make_case("mlp_classification", 0)
    ref = make_case("mlp_classification", 0).model
    prec = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    res = marglik_training(
        case.model, _loader(case, 12), "classification", n_epochs=1, n_epochs_burnin=5,
        optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.1}, prior_precision=prec,
        structure="diag", **FAST,
    )  # fmt: skip
    N = case.X.shape[0]
    loss = nn.functional.cross_entropy(ref(case.X), case.y)
    loss = loss + sum(0.5 * d * (p**2).sum() for d, p in zip(prec, ref.parameters())) / N
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for p, q, g in zip(res.model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p, q - 0.1 * g, rtol=1e-12, atol=1e-14)
    assert res.history.loss.shape == (1,) and res.history.loss[0] == pytest.approx(
        float(loss.detach())
    )
    assert res.history.marglik_epochs == ()


def test_history_and_result_hold_the_learned_values():
    case = make_case("mlp_regression", 0, n=24)
    res = marglik_training(
        case.model, _loader(case), "regression", n_epochs=6, n_epochs_burnin=2,
        marglik_frequency=2, structure="full", optimizer_kwargs={"lr": 1e-2}, **FAST,
    )  # fmt: skip
    h = res.history
    assert h.marglik_epochs == (2, 4, 6)
    assert h.loss.shape == (6,) and h.prior_precision.shape == (6, 4)
    assert (
        torch.isnan(h.log_evidence[[0, 2, 4]]).all()
        and torch.isfinite(h.log_evidence[[1, 3, 5]]).all()
    )
    torch.testing.assert_close(res.laplace.prior_precision, h.prior_precision[-1])
    torch.testing.assert_close(res.laplace.sigma_noise, h.sigma_noise[-1])
    assert res.laplace.is_fitted and res.model is case.model
    # the evidence reported is the wrapper's at the learned values, at the final weights
    assert float(res.laplace.log_marginal_likelihood()) == pytest.approx(float(h.log_evidence[-1]))
    assert h.sigma_noise[0] == 1.0 and h.sigma_noise[-1] != 1.0


def test_the_hyperparameter_steps_ascend_the_evidence():
    case = make_case("mlp_regression", 1, n=24)
    la = LaplaceWrapper(case.model, "regression", structure="full").fit(_loader(case))
    from laplace_ggn.posteriors import PriorKind

    hs = HyperState(
        PriorKind.LAYERWISE, la.fitted.layout, torch.tensor(1.0, dtype=torch.float64),
        torch.tensor(1.0, dtype=torch.float64), 1.0, tune_sigma_noise=True,
        tune_temperature=False, lr=0.1,
    )  # fmt: skip
    before = float(la.log_marginal_likelihood())
    after = hs.ascend(la.fitted, None, 30)
    assert after > before + 1.0
    assert after == pytest.approx(
        float(la.log_marginal_likelihood(hs.prior_precision, hs.sigma_noise)), rel=1e-12
    )


def test_temperature_term_is_the_exact_loss_on_its_window():
    torch.manual_seed(0)
    f = 3 * torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (40,))
    T0 = 1.7

    def loss(T):
        return float(nn.functional.cross_entropy(f / T, y, reduction="sum"))

    temps = T0 * torch.exp(TemperatureTerm.offsets(torch.float64))
    term = TemperatureTerm(
        math.log(T0), torch.tensor([loss(float(T)) for T in temps], dtype=torch.float64)
    )
    for T in (T0, T0 * 0.7, T0 * 1.5):
        got = float(term(torch.tensor(math.log(T), dtype=torch.float64)))
        assert got == pytest.approx(loss(T), rel=1e-8)


def test_temperature_evidence_is_exact_at_the_refit_and_scales_the_curvature_by_t0_over_t():
    """E(T) = -ℓ(T) - ½θᵀΛ₀θ - ½log|(T₀/T)²G(T₀) + Λ₀| + ½log|Λ₀|, with G(T₀) of f/T₀."""
    case = make_case("mlp_classification", 0)
    T0 = 1.6
    la = LaplaceWrapper(case.model, "classification", structure="full", logit_temperature=T0)
    la.fit(_loader(case))
    G = dense_ggn(_Scaled(case.model, T0), case.X, case.y, "classification")
    torch.testing.assert_close(la.posterior.ggn, G, rtol=1e-10, atol=1e-12)
    from laplace_ggn.posteriors import PriorKind

    one = torch.tensor(1.0, dtype=torch.float64)
    hs = HyperState(
        PriorKind.SCALAR, la.fitted.layout, one * 0.8, one, T0, tune_sigma_noise=False,
        tune_temperature=True, lr=0.1,
    )  # fmt: skip
    with torch.no_grad():
        f = case.model(case.X)
    temps = T0 * torch.exp(TemperatureTerm.offsets(torch.float64))
    vals = torch.stack([nn.functional.cross_entropy(f / t, case.y, reduction="sum") for t in temps])
    term = TemperatureTerm(math.log(T0), vals)
    theta = la.posterior.mean
    P = theta.shape[0]
    for T in (T0, T0 * 1.3):
        with torch.no_grad():
            hs.log_t.fill_(math.log(T))
            got = hs.evidence(la.fitted, term)
        nll = nn.functional.cross_entropy(f / T, case.y, reduction="sum")
        Lam = (T0 / T) ** 2 * G + 0.8 * torch.eye(P, dtype=torch.float64)
        ref = -nll - 0.4 * theta @ theta - 0.5 * torch.logdet(Lam) + 0.5 * P * math.log(0.8)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
        if T == T0:
            torch.testing.assert_close(got, la.log_marginal_likelihood(0.8), rtol=1e-9, atol=1e-9)


def test_learned_temperature_is_in_the_curvature_and_the_predictive():
    case = make_case("mlp_classification", 2, n=30)
    res = marglik_training(
        case.model, _loader(case), "classification", n_epochs=4, n_epochs_burnin=0,
        marglik_frequency=2, structure="full", optimizer_kwargs={"lr": 1e-2}, **FAST,
    )  # fmt: skip
    la, T = res.laplace, res.temperature
    assert T == res.history.temperature[-1] and T != 1.0
    assert la.logit_temperature == T
    G = dense_ggn(_Scaled(case.model, T), case.X, case.y, "classification")
    torch.testing.assert_close(la.posterior.ggn, G, rtol=1e-10, atol=1e-12)
    # the GLM predictive of softmax(f / T): logits f/T, covariance JΣJᵀ/T²
    ref = LaplaceWrapper(_Scaled(case.model, T), "classification", structure="full")
    ref.fit(_loader(case)).set_hyperparameters(prior_precision=la.prior_precision)
    torch.testing.assert_close(
        la.predict(case.X).mean, ref.predict(case.X).mean, rtol=1e-10, atol=1e-12
    )
    again = LaplaceWrapper.from_state_dict(case.model, la.state_dict())
    assert again.logit_temperature == T
    torch.testing.assert_close(again.predict(case.X).mean, la.predict(case.X).mean, rtol=0, atol=0)


def test_binary_and_kfac_mc_with_scheduler_and_scalar_prior():
    case = make_case("mlp_binary", 0, n=24)
    seen = []

    def scheduler(opt):
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        seen.append(sched)
        return sched

    res = marglik_training(
        case.model, _loader(case), "binary", n_epochs=3, n_epochs_burnin=1, marglik_frequency=1,
        structure="kfac", curvature="mc", prior_structure="scalar", scheduler=scheduler,
        generator=torch.Generator().manual_seed(0), **FAST,
    )  # fmt: skip
    assert seen and seen[0].last_epoch == 3  # stepped once per epoch
    assert res.history.prior_precision.shape == (3,)
    assert res.laplace.structure == "kfac" and res.laplace.curvature.value == "mc"


def test_sequence_outputs_and_ignored_targets():
    from test_sequences import _data

    model, batches = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = marglik_training(
            model, batches, "classification", n_epochs=2, n_epochs_burnin=0,
            marglik_frequency=1, structure="diag", optimizer_kwargs={"lr": 1e-2}, **FAST,
        )  # fmt: skip
    kept = sum(int((y != -100).sum()) for _, y in batches)
    assert res.laplace.fitted.statistics.n_data == kept
    assert torch.isfinite(res.history.log_evidence).all()


def test_dict_batches_of_a_hugging_face_model():
    pytest.importorskip("transformers")
    from test_hf import _bert, _loader

    loader, _ = _loader()
    model = _bert().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = marglik_training(
            model, loader, "classification", n_epochs=2, n_epochs_burnin=0, marglik_frequency=2,
            structure="diag", subset="last_layer", optimizer_kwargs={"lr": 1e-3}, **FAST,
        )  # fmt: skip
    assert res.laplace.fitted.statistics.n_data == 8
    assert model.training  # the model's mode is restored
    assert len(res.laplace.fitted.layout.names) == 2  # the classifier's weight and bias


def test_errors():
    case = make_case("mlp_classification", 0)
    loader = _loader(case)

    def run(**kw):
        args = {"n_epochs": 1, **FAST, **kw}
        return marglik_training(case.model, loader, "classification", **args)

    with pytest.raises(ValueError, match="n_epochs must be an integer >= 1; got 0"):
        run(n_epochs=0)
    with pytest.raises(ValueError, match="marglik_frequency must be an integer >= 1"):
        run(marglik_frequency=0)
    with pytest.raises(ValueError, match="n_hypersteps must be an integer >= 0"):
        run(n_hypersteps=-1)
    with pytest.raises(ValueError, match="n_epochs_burnin must be an integer >= 0"):
        run(n_epochs_burnin=1.5)
    with pytest.raises(ValueError, match="lr_hyper must be a float > 0"):
        run(lr_hyper=0.0)
    with pytest.raises(ValueError, match="prior_structure must be one of"):
        run(prior_structure="blockwise")
    with pytest.raises(
        ValueError, match="optimizer must have weight_decay=0; got weight_decay=0.1"
    ):
        run(optimizer_kwargs={"weight_decay": 0.1})
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        run(optimizer="adam")
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer_kwargs apply to an optimizer class"):
        run(optimizer=opt, optimizer_kwargs={"lr": 1.0})
    with pytest.raises(TypeError, match="scheduler must be None, a learning-rate scheduler"):
        run(scheduler=3)
    with pytest.raises(ValueError, match="per-parameter prior is accepted by structure"):
        run(structure="kfac", prior_structure="diagonal")
    with pytest.raises(ValueError, match="structure must be one of"):
        run(structure="blocky")
    with pytest.raises(ValueError, match="structure must have a finite curvature to train"):
        run(structure="projected")
    first = LaplaceWrapper(case.model, "classification", structure="full").fit(loader)
    with pytest.raises(ValueError, match="prior_mean of marglik_training must be a tensor"):
        run(structure="full", prior_mean=first)
    with pytest.raises(TypeError, match="train_loader must be an iterable of batches"):
        marglik_training(case.model, 3, "classification", **FAST)
    empty = DataLoader(TensorDataset(case.X[:0], case.y[:0]), batch_size=2)
    case.model.train()
    with pytest.raises(ValueError, match="train_loader must yield at least one observation"):
        marglik_training(case.model, empty, "classification", **FAST)
    assert case.model.training  # the model's mode is restored after a failure


def test_no_refit_before_the_end_of_the_burn_in_warns():
    case = make_case("mlp_regression", 0)
    with pytest.warns(UserWarning, match="never refitted the posterior"):
        res = marglik_training(
            case.model, _loader(case), "regression", n_epochs=2, n_epochs_burnin=5, **FAST
        )
    assert res.laplace.is_fitted and bool((res.laplace.prior_precision == 1.0).all())


def test_prior_mean_centres_the_weight_decay():
    case = make_case("mlp_regression", 0)
    P = sum(p.numel() for p in case.model.parameters())
    theta0 = torch.full((P,), 3.0, dtype=torch.float64)
    ref = make_case("mlp_regression", 0).model
    res = marglik_training(
        case.model, _loader(case, 12), "regression", n_epochs=1, n_epochs_burnin=5,
        optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.1}, prior_mean=theta0,
        prior_precision=2.0, structure="diag", **FAST,
    )  # fmt: skip
    N = case.X.shape[0]
    nll = laplace_ggn.likelihoods.Gaussian().nll(ref(case.X), case.y) / N
    theta = torch.cat([p.reshape(-1) for p in ref.parameters()])
    grads = torch.autograd.grad(nll + ((theta - 3.0) ** 2).sum() / N, list(ref.parameters()))
    for p, q, g in zip(res.model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p, q - 0.1 * g, rtol=1e-12, atol=1e-14)


def test_logit_temperature_option_errors():
    case = make_case("mlp_classification", 0)
    with pytest.raises(ValueError, match="logit_temperature must be finite and > 0; got 0.0"):
        LaplaceWrapper(case.model, "classification", logit_temperature=0.0)
    with pytest.raises(TypeError, match="logit_temperature must be a float; got str"):
        LaplaceWrapper(case.model, "classification", logit_temperature="2")
    reg = make_case("mlp_regression", 0)
    with pytest.raises(
        ValueError, match="logit_temperature applies to likelihoods that predict probabilities"
    ):
        LaplaceWrapper(reg.model, "regression", logit_temperature=2.0)
    la = LaplaceWrapper(case.model, "classification", logit_temperature=torch.tensor(2.0))
    assert la.logit_temperature == 2.0 and la.output_fn is None


def test_a_non_finite_evidence_stops_training_with_the_values_kept():
    case = make_case("mlp_regression", 0)
    with pytest.raises(RuntimeError, match="hyperparameter steps must keep the evidence finite"):
        marglik_training(
            case.model, _loader(case), "regression", n_epochs=1, n_epochs_burnin=0,
            structure="full", lr_hyper=1e4, n_hypersteps=5, progress=False,
        )  # fmt: skip


def test_other_likelihoods_and_one_sigma_per_output():
    torch.manual_seed(0)
    X = torch.randn(24, 3, dtype=torch.float64)
    run = {"n_epochs": 2, "n_epochs_burnin": 0, "marglik_frequency": 1, "structure": "full"}
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    y = torch.poisson(torch.exp(0.3 * X[:, :1]))
    res = marglik_training(net, DataLoader(TensorDataset(X, y), 8), "poisson", **run, **FAST)
    assert torch.isfinite(res.history.log_evidence).all() and res.temperature == 1.0
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    y = X[:, :2] + 0.1 * torch.randn(24, 2, dtype=torch.float64)
    res = marglik_training(
        net, DataLoader(TensorDataset(X, y), 8), "regression", **run, **FAST,
        sigma_noise=torch.ones(2, dtype=torch.float64),
    )  # fmt: skip
    assert res.history.sigma_noise.shape == (2, 2) and res.sigma_noise.shape == (2,)
    torch.testing.assert_close(res.laplace.sigma_noise, res.history.sigma_noise[-1])
