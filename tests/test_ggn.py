"""GGN collectors within a batch: sub-batches sized to the memory budget, refusals before allocation.

Shared weights: a weight also used outside its layer's forward is collected from exact
per-sample Jacobians, every structure equal to a dense ``torch.func`` GGN.
"""

from __future__ import annotations

import pytest
import torch
from cases import dense_ggn_of, make_case, range_projector, stored_curvature, tied_autoencoder_case
from torch import nn

from laplace_ggn import LaplaceWrapper
from laplace_ggn._checks import Likelihood, check_finite
from laplace_ggn.collectors import (
    DiagGGNCollector,
    ExactLowRankCollector,
    FullGGNCollector,
    KFACCollector,
)
from laplace_ggn.collectors import _jacobian as jacobian_rows
from laplace_ggn.collectors import _rows as rows_module
from laplace_ggn.collectors._jacobian import ROW_COPIES, jacobian_sqrt_diag, sub_batches
from laplace_ggn.collectors._rows import SqrtGGNRows
from laplace_ggn.functional import FunctionalModel, resolve_subset
from laplace_ggn.likelihoods import get_likelihood
from laplace_ggn.testing import dense_ggn

TOL = {"rtol": 1e-12, "atol": 1e-12}


class _Scaled(nn.Module):
    """An MLP with a parameter outside any nn.Linear (rows from per-sample Jacobians)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, 1.0]))

    def forward(self, x):
        return self.net(x) * self.scale


def _case(kind):
    case = make_case("mlp_classification", n=20)
    if kind == "scaled":
        torch.manual_seed(0)
        case.model = _Scaled().double()
    return case


def _count_calls(monkeypatch, owner, name):
    calls = []  # batch size of each call
    original = getattr(owner, name)

    def spy(*args, **kwargs):
        x = next(a for a in args if isinstance(a, torch.Tensor))
        calls.append(x.shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def _per_sample_row_bytes(model, C=3):
    P = sum(p.numel() for p in model.parameters())
    return ROW_COPIES * C * P * 8


@pytest.mark.parametrize("kind", ["mlp", "scaled"])
def test_full_rows_in_sub_batches_equal_the_whole_batch(kind, monkeypatch):
    case = _case(kind)
    lik = get_likelihood(Likelihood.CLASSIFICATION)
    layout = resolve_subset(case.model, "all")
    whole = FullGGNCollector(FunctionalModel(case.model, layout), lik)
    f_whole = whole.update(case.X)
    calls = _count_calls(monkeypatch, SqrtGGNRows, "rows")
    budget = 6 * _per_sample_row_bytes(case.model)  # 6 samples per sub-batch: 4 of them
    chunked = FullGGNCollector(FunctionalModel(case.model, layout, memory_budget=budget), lik)
    f_chunked = chunked.update(case.X)
    assert len(calls) == 4
    torch.testing.assert_close(chunked.finalize(), whole.finalize(), **TOL)
    torch.testing.assert_close(f_chunked, f_whole, **TOL)
    ref = dense_ggn(case.model, case.X, case.y, "classification")
    torch.testing.assert_close(chunked.finalize(), ref, rtol=1e-10, atol=1e-12)


def test_sub_batches_pass_a_batch_that_fits_unsliced():
    case = _case("mlp")
    fm = FunctionalModel(case.model, resolve_subset(case.model, "all"))
    ((start, x),) = list(sub_batches(fm, case.X, 1))
    assert start == 0 and x is case.X
    fm.memory_budget = 7
    parts = list(sub_batches(fm, case.X, 1))  # 7 samples per chunk
    assert [s for s, _ in parts] == [0, 7, 14] and [len(x) for _, x in parts] == [7, 7, 6]


def test_exact_lowrank_rows_in_sub_batches_equal_the_whole_batch(monkeypatch):
    case = _case("scaled")
    lik = get_likelihood(Likelihood.CLASSIFICATION)
    layout = resolve_subset(case.model, "all")
    P, N = layout.n_params, case.X.shape[0]
    whole = ExactLowRankCollector(FunctionalModel(case.model, layout), lik, memory_budget=1 << 30)
    whole.update(case.X)
    # room for the N·C rows, but intermediates of only about a third of the batch at once
    budget = N * 3 * P * 8 + 8
    calls = _count_calls(monkeypatch, SqrtGGNRows, "rows")
    fm = FunctionalModel(case.model, layout, memory_budget=budget)
    chunked = ExactLowRankCollector(fm, lik, memory_budget=budget)
    chunked.update(case.X)
    assert len(calls) == 4
    a, b = chunked.finalize(), whole.finalize()
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        a.eigenvectors @ torch.diag(a.eigenvalues) @ a.eigenvectors.T,
        dense_ggn(case.model, case.X, case.y, "classification"),
        rtol=1e-10,
        atol=1e-12,
    )
    assert len(chunked.rows) == 1  # the sub-batches were moved into one block by finalize


def test_exact_lowrank_refuses_an_oversized_batch_before_computing_any_row(monkeypatch):
    # P ≈ 1e6 and C = 1000: the rows of this batch would take 4 TB; computing them would fail
    # in the allocator, not with this ValueError
    torch.manual_seed(0)
    model = nn.Linear(1000, 1000)
    X, y = torch.randn(1000, 1000), torch.randint(0, 1000, (1000,))
    calls = _count_calls(monkeypatch, SqrtGGNRows, "rows")
    la = LaplaceWrapper(model, "classification", structure="lowrank")
    with pytest.raises(
        ValueError,
        match=r"rank=None must keep all N·C rows of length P=1001000 within the memory budget "
        r"of 1 GB; got 1000000 rows by batch 0 \(3\.73e\+03 GB and growing\)\. Pass rank=k",
    ):
        la.fit([(X, y)])
    assert calls == [] and not la.is_fitted


def test_exact_lowrank_refuses_a_later_batch_before_computing_its_rows(monkeypatch):
    case = _case("mlp")
    P = sum(p.numel() for p in case.model.parameters())
    calls = _count_calls(monkeypatch, SqrtGGNRows, "rows")
    la = LaplaceWrapper(case.model, "classification", structure="lowrank", memory_budget=45 * P * 8)
    with pytest.raises(ValueError, match=r"got 60 rows by batch 1 .*Pass rank=k"):
        la.fit(case.loader(batch_size=10))  # 30 rows, then 30 more
    assert sum(calls) == 10  # batch 0 only (in 2 sub-batches): batch 1 is refused from its size


@pytest.mark.parametrize("kind", ["mlp", "scaled"])
def test_diagonal_jacobian_part_in_sub_batches_equals_the_whole_batch(kind, monkeypatch):
    case = _case(kind)
    lik = get_likelihood(Likelihood.CLASSIFICATION)
    layout = resolve_subset(case.model, "all")
    whole, _ = jacobian_sqrt_diag(FunctionalModel(case.model, layout), case.X, layout, lik)
    calls = _count_calls(monkeypatch, jacobian_rows, "jacobian_sqrt_rows")
    budget = 6 * _per_sample_row_bytes(case.model)
    fm = FunctionalModel(case.model, layout, memory_budget=budget)
    d, f = jacobian_sqrt_diag(fm, case.X, layout, lik)  # every parameter from Jacobians
    assert len(calls) == 4
    torch.testing.assert_close(d, whole, **TOL)
    ref = dense_ggn(case.model, case.X, case.y, "classification").diagonal()
    torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f, case.model(case.X).detach(), **TOL)
    hooked = DiagGGNCollector(fm, lik)  # layer hooks where possible, the same diagonal
    hooked.update(case.X)
    torch.testing.assert_close(hooked.finalize(), ref, rtol=1e-10, atol=1e-12)


def test_kfac_diagonal_part_in_sub_batches_equals_the_whole_batch(monkeypatch):
    case = _case("scaled")
    lik = get_likelihood(Likelihood.CLASSIFICATION)
    layout = resolve_subset(case.model, "all")
    whole = KFACCollector(FunctionalModel(case.model, layout), lik)
    with pytest.warns(UserWarning, match="kfac: parameters \\['scale'\\]"):
        whole.update(case.X)
    calls = _count_calls(monkeypatch, jacobian_rows, "jacobian_sqrt_rows")
    fm = FunctionalModel(case.model, layout, memory_budget=6 * ROW_COPIES * 3 * 3 * 8)
    chunked = KFACCollector(fm, lik)
    with pytest.warns(UserWarning, match="kfac: parameters"):
        chunked.update(case.X)
    assert len(calls) == 4
    torch.testing.assert_close(chunked.finalize().diag, whole.finalize().diag, **TOL)


def test_check_finite_in_slices_counts_like_the_whole_tensor():
    t = torch.zeros(3 << 20)  # three slices of 2**20 entries
    check_finite(t, "big")
    t[-1], t[5] = float("nan"), float("inf")
    with pytest.raises(
        ValueError, match=r"big must be finite; got 1 NaN and 1 Inf values out of 3145728"
    ):
        check_finite(t, "big")


# ---------------------------------------------------------------------------------------------
# Shared weights: the decoder reuses the encoder weight by a functional call
# ---------------------------------------------------------------------------------------------


def _tied_reference(case):
    names = [n for n, _ in case.model.named_parameters()]
    params = dict(case.model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def fn(th):
        parts = dict(zip(names, (t.view(params[n].shape) for n, t in zip(names, th.split(sizes)))))
        return torch.func.functional_call(case.model, parts, (case.X,))

    return fn, theta


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize(
    ("structure", "rank"),
    [("full", None), ("diag", None), ("lowrank", None), ("lowrank", 17), ("projected", None)],
)
def test_shared_weight_curvature_equals_the_dense_ggn(likelihood, structure, rank):
    case = tied_autoencoder_case(likelihood, n=4)  # N·C = 12 < P = 17: a proper range
    fn, theta = _tied_reference(case)
    la = LaplaceWrapper(case.model, likelihood, structure=structure, rank=rank)
    la.fit(case.loader(batch_size=3))
    if structure == "projected":
        J = torch.func.jacrev(fn)(theta)
        ref = range_projector(J)
    else:
        G = dense_ggn_of(fn, theta, likelihood, case.y)
        ref = torch.diag(G.diagonal()) if structure == "diag" else G
    torch.testing.assert_close(stored_curvature(la), ref, rtol=1e-8, atol=1e-10)


def test_shared_weight_mc_curvature_is_unbiased():
    case = tied_autoencoder_case("classification", n=4)
    fn, theta = _tied_reference(case)
    G = dense_ggn_of(fn, theta, "classification", case.y)
    la = LaplaceWrapper(
        case.model, "classification", structure="full", curvature="mc", n_mc_samples=20_000
    )
    la.fit(case.loader(batch_size=4), generator=torch.Generator().manual_seed(0))
    # 20,000 draws: about 1 % noise; the hooked rows of the shared weight were 30 % off
    err = (la.posterior.ggn - G).norm() / G.norm()
    assert err < 0.03


def test_shared_weight_leaves_the_other_layers_on_hooks(monkeypatch):
    case = tied_autoencoder_case()
    layout = resolve_subset(case.model, "all")
    rows = SqrtGGNRows(FunctionalModel(case.model, layout), get_likelihood(Likelihood.REGRESSION))
    rows.rows(case.X)
    assert rows.rest.names == ("dec_b", "enc.weight")  # enc.bias and mid stay on the hooks
    assert set(rows.layers) == {"enc", "mid"} and rows.layers["enc"].weight is None
    assert rows.traced
    calls = _count_calls(monkeypatch, rows_module, "jacobian_sqrt_rows")
    rows.rows(case.X)  # traced once, on the first batch
    assert len(calls) == 1 and rows.rest.names == ("dec_b", "enc.weight")


class _RootWeight(nn.Module):
    """A root-level weight (per-sample Jacobians) before a Linear head (hooks): P = 9 + 12."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.w))


def test_jacobian_of_parameters_outside_the_hooks_is_refused_over_the_budget():
    torch.manual_seed(0)
    model, X = _RootWeight().double(), torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    # diag stores P·8 = 168 bytes; one sample's Jacobian of w is M·P'·8 = 3·9·8 = 216 bytes
    la = LaplaceWrapper(model, structure="diag", curvature="mc", memory_budget=200)
    with pytest.raises(
        ValueError,
        match=r"one sample's Jacobian of the parameters \[w\] \(M=3 outputs x P=9\) in batch 0 "
        r"must fit in the memory budget of .*Fit a subset without them",
    ):
        la.fit([(X, y)], generator=torch.Generator().manual_seed(0))
    assert not la.is_fitted
    la = LaplaceWrapper(model, structure="diag", curvature="mc", memory_budget=216)
    assert la.fit([(X, y)], generator=torch.Generator().manual_seed(0)).is_fitted
