import math
import warnings

import pytest
import torch
from cases import make_case

from laplace_ggn.operators import (
    DenseOperator,
    EFOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    as_operator,
)
from laplace_ggn.testing import dense_ef, dense_ggn, dense_hessian

TOL = dict(rtol=1e-8, atol=1e-10)


def test_ggn_operator_matches_dense(case):
    ref = dense_ggn(case.model, case.X, case.y, case.likelihood)
    G = GGNOperator(case.model, case.loader(), likelihood=case.likelihood)
    torch.testing.assert_close(G.to_dense(), ref, **TOL)
    P = ref.shape[0]
    V = torch.randn(P, 2, dtype=torch.float64)
    torch.testing.assert_close(G @ V, ref @ V, **TOL)
    torch.testing.assert_close(G @ V[:, 0], ref @ V[:, 0], **TOL)
    torch.testing.assert_close(G.diagonal(), ref.diagonal(), **TOL)


def test_hessian_operator_matches_dense(case):
    ref = dense_hessian(case.model, case.X, case.y, case.likelihood)
    H = HessianOperator(case.model, case.loader(), likelihood=case.likelihood)
    v = torch.randn(ref.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(H @ v, ref @ v, **TOL)


def test_ef_operator_matches_dense(case):
    ref = dense_ef(case.model, case.X, case.y, case.likelihood)
    EF = EFOperator(case.model, case.loader(), likelihood=case.likelihood)
    torch.testing.assert_close(EF.to_dense(), ref, **TOL)


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_regression_sigma_scales_every_operator(sigma):
    case = make_case("mlp_regression")
    kw = dict(likelihood="regression", sigma_noise=sigma)
    for op, ref in [
        (GGNOperator, dense_ggn(case.model, case.X, case.y, "regression", sigma=sigma)),
        (HessianOperator, dense_hessian(case.model, case.X, case.y, "regression", sigma=sigma)),
        (EFOperator, dense_ef(case.model, case.X, case.y, "regression", sigma=sigma)),
    ]:
        torch.testing.assert_close(op(case.model, case.loader(), **kw).to_dense(), ref, **TOL)


def test_ggn_equals_hessian_for_linear_model_with_mse():
    case = make_case("linear_regression")
    G = GGNOperator(case.model, case.loader(), likelihood="regression").to_dense()
    H = HessianOperator(case.model, case.loader(), likelihood="regression").to_dense()
    torch.testing.assert_close(G, H, **TOL)


def test_ggn_differs_from_hessian_for_mlp():
    case = make_case("mlp_regression")
    G = GGNOperator(case.model, case.loader(), likelihood="regression").to_dense()
    H = HessianOperator(case.model, case.loader(), likelihood="regression").to_dense()
    assert float((G - H).abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["mlp_classification", "mlp_binary", "mlp_regression"])
def test_mc_fisher_matches_ggn_in_expectation(name):
    case = make_case(name)
    ref = dense_ggn(case.model, case.X, case.y, case.likelihood)
    S = 4000
    F = MCFisherOperator(case.model, case.loader(), likelihood=case.likelihood, mc_samples=S)
    v = torch.randn(ref.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    est, exact = F @ v, ref @ v
    # each entry is a mean of S iid terms; bound the error by 6 standard errors, estimated
    # from a second, independent operator (seeded differently) as the spread of two estimates
    F2 = MCFisherOperator(
        case.model, case.loader(), likelihood=case.likelihood, mc_samples=S, seed=1000
    )
    spread = (est - F2 @ v).abs().max() / math.sqrt(2)
    err = (est - exact).abs().max()
    assert float(err) <= 6 * float(spread) + 1e-3 * float(exact.abs().max())
    # and is a fixed matrix for a fixed loader
    torch.testing.assert_close(F @ v, est, rtol=0, atol=0)
    # a single label draw is a different matrix than the GGN (the estimator is not exact)
    F1 = MCFisherOperator(case.model, case.loader(), likelihood=case.likelihood, mc_samples=1)
    assert float((F1 @ v - exact).abs().max()) > 1e-6


def test_operator_algebra():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, dtype=torch.float64, generator=g)
    B = torch.randn(5, 5, dtype=torch.float64, generator=g)
    a, b = as_operator(A), DenseOperator(B)
    v = torch.randn(5, 2, dtype=torch.float64, generator=g)
    torch.testing.assert_close((a + b) @ v, (A + B) @ v)
    torch.testing.assert_close((2.5 * a) @ v, 2.5 * A @ v)
    torch.testing.assert_close((a * 2.0) @ v, 2.0 * A @ v)
    torch.testing.assert_close(a.T @ v, A.T @ v)
    torch.testing.assert_close((a - b).to_dense(), A - B)
    torch.testing.assert_close((a @ b).to_dense(), A @ B)
    torch.testing.assert_close((a @ b).T.to_dense(), (A @ B).T)
    torch.testing.assert_close(a.T.T.to_dense(), A)
    with pytest.raises(ValueError, match=r"operand must have shape \(5,\) or \(5, K\); got \(4,\)"):
        a @ torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="same shape to add"):
        a + DenseOperator(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="LinearOperator or a 2-D tensor; got list"):
        as_operator([1, 2])
    with pytest.raises(ValueError, match=r"A must be a matrix \(P, Q\); got shape \(3,\)"):
        DenseOperator(torch.zeros(3))


