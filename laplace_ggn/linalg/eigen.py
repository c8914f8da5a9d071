"""Eigenvalues of symmetric operators: power iteration and Lanczos."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .._checks import is_integer
from ..operators import LinearOperator, as_operator
from ._common import _check_count, _check_square, _gdev, _random_unit

__all__ = ["lanczos", "power_iteration"]


def _power_iteration(
    A: LinearOperator, n_iter: int, tol: float, generator: torch.Generator | None
) -> tuple[float, Tensor, int, bool]:
    """``(Rayleigh quotient, unit vector, products, converged)`` after at most ``n_iter`` steps."""
    P = A.shape[0]
    v = _random_unit(P, A, generator)
    lam = 0.0
    n = 0
    converged = False
    for _ in range(n_iter):
        w = A @ v
        n += 1
        lam_new = float(torch.dot(v, w))
        w_norm = torch.linalg.vector_norm(w)
        if float(w_norm) == 0.0:
            return 0.0, v, n, True
        v = w / w_norm
        if abs(lam_new - lam) <= tol * abs(lam_new):
            lam, converged = lam_new, True
            break
        lam = lam_new
    lam = float(torch.dot(v, A @ v))
    return lam, v, n + 1, converged


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

    Warns:
        RuntimeWarning: If the eigenvalue has not settled to ``tol`` after ``n_iter``
            iterations (the last estimate is returned).

    Example:
        >>> lam, v = power_iteration(torch.diag(torch.tensor([3.0, 1.0])), n_iter=200)
        >>> round(float(lam), 4)
        3.0
    """
    A = as_operator(A)
    _check_square(A)
    n_iter = _check_count(n_iter, "n_iter")
    if not tol > 0:
        raise ValueError(f"tol must be > 0; got {tol!r}.")
    lam, v, _, converged = _power_iteration(A, n_iter, tol, generator)
    if not converged:
        warnings.warn(
            f"power_iteration did not reach the relative tolerance tol={tol:g} in "
            f"n_iter={n_iter} iterations; returning the last estimate {lam:.6g}. Increase "
            "n_iter (convergence is slow when the two largest |eigenvalues| are close).",
            RuntimeWarning,
            stacklevel=2,
        )
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
    if not is_integer(k) or not 1 <= k <= P:
        raise ValueError(f"k must be an integer in [1, {P}]; got {k!r}.")
    k = int(k)
    if n_iter is None:
        n_iter = min(P, max(2 * k, k + 20))
    if not is_integer(n_iter) or not k <= n_iter <= P:
        raise ValueError(f"n_iter must be an integer in [k, P] = [{k}, {P}]; got {n_iter!r}.")
    n_iter = int(n_iter)
    v0 = _random_unit(P, A, generator)
    alpha, beta, Q = _lanczos_tridiag(A, v0, n_iter, generator)
    theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
    idx = torch.argsort(theta, descending=True)[:k]
    return theta[idx], Q @ S[:, idx]
