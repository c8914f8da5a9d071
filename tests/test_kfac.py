"""KFAC: factors against an independent dense reference, exactness cases, Conv2d, fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import CASE_NAMES, make_case, tied_autoencoder_case
from torch import nn

from laplace_ggn import LaplaceWrapper
from laplace_ggn._checks import Likelihood
from laplace_ggn.collectors import KFACCollector
from laplace_ggn.functional import FunctionalModel, resolve_subset
from laplace_ggn.likelihoods import get_likelihood
from laplace_ggn.posteriors import KFACPosterior, make_prior
from laplace_ggn.testing import (
    check_posterior,
    dense_ggn,
    dense_output_hessians,
    dense_posterior_covariance,
)

TOL = {"rtol": 1e-8, "atol": 1e-10}


# ---------------------------------------------------------------------------------------------
# Independent dense reference of the KFAC approximation
# ---------------------------------------------------------------------------------------------


def _layer_io(model: nn.Module, module: nn.Module, X: torch.Tensor):
    """Layer input, and d f / d (layer output) per sample by jacrev of an added zero offset."""
    store = {}

    def rec(mod, inp, out):
        store["a"] = inp[0].detach()
        store["z"] = out.detach()

    h = module.register_forward_hook(rec)
    with torch.no_grad():
        model(X)
    h.remove()
    z = store["z"]

    def run(delta):
        h2 = module.register_forward_hook(lambda m, i, o: o + delta)
        try:
            out = model(X)
        finally:
            h2.remove()
        return out.reshape(out.shape[0], -1)

    Jz = torch.func.jacrev(run)(torch.zeros_like(z))  # (N, C, N, *z.shape[1:])
    N = X.shape[0]
    Jz = torch.stack([Jz[n, :, n] for n in range(N)])  # (N, C, *z.shape[1:])
    return store["a"], Jz.detach()


def _patches_loop(a: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Patches ``(N, T, Cin·kh·kw)`` extracted with explicit loops (no F.unfold)."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    ap = torch.nn.functional.pad(a, (pw, pw, ph, ph))
    N, _, H, W = ap.shape
    rows = []
    for i in range(0, H - kh + 1, sh):
        for j in range(0, W - kw + 1, sw):
            rows.append(ap[:, :, i : i + kh, j : j + kw].reshape(N, -1))
    return torch.stack(rows, dim=1)


def kfac_dense_reference(model, X, y, likelihood, names=None, diagonal=()) -> torch.Tensor:
    """Dense ``(P, P)`` KFAC GGN in flat order: ``kron(B, A)`` per Linear/Conv2d layer, scattered
    to the positions of ``W[o, j]`` / ``b[o]``; other parameters, and those of the layers named
    in ``diagonal``, get the exact GGN diagonal."""
    model.eval()
    params = dict(model.named_parameters())
    names = list(params) if names is None else [n for n in params if n in set(names)]
    offsets, off = {}, 0
    for n in names:
        offsets[n] = off
        off += params[n].numel()
    P = off
    with torch.no_grad():
        f = model(X)
    f = f.unsqueeze(1) if f.ndim == 1 else f
    Lam = dense_output_hessians(likelihood, f, y)  # (N, C, C)
    G = torch.zeros(P, P, dtype=X.dtype)
    covered = set()
    for mname, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or mname in diagonal:
            continue
        pre = f"{mname}." if mname else ""
        wn, bn = pre + "weight", pre + "bias"
        has_w, has_b = wn in names, m.bias is not None and bn in names
        if not (has_w or has_b):
            continue
        a, Jz = _layer_io(model, m, X)
        N = X.shape[0]
        if isinstance(m, nn.Conv2d):
            a = _patches_loop(a, m)  # (N, T, D)
            Jz = Jz.flatten(3).transpose(2, 3)  # (N, C, T, O)
        elif a.ndim == 2:
            a, Jz = a.unsqueeze(1), Jz.unsqueeze(2)  # (N, 1, I), (N, C, 1, O)
        T = a.shape[1]
        cols = ([a] if has_w else []) + ([torch.ones(N, T, 1, dtype=X.dtype)] if has_b else [])
        at = torch.cat(cols, -1)
        A = torch.einsum("ntd,nte->de", at, at)
        B = torch.einsum("ncto,ncd,ndtp->op", Jz, Lam, Jz) / (N * T)
        O, D = B.shape[0], A.shape[0]
        I = D - has_b
        idx = torch.empty(O, D, dtype=torch.long)
        for o in range(O):
            for j in range(I):
                idx[o, j] = offsets[wn] + o * I + j
            if has_b:
                idx[o, I] = offsets[bn] + o
        idx = idx.reshape(-1)
        G[idx[:, None], idx[None, :]] = torch.kron(B, A)
        covered |= {n for n, h in ((wn, has_w), (bn, has_b)) if h}
    rest = [n for n in names if n not in covered]
    if rest:
        Gfull = dense_ggn(model, X, y, likelihood, names=names)
        for n in rest:
            s = slice(offsets[n], offsets[n] + params[n].numel())
            G[s, s] = torch.diag(Gfull[s, s].diagonal())
    return G


def _collect(model, X, y, likelihood, *, subset="all", batch=5, mc=False, generator=None):
    layout = resolve_subset(model, subset, X[:batch])
    fm = FunctionalModel(model, layout)
    col = KFACCollector(fm, get_likelihood(Likelihood(likelihood)), mc=mc, generator=generator)
    for i in range(0, X.shape[0], batch):
        col.update(X[i : i + batch])
    return col.finalize(), fm


# ---------------------------------------------------------------------------------------------
# Factors and posterior
# ---------------------------------------------------------------------------------------------


def test_factors_match_dense_reference(case):
    curv, _ = _collect(case.model, case.X, case.y, case.likelihood)
    ref = kfac_dense_reference(case.model, case.X, case.y, case.likelihood)
    torch.testing.assert_close(curv.to_dense(), ref, **TOL)


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_posterior_passes_battery(name, prior_kind):
    case = make_case(name, seed=2)
    curv, fm = _collect(case.model, case.X, case.y, case.likelihood)
    T = len(fm.layout.names)
    g = torch.Generator().manual_seed(4)
    prec = 0.8 if prior_kind == "scalar" else 0.2 + torch.rand(T, generator=g, dtype=torch.float64)
    prior = make_prior(prec, fm.layout, dtype=torch.float64, device=torch.device("cpu"))
    post = KFACPosterior(fm.theta, curv, prior, scale=0.6)
    ref = kfac_dense_reference(case.model, case.X, case.y, case.likelihood)
    Sigma = dense_posterior_covariance(ref, prior.diag(), 0.6)
    check_posterior(post, Sigma, rtol=1e-7, atol=1e-9)
    # with_prior reuses the eigenbases and equals a fresh posterior
    prior2 = make_prior(1.7, fm.layout, dtype=torch.float64, device=torch.device("cpu"))
    torch.testing.assert_close(
        post.with_prior(prior2, 1.0).to_dense(), dense_posterior_covariance(ref, 1.7), **TOL
    )


def test_log_det_is_differentiable_in_layerwise_prior():
    case = make_case("mlp_regression")
    curv, fm = _collect(case.model, case.X, case.y, case.likelihood)
    prec = torch.tensor([0.5, 1.0, 2.0, 0.7], dtype=torch.float64, requires_grad=True)
    prior = make_prior(prec, fm.layout, dtype=torch.float64, device=torch.device("cpu"))
    post = KFACPosterior(fm.theta, curv, prior, scale=1.0)
    (grad,) = torch.autograd.grad(post.log_det(), prec)
    ref = kfac_dense_reference(case.model, case.X, case.y, case.likelihood)
    p2 = prec.detach().clone().requires_grad_(True)
    ld = torch.logdet(ref + torch.diag(fm.layout.expand_per_tensor(p2)))
    (grad_ref,) = torch.autograd.grad(ld, p2)
    torch.testing.assert_close(grad, grad_ref, **TOL)


@pytest.mark.parametrize("w_prec,b_prec", [(1e12, 1e-12), (1e-12, 1e12), (1.0, 1e-12), (1e-6, 1e6)])
def test_float32_extreme_weight_and_bias_priors_stay_finite_and_psd(w_prec, b_prec):
    # 1 + δw with δ = α_b - α cancelled (NaN evidence); J Σ̃ Jᵀ as a difference went negative
    case = make_case("mlp_classification")
    curv, fm = _collect(case.model, case.X, case.y, case.likelihood)
    J = torch.randn(6, 3, fm.n_params, generator=torch.Generator().manual_seed(0))
    J64 = J.double()
    out = {}
    for dt in (torch.float32, torch.float64):
        c = type(curv)(
            curv.layout,
            tuple(type(b)(b.weight, b.bias, b.A.to(dt), b.B.to(dt)) for b in curv.blocks),
            curv.diag_names,
            curv.diag.to(dt),
        )
        prec = torch.tensor([w_prec, b_prec, w_prec, b_prec], dtype=dt)
        prior = make_prior(prec, fm.layout, dtype=dt, device=torch.device("cpu"))
        out[dt] = KFACPosterior(fm.theta.to(dt), c, prior, scale=1.0)
    post, ref = out[torch.float32], out[torch.float64]
    assert bool(torch.isfinite(post.log_det()))
    torch.testing.assert_close(post.log_det().double(), ref.log_det(), rtol=1e-5, atol=1e-3)
    var = torch.diagonal(post.functional_covariance(J.float()), dim1=1, dim2=2)
    assert bool((var >= 0).all()), var
    fc64 = ref.functional_covariance(J64)
    torch.testing.assert_close(
        var.double(), torch.diagonal(fc64, dim1=1, dim2=2), rtol=1e-3, atol=1e-5 * float(var.max())
    )
    dense = post.to_dense()
    assert bool((dense.diagonal() >= 0).all())
    torch.testing.assert_close(dense.diagonal(), post.variance(), rtol=0, atol=0)
    torch.testing.assert_close(
        post.variance().double(), ref.variance(), rtol=1e-3, atol=1e-5 * float(ref.variance().max())
    )
    torch.testing.assert_close(ref.to_dense().diagonal(), ref.variance(), rtol=1e-9, atol=0)
    assert bool(torch.isfinite(post.sample(4, generator=torch.Generator().manual_seed(0))).all())


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


def test_last_layer_regression_is_exact():
    case = make_case("mlp_regression", seed=1)
    curv, fm = _collect(case.model, case.X, case.y, "regression", subset="last_layer")
    assert fm.layout.names == ("2.weight", "2.bias")
    exact = dense_ggn(case.model, case.X, case.y, "regression", names=fm.layout.names)
    torch.testing.assert_close(curv.to_dense(), exact, **TOL)


def test_deep_linear_network_mse_is_exact_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randn(10, 2, generator=g, dtype=torch.float64)
    curv, fm = _collect(model, X, y, "regression")
    exact = dense_ggn(model, X, y, "regression")
    approx = curv.to_dense()
    for i in range(3):
        s = slice(fm.layout.slice_of(f"{i}.weight").start, fm.layout.slice_of(f"{i}.bias").stop)
        torch.testing.assert_close(approx[s, s], exact[s, s], **TOL)
    # and it is block-diagonal: the cross-layer blocks of the exact GGN are not zero
    s0, s1 = fm.layout.slice_of("0.weight"), fm.layout.slice_of("1.weight")
    assert float(exact[s0, s1].abs().max()) > 1e-3
    assert float(approx[s0, s1].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------
# Conv2d
# ---------------------------------------------------------------------------------------------


def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)
    ).double()


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_conv2d_factors_match_loop_reference(likelihood):
    model = _tiny_cnn()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(9, 1, 4, 4, generator=g, dtype=torch.float64)
    y = (
        torch.randint(0, 3, (9,), generator=g)
        if likelihood == "classification"
        else torch.randn(9, 3, generator=g, dtype=torch.float64)
    )
    curv, fm = _collect(model, X, y, likelihood, batch=4)
    assert [b.weight for b in curv.blocks] == ["0.weight", "3.weight"]
    ref = kfac_dense_reference(model, X, y, likelihood)
    torch.testing.assert_close(curv.to_dense(), ref, **TOL)
    prior = make_prior(0.9, fm.layout, dtype=torch.float64, device=torch.device("cpu"))
    check_posterior(KFACPosterior(fm.theta, curv, prior), dense_posterior_covariance(ref, 0.9))


def test_linear_on_sequence_inputs_uses_expand_convention():
    class SeqNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Linear(3, 2)
            self.head = nn.Linear(8, 2)

        def forward(self, x):  # x: (N, 4, 3)
            return self.head(torch.tanh(self.tok(x)).flatten(1))

    torch.manual_seed(0)
    model = SeqNet().double()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(7, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (7,), generator=g)
    curv, _ = _collect(model, X, y, "classification", batch=3)
    torch.testing.assert_close(
        curv.to_dense(), kfac_dense_reference(model, X, y, "classification"), **TOL
    )


def test_conv2d_with_one_output_location_is_exact():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)
    curv, _ = _collect(model, X, y, "regression", batch=3)
    torch.testing.assert_close(curv.to_dense(), dense_ggn(model, X, y, "regression"), **TOL)


# ---------------------------------------------------------------------------------------------
# MC variant, fallbacks, subsets of a layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp_classification", "mlp_regression"])
def test_mc_factors_converge_to_exact(name):
    case = make_case(name)
    X = case.X.repeat(400, 1)
    y = case.y.repeat(400, *([1] * (case.y.ndim - 1)))
    exact, _ = _collect(case.model, case.X, case.y, case.likelihood)
    mc, _ = _collect(
        case.model,
        X,
        y,
        case.likelihood,
        batch=len(X),
        mc=True,
        generator=torch.Generator().manual_seed(0),
    )
    for be, bm in zip(exact.blocks, mc.blocks):
        torch.testing.assert_close(bm.A / 400, be.A, **TOL)
        # B is a mean of 4800 sampled outer products: a few per cent of its scale
        err = float((bm.B - be.B).abs().max() / be.B.abs().max())
        assert err < 0.1, err
    # a different seed gives a different estimate (the column is random)
    mc2, _ = _collect(
        case.model,
        X,
        y,
        case.likelihood,
        batch=len(X),
        mc=True,
        generator=torch.Generator().manual_seed(1),
    )
    assert float((mc2.blocks[0].B - mc.blocks[0].B).abs().max()) > 0


class _Scale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n, dtype=torch.float64))

    def forward(self, x):
        return x * self.s


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 3)
        self.shared = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), _Scale(4), nn.Linear(4, 2)), ["2.s"]),
        (_Twice, ["shared.weight", "shared.bias"]),
    ],
    ids=["other-module", "layer-run-twice"],
)
def test_uncovered_parameters_get_exact_diagonal_and_one_warning(make, expected):
    torch.manual_seed(0)
    model = make().double()
    case = make_case("mlp_regression")
    la = LaplaceWrapper(model, "regression", structure="kfac")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        la.fit(case.loader(4))
    msgs = [str(w.message) for w in rec if "exact diagonal" in str(w.message)]
    assert len(msgs) == 1 and all(n in msgs[0] for n in expected), msgs
    curv = la.posterior.curvature
    assert list(curv.diag_names) == expected
    ref = dense_ggn(model, case.X, case.y, "regression")
    idx = curv.diag_index()
    torch.testing.assert_close(curv.diag, ref.diagonal()[idx], **TOL)
    Gk = curv.to_dense()
    for blk in curv.blocks:  # the covered layers still match the reference blocks
        bi = blk.index(la.fitted.layout)
        torch.testing.assert_close(Gk[bi][:, bi], torch.kron(blk.B, blk.A), **TOL)


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_weight_used_outside_its_layer_gets_the_exact_diagonal(likelihood):
    case = tied_autoencoder_case(likelihood)  # the decoder is F.linear(h, enc.weight.t(), b)
    la = LaplaceWrapper(case.model, likelihood, structure="kfac")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        la.fit(case.loader(3))
    msgs = [str(w.message) for w in rec if "exact diagonal" in str(w.message)]
    assert len(msgs) == 1 and "['dec_b', 'enc.weight', 'enc.bias']" in msgs[0], msgs
    assert "a weight also used outside its layer" in msgs[0]
    ref = kfac_dense_reference(case.model, case.X, case.y, likelihood, diagonal=("enc",))
    torch.testing.assert_close(la.posterior.curvature.to_dense(), ref, **TOL)


def test_weight_only_and_bias_only_subsets_of_a_layer():
    case = make_case("mlp_classification")
    for subset in (["0.weight", "2.bias"], ["0.bias"], ["2.weight"]):
        curv, _ = _collect(case.model, case.X, case.y, case.likelihood, subset=subset)
        ref = kfac_dense_reference(case.model, case.X, case.y, case.likelihood, names=subset)
        torch.testing.assert_close(curv.to_dense(), ref, **TOL)


# ---------------------------------------------------------------------------------------------
# Wrapper integration: prior refusal, state round trip, distributed state
# ---------------------------------------------------------------------------------------------


def test_diagonal_prior_is_refused_and_wrapper_stays_usable():
    case = make_case("mlp_classification")
    P = sum(p.numel() for p in case.model.parameters())
    with pytest.raises(
        ValueError, match=r"structure='kfac'.*accepted by structure='full', 'diag' and 'lowrank'"
    ):
        LaplaceWrapper(
            case.model,
            "classification",
            structure="kfac",
            prior_precision=torch.ones(P, dtype=torch.float64),
        )
    la = LaplaceWrapper(
        case.model,
        "classification",
        structure="kfac",
        subset="last_layer",
        prior_precision=torch.ones(15, dtype=torch.float64),
    )
    with pytest.raises(
        ValueError, match=r"structure='kfac'.*accepted by structure='full', 'diag' and 'lowrank'"
    ):
        la.fit(case.loader())
    assert not la.is_fitted
    la2 = LaplaceWrapper(case.model, "classification", structure="kfac").fit(case.loader())
    before = la2.posterior.to_dense()
    with pytest.raises(ValueError, match="one per parameter tensor"):
        la2.set_hyperparameters(prior_precision=torch.ones(P, dtype=torch.float64))
    with pytest.raises(ValueError, match="structure='kfac'"):
        la2.log_marginal_likelihood(prior_precision=torch.ones(P, dtype=torch.float64))
    torch.testing.assert_close(la2.posterior.to_dense(), before, rtol=0, atol=0)
    la2.set_hyperparameters(prior_precision=torch.full((4,), 2.0, dtype=torch.float64))
    assert la2.sample(3).shape == (3, P)
    assert torch.isfinite(la2.log_marginal_likelihood())


def test_state_dict_round_trip():
    case = make_case("mlp_regression")
    la = LaplaceWrapper(
        case.model,
        "regression",
        structure="kfac",
        prior_precision=torch.tensor([0.5, 1.0, 2.0, 0.7], dtype=torch.float64),
        sigma_noise=0.8,
    ).fit(case.loader())
    la2 = LaplaceWrapper.from_state_dict(case.model, la.state_dict())
    torch.testing.assert_close(la2.posterior.to_dense(), la.posterior.to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(la2.log_marginal_likelihood(), la.log_marginal_likelihood(), **TOL)


def test_distributed_state_sums_to_single_process_fit():
    case = make_case("mlp_classification", n=13)
    lik = get_likelihood(Likelihood.CLASSIFICATION)
    layout = resolve_subset(case.model, "all")
    single = KFACCollector(FunctionalModel(case.model, layout), lik)
    single.update(case.X)
    ranks = [KFACCollector(FunctionalModel(case.model, layout), lik) for _ in range(2)]
    ranks[0].update(case.X[:5])
    ranks[1].update(case.X[5:])
    states = [r.distributed_state() for r in ranks]
    assert all(op == "sum" for _, op in states[0].values())
    reduced = {k: states[0][k][0] + states[1][k][0] for k in states[0]}
    ranks[0].load_distributed_state(reduced)
    torch.testing.assert_close(ranks[0].finalize().to_dense(), single.finalize().to_dense(), **TOL)
    # a rank with an empty shard has zero sums of the same shapes, and finalizes after loading
    empty = KFACCollector(FunctionalModel(case.model, layout), lik)
    zero = empty.distributed_state()
    assert list(zero) == list(states[0])
    assert all(
        float(t.abs().sum()) == 0 and t.shape == states[0][k][0].shape for k, (t, _) in zero.items()
    )
    empty.load_distributed_state(reduced)
    torch.testing.assert_close(empty.finalize().to_dense(), single.finalize().to_dense(), **TOL)


def test_layer_running_differently_on_a_later_batch_is_refused():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            h = self.lin(x)
            return self.lin.weight.new_zeros(()) + (h if self.calls == 1 else h + self.lin(x))

    case = make_case("linear_regression")
    fm = FunctionalModel(Flaky(), resolve_subset(Flaky(), "all"), copy_model=True)
    col = KFACCollector(fm, get_likelihood(Likelihood.REGRESSION))
    col.update(case.X[:4])
    with pytest.raises(RuntimeError, match="must run once per forward pass"):
        col.update(case.X[4:], "batch 1")
    with pytest.raises(RuntimeError, match="needs at least one update"):
        KFACCollector(fm, get_likelihood(Likelihood.REGRESSION)).finalize()


def test_kronecker_block_algebra_matches_the_dense_kronecker_product():
    from laplace_ggn.kfac import KroneckerBlock

    gen = torch.Generator().manual_seed(3)
    MA = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    MB = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    blk = KroneckerBlock("w", "b", MA @ MA.T, MB @ MB.T)
    dense = torch.kron(blk.B, blk.A)
    torch.testing.assert_close(blk.to_dense(), dense, **TOL)
    s, delta = 0.7, 0.3
    Lam = s * dense + delta * torch.eye(12, dtype=torch.float64)
    V = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    X = blk.inverse_matvec(V, delta, s)
    ref = torch.linalg.solve(Lam, V.reshape(5, 12).T).T.reshape(5, 3, 4)
    torch.testing.assert_close(X, ref, **TOL)
    torch.testing.assert_close(blk.log_det(delta, s), torch.linalg.slogdet(Lam)[1], **TOL)
    torch.testing.assert_close(blk.unrotate(blk.rotate(V)), V, **TOL)
    assert blk.to(torch.float64) is blk and blk.to(torch.float32).A.dtype == torch.float32


def test_affine_layer_discovery_of_a_subset():
    from laplace_ggn.layers import affine_layers, with_bias_column

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.grouped = nn.Conv2d(2, 2, 3, groups=2)
            self.fc = nn.Linear(4, 5)
            self.out = nn.Linear(5, 4, bias=False)
            self.tied = nn.Linear(5, 4, bias=False)
            self.tied.weight = self.out.weight

    net = Net()
    every = affine_layers(net, conv=True)
    assert list(every) == ["conv", "fc", "out", "tied"]  # the grouped convolution is left out
    assert (every["conv"].n_features, every["conv"].n_out, every["conv"].n_in) == (18, 3, 19)
    assert list(affine_layers(net)) == ["fc", "out", "tied"]
    assert list(affine_layers(net, untied=True)) == ["fc"]
    only_bias = affine_layers(net, ["fc.bias"])["fc"]
    assert (only_bias.weight, only_bias.bias, only_bias.n_in) == (None, "fc.bias", 1)
    a = torch.arange(6.0).reshape(3, 2)
    torch.testing.assert_close(with_bias_column(a, True, True)[:, 2], torch.ones(3))
    assert with_bias_column(a, False, True).shape == (3, 1)
