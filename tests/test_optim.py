"""Tests of laplace_ggn.optim.NaturalGradient against dense float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from laplace_ggn.optim import NaturalGradient

DT = torch.float64


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def as_function(model: nn.Module):
    """theta (P,) -> model outputs, for dense jacrev references."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def call(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            params[n] = theta[i : i + k].reshape(s)
            i += k
        return functional_call(model, params, (x,))

    return call


def regression_data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DT) + 0.7
    return x, y + 0.1 * torch.randn(n, 1, generator=g, dtype=DT)


# ----------------------------------------------------------------------------- exactness


def test_one_undamped_step_solves_linear_regression() -> None:
    x, y = regression_data()
    torch.manual_seed(1)
    model = nn.Linear(3, 1).to(DT)
    opt = NaturalGradient(model.parameters(), likelihood="regression", damping=0.0, cg_tol=1e-12)
    loss0 = opt.step(lambda: (model(x), y))
    X = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], dim=1)
    w_ref = torch.linalg.lstsq(X, y).solution.squeeze(1)
    torch.testing.assert_close(flat(model), w_ref, rtol=1e-9, atol=1e-10)
    assert opt.last_solve is not None and opt.last_solve.converged
    assert opt.last_solve.n_iter <= 4  # P = 4 parameters
    assert loss0 > 0.5 * float(((X @ w_ref - y.squeeze(1)) ** 2).sum())


def test_one_step_with_prior_and_noise_is_ridge() -> None:
    x, y = regression_data(seed=2)
    model = nn.Linear(3, 1).to(DT)
    alpha, sigma = 3.0, 0.5
    opt = NaturalGradient(
        model.parameters(), damping=0.0, prior_precision=alpha, sigma_noise=sigma, cg_tol=1e-12
    )
    theta0 = flat(model)
    X = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], dim=1)
    loss0 = opt.step(lambda: (model(x).squeeze(1), y.squeeze(1)))  # (B,) outputs accepted
    A = X.T @ X / sigma**2 + alpha * torch.eye(4, dtype=DT)
    ref = torch.linalg.solve(A, X.T @ y.squeeze(1) / sigma**2)
    torch.testing.assert_close(flat(model), ref, rtol=1e-9, atol=1e-10)
    resid = X @ theta0 - y.squeeze(1)
    nll = 0.5 * (resid**2).sum() / sigma**2 + 0.5 * len(x) * math.log(2 * math.pi * sigma**2)
    torch.testing.assert_close(loss0, nll + 0.5 * alpha * (theta0**2).sum())


def _mlp(out: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, out)).to(DT)


@pytest.mark.parametrize(
    "likelihood,out", [("regression", 2), ("classification", 3), ("binary", 1)]
)
def test_ggn_step_matches_dense_solve(likelihood: str, out: int) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 2, generator=g, dtype=DT)
    if likelihood == "regression":
        y = torch.randn(10, out, generator=g, dtype=DT)
    elif likelihood == "classification":
        y = torch.randint(0, out, (10,), generator=g)
    else:
        y = torch.randint(0, 2, (10,), generator=g)
    model = _mlp(out)
    fn = as_function(model)
    theta = flat(model)
    f = fn(theta, x)
    J = jacrev(fn)(theta, x)  # (B, C, P)
    if likelihood == "regression":
        Lam = torch.eye(out, dtype=DT).expand(10, out, out)
        grad_f = f - y
    elif likelihood == "classification":
        p = torch.softmax(f, -1)
        Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        grad_f = p - nn.functional.one_hot(y, out).to(DT)
    else:
        p = torch.sigmoid(f)
        Lam = (p * (1 - p))[:, :, None]
        grad_f = p - y[:, None].to(DT)
    G = torch.einsum("bcp,bcd,bdq->pq", J, Lam, J)
    grad = torch.einsum("bcp,bc->p", J, grad_f)
    delta, alpha, lr = 0.1, 0.5, 0.7
    d_ref = torch.linalg.solve(
        G + (delta + alpha) * torch.eye(len(theta), dtype=DT), grad + alpha * theta
    )
    opt = NaturalGradient(
        model.parameters(),
        likelihood=likelihood,
        lr=lr,
        damping=delta,
        prior_precision=alpha,
        cg_tol=1e-12,
    )
    opt.step(lambda: (model(x), y))
    torch.testing.assert_close(flat(model), theta - lr * d_ref, rtol=1e-8, atol=1e-10)


