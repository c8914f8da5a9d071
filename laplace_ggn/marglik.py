r"""Laplace evidence and the tuning of the prior precision and the observation noise.

.. math::
    \log p(\mathcal D) \approx -\ell(\theta_*) - \tfrac12 (\theta_*-\theta_0)^\top \Lambda_0
    (\theta_*-\theta_0) - \tfrac12 \log|\Lambda| + \tfrac12 \log|\Lambda_0|,

with :math:`\Lambda = G/(\tau\sigma^2) + \Lambda_0` (the 2π terms of the Gaussian
approximation cancel; σ enters ℓ and G for regression).
"""

from __future__ import annotations

from torch import Tensor

from .likelihoods import FitStatistics

__all__ = ["log_marginal_likelihood"]


def log_marginal_likelihood(
    posterior, stats: FitStatistics, likelihood, sigma_noise: Tensor
) -> Tensor:
    r"""Laplace approximation of the log evidence, shape ``()``.

    Args:
        posterior: A posterior whose prior and curvature scale are the ones to evaluate.
        stats: Training-loss statistics at θ*.
        likelihood: The likelihood object (gives ℓ(θ*) as a function of σ).
        sigma_noise: σ, shape ``()`` (ignored for classification).

    Returns:
        The log marginal likelihood, differentiable in the prior precision and σ.
    """
    prior = posterior.prior
    nll = likelihood.nll_from_statistics(stats, sigma_noise)
    return (
        -nll
        - 0.5 * prior.quadratic(posterior.mean)
        - 0.5 * posterior.log_det()
        + 0.5 * prior.log_det()
    )
