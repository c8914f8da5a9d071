"""Function space: the joint predictive against the dense J Σ Jᵀ, function samples against the
joint covariance within Monte-Carlo error bars, predictives differentiable in x against finite
differences, memory refusals, seeding and threads."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import JointPrediction, LaplaceWrapper
from laplace_ggn.structures import STRUCTURES
from laplace_ggn.testing import dense_jacobian

DT = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-12}
SIGMA = torch.tensor([0.3, 0.8], dtype=DT)

#: every registered structure with its default options, plus the variants of the options
CONFIGS = {name: {"structure": name} for name in STRUCTURES}
CONFIGS.update(
    {
        "lowrank_k3": {"structure": "lowrank", "rank": 3},
        "full_last_layer": {"structure": "full", "subset": "last_layer"},
        "diag_last_layer": {"structure": "diag", "subset": "last_layer"},
        "kfac_last_layer": {"structure": "kfac", "subset": "last_layer"},
        "full_sigma_per_output": {"structure": "full", "sigma_noise": SIGMA},
        "kfac_sigma_per_output": {"structure": "kfac", "sigma_noise": SIGMA},
    }
)
LAST = ["2.weight", "2.bias"]


def _problem(likelihood: str, seed: int = 0, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    C = {"regression": 2, "classification": 3, "binary": 1}[likelihood]
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C)).double()
    X = torch.randn(n, 3, generator=g, dtype=DT)
    if likelihood == "regression":
        y = torch.randn(n, C, generator=g, dtype=DT)
    elif likelihood == "classification":
        y = torch.randint(0, C, (n,), generator=g)
    else:
        y = torch.randint(0, 2, (n,), generator=g).double()
    return model, DataLoader(TensorDataset(X, y), batch_size=6)


def _fit(config: str, likelihood: str = "regression", **kw):
    opts = dict(CONFIGS[config], **kw)
    if likelihood != "regression":
        opts.pop("sigma_noise", None)
    model, loader = _problem(likelihood)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = LaplaceWrapper(model, likelihood, prior_precision=0.7, **opts).fit(loader)
    return model, la


def _x(n=4, seed=5, grad=False):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return x.requires_grad_(grad)


def _dense_joint(model, la, x):
    names = LAST if CONFIGS_OF[id(la)].get("subset") == "last_layer" else None
    J = dense_jacobian(model, x, names)
    J = J.reshape(-1, J.shape[-1])
    return J @ la.posterior.to_dense() @ J.T


CONFIGS_OF: dict[int, dict] = {}


def _fit_tracked(config, likelihood="regression", **kw):
    model, la = _fit(config, likelihood, **kw)
    CONFIGS_OF[id(la)] = CONFIGS[config]
    return model, la


# -- joint covariance and joint predictive --------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_joint_covariance_equals_dense_reference_and_its_blocks_the_per_input_one(
    config, likelihood
):
    model, la = _fit_tracked(config, likelihood)
    x = _x()
    joint = la.functional_covariance(x, joint=True)
    B, C = x.shape[0], la.fitted.statistics.n_outputs
    assert joint.shape == (B, C, B, C)
    assert not joint.requires_grad
    torch.testing.assert_close(joint.reshape(B * C, B * C), _dense_joint(model, la, x), **TOL)
    per_input = la.functional_covariance(x)
    for b in range(B):
        torch.testing.assert_close(joint[b, :, b, :], per_input[b], **TOL)
    # symmetric in the pair of inputs
    torch.testing.assert_close(joint, joint.permute(2, 3, 0, 1), **TOL)


@pytest.mark.parametrize("config", ["full", "diag", "kfac_last_layer", "full_sigma_per_output"])
def test_joint_regression_predictive_adds_the_noise_on_the_diagonal(config):
    model, la = _fit_tracked(config)
    x = _x()
    pred = la.predict(x, joint=True)
    assert isinstance(pred, JointPrediction)
    sigma = la.sigma_noise.expand(2)
    ref = _dense_joint(model, la, x) + torch.diag((sigma**2).repeat(4))
    with torch.no_grad():
        torch.testing.assert_close(pred.mean, model(x), **TOL)
    torch.testing.assert_close(pred.covariance, ref, **TOL)
    torch.testing.assert_close(pred.variance, la.predict(x).variance, **TOL)


def test_joint_predictive_refuses_classification_and_nn():
    _, la = _fit("full", "classification")
    with pytest.raises(ValueError, match=r"joint Gaussian of likelihood='regression'"):
        la.predict(_x(), joint=True)
    _, la = _fit("full")
    with pytest.raises(ValueError, match=r"joint=True applies to method='glm'"):
        la.predict(_x(), "nn", joint=True)
    with pytest.raises(TypeError, match=r"joint must be True or False; got str"):
        la.functional_covariance(_x(), joint="yes")
    with pytest.raises(TypeError, match=r"differentiable must be True or False; got int"):
        la.predict(_x(), differentiable=1)


def test_joint_covariance_refused_over_the_memory_budget_before_allocating():
    model, loader = _problem("regression")
    la = LaplaceWrapper(model, "regression", structure="full", memory_budget=40_000).fit(loader)
    la.functional_covariance(_x(20), joint=True)  # (40, 40) and (40, 26): 20 kB
    with pytest.raises(ValueError, match=r"joint covariance of 60 inputs .*memory budget"):
        la.functional_covariance(_x(60), joint=True)  # (120, 120): 115 kB
    with pytest.raises(ValueError, match=r"joint covariance .*functional_samples"):
        la.predict(_x(60), joint=True)
    with pytest.raises(ValueError, match=r"the 1000 posterior draws .*memory budget"):
        la.functional_samples(_x(2), 1000)
    with pytest.raises(ValueError, match=r"function samples \(100 draws x 60 inputs"):
        la.functional_samples(_x(60), 100)


def test_zero_rows_give_empty_joint_results():
    _, la = _fit("kfac")
    x = _x(0)
    assert la.functional_covariance(x, joint=True).shape == (0, 2, 0, 2)
    assert la.functional_samples(x, 3).shape == (3, 0, 2)


# -- function samples ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_function_samples_have_the_joint_covariance_within_monte_carlo_error(config):
    """20,000 draws; every entry of the sample mean and covariance within 5 standard errors.

    For Gaussian draws the sample covariance S_ij has variance (Σ_ii Σ_jj + Σ_ij²) / n and
    the sample mean m_i variance Σ_ii / n; with 8 outputs (44 distinct entries) a 5σ bound
    fails by chance with probability < 1e-4 (and the draws are seeded).
    """
    model, la = _fit_tracked(config, "classification")
    x, n = _x(), 20_000
    draws = la.functional_samples(x, n, generator=torch.Generator().manual_seed(0))
    B, C = x.shape[0], 3
    assert draws.shape == (n, B, C)
    Sigma = la.functional_covariance(x, joint=True).reshape(B * C, B * C)
    flat = draws.reshape(n, B * C)
    d = Sigma.diagonal()
    with torch.no_grad():
        f = model(x).reshape(-1)
    assert bool(((flat.mean(0) - f).abs() <= 5 * (d / n).sqrt() + 1e-12).all())
    S = torch.cov(flat.T)
    se = ((torch.outer(d, d) + Sigma**2) / n).sqrt()
    assert bool(((S - Sigma).abs() <= 5 * se + 1e-12).all()), float(((S - Sigma).abs() / se).max())
    # the bound is not vacuous: the draws are correlated across inputs where Σ says so
    off = Sigma[:C, C:]
    clear = off.abs() > 20 * se[:C, C:]
    assert bool(clear.any())
    assert bool((S[:C, C:].sign() == off.sign())[clear].all())


def test_function_samples_are_the_linearised_network_at_the_posterior_draws():
    model, la = _fit_tracked("full", "classification")
    x = _x()
    draws = la.functional_samples(x, 5, generator=torch.Generator().manual_seed(3))
    thetas = la.sample(5, generator=torch.Generator().manual_seed(3))
    J = dense_jacobian(model, x)
    with torch.no_grad():
        f = model(x)
    ref = f + torch.einsum("bcp,sp->sbc", J, thetas - la.posterior.mean)
    torch.testing.assert_close(draws, ref, **TOL)


def test_function_samples_seeded_and_independent_of_the_chunking():
    model, loader = _problem("regression")
    la = LaplaceWrapper(model, "regression", structure="kfac").fit(loader)
    small = LaplaceWrapper(model, "regression", structure="kfac", memory_budget=20_000).fit(loader)
    x = _x(9)
    a = la.functional_samples(x, 7, generator=torch.Generator().manual_seed(1))
    b = la.functional_samples(x, 7, generator=torch.Generator().manual_seed(1))
    c = small.functional_samples(x, 7, generator=torch.Generator().manual_seed(1))
    d = la.functional_samples(x, 7, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, **TOL)
    assert not torch.allclose(a, d)
    with pytest.raises(ValueError, match=r"n must be a positive integer; got 0"):
        la.functional_samples(x, 0)
    with pytest.raises(TypeError, match="generator"):
        la.functional_samples(x, 2, generator=1)


# -- differentiable predictives ----------------------------------------------------------------------

LINKS = {
    "regression": [None],
    "classification": ["probit", "bridge", "bridge_norm", "mc"],
    "binary": ["probit", "bridge", "bridge_norm", "mc"],
}
GRAD_CASES = [
    (config, lik, link)
    for config in ["full", "diag", "kfac", "lowrank", "lowrank_k3", "projected"]
    for lik in LINKS
    for link in LINKS[lik]
] + [
    (config, lik, "probit" if lik != "regression" else None)
    for config in CONFIGS
    if config not in ("full", "diag", "kfac", "lowrank", "lowrank_k3", "projected")
    for lik in ("regression", "classification")
]


@pytest.mark.parametrize(("config", "likelihood", "link"), GRAD_CASES)
def test_differentiable_predictive_equals_finite_differences(config, likelihood, link):
    _, la = _fit(config, likelihood)

    def pred(x):
        g = torch.Generator().manual_seed(0)
        p = la.predict(x, link=link, n_samples=20, generator=g, differentiable=True)
        return p.mean, p.variance

    x = _x(2, grad=True)
    assert torch.autograd.gradcheck(pred, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
    # the same values as the predictive without graph
    p = la.predict(x.detach(), link=link, n_samples=20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pred(x)[0], p.mean, **TOL)
    torch.testing.assert_close(pred(x)[1], p.variance, **TOL)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("joint", [False, True])
def test_differentiable_functional_covariance_equals_finite_differences(config, joint):
    _, la = _fit(config)
    x = _x(2, grad=True)
    fn = lambda x: la.functional_covariance(x, joint=joint, differentiable=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-4)
    if joint:
        jp = lambda x: la.predict(x, joint=True, differentiable=True).covariance  # noqa: E731
        assert torch.autograd.gradcheck(jp, (x,), eps=1e-6, atol=1e-7, rtol=1e-4)


def test_gradients_reach_x_only_and_the_default_has_no_graph():
    model, la = _fit("full", "classification")
    post = la.posterior
    tensors = [post.mean, *[t for t in vars(post).values() if isinstance(t, torch.Tensor)]]
    x = _x(3, grad=True)
    assert not la.predict(x).mean.requires_grad
    assert not la.functional_covariance(x).requires_grad
    assert not la.functional_covariance(x, joint=True).requires_grad
    p = la.predict(x, link="bridge", differentiable=True)
    (p.mean[:, 0].sum() + p.variance.sum()).backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    assert all(not t.requires_grad and t.grad is None for t in tensors)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"differentiable=True applies to method='glm'"):
        la.predict(x, "nn", differentiable=True)


# -- threads ---------------------------------------------------------------------------------------


def test_concurrent_function_space_reads_equal_sequential():
    _, la = _fit("kfac", "classification")
    x = _x(6)
    calls = {
        "joint": lambda: la.functional_covariance(x, joint=True),
        "samples": lambda: la.functional_samples(x, 4, generator=torch.Generator().manual_seed(1)),
        "diff": lambda: la.predict(x, link="mc", differentiable=True,
                                   generator=torch.Generator().manual_seed(2)).mean.detach(),
    }  # fmt: skip
    expected = {k: f() for k, f in calls.items()}
    bad, barrier = [], threading.Barrier(3)

    def work(offset):
        try:
            barrier.wait()
            for i in range(9):
                name = list(calls)[(i + offset) % 3]
                if not torch.equal(calls[name](), expected[name]):
                    bad.append(name)
        except Exception as exc:  # reported below
            bad.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad, bad


class _NotVmappable(nn.Module):
    """Data-dependent control flow: vmap over samples fails (Jacobians by batch autograd)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if bool((x.abs() > 100).any()):
            h = h * 0
        return self.b(h)


