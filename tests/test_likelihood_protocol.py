"""Every likelihood beyond the three, in every structure, against dense references.

The references are computed another way than the library does: Jacobians by ``jacrev`` of
the whole batch, output Hessians by ``torch.autograd.functional.hessian`` of a per-sample NLL
written here (or the Fisher written by hand), clamped with an explicit ``eigh``, the KFAC
factors from layer inputs and ``jacrev`` of a zero offset at the layer output.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.batches import group_items
from laplace_ggn.likelihoods import BaseLikelihood, OutputCurvature, from_nll, get_likelihood

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _mlp(C: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C)).double()


def student_t_nll(f, y, nu: float = 3.0, scale: float = 0.5):
    r = (y.reshape(f.shape) - f) / scale
    return (
        0.5 * (nu + 1) * torch.log1p(r * r / nu)
        + math.log(scale)
        + 0.5 * math.log(nu * math.pi)
        + math.lgamma(nu / 2)
        - math.lgamma((nu + 1) / 2)
    ).sum(-1)


def _clamped_hessians(nll, f, y):
    """Per-sample autograd Hessians of ``nll`` in the outputs, clamped to PSD."""
    Hs = []
    for n in range(f.shape[0]):
        H = torch.autograd.functional.hessian(lambda z: nll(z[None], y[n : n + 1]).sum(), f[n])
        lam, U = torch.linalg.eigh(H)
        Hs.append((U * lam.clamp_min(0)) @ U.T)
    return torch.stack(Hs)


def _case(name: str):
    """(model, X, y, likelihood option, items per sample, output Hessians of the reference)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=g, dtype=DT)
    if name == "heteroscedastic":
        model, y = _mlp(4), torch.randn(12, 2, generator=g, dtype=DT)
        return (
            model,
            X,
            y,
            "heteroscedastic",
            1,
            lambda f, y: torch.diag_embed(
                torch.cat([torch.exp(-f[:, 2:]), torch.full_like(f[:, 2:], 0.5)], -1)
            ),
        )
    if name == "poisson":
        model, y = _mlp(2), torch.poisson(torch.full((12, 2), 2.0, dtype=DT), generator=g)

        def pois(f, y):
            return (torch.exp(f) - y * f + torch.lgamma(y + 1)).sum(-1)

        return model, X, y, "poisson", 1, lambda f, y: _clamped_hessians(pois, f, y)
    if name == "student_t":
        model = _mlp(1)
        y = 3 * torch.randn(12, 1, generator=g, dtype=DT)  # outliers: some Hessians negative
        return (
            model,
            X,
            y,
            from_nll(student_t_nll),
            1,
            lambda f, y: _clamped_hessians(student_t_nll, f, y),
        )
    if name == "reward_modeling":
        model = _mlp(1)
        X = torch.randn(12, 2, 3, generator=g, dtype=DT)
        y = torch.randint(0, 2, (12,), generator=g)

        def bt(f, y):
            return -torch.log_softmax(f, -1).gather(1, y.reshape(-1, 1))[:, 0]

        return model, X, y, "reward_modeling", 2, lambda f, y: _clamped_hessians(bt, f, y)
    raise KeyError(name)


def _pair_fn(model, k):
    def f(x):
        out = model(x.reshape(-1, x.shape[-1]) if k > 1 else x)
        return out.reshape(x.shape[0], -1)

    return f


def _dense_jacobian(model, X, k):
    params = dict(model.named_parameters())
    names = list(params)

    def call(theta):
        sizes = [params[n].numel() for n in names]
        chunks = dict(zip(names, theta.split(sizes)))
        ps = {n: chunks[n].view(params[n].shape) for n in names}
        return _pair_fn(lambda x: torch.func.functional_call(model, ps, (x,)), k)(X)

    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    return torch.func.jacrev(call)(theta).detach()  # (N, C, P)


