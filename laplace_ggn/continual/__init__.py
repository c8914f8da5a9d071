r"""Continual (online) Laplace: curvature added over fits, a posterior as the next prior.

- ``LaplaceWrapper(..., prior_mean=m)``: a prior centred at a tensor ``m`` ``(P,)``, or the
  posterior of a fitted wrapper as the prior (:mod:`.prior`).
- ``la.fit(loader, accumulate=True)``: the new data's curvature at the current weights added
  to the stored one (:func:`accumulate`, :mod:`.curvature` states what is exact).
- ``la.log_prob(theta)``: the posterior log density, the penalty of the next task's loss
  (:func:`log_prob`).

The recipe is in ``docs/continual.md``.
"""

from .curvature import CONTINUAL_STRUCTURES, add_curvature, curvature_quadratic
from .fit import accumulate, combine, log_prob, stored_fit
from .prior import CarriedCurvature, resolve_prior_mean, restore_prior_base, save_prior_base

__all__ = [
    "CONTINUAL_STRUCTURES",
    "CarriedCurvature",
    "accumulate",
    "add_curvature",
    "combine",
    "curvature_quadratic",
    "log_prob",
    "resolve_prior_mean",
    "restore_prior_base",
    "save_prior_base",
    "stored_fit",
]
