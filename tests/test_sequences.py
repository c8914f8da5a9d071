"""Outputs with a position dimension (B, T, C): every structure against the dense reference.

The model is a tiny token tagger (embedding, one attention layer with a padding mask, a
Linear head); two batches of different lengths, padded to each batch's longest, targets
-100 at the padding and at one real token.
"""

import math

import pytest
import torch
from torch import nn

from laplace_ggn import LaplaceWrapper
from laplace_ggn._checks import Curvature, Likelihood
from laplace_ggn.collectors._rows import SqrtGGNRows
from laplace_ggn.functional import FunctionalModel, resolve_subset
from laplace_ggn.likelihoods import OutputCurvature, get_likelihood
from laplace_ggn.testing import dense_ggn, dense_jacobian

TOL = {"rtol": 1e-9, "atol": 1e-11}


class Tagger(nn.Module):
    """Embedding + single-head attention over non-padding tokens (id 0) + Linear head."""

    def __init__(self, vocab: int = 6, d: int = 3, n_out: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, n_out)

    def forward(self, tokens):
        h = self.emb(tokens)
        s = self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(h.shape[-1])
        s = s.masked_fill((tokens == 0).unsqueeze(1), -1e9)
        h = h + torch.softmax(s, -1) @ self.v(h)
        return self.head(torch.tanh(h))


def _batch(B, T, g, n_out=3):
    tok = torch.randint(1, 6, (B, T), generator=g)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T
    for b in range(B):
        tok[b, lens[b] :] = 0
    y = torch.randint(0, n_out, (B, T), generator=g)
    y[tok == 0] = -100
    y[1, 0] = -100  # an ignored real token: it still feeds the others through attention
    return tok, y


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Tagger().double()
    return model, [_batch(3, 5, g), _batch(2, 3, g)]


def _dense(model, batches, likelihood="classification", names=None):
    return sum(
        dense_ggn(model, x, y, likelihood, names=names, ignore_index=-100) for x, y in batches
    )


def _curvature(la):
    post = la.posterior
    if la.structure == "full":
        return post.ggn
    if la.structure == "diag":
        return torch.diag(post.ggn_diag)
    if la.structure == "kfac":
        return post.curvature.to_dense()
    return post.eigenvectors @ torch.diag(post.eigenvalues) @ post.eigenvectors.T


@pytest.mark.parametrize(
    ("structure", "rank"), [("full", None), ("diag", None), ("lowrank", None), ("lowrank", 40)]
)
def test_exact_structures_equal_dense_reference(structure, rank):
    model, batches = _data()
    la = LaplaceWrapper(model, "classification", structure=structure, rank=rank).fit(batches)
    G = _dense(model, batches)
    ref = torch.diag(G.diagonal()) if structure == "diag" else G
    torch.testing.assert_close(_curvature(la), ref, rtol=1e-8, atol=1e-10)
    # N counts the kept positions; the loss is the cross-entropy over them
    kept = [y[y != -100] for _, y in batches]
    assert la.fitted.statistics.n_data == sum(k.numel() for k in kept) == 12
    with torch.no_grad():
        ce = sum(
            nn.functional.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1), reduction="sum")
            for x, y in batches
        )
    assert la.fitted.statistics.loss_sum == pytest.approx(float(ce), rel=1e-12)


def _kfac_reference(model, batches):
    """Per Linear layer: A over kept locations, B = mean of back-propagated L-column products.

    Gradients at each layer output come from explicit zero perturbations added by forward
    hooks, one backward pass per kept position and column of L.
    """
    layers = {"q": model.q, "k": model.k, "v": model.v, "head": model.head}
    A = {n: 0.0 for n in layers}
    Bsum = {n: 0.0 for n in layers}
    count = {n: 0 for n in layers}
    for x, y in batches:
        deltas, inputs, handles = {}, {}, []
        for n, m in layers.items():

            def hook(mod, inp, out, n=n):
                inputs[n] = inp[0].detach()
                deltas[n] = torch.zeros_like(out, requires_grad=True)
                return out + deltas[n]

            handles.append(m.register_forward_hook(hook))
        f = model(x)
        for h in handles:
            h.remove()
        B, T, C = f.shape
        Lam_sqrt = {}
        grads = {n: torch.zeros(B, T, C, B, T, deltas[n].shape[-1], dtype=f.dtype) for n in layers}
        p = torch.softmax(f.detach(), -1)
        for b in range(B):
            for t in range(T):
                if y[b, t] == -100:
                    continue
                sp = p[b, t].sqrt()
                Lam_sqrt[b, t] = torch.diag(sp) - p[b, t].unsqueeze(1) * sp.unsqueeze(0)
                for c in range(C):
                    gs = torch.autograd.grad(
                        (f[b, t] * Lam_sqrt[b, t][:, c]).sum(),
                        [deltas[n] for n in layers],
                        retain_graph=True,
                    )
                    for n, gn in zip(layers, gs):
                        grads[n][b, t, c] = gn
        for n, m in layers.items():
            g = grads[n].reshape(B * T * C, B * T, -1)  # (columns, locations, O)
            a = inputs[n].reshape(B * T, -1)
            if m.bias is not None:
                a = torch.cat([a, torch.ones(B * T, 1, dtype=a.dtype)], 1)
            ignored = (y == -100).reshape(-1)
            keep = ~(ignored & (g == 0).all(-1).all(0))
            A[n] = A[n] + a[keep].T @ a[keep]
            Bsum[n] = Bsum[n] + torch.einsum("kro,krp->op", g[:, keep], g[:, keep])
            count[n] += int(keep.sum())
    return {n: (A[n], Bsum[n] / count[n]) for n in layers}