def test_ef_step_matches_dense_solve() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 2, generator=g, dtype=DT)
    y = torch.randn(8, 1, generator=g, dtype=DT)
    model = _mlp(1, seed=2)
    fn = as_function(model)
    theta = flat(model)

    def loss_n(t: torch.Tensor, xn: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((fn(t, xn[None]) - yn[None]) ** 2).sum()

    grads = vmap(torch.func.grad(loss_n), in_dims=(None, 0, 0))(theta, x, y)  # (N, P)
    EF = grads.T @ grads
    d_ref = torch.linalg.solve(EF + 0.05 * torch.eye(len(theta), dtype=DT), grads.sum(0))
    opt = NaturalGradient(model.parameters(), curvature="ef", damping=0.05, cg_tol=1e-12)
    opt.step(lambda: (model(x), y))
    torch.testing.assert_close(flat(model), theta - d_ref, rtol=1e-8, atol=1e-10)


def test_param_groups_get_their_own_lr() -> None:
    x, y = regression_data(seed=5)
    model = nn.Linear(3, 1).to(DT)
    twin = nn.Linear(3, 1).to(DT)
    twin.load_state_dict(model.state_dict())
    opt = NaturalGradient(
        [{"params": [model.weight], "lr": 0.5}, {"params": [model.bias]}], damping=0.0, cg_tol=1e-12
    )
    ref = NaturalGradient(twin.parameters(), damping=0.0, cg_tol=1e-12)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt.step(lambda: (model(x), y))
    ref.step(lambda: (twin(x), y))
    torch.testing.assert_close(model.weight - w0, 0.5 * (twin.weight - w0))
    torch.testing.assert_close(model.bias - b0, twin.bias - b0)


def test_kfac_step_is_exact_for_linear_regression() -> None:
    x, y = regression_data(seed=6)
    model = nn.Linear(3, 1).to(DT)
    opt = NaturalGradient(model.parameters(), curvature="kfac", model=model, damping=0.0)
    opt.step(lambda: (model(x), y))
    X = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], dim=1)
    w_ref = torch.linalg.lstsq(X, y).solution.squeeze(1)
    torch.testing.assert_close(flat(model), w_ref, rtol=1e-9, atol=1e-10)
    assert opt.last_solve is None


@pytest.mark.parametrize("likelihood,out", [("regression", 2), ("classification", 3)])
def test_kfac_step_matches_kfac_collector(likelihood: str, out: int) -> None:
    from laplace_ggn._checks import Likelihood
    from laplace_ggn.collectors import KFACCollector
    from laplace_ggn.functional import FunctionalModel, resolve_subset
    from laplace_ggn.likelihoods import get_likelihood

    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 2, generator=g, dtype=DT)
    if likelihood == "regression":
        y = torch.randn(9, out, generator=g, dtype=DT)
    else:
        y = torch.randint(0, out, (9,), generator=g)
    model = _mlp(out, seed=3)
    theta = flat(model)
    fm = FunctionalModel(model, resolve_subset(model, "all", x))
    col = KFACCollector(fm, get_likelihood(Likelihood(likelihood)))
    col.update(x)
    K = col.finalize().to_dense()
    lik = get_likelihood(Likelihood(likelihood))
    model_f = model(x)
    nll = lik.nll(model_f, lik.check_targets(model_f.detach(), y))
    grad = torch.cat([t.reshape(-1) for t in torch.autograd.grad(nll, list(model.parameters()))])
    delta, alpha = 0.2, 0.3
    d_ref = torch.linalg.solve(
        K + (delta + alpha) * torch.eye(len(theta), dtype=DT), grad + alpha * theta
    )
    opt = NaturalGradient(
        model.parameters(),
        likelihood=likelihood,
        curvature="kfac",
        model=model,
        damping=delta,
        prior_precision=alpha,
    )
    opt.step(lambda: (model(x), y))
    torch.testing.assert_close(flat(model), theta - d_ref, rtol=1e-8, atol=1e-10)


def test_kfac_errors() -> None:
    model = _mlp(1)
    with pytest.raises(TypeError, match="model must be the nn.Module the closure runs"):
        NaturalGradient(model.parameters(), curvature="kfac")
    extra = nn.Parameter(torch.ones(2, dtype=DT))
    with pytest.raises(ValueError, match=r"every optimised parameter must belong to an nn.Linear"):
        NaturalGradient([*model.parameters(), extra], curvature="kfac", model=model)
    groups = [
        {"params": list(model[0].parameters()), "damping": 0.1},
        {"params": list(model[2].parameters())},
    ]
    with pytest.raises(ValueError, match="damping must be the same in every parameter group"):
        NaturalGradient(groups, curvature="kfac", model=model)
    opt = NaturalGradient(model.parameters(), curvature="kfac", model=model)
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    with pytest.raises(ValueError, match=r"layers \['2'\] must run exactly once per forward pass"):
        opt.step(
            lambda: (model[2](model[1](model[0](x))) + model[2](torch.ones(4, 4, dtype=DT)), y)
        )


class _TiedDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 2)
        self.mid = nn.Linear(2, 2)

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.enc(x))))
        return nn.functional.linear(h, self.enc.weight.t())  # the encoder weight again


