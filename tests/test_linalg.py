"""Tests of laplace_ggn.linalg against dense float64 references (torch.linalg)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cases import make_case
from torch import nn
from torch.func import functional_call, jacrev

from laplace_ggn.linalg import (
    CGResult,
    NeumannResult,
    SpectralDensity,
    cg,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    inverse_matvec,
    lanczos,
    neumann,
    power_iteration,
    spectral_density,
)
from laplace_ggn.operators import CallableOperator, DenseOperator

DT = torch.float64


def spd(P: int, eigs: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Dense SPD matrix Q diag(eigs) Qᵀ with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT))
    if eigs is None:
        eigs = torch.logspace(0, 2, P, dtype=DT)  # condition number 100
    return (Q * eigs) @ Q.T


def rhs(P: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=DT)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- GGN of a tiny MLP


@pytest.fixture(scope="module")
def mlp_ggn() -> tuple[CallableOperator, torch.Tensor]:
    """Matrix-free GGN (MSE, unit noise) of a tanh MLP 2-4-2 and its dense jacrev reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(12, 2, dtype=DT)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    P = theta.numel()

    def f(t: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = t[i : i + math.prod(s)].reshape(s)
            i += math.prod(s)
        return functional_call(model, params, (x,))

    J = jacrev(f)(theta).reshape(-1, P)  # (N*C, P)
    G_ref = J.T @ J

    def matmat(V: torch.Tensor) -> torch.Tensor:
        cols = []
        for v in V.T:
            _, Jv = torch.func.jvp(f, (theta,), (v,))
            _, vjp = torch.func.vjp(f, theta)
            cols.append(vjp(Jv)[0])
        return torch.stack(cols, dim=1)

    return CallableOperator(matmat, P, dtype=DT), G_ref


# ----------------------------------------------------------------------------- CG


@pytest.mark.parametrize("as_op", [False, True], ids=["tensor", "operator"])
def test_cg_matches_solve(as_op: bool) -> None:
    A, b = spd(20), rhs(20)
    res = cg(DenseOperator(A) if as_op else A, b, tol=1e-10)
    assert isinstance(res, CGResult)
    assert res.converged and res.n_iter <= 40 and res.n_products == res.n_iter
    torch.testing.assert_close(res.solution, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    true_res = torch.linalg.vector_norm(b - A @ res.solution)
    assert true_res <= 1e-9 * torch.linalg.vector_norm(b)
    assert len(res.residual_norms) == res.n_iter + 1
    assert res.residual_norms[-1] <= 1e-10 * float(torch.linalg.vector_norm(b))


def test_cg_stops_at_tolerance_and_at_distinct_eigenvalues() -> None:
    A, b = spd(20), rhs(20)
    res = cg(A, b, tol=1e-3)
    rel = torch.linalg.vector_norm(b - A @ res.solution) / torch.linalg.vector_norm(b)
    assert res.converged and 1e-6 < rel <= 1e-3  # stopped at tol, not at full accuracy
    # three distinct eigenvalues: exact after three iterations
    A3 = spd(20, torch.tensor([1.0, 5.0, 10.0], dtype=DT).repeat_interleave(7)[:20])
    res3 = cg(A3, b, tol=1e-10)
    assert res3.n_iter == 3


def test_cg_preconditioner_and_x0() -> None:
    A, b = spd(15), rhs(15)
    exact = torch.linalg.solve(A, b)
    res = cg(A, b, M=lambda r: torch.linalg.solve(A, r), tol=1e-10)
    assert res.n_iter == 1
    torch.testing.assert_close(res.solution, exact, rtol=1e-8, atol=1e-10)
    jacobi = DenseOperator(torch.diag(1.0 / torch.diagonal(A)))
    torch.testing.assert_close(cg(A, b, M=jacobi, tol=1e-10).solution, exact, rtol=1e-7, atol=1e-9)
    res0 = cg(A, b, x0=exact, tol=1e-8)
    assert res0.n_iter == 0 and res0.n_products == 1 and res0.converged


def test_cg_max_iter_and_callback() -> None:
    A, b = spd(20), rhs(20)
    seen: list[torch.Tensor] = []
    res = cg(A, b, tol=1e-12, max_iter=3, callback=seen.append)
    assert not res.converged and res.n_iter == 3 and len(seen) == 3
    torch.testing.assert_close(seen[-1], res.solution)


def test_cg_warns_on_indefinite() -> None:
    A = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=DT))
    with pytest.warns(RuntimeWarning, match="not positive definite along a CG search direction"):
        res = cg(A, torch.tensor([1.0, 1.0, 0.0], dtype=DT))
    assert not res.converged


