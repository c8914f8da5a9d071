"""Option enums, result types and argument checks shared by :mod:`laplace_ggn.linalg`."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .._checks import is_integer, shape_str
from ..operators import LinearOperator

__all__ = ["CGResult", "NeumannResult", "ProbeDistribution", "SolveMethod", "SpectralDensity"]


class SolveMethod(str, enum.Enum):
    """Method of :func:`inverse_matvec`."""

    CG = "cg"
    NEUMANN = "neumann"
    KFAC = "kfac"


@runtime_checkable
class SupportsInverseMatvec(Protocol):
    r"""An operator that applies its own damped inverse, :math:`(A + \delta I)^{-1} v`."""

    def inverse_matvec(self, v: Tensor, damping: float = 0.0) -> Tensor:
        """``(P,)`` or ``(P, K)`` -> same shape."""


@runtime_checkable
class SupportsSolve(Protocol):
    """An operator that applies its inverse with the damping it was built with."""

    def solve(self, v: Tensor) -> Tensor:
        """``(P,)`` or ``(P, K)`` -> same shape."""


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


def _check_count(value: int, name: str, minimum: int = 1) -> int:
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


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