def test_kfac_refuses_a_weight_used_outside_its_layer_and_ggn_takes_it() -> None:
    torch.manual_seed(0)
    model = _TiedDecoder().double()
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 3, dtype=DT)
    theta = flat(model)
    opt = NaturalGradient(model.parameters(), curvature="kfac", model=model)
    with pytest.raises(
        ValueError,
        match=r"optimised parameters \['enc.weight'\] must be used only inside the forward of "
        r"their nn.Linear layer for curvature='kfac'.*Use curvature='ggn'",
    ):
        opt.step(lambda: (model(x), y))
    torch.testing.assert_close(flat(model), theta, rtol=0, atol=0)  # no step was taken
    with pytest.raises(ValueError, match=r"\['enc.weight'\] must be used only inside"):
        opt.step(lambda: (model(x), y))  # refused again: nothing was cached by the failure
    # a detached or logged use outside the layer does not count
    opt = NaturalGradient(model.parameters(), curvature="kfac", model=model)

    def detached():
        h = torch.tanh(model.mid(torch.tanh(model.enc(x))))
        return nn.functional.linear(h, model.enc.weight.detach().t()), y

    opt.step(detached)
    assert opt._kfac.checked
    opt = NaturalGradient(model.parameters(), curvature="ggn", model=model)
    opt.step(lambda: (model(x), y))


# ----------------------------------------------------------------------------- against SGD


def test_natural_gradient_beats_sgd_on_small_mlp() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, 32, dtype=DT)[:, None]
    y = torch.sin(2 * x) + 0.05 * torch.randn(32, 1, generator=g, dtype=DT)
    target, budget = 0.02, 300

    def init() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1)).to(DT)

    def count(model, step) -> int:
        for k in range(budget):
            with torch.no_grad():
                if float(((model(x) - y) ** 2).mean()) <= target:
                    return k
            step()
        return budget

    model = init()
    ngd = NaturalGradient(model.parameters(), damping=1e-2, lr=1.0, cg_max_iter=50)
    n_ngd = count(model, lambda: ngd.step(lambda: (model(x), y)))

    best_sgd = budget
    for lr in (0.3, 0.1, 0.03):  # mean-squared-error loss, learning rates tuned on a grid
        model = init()
        sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

        def sgd_step(model: nn.Module = model, sgd: torch.optim.SGD = sgd) -> None:
            sgd.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            sgd.step()

        best_sgd = min(best_sgd, count(model, sgd_step))
    assert n_ngd < budget, "natural gradient did not reach the target"
    assert 2 * n_ngd < best_sgd, (n_ngd, best_sgd)


# ----------------------------------------------------------------------------- errors


def test_construction_errors() -> None:
    params = list(nn.Linear(2, 1).parameters())
    with pytest.raises(
        ValueError, match=r"likelihood must be one of \['regression', 'classification', 'binary'\]"
    ):
        NaturalGradient(params, likelihood="poisson")
    with pytest.raises(
        ValueError,
        match=r"curvature must be one of \['ggn', 'ef', 'kfac'\]; got 'gnn'. Did you mean 'ggn'",
    ):
        NaturalGradient(params, curvature="gnn")
    with pytest.raises(ValueError, match="lr must be a finite number > 0; got 0"):
        NaturalGradient(params, lr=0.0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0; got -1"):
        NaturalGradient([{"params": params, "lr": -1.0}])
    with pytest.raises(ValueError, match="damping must be a finite number >= 0; got -0.1"):
        NaturalGradient(params, damping=-0.1)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0; got nan"):
        NaturalGradient([{"params": params, "damping": float("nan")}])
    with pytest.raises(ValueError, match="prior_precision must be a finite number >= 0; got -1"):
        NaturalGradient(params, prior_precision=-1.0)
    with pytest.raises(ValueError, match="sigma_noise must be a finite number > 0; got 0"):
        NaturalGradient(params, sigma_noise=0.0)
    with pytest.raises(ValueError, match="cg_tol must be > 0; got 0"):
        NaturalGradient(params, cg_tol=0.0)
    with pytest.raises(ValueError, match="cg_max_iter must be an integer >= 1; got 0"):
        NaturalGradient(params, cg_max_iter=0)


def test_step_errors() -> None:
    model = nn.Linear(2, 1).to(DT)
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    opt = NaturalGradient(model.parameters())
    with pytest.raises(
        TypeError, match=r"closure must be a callable returning \(outputs, targets\)"
    ):
        opt.step(None)
    with pytest.raises(
        TypeError, match=r"closure must return a pair \(outputs, targets\) of tensors; got Tensor"
    ):
        opt.step(lambda: ((model(x) - y) ** 2).sum())
    with pytest.raises(
        ValueError, match=r"outputs must have shape \(B, C\) or \(B,\); got \(4, 1, 1\)"
    ):
        opt.step(lambda: (model(x)[:, :, None], y))
    with pytest.raises(ValueError, match="outputs must be attached to the autograd graph"):
        opt.step(lambda: (model(x).detach(), y))