def _dense_ggn(model, X, y, k, hessians):
    J = _dense_jacobian(model, X, k)
    with torch.no_grad():
        f = _pair_fn(model, k)(X)
    return torch.einsum("ncp,ncd,ndq->pq", J, hessians(f, y), J)


def _dense_kfac(model, X, y, k, hessians):
    """kron(B, A) per Linear layer, in flat order (both layers of the MLP are covered)."""
    with torch.no_grad():
        f = _pair_fn(model, k)(X)
    Lam = hessians(f, y)
    N = X.shape[0]
    P = sum(p.numel() for p in model.parameters())
    G = torch.zeros(P, P, dtype=DT)
    off = 0
    for m in model:
        if not isinstance(m, nn.Linear):
            continue
        store = {}
        h = m.register_forward_hook(lambda mod, i, o: store.update(a=i[0].detach(), z=o))
        with torch.no_grad():
            _pair_fn(model, k)(X)
        h.remove()

        def run(delta, m=m):
            h2 = m.register_forward_hook(lambda mod, i, o: o + delta)
            try:
                return _pair_fn(model, k)(X)
            finally:
                h2.remove()

        Jz = torch.func.jacrev(run)(torch.zeros_like(store["z"]))  # (N, C, N·k, O)
        Jz = torch.stack([Jz[n, :, n * k : (n + 1) * k] for n in range(N)])  # (N, C, k, O)
        a = torch.cat([store["a"], torch.ones(N * k, 1, dtype=DT)], -1)
        A = a.T @ a
        B = torch.einsum("ncto,ncd,ndtp->op", Jz, Lam, Jz) / (N * k)
        O, I = m.weight.shape
        idx = torch.cat(
            [
                torch.cat([off + o * I + torch.arange(I), torch.tensor([off + O * I + o])])
                for o in range(O)
            ]
        )
        G[idx[:, None], idx[None, :]] = torch.kron(B, A)
        off += O * I + O
    return G


def _fit(model, X, y, lik, structure, **kw):
    loader = DataLoader(TensorDataset(X, y), batch_size=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LaplaceWrapper(model, lik, structure=structure, **kw).fit(loader)


LIKELIHOODS = ["heteroscedastic", "poisson", "student_t", "reward_modeling"]


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_curvature_of_every_structure_equals_the_dense_reference(name):
    model, X, y, lik, k, hessians = _case(name)
    G = _dense_ggn(model, X, y, k, hessians)
    torch.testing.assert_close(_fit(model, X, y, lik, "full").posterior.ggn, G, **TOL)
    diag = _fit(model, X, y, lik, "diag").posterior.ggn_diag
    torch.testing.assert_close(diag, G.diagonal(), **TOL)
    low = _fit(model, X, y, lik, "lowrank").posterior
    torch.testing.assert_close((low.eigenvectors * low.eigenvalues) @ low.eigenvectors.T, G, **TOL)
    kfac = _fit(model, X, y, lik, "kfac").posterior.curvature.to_dense()
    torch.testing.assert_close(kfac, _dense_kfac(model, X, y, k, hessians), **TOL)


def test_student_t_hessians_are_clamped_where_negative():
    model, X, y, lik, _, _ = _case("student_t")
    with torch.no_grad():
        f = model(X)
    raw = lik.raw_hessian(f, y)[:, 0, 0]
    assert bool((raw < 0).any()) and bool((raw > 0).any())  # outliers and inliers both present
    torch.testing.assert_close(lik.hessian(f, y)[:, 0, 0], raw.clamp_min(0), **TOL)
    assert "clamped to its positive semi-definite part" in repr(lik)


def _categorical_nll(f, y):
    return -torch.log_softmax(f, -1).gather(1, y.long().reshape(-1, 1))[:, 0]


def _draw(f, generator):
    return torch.multinomial(torch.softmax(f, -1), 1, generator=generator)[:, 0]


CATEGORICAL = from_nll(_categorical_nll, mean=lambda f: torch.softmax(f, -1), sample=_draw)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "lowrank", "projected"])
def test_from_nll_categorical_reproduces_the_builtin(structure):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 3, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    model = _mlp(3)
    ours = _fit(model, X, y, CATEGORICAL, structure)
    ref = _fit(model, X, y, "classification", structure)
    torch.testing.assert_close(ours.posterior_covariance(), ref.posterior_covariance(), **TOL)
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), **TOL)
    a = torch.tensor(0.3, dtype=DT)
    torch.testing.assert_close(
        ours.log_marginal_likelihood(a), ref.log_marginal_likelihood(a), **TOL
    )


