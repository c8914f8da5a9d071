"""LaplaceWrapper with the full and diagonal structures against dense references; its options and
their types, checked arguments, and the user's model left untouched by every entry point."""

import copy
import math
import re
import threading
import warnings

import numpy as np
import pytest
import torch
from cases import fit_case, make_case, same_state
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.structures import STRUCTURES
from laplace_ggn.testing import (
    dense_ggn,
    dense_jacobian,
    dense_posterior_covariance,
    nll_per_sample,
)

STRUCTS = list(STRUCTURES)

RTOL = 1e-6


def _dense_sigma(case, structure, prior=1.0, sigma=1.0, temperature=1.0):
    G = dense_ggn(case.model, case.X, case.y, case.likelihood, sigma=sigma)
    if structure == "diag":
        G = torch.diag(G.diagonal())
    return G, dense_posterior_covariance(G / temperature, prior)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_covariance_evidence_functional_match_dense(case, structure):
    sigma = 0.7 if case.likelihood == "regression" else 1.0
    la = LaplaceWrapper(
        case.model,
        case.likelihood,
        structure=structure,
        prior_precision=0.8,
        sigma_noise=sigma,
        temperature=1.5,
    ).fit(case.loader())
    G, Sigma = _dense_sigma(case, structure, 0.8, sigma, 1.5)
    torch.testing.assert_close(la.posterior_covariance(), Sigma, rtol=RTOL, atol=1e-10)
    # evidence from the dense formula
    theta = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])
    with torch.no_grad():
        f = case.model(case.X)
    nll = nll_per_sample(case.likelihood, f.reshape(len(case.X), -1), case.y, sigma).sum()
    P = theta.numel()
    Lam = G / 1.5 + 0.8 * torch.eye(P, dtype=torch.float64)
    ref = -nll - 0.5 * 0.8 * theta @ theta - 0.5 * torch.logdet(Lam) + 0.5 * P * math.log(0.8)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref, rtol=RTOL, atol=1e-10)
    # functional covariance at new inputs
    Xt = torch.randn(4, 3, dtype=torch.float64)
    J = dense_jacobian(case.model, Xt)
    torch.testing.assert_close(
        la.functional_covariance(Xt),
        torch.einsum("bcp,pq,bdq->bcd", J, Sigma, J),
        rtol=RTOL,
        atol=1e-10,
    )


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_evidence_differentiable_in_prior_and_sigma(structure):
    case = make_case("mlp_regression")
    la = LaplaceWrapper(case.model, "regression", structure=structure).fit(case.loader())
    a = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    ga, gs = torch.autograd.grad(la.log_marginal_likelihood(a, s), (a, s))
    eps = 1e-6
    for g, fn in [
        (ga, lambda e: la.log_marginal_likelihood(0.9 + e, 0.8)),
        (gs, lambda e: la.log_marginal_likelihood(0.9, 0.8 + e)),
    ]:
        fd = (fn(eps) - fn(-eps)) / (2 * eps)
        torch.testing.assert_close(g, fd.detach(), rtol=1e-5, atol=1e-7)


