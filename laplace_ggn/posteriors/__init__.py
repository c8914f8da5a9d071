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
    "eigenbasis_of",
    "make_prior",
    "spectrum_of",
]


@runtime_checkable
class Posterior(Protocol):
    r"""Gaussian posterior :math:`N(\theta_*, \Sigma)`, :math:`\Sigma = (sG + \Lambda_0)^{-1}`.

    Every structure is immutable; :meth:`with_prior` returns a new object and reuses whatever
    factorisation of the curvature does not depend on the prior.

    Besides the required members below, a structure may provide optional members that let
    the evidence, its tuning and the diagnostics take a cheaper or an exact path. A structure
    that cannot provide one either leaves the method out or returns ``None`` from it (for
    instance when only some prior structures admit it); callers reach them through
    :func:`spectrum_of` and :func:`eigenbasis_of`, which treat both alike, and never test the
    class of a posterior:

    - ``spectrum(kind: PriorKind) -> Tensor | None``: eigenvalues λ ``(P,)`` of the
      unit-noise curvature G in a basis that also diagonalises every prior of structure
      ``kind``, so that :math:`\log|sG + \Lambda_0| = \sum_i \log(s\lambda_i + a_i)` with
      :math:`a` the prior's diagonal (in parameter order where the prior is not scalar).
      ``+inf`` entries are directions of infinite curvature (no posterior variance).
    - ``eigenbasis() -> tuple[Tensor, Tensor] | None``: eigenvalues λ ``(R,)`` and
      orthonormal eigenvectors U ``(P, R)`` of the unit-noise G held by the posterior
      (R = P when G is held exactly and completely; R < P for a top-k low-rank G, whose
      complement carries the prior only); offered where it is cheap.
    - ``covariance_sqrt_rows(X) -> Tensor``: rows of :math:`XS` with :math:`SS^\top = \Sigma`,
      ``(M, P) -> (M, P)`` (quadratic forms that are >= 0 by construction).
    - ``variance() -> Tensor``: the diagonal of Σ, ``(P,)``.
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


def spectrum_of(posterior: object, kind: PriorKind) -> Tensor | None:
    r"""The optional ``spectrum(kind)`` member of a posterior: λ ``(P,)`` or ``None``.

    Args:
        posterior: Any posterior.
        kind: The prior structure the spectrum must diagonalise as well.

    Returns:
        λ with :math:`\log|sG+\Lambda_0| = \sum_i\log(s\lambda_i + a_i)`, shape ``(P,)``, or
        ``None`` when the structure has no such spectrum for priors of ``kind``.
    """
    member = getattr(posterior, "spectrum", None)
    return None if member is None else member(kind)


def eigenbasis_of(posterior: object) -> tuple[Tensor, Tensor] | None:
    """The optional ``eigenbasis()`` member of a posterior: ``(λ, U)`` of G, or ``None``.

    Args:
        posterior: Any posterior.

    Returns:
        Eigenvalues ``(R,)`` and orthonormal eigenvectors ``(P, R)`` of the unit-noise G, or
        ``None`` when the structure holds no cheap eigendecomposition of G.
    """
    member = getattr(posterior, "eigenbasis", None)
    return None if member is None else member()