def test_from_nll_mc_predictive_matches_the_builtin_mc_link_within_mc_error():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 3, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    model = _mlp(3)
    ours, ref = _fit(model, X, y, CATEGORICAL, "full"), _fit(model, X, y, "classification", "full")
    S = 4000
    p = ours.predict(X, n_samples=S, generator=torch.Generator().manual_seed(1))
    q = ref.predict(X, link="mc", n_samples=S, generator=torch.Generator().manual_seed(2))
    se = ((p.variance + q.variance) / S).sqrt()  # standard error of the difference of means
    assert bool(((p.mean - q.mean).abs() <= 4 * se + 1e-12).all())
    torch.testing.assert_close(p.variance, q.variance, rtol=0.2, atol=2e-3)
    # the NN predictive averages the response too
    pn = ours.predict(X, "nn", n_samples=200, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(pn.mean.sum(-1), torch.ones(12, dtype=DT), **TOL)


def test_from_nll_mc_curvature_is_unbiased_for_the_categorical_fisher():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 3, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    model = _mlp(3)
    ref = _fit(model, X, y, "classification", "full").posterior.ggn
    mc = _fit(model, X, y, CATEGORICAL, "full", curvature="mc", n_mc_samples=2000).posterior.ggn
    assert float((mc - ref).norm() / ref.norm()) < 0.05


class _StudentT(BaseLikelihood):
    """A user subclass with a parameter of its own (ν) saved with the wrapper."""

    name = "student_t_nu"
    parameters = ("nu",)

    def __init__(self, nu: float):
        self.nu = nu

    def per_sample_nll(self, f, y):
        return student_t_nll(f, y, nu=self.nu)


@pytest.mark.parametrize("structure", ["full", "kfac"])
def test_state_round_trip_of_user_likelihoods(structure):
    model, X, y, _, _, _ = _case("student_t")
    la = _fit(model, X, y, _StudentT(4.0), structure)
    state = la.state_dict()
    assert state["likelihood"] == "student_t_nu" and state["likelihood_state"] == {"nu": 4.0}
    with pytest.raises(ValueError, match="likelihood must be given to from_state_dict for a state"):
        LaplaceWrapper.from_state_dict(model, state)
    with pytest.raises(ValueError, match="likelihood must be the one the state was saved with"):
        LaplaceWrapper.from_state_dict(model, state, likelihood=from_nll(student_t_nll))
    with pytest.raises(TypeError, match=r"state\['likelihood_state'\] must be a dict; got 1"):
        LaplaceWrapper.from_state_dict(model, {**state, "likelihood_state": 1})
    given = _StudentT(1.5)
    back = LaplaceWrapper.from_state_dict(model, state, likelihood=given)
    assert back.fitted.likelihood.nu == 4.0 and given.nu == 1.5  # restored into a copy
    torch.testing.assert_close(back.log_marginal_likelihood(), la.log_marginal_likelihood(), **TOL)
    torch.testing.assert_close(back.predict(X).variance, la.predict(X).variance, **TOL)


@pytest.mark.parametrize("name", ["heteroscedastic", "poisson", "reward_modeling"])
def test_state_round_trip_of_builtin_likelihoods(name):
    model, X, y, lik, k, _ = _case(name)
    la = _fit(model, X, y, lik, "kfac")
    back = LaplaceWrapper.from_state_dict(model, la.state_dict())
    torch.testing.assert_close(back.log_marginal_likelihood(), la.log_marginal_likelihood(), **TOL)
    x = X[:, 0] if k > 1 else X
    torch.testing.assert_close(back.predict(x).variance, la.predict(x).variance, **TOL)


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_tuning_mc_curvature_and_sampling_work_for_every_likelihood(name):
    model, X, y, lik, k, _ = _case(name)
    kw = {} if name == "student_t" else {"curvature": "mc", "n_mc_samples": 3}
    la = _fit(model, X, y, lik, "diag", **kw)
    la.optimize_prior_precision(n_steps=20)
    assert bool(torch.isfinite(la.log_marginal_likelihood()))
    x = X[:, 0] if k > 1 else X
    pred = la.predict(x, "nn", n_samples=5, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(pred.variance).all())


def test_likelihood_errors_are_named():
    model, X, y, _, _, _ = _case("student_t")
    with pytest.raises(TypeError, match=r"likelihood must be one of .* got the class Poisson"):
        get_likelihood(type(get_likelihood("poisson")))
    with pytest.raises(TypeError, match=r"likelihood must be one of .* got object without"):
        LaplaceWrapper(model, object())
    with pytest.raises(TypeError, match="nll must be callable"):
        from_nll(3)
    with pytest.raises(TypeError, match="mean must be callable or None; got int"):
        from_nll(student_t_nll, mean=1)
    with pytest.raises(TypeError, match="name must be a non-empty str or None"):
        from_nll(student_t_nll, name="")
    with pytest.raises(ValueError, match=r"curvature='mc' needs a likelihood that samples targets"):
        LaplaceWrapper(model, from_nll(student_t_nll), curvature="mc")
    with pytest.raises(ValueError, match=r"nll must return the NLL of each row, shape \(5,\)"):
        _fit(model, X, y, from_nll(lambda f, y: student_t_nll(f, y).sum()), "diag")
    la = _fit(model, X, y, from_nll(student_t_nll), "diag")
    with pytest.raises(ValueError, match=r"link must be 'mc' \(or None\) for likelihood"):
        la.predict(X, link="probit")
    with pytest.raises(ValueError, match="y must be given for likelihood 'student_t_nll'"):
        la.fitted.likelihood.hessian(torch.zeros(2, 1, dtype=DT))
    with pytest.raises(ValueError, match=r"student_t_nll targets must have 2 rows"):
        la.fitted.likelihood.check_targets(torch.zeros(2, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="student_t_nll targets must lead with"):
        la.fitted.likelihood.position_targets(torch.zeros(2, 3, 1), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="sample must be given to from_nll"):
        la.fitted.likelihood.sample_targets(torch.zeros(2, 1), None)
    with pytest.raises(NotImplementedError, match="must implement per_sample_nll"):
        BaseLikelihood().per_sample_nll(torch.zeros(1, 1), torch.zeros(1))
    with pytest.raises(NotImplementedError, match="must implement sample_targets"):
        BaseLikelihood().sample_targets(torch.zeros(1, 1), None)
    with pytest.raises(ValueError, match=r"state of likelihood 'student_t_nu' must hold"):
        _StudentT(3.0).with_state({})
    with pytest.raises(ValueError, match="state of likelihood 'regression' must be empty"):
        get_likelihood("regression").with_state({"a": 1})
    with pytest.raises(ValueError, match=r"state of likelihood 'poisson' must hold the param"):
        get_likelihood("poisson").with_state({"a": 1})
    with pytest.raises(
        ValueError, match="y must be given for likelihood 'student_t_nll'; got None"
    ):
        OutputCurvature(from_nll(student_t_nll)).factor(torch.zeros(2, 1, dtype=DT))
    with pytest.raises(ValueError, match=r"model output must have shape \(B·2, C\) per candidate"):
        group_items(torch.zeros(4, 3, 1), 2)