def _blr_evidence(Phi, y, alpha, sigma):
    N = Phi.shape[0]
    K = sigma**2 * torch.eye(N, dtype=torch.float64) + Phi @ Phi.T / alpha
    return torch.distributions.MultivariateNormal(torch.zeros(N, dtype=torch.float64), K).log_prob(
        y
    )


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_bayesian_linear_regression_evidence_closed_form(structure):
    g = torch.Generator().manual_seed(0)
    N, D, alpha, sigma = 30, 3, 0.5, 0.4
    X = torch.randn(N, D, dtype=torch.float64, generator=g)
    if structure == "diag":  # orthogonal features: the GGN is diagonal, so diag is exact too
        X = torch.linalg.qr(X)[0] * math.sqrt(N)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + sigma * torch.randn(
        N, dtype=torch.float64, generator=g
    )
    model = nn.Linear(D, 1, bias=False).double()
    Lam = X.T @ X / sigma**2 + alpha * torch.eye(D, dtype=torch.float64)
    w = torch.linalg.solve(Lam, X.T @ y / sigma**2)
    with torch.no_grad():
        model.weight.copy_(w.reshape(1, D))
    la = LaplaceWrapper(
        model, "regression", structure=structure, prior_precision=alpha, sigma_noise=sigma
    )
    la.fit(DataLoader(TensorDataset(X, y.unsqueeze(1)), batch_size=7))
    torch.testing.assert_close(
        la.log_marginal_likelihood(), _blr_evidence(X, y, alpha, sigma), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(
        la.posterior_covariance(), torch.linalg.inv(Lam), rtol=1e-10, atol=1e-12
    )


def test_samples_reproducible_and_distributed():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="full").fit(case.loader())
    s1 = la.sample(5, generator=torch.Generator().manual_seed(3))
    s2 = la.sample(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    assert s1.shape == (5, la.n_params)


class FunctionalLayerNet(nn.Module):
    """A custom layer without nn.Linear: the diagonal takes the per-sample Jacobian path."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x @ self.w1.T) @ self.w2.T


class MixedNet(nn.Module):
    """Linear layers plus a LayerNorm and a free parameter: hooks and fallback together."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.l2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.norm(self.l1(x)))) * self.scale


class SharedLinearNet(nn.Module):
    """The same Linear runs twice: hooks cannot be used."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 3)

    def forward(self, x):
        return self.l(torch.tanh(self.l(x)))


@pytest.mark.parametrize("net", [FunctionalLayerNet, MixedNet, SharedLinearNet])
def test_diag_fallback_paths_match_dense(net):
    torch.manual_seed(0)
    model = net().double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    la = LaplaceWrapper(model, "classification", structure="diag").fit(
        DataLoader(TensorDataset(X, y), 4)
    )
    G = dense_ggn(model, X, y, "classification")
    torch.testing.assert_close(la.posterior.ggn_diag, G.diagonal(), rtol=1e-8, atol=1e-12)


def test_linear_with_sequence_dims_diag():
    torch.manual_seed(0)

    class SeqNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(3, 4)
            self.l2 = nn.Linear(4, 2)

        def forward(self, x):  # x (B, T, 3)
            return self.l2(torch.tanh(self.l1(x))).mean(1)

    model = SeqNet().double()
    X = torch.randn(6, 5, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    la = LaplaceWrapper(model, "regression", structure="diag").fit(
        DataLoader(TensorDataset(X, y), 4)
    )
    G = dense_ggn(model, X, y, "regression")
    torch.testing.assert_close(la.posterior.ggn_diag, G.diagonal(), rtol=1e-8, atol=1e-12)


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        [p.requires_grad for p in model.parameters()],
    )


def test_user_model_untouched_by_fit_and_queries():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 3)
    ).double()
    model.train()
    X = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    before = _snapshot(model)
    for structure in ["full", "diag"]:
        la = LaplaceWrapper(model, "classification", structure=structure).fit(
            DataLoader(TensorDataset(X, y), 5)
        )
        la.sample(3)
        la.functional_covariance(X[:2])
        la.log_marginal_likelihood()
        with pytest.raises(ValueError):
            LaplaceWrapper(model, "classification", structure=structure).fit(
                DataLoader(TensorDataset(X, y + 5), 5)
            )
    after = _snapshot(model)
    for a, b in zip(before[0].values(), after[0].values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert before[1:] == after[1:]
    # eval mode is used for curvature: the Jacobian of the eval network
    la = LaplaceWrapper(model, "classification", structure="full").fit(
        DataLoader(TensorDataset(X, y), 5)
    )
    ref_model = copy.deepcopy(model).eval()
    G = dense_ggn(ref_model, X, y, "classification")
    torch.testing.assert_close(la.posterior.ggn, G, rtol=1e-8, atol=1e-12)


def test_last_layer_subset_full():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="full", subset="last_layer").fit(
        case.loader()
    )
    assert la.n_params == 4 * 3 + 3
    G = dense_ggn(case.model, case.X, case.y, "classification", names=["2.weight", "2.bias"])
    torch.testing.assert_close(
        la.posterior_covariance(), dense_posterior_covariance(G, 1.0), rtol=RTOL, atol=1e-10
    )


def test_construction_errors():
    case = make_case("mlp_classification")
    m = case.model
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got function"):
        LaplaceWrapper(lambda x: x, "classification")
    with pytest.raises(
        ValueError,
        match=r"likelihood must be one of \['regression', 'classification', 'binary', "
        r"'heteroscedastic', 'poisson', 'reward_modeling'\]; got 'classify'",
    ):
        LaplaceWrapper(m, "classify")
    with pytest.raises(
        ValueError,
        match=r"structure must be one of \['full', 'diag', 'kfac', 'lowrank', 'projected', 'gp', 'ella'\]; got 'dense'",
    ):
        LaplaceWrapper(m, "classification", structure="dense")
    with pytest.raises(
        ValueError,
        match="subset must be 'all', 'last_layer' or a list of parameter names; got 'last'",
    ):
        LaplaceWrapper(m, "classification", subset="last")
    with pytest.raises(ValueError, match=r"unknown: '2.wieght' \(did you mean '2.weight'"):
        LaplaceWrapper(m, "classification", subset=["2.wieght"])
    with pytest.raises(ValueError, match="sigma_noise applies to likelihood='regression' only"):
        LaplaceWrapper(m, "classification", sigma_noise=2.0)
    with pytest.raises(ValueError, match=r"sigma_noise must be finite and > 0; got \[-1.0\]"):
        LaplaceWrapper(m, "regression", sigma_noise=-1.0)
    with pytest.raises(ValueError, match="temperature must be finite and > 0; got 0"):
        LaplaceWrapper(m, "classification", temperature=0)
    with pytest.raises(
        ValueError, match="rank applies to structure='lowrank', 'projected' or 'ella' only"
    ):
        LaplaceWrapper(m, "classification", structure="full", rank=3)
    with pytest.raises(ValueError, match=r"prior_precision must be finite and > 0; got \[0.0\]"):
        LaplaceWrapper(m, "classification", prior_precision=0.0)
    with pytest.raises(ValueError, match=r"prior_precision must be a scalar, or have shape \(4,\)"):
        LaplaceWrapper(m, "classification", prior_precision=torch.ones(7))
    with pytest.raises(ValueError, match="memory_budget must be a positive int"):
        LaplaceWrapper(m, "classification", memory_budget=-5)


def test_fit_and_query_errors():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="full")
    with pytest.raises(
        RuntimeError, match=r"needs a fitted posterior; call fit\(train_loader\) first"
    ):
        la.sample(3)
    with pytest.raises(ValueError, match="must yield at least one batch; got an empty loader"):
        la.fit([])
    with pytest.raises(TypeError, match="train_loader must be an iterable of batches"):
        la.fit(5)
    X, y = case.X.clone(), case.y.clone()
    X[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"input in batch 1 must be finite; got 1 NaN and 0 Inf"):
        la.fit(DataLoader(TensorDataset(X, y), 5))
    assert not la.is_fitted
    with pytest.raises(ValueError, match=r"targets \(batch 0\) must lie in \[0, 2\]"):
        la.fit(DataLoader(TensorDataset(case.X, y + 3), 5))
    with pytest.raises(
        ValueError, match=r"must be \(input, target\) pairs or mappings; got tuple of length 3"
    ):
        la.fit([(case.X, case.y, case.y)])
    with pytest.raises(
        ValueError,
        match=r"must hold exactly one target key of \['target', 'labels', 'label'\] when "
        r"target_key is not set; got keys \['x', 'y'\] \(none\)",
    ):
        la.fit([{"x": case.X, "y": case.y}])
    with pytest.raises(
        ValueError,
        match=r"needs .* for P=31 parameters .* over the memory budget.*Structures that fit: 'diag'",
    ):
        LaplaceWrapper(case.model, "classification", structure="full", memory_budget=5000).fit(
            case.loader()
        )
    la.fit(case.loader())
    with pytest.raises(
        ValueError, match=r"posterior_covariance\(\) needs a dense \(31, 31\) matrix"
    ):
        la.memory_budget = 100
        la.posterior_covariance()
    la.memory_budget = 2**30
    with pytest.raises(ValueError, match="n must be a positive integer; got -1"):
        la.sample(-1)
    with pytest.raises(ValueError, match="input must be finite"):
        la.functional_covariance(torch.full((2, 3), float("inf"), dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"sigma_noise applies to likelihood='regression' only; got sigma_noise="
    ):
        la.log_marginal_likelihood(sigma_noise=torch.ones(2))
    with pytest.raises(RuntimeError, match="n_params of subset='last_layer' is known after fit"):
        _ = LaplaceWrapper(case.model, "classification", subset="last_layer").n_params


def test_fitted_is_one_frozen_object_that_hyperparameters_replace():
    import dataclasses

    from laplace_ggn import FittedLaplace, Hyperparameters, Likelihood

    case = make_case("mlp_regression")
    la = LaplaceWrapper(case.model, "regression", structure="full", prior_precision=0.5)
    assert la.fitted is None and isinstance(la.hyperparameters, Hyperparameters)
    la.fit(case.loader())
    fitted = la.fitted
    assert isinstance(fitted, FittedLaplace) and fitted.n_params == la.n_params
    with pytest.raises(dataclasses.FrozenInstanceError):
        fitted.posterior = None
    la.set_hyperparameters(prior_precision=2.0, sigma_noise=0.5)
    assert la.fitted is not fitted and float(fitted.hyperparameters.prior_precision) == 0.5
    again = fitted.posterior_at(torch.tensor(2.0, dtype=torch.float64), 0.5)
    torch.testing.assert_close(again.to_dense(), la.posterior_covariance(), rtol=1e-12, atol=0)
    assert float(la.fitted.hyperparameters.scale()) == pytest.approx(1 / 0.25)
    torch.testing.assert_close(
        la.fitted.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=0, atol=0
    )
    hp = la.hyperparameters.replace(prior_precision=3.0)
    assert float(la.fitted.with_hyperparameters(hp).hyperparameters.prior_precision) == 3.0
    with pytest.raises(ValueError, match="sigma_noise applies to likelihood='regression' only"):
        Hyperparameters.create(
            Likelihood.CLASSIFICATION,
            sigma_noise=2.0,
            dtype=torch.float64,
            device=torch.device("cpu"),
        )


# -- unknown options and option types --------------------------------------------------------------


def test_unknown_likelihood_structure_subset_list_the_valid_ones():
    case = make_case("mlp_classification")
    with pytest.raises(
        ValueError,
        match=r"likelihood must be one of \['regression', 'classification', 'binary', "
        r"'heteroscedastic', 'poisson', 'reward_modeling'\]; got 'classifcation'\. Did you mean "
        r"'classification'\?",
    ):
        LaplaceWrapper(case.model, "classifcation")
    with pytest.raises(
        ValueError,
        match=r"structure must be one of \['full', 'diag', 'kfac', "
        r"'lowrank', 'projected', 'gp', 'ella'\]; got 'ful'",
    ):
        LaplaceWrapper(case.model, "classification", structure="ful")
    with pytest.raises(
        ValueError,
        match=r"subset must be 'all', 'last_layer' or a list of "
        r"parameter names; got 'lastlayer'\. Did you mean 'last_layer'\?",
    ):
        LaplaceWrapper(case.model, "classification", subset="lastlayer")
    with pytest.raises(ValueError, match=r"unknown: '0\.weigth' \(did you mean '0\.weight'"):
        LaplaceWrapper(case.model, "classification", subset=["0.weigth"])
    with pytest.raises(TypeError, match="subset must be 'all', 'last_layer' or a list"):
        LaplaceWrapper(case.model, "classification", subset=3)


def test_unknown_link_and_method_list_the_valid_ones():
    case = make_case("mlp_classification")
    la = fit_case(case, "diag")
    x = case.X[:4]
    with pytest.raises(ValueError, match=r"method must be one of \['glm', 'nn'\]; got 'glmm'"):
        la.predict(x, method="glmm")
    with pytest.raises(
        ValueError,
        match=r"link must be one of \['probit', 'bridge', 'bridge_norm', 'mc'\]; "
        r"got 'probitt'",
    ):
        la.predict(x, link="probitt")
    with pytest.raises(
        ValueError,
        match=r"link must be 'mc' \(or None\) with method='nn'.*"
        r"valid combinations",
    ):
        la.predict(x, method="nn", link="probit")
    with pytest.raises(
        ValueError,
        match=r"method must be one of \['marglik', 'gridsearch', 'marglik_temperature', 'temperature'\]",
    ):
        la.optimize_prior_precision(method="grid")


def test_wrapper_option_types():
    model = make_case("mlp_classification").model
    with pytest.raises(TypeError, match="temperature must be a float; got str"):
        LaplaceWrapper(model, "classification", temperature="1")
    with pytest.raises(ValueError, match="rank must be None or a positive integer; got 0"):
        LaplaceWrapper(model, "classification", structure="lowrank", rank=0)


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
    assert same_state(la.state_dict(), before)


# -- the user's model is never touched by any entry point ------------------------------------------


class _BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _full_snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ptrs": {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {
            n: (
                list(m._forward_hooks.items()),
                list(m._forward_pre_hooks.items()),
                list(m._backward_hooks.items()),
            )
            for n, m in model.named_modules()
        },
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


def _assert_untouched(model: nn.Module, snap: dict, what: str) -> None:
    now = _full_snapshot(model)
    for k, v in snap["state"].items():
        assert torch.equal(v, now["state"][k]), f"{what} changed {k}"
    for key in ("ptrs", "training", "grad", "hooks", "grads"):
        assert now[key] == snap[key], f"{what} changed the model's {key}"


@pytest.mark.filterwarnings("ignore:kfac. parameters")
@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_user_model_untouched_by_every_entry_point(structure, subset):
    torch.manual_seed(0)
    model = _BatchNormNet().double()
    model.train()
    model.head.register_forward_hook(lambda m, i, o: None)
    model.body[0].register_forward_pre_hook(lambda m, i: None)
    X = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    model(X).sum().backward()  # the user's grads exist and must stay as they are
    snap = _full_snapshot(model)
    loader = [(X[:6], y[:6]), (X[6:], y[6:])]  # a DataLoader itself draws from the global RNG
    rng = torch.get_rng_state()
    la = LaplaceWrapper(model, "classification", structure=structure, subset=subset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(loader)
    assert torch.equal(rng, torch.get_rng_state()), "fit consumed the global random state"
    _assert_untouched(model, snap, "fit")
    g = torch.Generator().manual_seed(1)
    steps = {
        "predict glm": lambda: la.predict(X[:4], "glm"),
        "predict nn": lambda: la.predict(X[:4], "nn", n_samples=5, generator=g),
        "sample": lambda: la.sample(3, generator=g),
        "functional_covariance": lambda: la.functional_covariance(X[:4]),
        "evidence": lambda: la.log_marginal_likelihood(),
        "marglik tuning": lambda: la.optimize_prior_precision("marglik", n_steps=3),
        "gridsearch tuning": lambda: la.optimize_prior_precision(
            "gridsearch", val_loader=loader, n_points=3
        ),
        "state_dict": lambda: LaplaceWrapper.from_state_dict(model, la.state_dict()).sample(2),
    }
    for what, step in steps.items():
        step()
        _assert_untouched(model, snap, what)
    bad_x = X.clone()
    bad_x[3] = float("nan")
    errors = {
        "fit NaN": lambda: la.fit(DataLoader(TensorDataset(bad_x, y), batch_size=6)),
        "fit labels": lambda: la.fit([(X, y + 5)]),
        "predict NaN": lambda: la.predict(bad_x),
        "predict method": lambda: la.predict(X, "bad"),
        "sample n": lambda: la.sample(0),
        "evidence prior": lambda: la.log_marginal_likelihood(prior_precision=-1.0),
    }
    for what, step in errors.items():
        with pytest.raises(ValueError, match="must"):
            step()
        _assert_untouched(model, snap, what)
    assert all(m.training for m in model.modules())
    # still usable with torch.func afterwards
    params = {n: p.detach() for n, p in model.named_parameters()}
    model.eval()
    J = jacrev(lambda p: functional_call(model, p, (X[:2],)))(params)
    assert J["head.weight"].shape == (2, 3, 3, 5)
    model.train()


class _Locked(nn.Module):
    """A model holding a lock: copy.deepcopy (the private copy of every pass) refuses it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 3)
        self.lock = threading.Lock()

    def forward(self, x):
        return self.lin(x)


