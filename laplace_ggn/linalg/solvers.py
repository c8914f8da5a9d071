"""Linear systems :math:`A x = b`: conjugate gradients, Neumann series, inverse products."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import as_enum, shape_str
from ..kfac import KFACCurvature
from ..operators import LinearOperator, as_operator
from ._common import (
    CGResult,
    NeumannResult,
    SolveMethod,
    SupportsInverseMatvec,
    SupportsSolve,
    _apply,
    _check_count,
    _check_square,
    _check_vector,
)
from .eigen import _power_iteration

__all__ = ["cg", "inverse_matvec", "neumann"]


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
    max_iter = _check_count(max_iter, "max_iter", minimum=0)

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
    lam, _, n1, _ = _power_iteration(A, n_iter, tol, generator)
    if lam <= 0:
        return lam, lam, n1
    shifted = _Identity(A.shape[0], A.dtype, A.device) * lam - A
    mu, _, n2, _ = _power_iteration(shifted, n_iter, tol, generator)
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
    n_terms = _check_count(n_terms, "n_terms")
    n_power_iter = _check_count(n_power_iter, "n_power_iter")
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
    A: LinearOperator | Tensor | KFACCurvature | SupportsInverseMatvec | SupportsSolve,
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
        elif isinstance(A, KFACCurvature):
            return _kfac_inverse_matvec(A, v, damping)
        elif isinstance(A, SupportsInverseMatvec):
            return A.inverse_matvec(v, damping=damping)
        elif isinstance(A, SupportsSolve):
            if damping != 0:
                raise ValueError(
                    f"damping must be 0 for an object with only solve(v); got {damping!r}. "
                    "Build the object with its damping instead."
                )
            return A.solve(v)
        raise TypeError(
            "A must expose inverse_matvec(v, damping) or solve(v) for method='kfac'; got "
            f"{type(A).__name__}. Pass the fitted KFAC curvature."
        )

    op = as_operator(A)  # raises TypeError naming any other type
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


def _kfac_inverse_matvec(curv: KFACCurvature, v: Tensor, damping: float) -> Tensor:
    """Apply (KFAC + δI)⁻¹: each Kronecker block by its own inverse, the diagonal rest by entry.

    Every :class:`~laplace_ggn.kfac.KroneckerBlock` is solved through its eigendecomposition
    (:meth:`~laplace_ggn.kfac.KroneckerBlock.inverse_matvec`).

    Returns:
        The solution, shape of ``v`` (``(P,)`` or ``(P, K)``).
    """
    cols = v.unsqueeze(1) if v.ndim == 1 else v
    out = torch.zeros_like(cols)
    for blk in curv.blocks:
        blk = blk.to(v.dtype)
        idx = blk.index(curv.layout).to(v.device)
        V = cols[idx].T.reshape(-1, blk.n_out, blk.n_in)  # (K, O, D)
        out[idx] = blk.inverse_matvec(V, damping).reshape(cols.shape[1], -1).T
    di = curv.diag_index().to(v.device)
    if di.numel():
        out[di] = cols[di] / (curv.diag.to(v.dtype)[:, None] + damping)
    return out.squeeze(1) if v.ndim == 1 else out


class _Identity(LinearOperator):
    def __init__(self, P: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (P, P), dtype, device

    def _matmat(self, V: Tensor) -> Tensor:
        return V
