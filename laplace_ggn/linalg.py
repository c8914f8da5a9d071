r"""Matrix-free linear algebra on symmetric curvature operators.

Every function takes a :class:`~laplace_ggn.operators.LinearOperator` (a GGN, Hessian or EF
operator streaming over data, or any composition of them) or a plain 2-D tensor, and touches it
only through products :math:`A v`.  The cost of each routine is stated as a number of such
products, which is also what the result objects report.

- Linear systems :math:`A x = b`: :func:`cg` (conjugate gradients) and :func:`neumann`
  (truncated Neumann series); :func:`inverse_matvec` dispatches between them and KFAC.
- Eigenvalues: :func:`power_iteration` (largest-magnitude eigenpair) and :func:`lanczos`
  (top-k eigenpairs, full re-orthogonalisation).
- Trace and diagonal: :func:`hutchinson_trace`, :func:`hutchinson_diagonal`,
  :func:`hutchpp_trace`.
- Spectrum: :func:`spectral_density` (stochastic Lanczos quadrature).

Randomness comes only from the keyword-only ``generator`` argument.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import as_enum, shape_str
from .operators import LinearOperator, as_operator

__all__ = [
    "CGResult",
    "NeumannResult",
    "ProbeDistribution",
    "SolveMethod",
    "SpectralDensity",
    "cg",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "inverse_matvec",
    "lanczos",
    "neumann",
    "power_iteration",
    "spectral_density",
]


class SolveMethod(str, enum.Enum):
    """Method of :func:`inverse_matvec`."""

    CG = "cg"
    NEUMANN = "neumann"
    KFAC = "kfac"


class ProbeDistribution(str, enum.Enum):
    """Distribution of the random probe vectors of the stochastic estimators."""

    RADEMACHER = "rademacher"
    GAUSSIAN = "gaussian"


@dataclass(frozen=True)
class CGResult:
    r"""Outcome of :func:`cg`.

    Attributes:
        solution: Approximate solution :math:`x`, shape ``(P,)``.
        n_iter: Number of CG iterations run.
        n_products: Number of products with ``A`` used (``n_iter``, plus one if ``x0`` was given).
        converged: Whether the relative residual reached ``tol``.
        residual_norms: :math:`\lVert b - A x_k \rVert` for ``k = 0 .. n_iter``.
    """

    solution: Tensor
    n_iter: int
    n_products: int
    converged: bool
    residual_norms: tuple[float, ...]


@dataclass(frozen=True)
class NeumannResult:
    r"""Outcome of :func:`neumann`.

    Attributes:
        solution: Approximate solution :math:`x`, shape ``(P,)``.
        n_terms: Number of series terms summed.
        n_products: Products with ``A`` used, including those of the spectrum estimate.
        converged: Whether the relative residual reached ``tol`` (always ``False`` without tol).
        residual_norms: :math:`\lVert b - A x_k \rVert` of the partial sums.
        scale: The scale :math:`s` used (the series inverts :math:`sA`).
    """

    solution: Tensor
    n_terms: int
    n_products: int
    converged: bool
    residual_norms: tuple[float, ...]
    scale: float


@dataclass(frozen=True)
class SpectralDensity:
    r"""Smoothed spectral density from stochastic Lanczos quadrature.

    Attributes:
        grid: Points :math:`t` where the density is evaluated, shape ``(T,)``.
        density: :math:`\phi(t)`, shape ``(T,)``; integrates to one over the grid.
        nodes: Ritz values of each probe's Lanczos run, shape ``(S, M)``.
        weights: Quadrature weights (squared first components), shape ``(S, M)``; each row
            sums to one.
        sigma: Width of the Gaussian kernel.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float


# ----------------------------------------------------------------------------- helpers


def _check_square(A: LinearOperator) -> int:
    if A.shape[0] != A.shape[1]:
        raise ValueError(
            f"A must be a square operator (P, P); got shape {shape_str(A.shape)}. "
            "These routines need a symmetric matrix."
        )
    return A.shape[0]


def _check_vector(b: Tensor, P: int, name: str) -> None:
    if not isinstance(b, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(b).__name__}.")
    if b.ndim != 1 or b.shape[0] != P:
        raise ValueError(
            f"{name} must have shape ({P},); got {shape_str(b.shape)}. "
            "Solve one right-hand side at a time, or use inverse_matvec for (P, K)."
        )


