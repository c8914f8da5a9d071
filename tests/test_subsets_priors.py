"""Every structure × parameter subset × prior structure, through the wrapper, against the dense
form of the same approximation; and the Laplace evidence against its formula with the dense Λ."""

from __future__ import annotations

import math

import pytest
import torch
from cases import dense_ggn_of, make_case, stored_curvature
from test_kfac import kfac_dense_reference
from torch import nn

from laplace_ggn import LaplaceWrapper
from laplace_ggn.testing import check_posterior, dense_ggn, nll_per_sample

SUBSETS = {"all": "all", "last_layer": "last_layer", "list": ["0.weight", "2.bias"]}
STRUCTURES = ["full", "diag", "kfac", "lowrank-exact", "lowrank-k=rank", "lowrank-k=3"]
PRIORS = ["scalar", "layerwise", "diagonal"]


def _names(model, subset):
    if subset == "all":
        return [n for n, _ in model.named_parameters()]
    if subset == "last_layer":
        return ["2.weight", "2.bias"]
    return list(subset)


def _precision(kind, model, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    if kind == "scalar":
        return 0.8
    if kind == "layerwise":
        return 0.3 + torch.rand(len(names), generator=g, dtype=torch.float64)
    P = sum(params[n].numel() for n in names)
    return 0.3 + torch.rand(P, generator=g, dtype=torch.float64)


def _wrapper(case, structure, subset, prec, rank=None):
    kind = structure.split("-")[0]
    if case.likelihood == "regression":
        kw = {"sigma_noise": 0.8, "temperature": 1.2}
    else:
        kw = {"temperature": 1.5}
    return LaplaceWrapper(
        case.model,
        case.likelihood,
        structure=kind,
        subset=subset,
        prior_precision=prec,
        rank=rank,
        **kw,
    )


def _reference_curvature(case, structure, names, la=None):
    G = dense_ggn(case.model, case.X, case.y, case.likelihood, names=names).detach()
    if structure == "full" or structure == "lowrank-exact":
        return G
    if structure == "diag":
        return torch.diag(G.diagonal())
    if structure == "kfac":
        return kfac_dense_reference(case.model, case.X, case.y, case.likelihood, names=names)
    if structure == "lowrank-k=rank":
        return G
    post = la.posterior  # top-k below rank(G): the dense form of its own approximation
    return post.eigenvectors @ torch.diag(post.eigenvalues) @ post.eigenvectors.T


def _rank_of(case, names):
    lam = torch.linalg.eigvalsh(dense_ggn(case.model, case.X, case.y, case.likelihood, names=names))
    return int((lam > 1e-10 * lam.max()).sum())


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("subset", list(SUBSETS))
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("name", ["mlp_regression", "mlp_classification"])
def test_structure_subset_prior(name, structure, subset, prior):
    case = make_case(name, seed=3)
    sub = SUBSETS[subset]
    names = _names(case.model, sub)
    prec = _precision(prior, case.model, names)
    rank = None
    if structure == "lowrank-k=rank":
        rank = _rank_of(case, names)
    elif structure == "lowrank-k=3":
        rank = 3
    if structure == "kfac" and prior == "diagonal":
        match = "accepted by structure='full', 'diag' and 'lowrank'"
        if sub == "last_layer":  # the subset is traced on data: refused at fit
            la = _wrapper(case, structure, sub, prec, rank)
            with pytest.raises(ValueError, match=match):
                la.fit(case.loader(5))
            assert not la.is_fitted
        else:  # refused at construction
            with pytest.raises(ValueError, match=match):
                _wrapper(case, structure, sub, prec, rank)
        return
    la = _wrapper(case, structure, sub, prec, rank)
    la.fit(case.loader(5))
    assert list(la.fitted.layout.names) == names
    s = float(la.fitted.hyperparameters.scale())
    G = _reference_curvature(case, structure, names, la)
    prior_diag = la.posterior.prior.diag()
    Lam = s * G + torch.diag(prior_diag)
    Sigma = torch.linalg.inv(Lam)
    check_posterior(la.posterior, Sigma, rtol=1e-6, atol=1e-8)

    # Laplace evidence against the formula with the dense Λ (θ₀ = 0)
    params = dict(case.model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    with torch.no_grad():
        f = case.model(case.X)
    sigma = float(la.sigma_noise)
    nll = nll_per_sample(case.likelihood, f, case.y, sigma).sum()
    ref = (
        -nll
        - 0.5 * (prior_diag * theta**2).sum()
        - 0.5 * torch.logdet(Lam)
        + 0.5 * torch.log(prior_diag).sum()
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), ref, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "lowrank-exact", "lowrank-k=3"])
def test_evidence_gradient_in_layerwise_prior_matches_dense(structure):
    case = make_case("mlp_regression", seed=5)
    names = _names(case.model, "all")
    la = _wrapper(case, structure, "all", 1.0, 3 if structure == "lowrank-k=3" else None)
    la.fit(case.loader(4))
    G = _reference_curvature(case, structure, names, la)
    prec = torch.tensor([0.5, 1.5, 0.9, 2.0], dtype=torch.float64, requires_grad=True)
    sig = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    lml = la.log_marginal_likelihood(prior_precision=prec, sigma_noise=sig)
    g_prec, g_sig = torch.autograd.grad(lml, (prec, sig))

    p2 = prec.detach().clone().requires_grad_(True)
    s2 = sig.detach().clone().requires_grad_(True)
    d = la.fitted.layout.expand_per_tensor(p2)
    params = dict(case.model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    with torch.no_grad():
        f = case.model(case.X)
    sse = ((case.y - f) ** 2).sum()
    nll = 0.5 * sse / s2**2 + 0.5 * f.numel() * torch.log(2 * math.pi * s2**2)
    Lam = G / (la.temperature * s2**2) + torch.diag(d)
    ref = -nll - 0.5 * (d * theta**2).sum() - 0.5 * torch.logdet(Lam) + 0.5 * torch.log(d).sum()
    r_prec, r_sig = torch.autograd.grad(ref, (p2, s2))
    torch.testing.assert_close(lml.detach(), ref.detach(), rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(g_prec, r_prec, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g_sig, r_sig, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "lowrank"])
def test_unknown_subset_name_is_refused_with_a_hint(structure):
    case = make_case("mlp_classification")
    with pytest.raises(ValueError, match=r"unknown: '0\.weigth' \(did you mean '0\.weight'"):
        LaplaceWrapper(case.model, "classification", structure=structure, subset=["0.weigth"])


# ---------------------------------------------------------------------------------------------
# Tied parameters: the canonical name and the aliases of further holders
# ---------------------------------------------------------------------------------------------


class _TiedEmbedding(nn.Module):
    """Embedding tied to the output layer: ``out.weight`` is an alias of ``emb.weight``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mix = nn.Linear(3, 3)
        self.out = nn.Linear(3, 5)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.emb(ids).mean(1))))


def _tied_data():
    torch.manual_seed(0)
    model = _TiedEmbedding().double()
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 5, (6, 3), generator=g), torch.randint(0, 5, (6,), generator=g)
    return model, ids, y


def _untied_ggn(model, ids, y, names):
    """Dense GGN with each named holder's tensor a separate input (tie_weights=False)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def fn(th):
        parts = {n: t.view(params[n].shape) for n, t in zip(names, th.split(sizes))}
        return torch.func.functional_call(model, parts, (ids,), tie_weights=False)

    return dense_ggn_of(fn, theta, "classification", y)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "lowrank"])