def test_models_that_cannot_run_under_vmap_use_the_fallbacks():
    torch.manual_seed(0)
    model = _NotVmappable().double()
    _, loader = _problem("regression")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = LaplaceWrapper(model, "regression", structure="full").fit(loader)
        x = _x()
        J = dense_jacobian(model, x).reshape(8, -1)
        ref = J @ la.posterior.to_dense() @ J.T
        torch.testing.assert_close(
            la.functional_covariance(x, joint=True).reshape(8, 8), ref, **TOL
        )
        draws = la.functional_samples(x, 3, generator=torch.Generator().manual_seed(0))
        thetas = la.sample(3, generator=torch.Generator().manual_seed(0)) - la.posterior.mean
        with torch.no_grad():
            f = model(x)
        torch.testing.assert_close(draws.reshape(3, 8), f.reshape(8) + thetas @ J.T, **TOL)
        xg = _x(2, grad=True)
        fn = lambda x: la.predict(x, differentiable=True).variance  # noqa: E731
        assert torch.autograd.gradcheck(fn, (xg,), eps=1e-6, atol=1e-7, rtol=1e-4)


def test_sequence_outputs_give_the_joint_covariance_of_every_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()  # (B, T, 2)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 5, 3, generator=g, dtype=DT), torch.randn(6, 5, 2, generator=g, dtype=DT)
    la = LaplaceWrapper(model, "regression", structure="full").fit(
        DataLoader(TensorDataset(X, y), batch_size=3)
    )
    x = torch.randn(2, 5, 3, generator=g, dtype=DT)
    joint = la.functional_covariance(x, joint=True)
    assert joint.shape == (2, 5, 2, 2, 5, 2)
    J = dense_jacobian(model, x.reshape(10, 3)).reshape(20, -1)  # positions are independent rows
    torch.testing.assert_close(joint.reshape(20, 20), J @ la.posterior.to_dense() @ J.T, **TOL)
    assert la.functional_samples(x, 3).shape == (3, 2, 5, 2)
    assert la.predict(x, joint=True).covariance.shape == (20, 20)