def _check_count(value: int, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")


def _apply(M: LinearOperator | Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
    return M @ v if isinstance(M, LinearOperator) else M(v)


def _gdev(generator: torch.Generator | None) -> torch.device:
    """Device to draw on: the generator's (CPU or CUDA), CPU without one."""
    return generator.device if generator is not None else torch.device("cpu")


def _probes(
    P: int,
    K: int,
    dist: ProbeDistribution,
    A: LinearOperator,
    generator: torch.Generator | None,
) -> Tensor:
    """Random probes with E[z zᵀ] = I.

    Returns:
        Probes, shape ``(P, K)``.
    """
    if dist is ProbeDistribution.RADEMACHER:
        z = torch.randint(
            0, 2, (P, K), generator=generator, dtype=torch.int64, device=_gdev(generator)
        )
        Z = (2 * z - 1).to(A.dtype)
    else:
        Z = torch.randn(P, K, generator=generator, dtype=A.dtype, device=_gdev(generator))
    return Z.to(A.device)


def _random_unit(P: int, A: LinearOperator, generator: torch.Generator | None) -> Tensor:
    v = torch.randn(P, generator=generator, dtype=A.dtype, device=_gdev(generator)).to(A.device)
    return v / torch.linalg.vector_norm(v)


# ----------------------------------------------------------------------------- solvers


def cg(
    A: LinearOperator | Tensor,
    b: Tensor,
    *,
    M: LinearOperator | Callable[[Tensor], Tensor] | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
    x0: Tensor | None = None,
    callback: Callable[[Tensor], None] | None = None,
) -> CGResult:
    r"""Solve :math:`A x = b` for symmetric positive-definite ``A`` by conjugate gradients.

    Stops when :math:`\lVert b - A x_k\rVert \le \mathrm{tol}\,\lVert b\rVert`. In exact
    arithmetic CG terminates after at most ``P`` iterations (one product each), and after as
    many iterations as ``A`` has distinct eigenvalues.

    Args:
        A: Symmetric operator or tensor, shape ``(P, P)``.
        b: Right-hand side, shape ``(P,)``.
        M: Preconditioner applying an approximation of :math:`A^{-1}` (an operator or a
            callable ``(P,) -> (P,)``, symmetric positive definite); ``None`` for none.
        tol: Relative residual tolerance, > 0.
        max_iter: Maximum number of iterations; default ``10 * P``.
        x0: Initial guess, shape ``(P,)``; default zeros (saves one product).
        callback: Called with the iterate :math:`x_k` (shape ``(P,)``) after each iteration.

    Returns:
        :class:`CGResult` with the solution and the residual history.

    Raises:
        ValueError: If shapes do not match or ``tol``/``max_iter`` are not positive.

    Warns:
        RuntimeWarning: If :math:`p^\top A p \le 0` along a search direction (``A`` is not
            positive definite); the iteration stops there with ``converged=False``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> res = cg(A, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> res.converged, res.n_iter
        (True, 2)
    """
    A = as_operator(A)
    P = _check_square(A)
    _check_vector(b, P, "b")
    if not tol > 0:
        raise ValueError(f"tol must be > 0; got {tol!r}.")
    if max_iter is None:
        max_iter = 10 * P
    _check_count(max_iter, "max_iter", minimum=0)

    n_products = 0
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        _check_vector(x0, P, "x0")
        x = x0.clone()
        r = b - A @ x
        n_products += 1
    b_norm = float(torch.linalg.vector_norm(b))
    r_norm = float(torch.linalg.vector_norm(r))
    norms = [r_norm]
    threshold = tol * b_norm
    if r_norm <= threshold or b_norm == 0.0:
        return CGResult(x, 0, n_products, True, tuple(norms))

    z = _apply(M, r) if M is not None else r
    p = z.clone()
    rz = torch.dot(r, z)
    converged = False
    k = 0
    while k < max_iter:
        Ap = A @ p
        n_products += 1
        pAp = torch.dot(p, Ap)
        if not bool(pAp > 0):
            warnings.warn(
                f"A is not positive definite along a CG search direction (p^T A p = "
                f"{float(pAp):.3e} at iteration {k}); stopping. CG needs an SPD matrix: add "
                "damping, or use the GGN instead of the Hessian.",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        k += 1
        r_norm = float(torch.linalg.vector_norm(r))
        norms.append(r_norm)
        if callback is not None:
            callback(x)
        if r_norm <= threshold:
            converged = True
            break
        z = _apply(M, r) if M is not None else r
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return CGResult(x, k, n_products, converged, tuple(norms))


def _extreme_eigenvalues(
    A: LinearOperator, n_iter: int, tol: float, generator: torch.Generator | None
) -> tuple[float, float, int]:
    """Estimates (λ_max, λ_min, products) by power iteration on A and on λ_max·I - A.

    Both come from Rayleigh quotients, so λ_max is never overestimated and λ_min never
    underestimated: a reported λ_min <= 0, or s·λ_max >= 2, is certain (up to rounding).
    A negative largest-magnitude Rayleigh quotient already proves an eigenvalue < 0.

    Returns:
        ``(lambda_max, lambda_min, n_products)``.
    """
    lam, _, n1 = _power_iteration(A, n_iter, tol, generator)
    if lam <= 0:
        return lam, lam, n1
    shifted = _Identity(A.shape[0], A.dtype, A.device) * lam - A
    mu, _, n2 = _power_iteration(shifted, n_iter, tol, generator)
    return lam, lam - mu, n1 + n2


def neumann(
    A: LinearOperator | Tensor,
    b: Tensor,
    *,
    scale: float | None = None,
    n_terms: int = 100,
    tol: float | None = None,
    n_power_iter: int = 100,
    generator: torch.Generator | None = None,
    callback: Callable[[Tensor], None] | None = None,
) -> NeumannResult:
    r"""Solve :math:`A x = b` by the truncated Neumann series of the scaled operator.

    .. math::
        A^{-1} b = s \sum_{k=0}^{\infty} (I - sA)^k b, \qquad
        x_{n+1} = s b + x_n - s A x_n,

    which converges iff the spectrum of :math:`sA` lies in :math:`(0, 2)`; the error contracts
    by :math:`\max_i |1 - s\lambda_i|` per term, so about :math:`\kappa(A)\log(1/\epsilon)`
    terms are needed with :math:`s = 1/\lambda_{\max}`. The residual of each partial sum is
    :math:`(x_{n+1} - x_n)/s`, available without extra products.

    Args:
        A: Symmetric operator or tensor, shape ``(P, P)``.
        b: Right-hand side, shape ``(P,)``.
        scale: The scale :math:`s`. If ``None``, :math:`s = 1/\lambda_{\max}` with
            :math:`\lambda_{\max}` from power iteration.
        n_terms: Maximum number of series terms (one product each).
        tol: Optional relative residual tolerance to stop early.
        n_power_iter: Iterations of each power iteration of the spectrum check.
        generator: Random generator of the power-iteration start vectors.
        callback: Called with each partial sum, shape ``(P,)``.

    Returns:
        :class:`NeumannResult`.

    Raises:
        ValueError: If shapes or counts are invalid, or power iteration shows the series
            diverges: ``A`` has an eigenvalue <= 0 (estimated :math:`\lambda_{\min}`) or
            :math:`s\lambda_{\max} \ge 2`.

    Example:
        >>> A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> res = neumann(A, torch.ones(2, dtype=torch.float64), n_terms=200, tol=1e-10)
        >>> torch.allclose(A @ res.solution, torch.ones(2, dtype=torch.float64))
        True
    """
    A = as_operator(A)
    P = _check_square(A)
    _check_vector(b, P, "b")
    _check_count(n_terms, "n_terms")
    _check_count(n_power_iter, "n_power_iter")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 or None; got {tol!r}.")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0 or None; got {scale!r}.")

    lam_max, lam_min, n_products = _extreme_eigenvalues(A, n_power_iter, 1e-8, generator)
    if lam_min <= 0:
        raise ValueError(
            "A must be positive definite for the Neumann series to converge; got an "
            f"eigenvalue estimate lambda_min = {lam_min:.3e} <= 0 (lambda_max = {lam_max:.3e}) "
            "from power iteration. Add damping, or use the GGN instead of the Hessian."
        )
    if scale is None:
        scale = 1.0 / lam_max
    if scale * lam_max >= 2:
        raise ValueError(
            f"scale * lambda_max must be < 2 for the Neumann series to converge; got "
            f"{scale:.3e} * {lam_max:.3e} = {scale * lam_max:.3e}. Use scale < "
            f"{2.0 / lam_max:.3e}, or scale=None for 1 / lambda_max."
        )

    b_norm = float(torch.linalg.vector_norm(b))
    sb = scale * b
    x = sb.clone()
    norms: list[float] = [b_norm]
    converged = False
    n = 1
    if callback is not None:
        callback(x)
    while n < n_terms:
        x_new = sb + x - scale * (A @ x)
        n_products += 1
        norms.append(float(torch.linalg.vector_norm(x_new - x)) / scale)  # residual of x
        x = x_new
        n += 1
        if callback is not None:
            callback(x)
        if tol is not None and norms[-1] <= tol * b_norm:
            converged = True
            break
    return NeumannResult(x, n, n_products, converged, tuple(norms), float(scale))


def inverse_matvec(
    A: LinearOperator | Tensor | object,
    v: Tensor,
    *,
    method: SolveMethod | str = SolveMethod.CG,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iter: int | None = None,
    n_terms: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Inverse-curvature-vector product :math:`(A + \delta I)^{-1} v`.

    For KFAC, each block :math:`B \otimes A` with :math:`A = Q_A \Lambda_A Q_A^\top`,
    :math:`B = Q_B \Lambda_B Q_B^\top` is inverted as

    .. math::
        (B \otimes A + \delta I)^{-1} \mathrm{vec}(V)
        = \mathrm{vec}\big(Q_B [(Q_B^\top V Q_A) \oslash (\lambda_B \lambda_A^\top + \delta)]
          Q_A^\top\big),

    with :math:`V` the block's entries as an ``(O, D)`` matrix; the diagonal part is divided by
    its entries plus :math:`\delta`. Use ``damping > 0`` when a factor is singular.

    Args:
        A: For ``"cg"`` and ``"neumann"``: symmetric operator or tensor, shape ``(P, P)``.
            For ``"kfac"``: a :class:`laplace_ggn.kfac.KFACCurvature` (inverted exactly
            block by block through the eigendecompositions of its Kronecker factors, see
            below), any object with an ``inverse_matvec(v, damping)`` method, or one with a
            ``solve(v)`` method that already includes its damping (then ``damping`` must be 0).
        v: Vector ``(P,)`` or matrix ``(P, K)`` (solved column by column).
        method: ``"cg"``, ``"neumann"`` or ``"kfac"``.
        damping: :math:`\delta \ge 0` added to the diagonal.
        tol: Relative residual tolerance of CG and Neumann.
        max_iter: CG iterations (default ``10 * P``).
        n_terms: Neumann series terms.
        generator: Random generator of Neumann's spectrum check.

    Returns:
        The solution, same shape as ``v``.

    Raises:
        ValueError: If ``method`` is unknown, ``damping`` is negative, ``v`` has the wrong
            shape, or a ``solve``-only object gets ``damping != 0``.
        TypeError: If ``method="kfac"`` and ``A`` has neither method.
        RuntimeError: If CG or Neumann do not reach ``tol``.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> inverse_matvec(A, torch.ones(3, dtype=torch.float64), damping=1.0)
        tensor([0.5000, 0.3333, 0.2000], dtype=torch.float64)
    """
    method = as_enum(SolveMethod, method, "method")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0; got {damping!r}.")
    if not isinstance(v, Tensor) or v.ndim not in (1, 2):
        got = shape_str(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"v must be a tensor of shape (P,) or (P, K); got {got}.")

    if method is SolveMethod.KFAC:
        if isinstance(A, (Tensor, LinearOperator)):
            pass  # plain matrices have no Kronecker inverse (Tensor.solve is a removed API)
        elif all(hasattr(A, a) for a in ("blocks", "layout", "diag", "diag_index")):
            return _kfac_inverse_matvec(A, v, damping)
        elif hasattr(A, "inverse_matvec"):
            return A.inverse_matvec(v, damping=damping)  # type: ignore[union-attr]
        elif hasattr(A, "solve"):
            if damping != 0:
                raise ValueError(
                    f"damping must be 0 for an object with only solve(v); got {damping!r}. "
                    "Build the object with its damping instead."
                )
            return A.solve(v)  # type: ignore[union-attr]
        raise TypeError(
            "A must expose inverse_matvec(v, damping) or solve(v) for method='kfac'; got "
            f"{type(A).__name__}. Pass the fitted KFAC curvature."
        )

    op = as_operator(A)  # type: ignore[arg-type]
    P = _check_square(op)
    if v.shape[0] != P:
        raise ValueError(f"v must have shape ({P},) or ({P}, K); got {shape_str(v.shape)}.")
    if damping > 0:
        eye_op = _Identity(P, op.dtype, op.device)
        op = op + eye_op * damping
    cols = v.unsqueeze(1) if v.ndim == 1 else v
    out = []
    for j in range(cols.shape[1]):
        if method is SolveMethod.CG:
            res = cg(op, cols[:, j], tol=tol, max_iter=max_iter)
            ok, steps = res.converged, f"{res.n_iter} CG iterations"
        else:
            res = neumann(op, cols[:, j], n_terms=n_terms, tol=tol, generator=generator)
            ok, steps = res.converged, f"{res.n_terms} Neumann terms"
        if not ok:
            raise RuntimeError(
                f"inverse_matvec did not reach the relative residual tol={tol:g} in {steps} "
                f"(final residual {res.residual_norms[-1]:.3e}). Increase max_iter/n_terms or "
                "damping."
            )
        out.append(res.solution)
    sol = torch.stack(out, dim=1)
    return sol.squeeze(1) if v.ndim == 1 else sol


def _kfac_inverse_matvec(curv: object, v: Tensor, damping: float) -> Tensor:
    """Apply (KFAC + δI)⁻¹ for a KFACCurvature-like object (blocks B ⊗ A, exact diagonal rest).

    Returns:
        The solution, shape of ``v`` (``(P,)`` or ``(P, K)``).
    """
    cols = v.unsqueeze(1) if v.ndim == 1 else v
    out = torch.zeros_like(cols)
    for blk in curv.blocks:  # type: ignore[attr-defined]
        idx = blk.index(curv.layout).to(v.device)  # type: ignore[attr-defined]
        lam_a, Q_a = torch.linalg.eigh(blk.A.to(v.dtype))
        lam_b, Q_b = torch.linalg.eigh(blk.B.to(v.dtype))
        V = cols[idx].T.reshape(-1, blk.n_out, blk.n_in)  # (K, O, D)
        W = Q_b.T @ V @ Q_a / (lam_b[:, None] * lam_a[None, :] + damping)
        out[idx] = (Q_b @ W @ Q_a.T).reshape(cols.shape[1], -1).T
    di = curv.diag_index().to(v.device)  # type: ignore[attr-defined]
    if di.numel():
        out[di] = cols[di] / (curv.diag.to(v.dtype)[:, None] + damping)  # type: ignore[attr-defined]
    return out.squeeze(1) if v.ndim == 1 else out


class _Identity(LinearOperator):
    def __init__(self, P: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (P, P), dtype, device

    def _matmat(self, V: Tensor) -> Tensor:
        return V


# ----------------------------------------------------------------------------- eigenvalues


def _power_iteration(
    A: LinearOperator, n_iter: int, tol: float, generator: torch.Generator | None
) -> tuple[float, Tensor, int]:
    P = A.shape[0]
    v = _random_unit(P, A, generator)
    lam = 0.0
    n = 0
    for _ in range(n_iter):
        w = A @ v
        n += 1
        lam_new = float(torch.dot(v, w))
        w_norm = torch.linalg.vector_norm(w)
        if float(w_norm) == 0.0:
            return 0.0, v, n
        v = w / w_norm
        if abs(lam_new - lam) <= tol * abs(lam_new):
            lam = lam_new
            break
        lam = lam_new
    lam = float(torch.dot(v, A @ v))
    return lam, v, n + 1


def power_iteration(
    A: LinearOperator | Tensor,
    *,
    n_iter: int = 100,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Largest-magnitude eigenpair of a symmetric operator by power iteration.

    Iterates :math:`v \leftarrow Av/\lVert Av\rVert` and returns the Rayleigh quotient
    :math:`v^\top A v`; stops when it changes by less than ``tol`` relative. Convergence is
    geometric with ratio :math:`|\lambda_2/\lambda_1|`.

    Args:
        A: Symmetric operator or tensor, shape ``(P, P)``.
        n_iter: Maximum number of iterations (one product each).
        tol: Relative tolerance on the eigenvalue.
        generator: Random generator of the start vector.

    Returns:
        ``(eigenvalue, eigenvector)``: a 0-dim tensor (signed) and a unit vector ``(P,)``.

    Raises:
        ValueError: If ``A`` is not square or ``n_iter`` < 1.

    Example:
        >>> lam, v = power_iteration(torch.diag(torch.tensor([3.0, 1.0])), n_iter=200)
        >>> round(float(lam), 4)
        3.0
    """
    A = as_operator(A)
    _check_square(A)
    _check_count(n_iter, "n_iter")
    if not tol > 0:
        raise ValueError(f"tol must be > 0; got {tol!r}.")
    lam, v, _ = _power_iteration(A, n_iter, tol, generator)
    return torch.tensor(lam, dtype=A.dtype, device=A.device), v


def _lanczos_tridiag(
    A: LinearOperator, v0: Tensor, m: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Run m Lanczos steps with full re-orthogonalisation.

    On breakdown (an invariant subspace is found)
    the basis is continued with a fresh random vector orthogonal to it and beta = 0, so T stays
    similar to the restriction of A to span(Q).

    Returns:
        ``(alpha, beta, Q)`` of shapes ``(m,)``, ``(m - 1,)`` and ``(P, m)``.
    """
    P = A.shape[0]
    Q = torch.zeros(P, m, dtype=A.dtype, device=A.device)
    alpha = torch.zeros(m, dtype=A.dtype, device=A.device)
    beta = torch.zeros(max(m - 1, 0), dtype=A.dtype, device=A.device)
    q = v0 / torch.linalg.vector_norm(v0)
    for j in range(m):
        Q[:, j] = q
        w = A @ q
        alpha[j] = torch.dot(q, w)
        # full re-orthogonalisation, twice ("twice is enough")
        for _ in range(2):
            w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        if j == m - 1:
            break
        b = torch.linalg.vector_norm(w)
        scale = float(torch.linalg.vector_norm(alpha[: j + 1])) + 1.0
        if float(b) <= 1e-10 * scale:
            beta[j] = 0.0
            w = torch.randn(P, generator=generator, dtype=A.dtype, device=_gdev(generator))
            w = w.to(A.device)
            for _ in range(2):
                w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
            q = w / torch.linalg.vector_norm(w)
        else:
            beta[j] = b
            q = w / b
    return alpha, beta, Q


def _tridiag(alpha: Tensor, beta: Tensor) -> Tensor:
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


def lanczos(
    A: LinearOperator | Tensor,
    k: int,
    *,
    n_iter: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Top-k eigenpairs (largest algebraic) of a symmetric operator by Lanczos.

    Builds an orthonormal Krylov basis :math:`Q` of ``n_iter`` vectors with full
    re-orthogonalisation, diagonalises the tridiagonal :math:`T = Q^\top A Q` and returns the
    largest Ritz pairs :math:`(\theta_i, Q s_i)`. With ``n_iter = P`` the result is exact up to
    rounding.

    Args:
        A: Symmetric operator or tensor, shape ``(P, P)``.
        k: Number of eigenpairs, ``1 <= k <= P``.
        n_iter: Krylov dimension (products), ``k <= n_iter <= P``; default
            ``min(P, max(2k, k + 20))``.
        generator: Random generator of the start vector.

    Returns:
        ``(eigenvalues, eigenvectors)``: shape ``(k,)`` in descending order, and
        orthonormal columns ``(P, k)``.

    Raises:
        ValueError: If ``k`` or ``n_iter`` are out of range.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> lanczos(A, 2, n_iter=5)[0].round(decimals=6)
        tensor([5., 4.], dtype=torch.float64)
    """
    A = as_operator(A)
    P = _check_square(A)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= P:
        raise ValueError(f"k must be an integer in [1, {P}]; got {k!r}.")
    if n_iter is None:
        n_iter = min(P, max(2 * k, k + 20))
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or not k <= n_iter <= P:
        raise ValueError(f"n_iter must be an integer in [k, P] = [{k}, {P}]; got {n_iter!r}.")
    v0 = _random_unit(P, A, generator)
    alpha, beta, Q = _lanczos_tridiag(A, v0, n_iter, generator)
    theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
    idx = torch.argsort(theta, descending=True)[:k]
    return theta[idx], Q @ S[:, idx]


# ----------------------------------------------------------------------------- traces


def hutchinson_trace(
    A: LinearOperator | Tensor,
    n_samples: int,
    *,
    distribution: ProbeDistribution | str = ProbeDistribution.RADEMACHER,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Hutchinson's unbiased trace estimate :math:`\frac1S\sum_s z_s^\top A z_s`.

    With Rademacher probes the variance is :math:`\frac2S(\lVert A\rVert_F^2 - \sum_i A_{ii}^2)`.

    Args:
        A: Square operator or tensor, shape ``(P, P)``.
        n_samples: Number of probes :math:`S` (= products).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: Random generator of the probes.

    Returns:
        The estimate, a 0-dim tensor.

    Raises:
        ValueError: If ``n_samples`` < 1 or ``distribution`` is unknown.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> float(hutchinson_trace(A, 4))  # exact for diagonal A with Rademacher probes
        6.0
    """
    A = as_operator(A)
    P = _check_square(A)
    _check_count(n_samples, "n_samples")
    dist = as_enum(ProbeDistribution, distribution, "distribution")
    Z = _probes(P, n_samples, dist, A, generator)
    return (Z * (A @ Z)).sum() / n_samples


def hutchinson_diagonal(
    A: LinearOperator | Tensor,
    n_samples: int,
    *,
    distribution: ProbeDistribution | str = ProbeDistribution.RADEMACHER,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Unbiased estimate of :math:`\operatorname{diag}(A)`: :math:`\frac1S\sum_s z_s \odot A z_s`.

    Args:
        A: Square operator or tensor, shape ``(P, P)``.
        n_samples: Number of probes (= products).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: Random generator of the probes.

    Returns:
        The estimated diagonal, shape ``(P,)``.

    Raises:
        ValueError: If ``n_samples`` < 1 or ``distribution`` is unknown.

    Example:
        >>> hutchinson_diagonal(torch.diag(torch.tensor([1.0, 2.0])), 3)
        tensor([1., 2.])
    """
    A = as_operator(A)
    P = _check_square(A)
    _check_count(n_samples, "n_samples")
    dist = as_enum(ProbeDistribution, distribution, "distribution")
    Z = _probes(P, n_samples, dist, A, generator)
    return (Z * (A @ Z)).sum(dim=1) / n_samples


def hutchpp_trace(
    A: LinearOperator | Tensor,
    n_products: int,
    *,
    distribution: ProbeDistribution | str = ProbeDistribution.RADEMACHER,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Hutch++ trace estimate (Meyer et al., 2021) with ``n_products`` products.

    With :math:`m = \lfloor n/3 \rfloor` sketch vectors :math:`S`, :math:`Q = \operatorname{qr}(AS)`
    captures the top of the spectrum exactly and Hutchinson estimates the rest:

    .. math::
        \widehat{\mathrm{tr}}(A) = \mathrm{tr}(Q^\top A Q)
            + \frac{1}{n - 2m} \sum_{s} z_s^\top (I - QQ^\top) A (I - QQ^\top) z_s.

    Unbiased; for matrices with a decaying spectrum its variance is far below Hutchinson's at
    the same number of products.

    Args:
        A: Symmetric operator or tensor, shape ``(P, P)``.
        n_products: Total number of products, >= 3.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: Random generator of the probes.

    Returns:
        The estimate, a 0-dim tensor.

    Raises:
        ValueError: If ``n_products`` < 3 or ``distribution`` is unknown.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 1.0, 0.1], dtype=torch.float64))
        >>> round(float(hutchpp_trace(A, 9)), 6)  # the sketch spans all 3 dimensions
        6.1
    """
    A = as_operator(A)
    P = _check_square(A)
    _check_count(n_products, "n_products", minimum=3)
    dist = as_enum(ProbeDistribution, distribution, "distribution")
    m = n_products // 3
    n_g = n_products - 2 * m
    S = _probes(P, m, dist, A, generator)
    G = _probes(P, n_g, dist, A, generator)
    Q, _ = torch.linalg.qr(A @ S)
    low = torch.trace(Q.T @ (A @ Q))
    G_perp = G - Q @ (Q.T @ G)
    rest = (G_perp * (A @ G_perp)).sum() / n_g
    return low + rest


def spectral_density(
    A: LinearOperator | Tensor,
    *,
    n_probes: int = 10,
    n_lanczos: int = 30,
    grid: Tensor | None = None,
    n_grid: int = 400,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    r"""Spectral density by stochastic Lanczos quadrature (Ubaru et al. 2017; Ghorbani et al. 2019).

    For each unit Rademacher probe :math:`v_s = z_s/\sqrt P`, ``n_lanczos`` Lanczos steps give
    Ritz values :math:`\theta_{sj}` and weights :math:`\tau_{sj}` (squared first components of
    the eigenvectors of :math:`T_s`), a Gauss quadrature of :math:`v_s^\top f(A) v_s`:

    .. math::
        \phi(t) = \frac1S \sum_{s=1}^S \sum_{j} \tau_{sj}\,
            \mathcal N(t;\, \theta_{sj}, \sigma^2), \qquad
        \frac1S\sum_{s,j} \tau_{sj}\theta_{sj}^k \approx \frac{\mathrm{tr}(A^k)}{P},

    the quadrature being exact in :math:`v_s^\top A^k v_s` for :math:`k < 2\,` ``n_lanczos``.
    :math:`\phi` integrates to one; its mean is :math:`\mathrm{tr}(A)/P` estimated and its
    second moment adds :math:`\sigma^2` to the quadrature's.

    Args:
        A: Symmetric operator or tensor, shape ``(P, P)``.
        n_probes: Number of probes :math:`S`.
        n_lanczos: Lanczos steps per probe (products per probe), ``<= P``.
        grid: Evaluation points, shape ``(T,)``; default ``n_grid`` points spanning the Ritz
            values with a margin of ``6 * sigma``.
        n_grid: Number of default grid points (ignored when ``grid`` is given).
        sigma: Kernel width; default 1/50 of the Ritz-value range.
        generator: Random generator of the probes.

    Returns:
        :class:`SpectralDensity`.

    Raises:
        ValueError: If a count is out of range, ``sigma`` is not positive or ``grid`` is not 1-D.

    Example:
        >>> A = torch.diag(torch.linspace(1.0, 2.0, 20, dtype=torch.float64))
        >>> sd = spectral_density(A, n_probes=3, n_lanczos=10)
        >>> round(float(torch.trapezoid(sd.density, sd.grid)), 3)
        1.0
    """
    A = as_operator(A)
    P = _check_square(A)
    _check_count(n_probes, "n_probes")
    _check_count(n_grid, "n_grid", minimum=2)
    if isinstance(n_lanczos, bool) or not isinstance(n_lanczos, int) or not 1 <= n_lanczos <= P:
        raise ValueError(f"n_lanczos must be an integer in [1, {P}]; got {n_lanczos!r}.")
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0 or None; got {sigma!r}.")
    if grid is not None and (not isinstance(grid, Tensor) or grid.ndim != 1):
        got = shape_str(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"grid must be a 1-D tensor (T,); got {got}.")

    Z = _probes(P, n_probes, ProbeDistribution.RADEMACHER, A, generator) / math.sqrt(P)
    nodes, weights = [], []
    for s in range(n_probes):
        alpha, beta, _ = _lanczos_tridiag(A, Z[:, s], n_lanczos, generator)
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        nodes.append(theta)
        weights.append(S[0, :] ** 2)
    nodes_t, weights_t = torch.stack(nodes), torch.stack(weights)
    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    if sigma is None:
        sigma = max(hi - lo, abs(hi), 1e-12) / 50.0
    if grid is None:
        grid = torch.linspace(
            lo - 6 * sigma, hi + 6 * sigma, n_grid, dtype=A.dtype, device=A.device
        )
    diff = grid[:, None, None] - nodes_t[None]
    kern = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (kern * weights_t[None]).sum(dim=(1, 2)) / n_probes
    return SpectralDensity(grid, density, nodes_t, weights_t, float(sigma))