def test_kfac_factors_equal_reference():
    model, batches = _data()
    with pytest.warns(UserWarning, match=r"kfac: parameters \['emb.weight'\]"):
        la = LaplaceWrapper(model, "classification", structure="kfac").fit(batches)
    curv = la.posterior.curvature
    ref = _kfac_reference(model, batches)
    for blk in curv.blocks:
        A, B = ref[(blk.weight or blk.bias).split(".")[0]]
        torch.testing.assert_close(blk.A, A, **TOL)
        torch.testing.assert_close(blk.B, B, **TOL)
    G = _dense(model, batches)
    n_emb = model.emb.weight.numel()
    torch.testing.assert_close(curv.diag, G.diagonal()[:n_emb], **TOL)


def test_kfac_sequence_regression_head_is_exact():
    # Gaussian outputs: Σ_c g gᵀ = I at every position, so the head's block is exact
    model, batches = _data()
    g = torch.Generator().manual_seed(3)
    batches = [(x, torch.randn(*x.shape, 3, generator=g, dtype=torch.float64)) for x, _ in batches]
    names = ["head.weight", "head.bias"]
    la = LaplaceWrapper(model, "regression", structure="kfac", subset=names).fit(batches)
    G = _dense(model, batches, "regression", names=names)
    torch.testing.assert_close(la.posterior.curvature.to_dense(), G, **TOL)
    assert la.fitted.statistics.n_data == 3 * 5 + 2 * 3