def test_cg_errors() -> None:
    A, b = spd(5), rhs(5)
    with pytest.raises(ValueError, match=r"b must have shape \(5,\); got \(4,?\)"):
        cg(A, b[:4])
    with pytest.raises(ValueError, match=r"x0 must have shape \(5,\); got \(3,?\)"):
        cg(A, b, x0=b[:3])
    with pytest.raises(ValueError, match="tol must be > 0; got 0"):
        cg(A, b, tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be an integer >= 0; got -1"):
        cg(A, b, max_iter=-1)
    with pytest.raises(
        ValueError, match=r"A must be a square operator \(P, P\); got shape \(5, 4\)"
    ):
        cg(A[:, :4], b)
    with pytest.raises(TypeError, match="b must be a torch.Tensor; got list"):
        cg(A, [1.0] * 5)
    with pytest.raises(TypeError, match="A must be a LinearOperator or a 2-D tensor"):
        cg([[1.0]], b)


# ----------------------------------------------------------------------------- Neumann


def test_neumann_matches_solve() -> None:
    A = spd(10, torch.linspace(1.0, 4.0, 10, dtype=DT))
    b = rhs(10)
    res = neumann(A, b, n_terms=2000, tol=1e-10, generator=gen(0))
    assert isinstance(res, NeumannResult) and res.converged
    torch.testing.assert_close(res.solution, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-9)
    assert abs(res.scale * 4.0 - 1.0) < 1e-6  # scale = 1 / lambda_max
    assert res.residual_norms[-1] <= 1e-10 * float(torch.linalg.vector_norm(b))


def test_neumann_partial_sums_are_the_series() -> None:
    A, b = spd(6, torch.linspace(0.5, 2.0, 6, dtype=DT)), rhs(6)
    s, n = 0.4, 7
    res = neumann(A, b, scale=s, n_terms=n, generator=gen(0))
    B = torch.eye(6, dtype=DT) - s * A
    ref = s * sum(torch.linalg.matrix_power(B, k) @ b for k in range(n))
    torch.testing.assert_close(res.solution, ref, rtol=1e-12, atol=1e-12)
    assert res.n_terms == n and not res.converged
    # the free residuals are the true residuals of the partial sums
    sums = [s * sum(torch.linalg.matrix_power(B, k) @ b for k in range(m)) for m in range(1, n)]
    true = [float(torch.linalg.vector_norm(b - A @ x)) for x in sums]
    torch.testing.assert_close(torch.tensor(res.residual_norms[1:]), torch.tensor(true))


def test_neumann_refuses_divergent_series() -> None:
    A, b = spd(8, torch.linspace(1.0, 5.0, 8, dtype=DT)), rhs(8)
    with pytest.raises(ValueError, match=r"scale \* lambda_max must be < 2"):
        neumann(A, b, scale=0.5, generator=gen(0))  # 0.5 * 5 = 2.5
    indefinite = spd(8, torch.linspace(-1.0, 5.0, 8, dtype=DT))
    with pytest.raises(ValueError, match="A must be positive definite for the Neumann series"):
        neumann(indefinite, b, generator=gen(0))
    neg = -A
    with pytest.raises(ValueError, match="A must be positive definite for the Neumann series"):
        neumann(neg, b, generator=gen(0))


def test_neumann_errors() -> None:
    A, b = spd(4), rhs(4)
    with pytest.raises(ValueError, match="n_terms must be an integer >= 1; got 0"):
        neumann(A, b, n_terms=0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0 or None; got -1"):
        neumann(A, b, scale=-1.0)
    with pytest.raises(ValueError, match="tol must be > 0 or None; got 0"):
        neumann(A, b, tol=0.0)
    with pytest.raises(ValueError, match="n_power_iter must be an integer >= 1; got 0"):
        neumann(A, b, n_power_iter=0)


# ----------------------------------------------------------------------------- inverse_matvec


class _KFACLike:
    def __init__(self, A: torch.Tensor):
        self.A = A

    def inverse_matvec(self, v: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        return torch.linalg.solve(self.A + damping * torch.eye(self.A.shape[0], dtype=DT), v)


class _SolveOnly:
    def __init__(self, A: torch.Tensor):
        self.A = A

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.A, v)


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_inverse_matvec_vector_and_matrix(method: str) -> None:
    A = spd(8, torch.linspace(1.0, 3.0, 8, dtype=DT))
    V = torch.randn(8, 3, generator=gen(2), dtype=DT)
    ref = torch.linalg.solve(A + 0.5 * torch.eye(8, dtype=DT), V)
    kw = {"method": method, "damping": 0.5, "tol": 1e-11, "n_terms": 5000}
    torch.testing.assert_close(inverse_matvec(A, V, **kw), ref, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(inverse_matvec(A, V[:, 0], **kw), ref[:, 0], rtol=1e-8, atol=1e-9)


def test_inverse_matvec_kfac_objects() -> None:
    A, v = spd(5), rhs(5)
    ref = torch.linalg.solve(A + 2.0 * torch.eye(5, dtype=DT), v)
    torch.testing.assert_close(inverse_matvec(_KFACLike(A), v, method="kfac", damping=2.0), ref)
    torch.testing.assert_close(
        inverse_matvec(_SolveOnly(A), v, method="kfac"), torch.linalg.solve(A, v)
    )


def test_inverse_matvec_kfac_curvature_matches_dense() -> None:
    from laplace_ggn.functional import ParamLayout
    from laplace_ggn.kfac import KFACCurvature, KroneckerBlock

    layout = ParamLayout(
        ("0.weight", "0.bias", "1.weight", "2.scale"),
        (torch.Size([3, 2]), torch.Size([3]), torch.Size([2, 3]), torch.Size([2])),
    )
    g = gen(7)

    def rand_spd(n: int) -> torch.Tensor:
        M = torch.randn(n, n, generator=g, dtype=DT)
        return M @ M.T + 0.1 * torch.eye(n, dtype=DT)

    curv = KFACCurvature(
        layout=layout,
        blocks=(
            KroneckerBlock("0.weight", "0.bias", rand_spd(3), rand_spd(3)),  # D = 2 + 1 bias
            KroneckerBlock("1.weight", None, rand_spd(3), rand_spd(2)),
        ),
        diag_names=("2.scale",),
        diag=torch.tensor([0.5, 2.0], dtype=DT),
    )
    P = layout.n_params
    V = torch.randn(P, 2, generator=g, dtype=DT)
    ref = torch.linalg.solve(curv.to_dense() + 0.3 * torch.eye(P, dtype=DT), V)
    out = inverse_matvec(curv, V, method="kfac", damping=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(
        inverse_matvec(curv, V[:, 1], method="kfac", damping=0.3), ref[:, 1], rtol=1e-9, atol=1e-10
    )


def test_inverse_matvec_errors() -> None:
    A, v = spd(5), rhs(5)
    with pytest.raises(
        ValueError,
        match=r"method must be one of \['cg', 'neumann', 'kfac'\]; got 'cgg'. Did you mean 'cg'",
    ):
        inverse_matvec(A, v, method="cgg")
    with pytest.raises(ValueError, match="damping must be a finite number >= 0; got -1"):
        inverse_matvec(A, v, damping=-1.0)
    with pytest.raises(
        ValueError, match=r"v must be a tensor of shape \(P,\) or \(P, K\); got \(1, 1, 5\)"
    ):
        inverse_matvec(A, v.reshape(1, 1, 5))
    with pytest.raises(ValueError, match=r"v must have shape \(5,\) or \(5, K\); got \(4,?\)"):
        inverse_matvec(A, v[:4])
    with pytest.raises(ValueError, match="damping must be 0 for an object with only solve"):
        inverse_matvec(_SolveOnly(A), v, method="kfac", damping=1.0)
    with pytest.raises(
        TypeError, match=r"A must expose inverse_matvec\(v, damping\) or solve\(v\)"
    ):
        inverse_matvec(A, v, method="kfac")
    with pytest.raises(RuntimeError, match="did not reach the relative residual tol=1e-10 in 2 CG"):
        inverse_matvec(A, v, tol=1e-10, max_iter=2)


# ----------------------------------------------------------------------------- eigenvalues


def test_power_iteration_matches_eigh() -> None:
    A = spd(12, torch.linspace(1.0, 10.0, 12, dtype=DT))
    lam, v = power_iteration(A, n_iter=500, tol=1e-12, generator=gen(0))
    evals, evecs = torch.linalg.eigh(A)
    torch.testing.assert_close(lam, evals[-1], rtol=1e-8, atol=0)
    assert abs(float(v @ evecs[:, -1])) > 1 - 1e-5
    # largest magnitude is negative
    lam_neg, _ = power_iteration(-A, n_iter=500, tol=1e-12, generator=gen(0))
    torch.testing.assert_close(lam_neg, -evals[-1], rtol=1e-8, atol=0)


def test_power_iteration_on_ggn_operator(mlp_ggn) -> None:
    G_op, G = mlp_ggn
    lam, v = power_iteration(G_op, n_iter=1000, tol=1e-12, generator=gen(1))
    evals = torch.linalg.eigvalsh(G)
    torch.testing.assert_close(lam, evals[-1], rtol=1e-6, atol=0)
    torch.testing.assert_close(G @ v, lam * v, rtol=0, atol=1e-3 * float(evals[-1]))


def test_lanczos_and_power_iteration_on_library_ggn_operator(mlp_ggn) -> None:
    from laplace_ggn.operators import GGNOperator

    torch.manual_seed(0)  # the same model and inputs as the mlp_ggn fixture
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(12, 2, dtype=DT)
    y = torch.zeros(12, 2, dtype=DT)
    G_op = GGNOperator(model, [(x[:7], y[:7]), (x[7:], y[7:])], likelihood="regression")
    _, G = mlp_ggn
    evals, evecs = lanczos(G_op, 3, n_iter=G.shape[0], generator=gen(0))
    ref = torch.linalg.eigvalsh(G).flip(0)
    torch.testing.assert_close(evals, ref[:3], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(G @ evecs, evecs * evals, rtol=0, atol=1e-7)
    lam, _ = power_iteration(G_op, n_iter=1000, tol=1e-12, generator=gen(1))
    torch.testing.assert_close(lam, ref[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_lanczos_matches_eigh(k: int) -> None:
    A = spd(30, torch.logspace(-2, 2, 30, dtype=DT), seed=3)
    evals, evecs = lanczos(A, k, n_iter=30, generator=gen(0))
    ref_vals = torch.linalg.eigvalsh(A)
    assert evals.shape == (k,) and evecs.shape == (30, k)
    torch.testing.assert_close(evals, ref_vals.flip(0)[:k], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(k, dtype=DT), rtol=0, atol=1e-10)
    torch.testing.assert_close(A @ evecs, evecs * evals, rtol=0, atol=1e-8)
    # default Krylov size on a well-separated top of the spectrum
    top = lanczos(A, k, generator=gen(1))[0]
    torch.testing.assert_close(top, ref_vals.flip(0)[:k], rtol=1e-6, atol=0)


def test_lanczos_rank_deficient_breakdown() -> None:
    g = gen(4)
    U = torch.randn(20, 3, generator=g, dtype=DT)
    A = U @ U.T  # rank 3: the Krylov space is invariant after 3 steps
    evals, evecs = lanczos(A, 5, n_iter=20, generator=gen(0))
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    torch.testing.assert_close(evals, ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(5, dtype=DT), rtol=0, atol=1e-9)


def test_lanczos_on_ggn_operator(mlp_ggn) -> None:
    G_op, G = mlp_ggn
    P = G.shape[0]
    evals, evecs = lanczos(G_op, 4, n_iter=P, generator=gen(0))
    ref = torch.linalg.eigvalsh(G).flip(0)[:4]
    torch.testing.assert_close(evals, ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(G @ evecs, evecs * evals, rtol=0, atol=1e-7)


def test_eigen_errors() -> None:
    A = spd(5)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\]; got 6"):
        lanczos(A, 6)
    with pytest.raises(
        ValueError, match=r"n_iter must be an integer in \[k, P\] = \[3, 5\]; got 2"
    ):
        lanczos(A, 3, n_iter=2)
    with pytest.raises(ValueError, match="n_iter must be an integer >= 1; got 0"):
        power_iteration(A, n_iter=0)
    with pytest.raises(ValueError, match="tol must be > 0; got 0"):
        power_iteration(A, tol=0.0)


# ----------------------------------------------------------------------------- traces

N_SEEDS = 400


def _seeded(fn, A, n, **kw) -> torch.Tensor:
    return torch.stack([fn(A, n, generator=gen(s), **kw) for s in range(N_SEEDS)])


def _assert_unbiased(est: torch.Tensor, truth: torch.Tensor, z: float = 4.5) -> None:
    """|mean - truth| within z standard errors (per entry), standard error from the sample std."""
    mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    assert torch.all((mean - truth).abs() <= z * se + 1e-12), (mean, truth, se)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_hutchinson_trace_unbiased(dist: str) -> None:
    A = spd(15, torch.linspace(0.1, 3.0, 15, dtype=DT)) + 0.3  # dense off-diagonal
    est = _seeded(hutchinson_trace, A, 3, distribution=dist)
    _assert_unbiased(est, torch.trace(A))
    assert est.std() > 0.01  # it is random: the bound above is not vacuous


def test_hutchinson_diagonal_unbiased() -> None:
    A = spd(10, torch.linspace(0.1, 3.0, 10, dtype=DT), seed=5)
    est = _seeded(hutchinson_diagonal, A, 2)
    assert est.shape == (N_SEEDS, 10)
    _assert_unbiased(est, torch.diagonal(A))
    # Rademacher variance per entry is sum_{j != i} A_ij^2 / S
    var_ref = ((A**2).sum(1) - torch.diagonal(A) ** 2) / 2
    ratio = est.var(0) / var_ref
    assert torch.all((ratio > 0.7) & (ratio < 1.4)), ratio


def test_hutchpp_unbiased_and_lower_variance() -> None:
    A = spd(40, 1.0 / torch.arange(1, 41, dtype=DT) ** 2, seed=6)  # decaying spectrum
    n = 12
    pp = _seeded(hutchpp_trace, A, n)
    hu = _seeded(hutchinson_trace, A, n)
    _assert_unbiased(pp, torch.trace(A))
    _assert_unbiased(hu, torch.trace(A))
    assert pp.var() < 0.2 * hu.var(), (pp.var(), hu.var())


def test_hutchpp_exact_when_sketch_spans() -> None:
    A = spd(4, torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=DT))
    torch.testing.assert_close(hutchpp_trace(A, 12, generator=gen(0)), torch.trace(A))


def test_trace_errors() -> None:
    A = spd(4)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1; got 0"):
        hutchinson_trace(A, 0)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1; got 0"):
        hutchinson_diagonal(A, 0)
    with pytest.raises(ValueError, match="n_products must be an integer >= 3; got 2"):
        hutchpp_trace(A, 2)
    with pytest.raises(
        ValueError, match=r"distribution must be one of \['rademacher', 'gaussian'\]"
    ):
        hutchinson_trace(A, 2, distribution="uniform")


# ----------------------------------------------------------------------------- spectral density


def test_spectral_density_integrates_to_one_and_moments() -> None:
    P = 30
    A = spd(P, torch.linspace(0.5, 5.0, P, dtype=DT) ** 2, seed=7)
    m = 8
    sd = spectral_density(A, n_probes=200, n_lanczos=m, generator=gen(0))
    assert isinstance(sd, SpectralDensity)
    assert sd.nodes.shape == (200, m) and sd.weights.shape == (200, m)
    torch.testing.assert_close(sd.weights.sum(1), torch.ones(200, dtype=DT))
    torch.testing.assert_close(
        torch.trapezoid(sd.density, sd.grid), torch.tensor(1.0, dtype=DT), rtol=0, atol=1e-6
    )
    # per probe, Gauss quadrature is exact for v^T A^k v, k < 2m
    Z = (2 * torch.randint(0, 2, (P, 200), generator=gen(0)) - 1).to(DT) / math.sqrt(P)
    for k in range(1, 2 * m):
        Ak = torch.linalg.matrix_power(A, k)
        quad = (sd.weights * sd.nodes**k).sum(1)
        exact = ((Ak @ Z) * Z).sum(0)
        torch.testing.assert_close(quad, exact, rtol=1e-7, atol=0)
    # and the mean over probes estimates tr(A^k)/P without bias
    for k in (1, 2, 3):
        quad = (sd.weights * sd.nodes**k).sum(1)
        _assert_unbiased(quad, torch.trace(torch.linalg.matrix_power(A, k)) / P)
    # moments of the smoothed density: mean unchanged, second moment + sigma^2
    mean_q = (sd.weights * sd.nodes).sum(1).mean()
    m2_q = (sd.weights * sd.nodes**2).sum(1).mean()
    m1 = torch.trapezoid(sd.grid * sd.density, sd.grid)
    m2 = torch.trapezoid(sd.grid**2 * sd.density, sd.grid)
    torch.testing.assert_close(m1, mean_q, rtol=1e-6, atol=0)
    torch.testing.assert_close(m2, m2_q + sd.sigma**2, rtol=1e-6, atol=0)


def test_spectral_density_full_lanczos_recovers_eigenvalues(mlp_ggn) -> None:
    G_op, G = mlp_ggn
    P = G.shape[0]
    sd = spectral_density(G_op, n_probes=2, n_lanczos=P, sigma=1e-3, generator=gen(0))
    ref = torch.linalg.eigvalsh(G)
    torch.testing.assert_close(sd.nodes[0], ref, rtol=0, atol=1e-8 * float(ref[-1]))


def test_spectral_density_custom_grid_and_errors() -> None:
    A = spd(6)
    grid = torch.linspace(0.0, 200.0, 11, dtype=DT)
    sd = spectral_density(A, n_probes=2, n_lanczos=3, grid=grid, sigma=1.0, generator=gen(0))
    assert torch.equal(sd.grid, grid) and sd.density.shape == (11,)
    with pytest.raises(ValueError, match=r"n_lanczos must be an integer in \[1, 6\]; got 7"):
        spectral_density(A, n_lanczos=7)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0 or None; got 0"):
        spectral_density(A, n_lanczos=3, sigma=0.0)
    with pytest.raises(ValueError, match=r"grid must be a 1-D tensor \(T,\); got \(2, 2\)"):
        spectral_density(A, n_lanczos=3, grid=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="n_probes must be an integer >= 1; got 0"):
        spectral_density(A, n_probes=0, n_lanczos=3)
    with pytest.raises(ValueError, match="n_grid must be an integer >= 2; got 1"):
        spectral_density(A, n_lanczos=3, n_grid=1)


def test_power_iteration_warns_when_it_stops_unconverged() -> None:
    A = torch.diag(torch.tensor([1.0, 0.999, 0.5], dtype=DT))
    with pytest.warns(RuntimeWarning, match=r"did not reach the relative tolerance tol=1e-12 in"):
        lam, _ = power_iteration(A, n_iter=3, tol=1e-12, generator=gen(0))
    assert 0.5 <= float(lam) <= 1.0


# ----------------------------------------------------------------------------- errors and integer scalars


def test_inverse_matvec_reports_no_convergence():
    A = torch.diag(torch.logspace(0, 6, 20, dtype=torch.float64))
    b = torch.ones(20, dtype=torch.float64)
    with pytest.raises(
        RuntimeError,
        match="inverse_matvec did not reach the relative residual tol=1e-12 in 2 CG iterations",
    ):
        inverse_matvec(A, b, method="cg", tol=1e-12, max_iter=2)


def test_integer_scalars_accepted_by_linalg_calibration_operators_and_optim():
    from laplace_ggn.calibration import expected_calibration_error
    from laplace_ggn.linalg import cg, hutchinson_trace, lanczos, spectral_density
    from laplace_ggn.operators import MCFisherOperator
    from laplace_ggn.optim import NaturalGradient

    A = torch.diag(torch.arange(1.0, 7.0, dtype=DT))
    b = torch.ones(6, dtype=DT)
    torch.testing.assert_close(
        cg(A, b, max_iter=np.int64(6)).solution, cg(A, b, max_iter=6).solution
    )
    torch.testing.assert_close(lanczos(A, np.int64(2), n_iter=torch.tensor(6))[0], lanczos(A, 2)[0])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(
        hutchinson_trace(A, np.int32(4), generator=g()), hutchinson_trace(A, 4, generator=g())
    )
    assert spectral_density(A, n_probes=np.int64(2), n_lanczos=np.int64(3)).density.ndim == 1
    p = torch.softmax(torch.randn(8, 3, dtype=DT), -1)
    labels = torch.arange(8) % 3
    torch.testing.assert_close(
        expected_calibration_error(p, labels, n_bins=np.int64(5)),
        expected_calibration_error(p, labels, n_bins=5),
    )
    case = make_case("mlp_classification")
    F = MCFisherOperator(
        case.model, case.loader(), likelihood=case.likelihood, mc_samples=np.int64(2)
    )
    assert F.mc_samples == 2 and type(F.mc_samples) is int
    opt = NaturalGradient(
        case.model.parameters(), likelihood="classification", cg_max_iter=np.int64(5)
    )
    assert opt.cg_max_iter == 5
    with pytest.raises(ValueError, match=r"max_iter must be an integer >= 0; got True\."):
        cg(A, b, max_iter=True)