class _LockedCopyable(_Locked):
    """The way out the message names: copies leave the lock out and make their own."""

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["lock"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.lock = threading.Lock()


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_model_that_cannot_be_copied_refused_naming_the_attribute(subset, tmp_path):
    # raw "TypeError: cannot pickle '_thread.lock' object" before
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    model = _Locked().double()
    la = LaplaceWrapper(model, structure="diag", subset=subset)
    with pytest.raises(
        TypeError,
        match=r"model must be deep-copyable \(every pass runs on a private copy, so that yours "
        r"is never changed\); copy.deepcopy\(model\) failed: the attribute 'lock' \(lock\) cannot "
        r"be copied \(TypeError: cannot pickle '_thread.lock' object\)\. Keep such objects .* or "
        r"give its class __getstate__ / __setstate__ \(or __deepcopy__\)",
    ):
        la.fit([(X, y)])
    assert not la.is_fitted
    with open(tmp_path / "log.txt", "w") as handle:
        nested = nn.Sequential(nn.Linear(3, 3)).double()
        nested[0].log = handle  # an open file in a submodule
        with pytest.raises(TypeError, match=r"the attribute '0.log' \(TextIOWrapper\)"):
            LaplaceWrapper(nested, structure="diag", subset=subset).fit([(X, y)])
    fixed = _LockedCopyable().double()
    la = LaplaceWrapper(fixed, structure="diag", subset=subset).fit([(X, y)])
    ref = LaplaceWrapper(_Locked().double().lin, structure="diag").fit([(X, y)])
    torch.testing.assert_close(la.predict(X).mean, ref.predict(X).mean, rtol=0, atol=0)
    assert fixed.lock is not None and not fixed.lock.locked()