@pytest.mark.parametrize("structure", ["full", "kfac", "lowrank"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_predict_and_functional_covariance_per_position(structure, subset):
    model, batches = _data()
    la = LaplaceWrapper(
        model, "classification", structure=structure, subset=subset, prior_precision=0.7
    )
    with pytest.warns(UserWarning) if structure == "kfac" and subset == "all" else _nothing():
        la.fit(batches)
    x = batches[0][0]
    J = dense_jacobian(model, x, la.fitted.layout.names)  # (B, T, C, P)
    ref = torch.einsum("btcp,pq,btdq->btcd", J, la.posterior_covariance(), J)
    torch.testing.assert_close(la.functional_covariance(x), ref, rtol=1e-8, atol=1e-11)
    pred = la.predict(x, link="probit")
    assert pred.mean.shape == pred.variance.shape == (3, 5, 3)
    torch.testing.assert_close(pred.mean.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    J_out, f = la.jacobians(x)
    assert J_out.shape == (3, 5, 3, la.n_params) and f.shape == (3, 5, 3)
    nn_pred = la.predict(x, method="nn", n_samples=4, generator=torch.Generator().manual_seed(0))
    assert nn_pred.mean.shape == (3, 5, 3)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_sequence_regression_full_and_evidence():
    model, batches = _data()
    g = torch.Generator().manual_seed(5)
    batches = [(x, torch.randn(*x.shape, 3, generator=g, dtype=torch.float64)) for x, _ in batches]
    la = LaplaceWrapper(model, "regression", structure="full", sigma_noise=0.8).fit(batches)
    torch.testing.assert_close(
        la.posterior.ggn, _dense(model, batches, "regression"), rtol=1e-8, atol=1e-10
    )
    assert la.fitted.statistics.n_data == 21
    with torch.no_grad():
        sse = sum(float(((model(x) - y) ** 2).sum()) for x, y in batches)
    assert la.fitted.statistics.loss_sum == pytest.approx(sse, rel=1e-12)
    pred = la.predict(batches[1][0])
    assert pred.mean.shape == (2, 3, 3)
    assert bool((pred.variance > 0.64).all())


def test_binary_sequence_with_ignored_targets():
    torch.manual_seed(0)
    model, batches = _data()
    model.head = nn.Linear(3, 1).double()
    batches = [(x, torch.where(y == -100, -100, y % 2).double()) for x, y in batches]
    la = LaplaceWrapper(model, "binary", structure="full").fit(batches)
    torch.testing.assert_close(la.posterior.ggn, _dense(model, batches, "binary"), **TOL)
    assert la.fitted.statistics.n_data == 12


def test_mc_sequence_factor_is_unbiased():
    r"""One sampled column covers every position; cross terms vanish in expectation.

    The S draws of one pass are independent, so each gives its own estimate
    :math:`X_s = \sum_n J_n^\top l_{ns} l_{ns}^\top J_n`; their mean is the MC curvature and
    their spread its standard error.
    """
    model, batches = _data()
    G = _dense(model, batches)
    fm = FunctionalModel(model, resolve_subset(model, "all"))
    S = 2000
    out = OutputCurvature(
        get_likelihood(Likelihood.CLASSIFICATION),
        curvature=Curvature.MC,
        n_samples=S,
        generator=torch.Generator().manual_seed(0),
    )
    rows = SqrtGGNRows(fm, out)
    X = 0.0
    for x, y in batches:
        R, _ = rows.rows(x, y)  # (B, S, P): J_nᵀ l_ns / √S
        X = X + S * torch.einsum("bsp,bsq->spq", R, R)
    se = X.std(0) / math.sqrt(S)
    live = se > 1e-12
    z = (X.mean(0) - G)[live] / se[live]
    assert float(z.abs().max()) < 5.0
    assert 0.15 < float(z.pow(2).mean()) < 3.0  # entries are correlated: a loose check
    assert float(se.max()) < 0.03 * float(G.abs().max())  # power: SE small against G
    assert bool((G[~live].abs() < 1e-12).all())
    la = LaplaceWrapper(model, "classification", structure="full", curvature="mc")
    assert la.fit(batches, generator=torch.Generator().manual_seed(0)).is_fitted


def test_sequence_target_errors():
    model, batches = _data()
    x, y = batches[0]
    with pytest.raises(
        ValueError,
        match=r"classification targets \(batch 0\) must have shape \(3, 5\) or \(3, 5, 1\) for "
        r"outputs of shape \(3, 5, 3\) \(one target per position\); got \(3, 4\)",
    ):
        LaplaceWrapper(model, "classification", structure="diag").fit([(x, y[:, :4])])
    bad = y.clone()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
        LaplaceWrapper(model, "classification", structure="diag").fit([(x, bad)])

    class Flat(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens):
            out = self.inner(tokens)
            return out if tokens.shape[1] == 5 else out[:, 0]

    reg = [(x, torch.randn(*x.shape, 3, dtype=torch.float64)) for x, _ in batches]
    reg[1] = (reg[1][0], reg[1][1][:, 0])  # targets that fit the (B, C) output of batch 1
    with pytest.raises(
        ValueError, match=r"model output in batch 1 must have 3 dimensions like batch 0"
    ):
        LaplaceWrapper(Flat(model), "regression", structure="diag").fit(reg)


def test_ignore_index_is_an_option():
    model, batches = _data()
    moved = [(x, torch.where(y == -100, 99, y)) for x, y in batches]
    la = LaplaceWrapper(model, "classification", structure="diag", ignore_index=99).fit(moved)
    ref = LaplaceWrapper(model, "classification", structure="diag").fit(batches)
    torch.testing.assert_close(la.posterior.ggn_diag, ref.posterior.ggn_diag, **TOL)
    state = la.state_dict()
    assert state["ignore_index"] == 99
    assert LaplaceWrapper.from_state_dict(model, state).ignore_index == 99
    with pytest.raises(TypeError, match=r"ignore_index must be an int; got float"):
        LaplaceWrapper(model, "classification", ignore_index=-1.0)


def test_gridsearch_scores_kept_positions():
    model, batches = _data()
    la = LaplaceWrapper(model, "classification", structure="diag", subset="last_layer")
    la.fit(batches)
    la.optimize_prior_precision(method="gridsearch", val_loader=batches, grid=[2.0])
    res = la.gridsearch_result_
    # the score is the mean NLL over the 12 kept positions
    assert float(la.prior_precision) == 2.0
    nll = 0.0
    for x, y in batches:
        p = la.predict(x).mean.reshape(-1, 3)
        keep = y.reshape(-1) != -100
        nll -= float(torch.log(p[keep].gather(1, y.reshape(-1, 1)[keep]).squeeze(1)).sum())
    assert float(res.scores[res.best_index]) == pytest.approx(nll / 12, rel=1e-10)
    ignored = [(x, torch.full_like(y, -100)) for x, y in batches]
    with pytest.raises(ValueError, match=r"val_loader must hold a target that is not ignore_index"):
        la.optimize_prior_precision(method="gridsearch", val_loader=ignored, grid=[2.0])


def test_kernel_decomposition_refuses_sequence_outputs():
    model, batches = _data()
    la = LaplaceWrapper(model, "classification", structure="full").fit(batches)
    assert la.fitted.statistics.output_ndim == 3
    with pytest.raises(ValueError, match=r"kernel_decomposition\(\) needs a model with outputs"):
        la.kernel_decomposition(batches[0][0])
    back = LaplaceWrapper.from_state_dict(model, la.state_dict())
    assert back.fitted.statistics.output_ndim == 3
