"""Posterior structures: one class each, all satisfying the :class:`Posterior` protocol."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ._common import Prior, PriorKind, make_prior
from .diag import DiagPosterior
from .full import FullPosterior
from .kfac import KFACPosterior
from .lowrank import LowRankPosterior
from .projected import ProjectedPosterior

__all__ = [
    "DiagPosterior",
    "FullPosterior",
    "KFACPosterior",
    "LowRankPosterior",
    "Posterior",
    "Prior",
    "PriorKind",
    "ProjectedPosterior",
    "make_prior",
]


@runtime_checkable
class Posterior(Protocol):
    r"""Gaussian posterior :math:`N(\theta_*, \Sigma)`, :math:`\Sigma = (sG + \Lambda_0)^{-1}`.

    Every structure is immutable; :meth:`with_prior` returns a new object and reuses whatever
    factorisation of the curvature does not depend on the prior.
    """

    mean: Tensor
    prior: Prior

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``(n, P)`` draws."""

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """Σ V, ``(P,)`` or ``(P, K)``."""

    def log_det(self) -> Tensor:
        """log|Λ| of the precision (never of Σ), ``()``."""

    def functional_covariance(self, J: Tensor) -> Tensor:
        """J Σ Jᵀ, ``(B, C, P) -> (B, C, C)``."""

    def to_dense(self) -> Tensor:
        """Σ, ``(P, P)``."""

    def with_prior(self, prior: Prior, scale: Tensor | float | None = None) -> "Posterior":
        """Same curvature, another prior / curvature scale."""
