"""Recurrent and attention models in float32 (oneDNN RNN kernels, fused attention, nested-tensor
fast paths): every fit, product and predictive runs, matches float64, and torch's global
kernel settings are as they were afterwards."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from zoo import dense_ggn_of, make_arch, per_sample_jacobians

from laplace_ggn import LaplaceWrapper
from laplace_ggn.functional import FunctionalModel, resolve_subset
from laplace_ggn.operators import GGNOperator, HessianOperator
from laplace_ggn.testing import dense_ggn


def _as(arch, dtype):
    """The arch's model and batches in ``dtype`` (float inputs cast)."""
    model = arch.model.to(dtype)
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    batches = []
    for b in arch.batches:
        if isinstance(b, dict):
            batches.append({k: cast(v) for k, v in b.items()})
        else:
            batches.append((cast(b[0]), b[1]))
    x_test = arch.x_test
    x_test = {k: cast(v) for k, v in x_test.items()} if isinstance(x_test, dict) else cast(x_test)
    return model, batches, x_test


def _flags():
    return (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.mkldnn.enabled,
    )


@pytest.mark.parametrize("name", ["lstm", "gru", "transformer"])
@pytest.mark.parametrize("structure", ["diag", "full", "lowrank_k"])
def test_float32_fit_and_predict_match_float64(name, structure):
    kw = (
        {"structure": "lowrank", "rank": 14}
        if structure == "lowrank_k"
        else {"structure": structure}
    )
    flags = _flags()
    results = {}
    for dtype in (torch.float64, torch.float32):
        model, batches, x_test = _as(make_arch(name), dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no slow fallback anywhere
            la = LaplaceWrapper(model, "classification", **kw).fit(batches)
            glm = la.predict(x_test)
            cov = la.functional_covariance(x_test)
        nn_mean = la.predict(x_test, "nn", n_samples=3).mean
        assert nn_mean.shape == glm.mean.shape
        results[dtype] = (glm.mean.double(), cov.double())
    assert _flags() == flags  # global kernel settings restored
    # float32 round-off; the randomized top-k sketch amplifies it where eigenvalues are close
    loose = structure == "lowrank_k"
    for a, b in zip(results[torch.float32], results[torch.float64]):
        atol = 1e-2 * float(b.abs().max()) if loose else 2e-5
        torch.testing.assert_close(a, b, rtol=2e-2 if loose else 2e-3, atol=atol)


def test_head_only_subset_of_a_padded_transformer_in_float32():
    """The encoder's frozen layers take the nested-tensor fast path in eval mode."""
    model, batches, x_test = _as(make_arch("transformer"), torch.float32)
    for subset in (["head.weight", "head.bias"], "last_layer"):
        la = LaplaceWrapper(model, "classification", structure="full", subset=subset).fit(batches)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            pred = la.predict(x_test)
        assert torch.isfinite(pred.variance).all() and pred.mean.shape == (5, 3)
        assert la.predict(x_test, "nn", n_samples=4).mean.shape == (5, 3)


@pytest.mark.parametrize("name", ["lstm", "transformer"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_operators_forward_mode_on_rnn_and_attention(name, dtype):
    arch = make_arch(name)
    G_ref = dense_ggn_of(arch)
    model, batches, _ = _as(arch, dtype)
    flags = _flags()
    V = torch.randn(
        G_ref.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    tol = {"rtol": 1e-8, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-4}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        G = GGNOperator(model, batches, likelihood="classification")
        torch.testing.assert_close((G @ V.to(dtype)).double(), G_ref @ V, **tol)
        H = HessianOperator(model, batches, likelihood="classification")
        assert torch.isfinite(H @ V.to(dtype)).all()
    assert _flags() == flags


class _NoForwardAD(torch.autograd.Function):
    """tanh with a backward but no forward-mode derivative."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_NoForwardAD.apply(self.a(x)))


def test_reverse_mode_fallback_warns_every_call_and_is_exact():
    torch.manual_seed(0)
    model = _Custom().double()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    fm = FunctionalModel(model, resolve_subset(model, "all"))
    J = per_sample_jacobians(model, X)
    V = torch.randn(fm.n_params, 3, dtype=torch.float64)
    for _ in range(2):  # warned on every call: nothing is switched off for good
        with pytest.warns(RuntimeWarning, match="has no forward-mode derivative.*reverse-mode"):
            out, _ = fm.jvp_vjp(X, V, lambda f, u: 2 * u)
        torch.testing.assert_close(out, 2 * torch.einsum("bcp,bcq,qk->pk", J, J, V))
    with pytest.warns(RuntimeWarning, match="has no forward-mode derivative"):
        la = LaplaceWrapper(model, "classification", structure="lowrank", rank=5).fit([(X, y)])
    G = dense_ggn(model, X, y, "classification")
    lam = torch.linalg.eigvalsh(G).flip(0)[:5]
    torch.testing.assert_close(la.posterior.eigenvalues, lam, rtol=1e-6, atol=1e-8)
    with warnings.catch_warnings():  # a model with forward-mode derivatives does not warn
        warnings.simplefilter("error", RuntimeWarning)
        plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        LaplaceWrapper(plain, "classification", structure="lowrank", rank=5).fit([(X, y)])


class _Raising(nn.Module):
    """Raises ``error`` from its forward once ``armed``; counts its forward calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)
        self.error: Exception | None = None
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.lin(x)


class _UserError(Exception):
    pass


@pytest.mark.parametrize("structure", ["diag", "lowrank"])
def test_errors_of_the_model_propagate_without_a_retry(structure):
    # a ValueError of the model was caught in jacobians and predict(method="nn"), the model
    # re-run another way, and the nn path warned that "vmap failed"
    X = torch.randn(6, 3, dtype=torch.float64)
    la = LaplaceWrapper(
        _Raising().double(), structure=structure, rank=2 if structure != "diag" else None
    )
    la.fit([(X, torch.randint(0, 2, (6,)))])
    own = la.fitted.fmodel.module  # this thread's private copy, the one every pass runs
    steps = {
        "jacobians": lambda: la.jacobians(X),
        "functional_covariance": lambda: la.functional_covariance(X),
        "predict glm": lambda: la.predict(X),
        "predict nn": lambda: la.predict(X, "nn", n_samples=3),
    }
    for error in (ValueError("bad input for this model"), KeyError("k"), _UserError("mine")):
        own.error = error
        for what, step in steps.items():
            own.calls = 0
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no "vmap failed" warning either
                with pytest.raises(type(error), match=re.escape(str(error).strip("'"))):
                    step()
            assert own.calls == 1, f"{what}: the model ran {own.calls} times for {error!r}"
    # a RuntimeError may mean "cannot be vectorised": retried once without vmap, then raised,
    # and without the warning of a successful fallback
    own.error = RuntimeError("a runtime error of the model")
    for step in steps.values():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(RuntimeError, match="a runtime error of the model"):
                step()
    own.error = None
    la.jacobians(X)
    la.predict(X, "nn", n_samples=3)