def test_operator_input_errors():
    case = make_case("mlp_classification")
    with pytest.raises(ValueError, match="loader must yield at least one batch"):
        GGNOperator(case.model, [], likelihood="classification")
    with pytest.raises(ValueError, match=r"likelihood must be one of \['regression'"):
        GGNOperator(case.model, case.loader(), likelihood="gaussian")
    with pytest.raises(ValueError, match="mc_samples must be a positive integer; got 0"):
        MCFisherOperator(case.model, case.loader(), mc_samples=0)
    with pytest.raises(ValueError, match="sigma_noise must be finite and > 0; got -1"):
        GGNOperator(case.model, case.loader(), likelihood="regression", sigma_noise=-1)


@pytest.mark.parametrize("name", ["mlp_classification", "mlp_regression", "mlp_binary"])
@pytest.mark.parametrize(
    "budget", [2**30, 2000, 1], ids=["all-cached", "partly-cached", "none-cached"]
)
def test_cached_ggn_products_match_dense(name, budget):
    case = make_case(name)
    ref = dense_ggn(case.model, case.X, case.y, case.likelihood)
    G = GGNOperator(
        case.model, case.loader(), likelihood=case.likelihood, cache=True, memory_budget=budget
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # first product builds the cache, later ones reuse it
        V = torch.randn(ref.shape[0], 2, dtype=torch.float64, generator=g)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.testing.assert_close(G @ V, ref @ V, **TOL)
        said = [str(w.message) for w in caught if "GGNOperator(cache=True)" in str(w.message)]
        if budget == 2**30:
            assert not said
        else:  # batches past the budget are recomputed, and every such product says so once
            assert len(said) == 1 and "do not fit memory_budget" in said[0]
    n_cached = len(G._entries)
    if budget == 2**30:
        assert G._complete and n_cached == 3
    elif budget == 1:
        assert n_cached == 0 and not G._complete
    else:
        assert 0 < n_cached < 3
    G.clear_cache()
    assert not G._entries
    v = torch.randn(ref.shape[0], dtype=torch.float64, generator=g)
    torch.testing.assert_close(G @ v, ref @ v, **TOL)


class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again (no double backward)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _NoDoubleBackward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin1 = torch.nn.Linear(3, 4).double()
        self.lin2 = torch.nn.Linear(4, 2).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=g))

    def forward(self, x):
        return self.lin2(_OnceDifferentiableTanh.apply(self.lin1(x)))


def test_cached_ggn_falls_back_with_a_warning_without_double_backward():
    model = _NoDoubleBackward()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 2, (6,), generator=g)
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    ref = GGNOperator(model, data, likelihood="classification").to_dense()
    G = GGNOperator(model, data, likelihood="classification", cache=True)
    v = torch.randn(ref.shape[0], dtype=torch.float64, generator=g)
    for _ in range(2):  # every product without the cache says why, once
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.testing.assert_close(G @ v, ref @ v, **TOL)
        said = [str(w.message) for w in caught if "GGNOperator(cache=True)" in str(w.message)]
        assert len(said) == 1 and "double backward" in said[0]
    assert not G._entries


# -- errors ----------------------------------------------------------------------------------------


def test_operator_product_shape_mismatch():
    a = DenseOperator(torch.zeros(3, 4))
    b = DenseOperator(torch.zeros(5, 2))
    with pytest.raises(
        ValueError, match=r"cannot multiply operators of shapes \(3, 4\) and \(5, 2\)"
    ):
        a @ b