def test_alias_selects_its_holder_and_the_canonical_name_the_other_uses(structure):
    model, ids, y = _tied_data()
    loader = [(ids[:3], y[:3]), (ids[3:], y[3:])]
    head = LaplaceWrapper(model, structure=structure, subset="last_layer").fit(loader)
    assert head.fitted.layout.names == ("out.weight", "out.bias")
    alias = LaplaceWrapper(model, structure=structure, subset=["out.bias", "out.weight"])
    alias.fit(loader)
    assert alias.fitted.layout.names == ("out.weight", "out.bias")
    G = _untied_ggn(model, ids, y, ["out.weight", "out.bias"])
    if structure == "diag":
        G = torch.diag(G.diagonal())
    elif structure == "kfac":  # B ⊗ A of the head [W b], scattered to W (5, 3) then b (5,)
        with torch.no_grad():
            phi = torch.tanh(model.mix(model.emb(ids).mean(1)))
            p = torch.softmax(model(ids), -1)
        a = torch.cat([phi, torch.ones(6, 1, dtype=phi.dtype)], 1)
        B = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)).mean(0)
        idx = torch.tensor([[o * 3 + j for j in range(3)] + [15 + o] for o in range(5)]).reshape(-1)
        G = torch.zeros(20, 20, dtype=phi.dtype)
        G[idx[:, None], idx[None, :]] = torch.kron(B, a.T @ a)
    for la in (head, alias):
        torch.testing.assert_close(stored_curvature(la), G, rtol=1e-9, atol=1e-11)
    # both names: the embedding's use and the output layer's use are separate tensors of θ
    both = LaplaceWrapper(model, structure="full", subset=["out.weight", "emb.weight"]).fit(loader)
    assert both.fitted.layout.names == ("emb.weight", "out.weight") and both.n_params == 30
    G2 = _untied_ggn(model, ids, y, ["emb.weight", "out.weight"])
    torch.testing.assert_close(both.posterior.ggn, G2, rtol=1e-9, atol=1e-11)
    state = both.state_dict()
    back = LaplaceWrapper.from_state_dict(model, state)
    torch.testing.assert_close(back.posterior_covariance(), both.posterior_covariance())
    assert model.out.weight is model.emb.weight  # the user's model stays tied


def test_unknown_name_next_to_an_alias_is_refused():
    model, _, _ = _tied_data()
    with pytest.raises(ValueError, match=r"unknown: 'out.weigth' \(did you mean 'out.weight'"):
        LaplaceWrapper(model, subset=["out.weigth"])
