r"""The joint Gaussian of the linearised outputs over a batch of inputs.

.. math::
    \mathrm{vec} f(X) \sim N\big(\mathrm{vec} f(X, \theta_*),\; J(X)\,\Sigma\,J(X)^\top\big),
    \qquad J(X) \in \mathbb R^{BC \times P},

the Jacobian rows of all B·C outputs stacked as one block and handed to the posterior's
``functional_covariance`` (any structure of the registry; Σ is never formed).  Entry
``[b, c, b', c']`` is :math:`\mathrm{Cov}(f_c(x_b), f_{c'}(x_{b'}))`; the diagonal blocks
``[b, :, b, :]`` are the per-input covariances.  Regression adds :math:`\sigma^2` (one per
output, when the fit has one σ per output) on the diagonal: :class:`JointPrediction`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import Likelihood, check_computed_finite, check_memory
from ..batches import batch_size_of
from ..likelihoods import Prediction
from .jacobians import (
    check_differentiable_bytes,
    head_jacobians,
    jacobians_with_graph,
    outputs_per_sample,
)

__all__ = ["JointPrediction", "joint_moments", "joint_predict"]


@dataclass(frozen=True)
class JointPrediction(Prediction):
    """The joint Gaussian predictive of regression outputs over a batch.

    Attributes:
        mean: Predictive mean, shape ``(B, C)``.
        variance: Its marginal variances (functional + σ²), shape ``(B, C)``.
        covariance: The joint covariance of the B·C outputs (functional + σ² on the
            diagonal), shape ``(B·C, B·C)``, row ``b·C + c``.
    """

    covariance: Tensor | None = None


def _check_joint_bytes(fmodel, B: int, M: int) -> None:
    P, elt = fmodel.n_params, fmodel.theta.element_size()
    N = B * M
    check_memory(
        (N * N + 2 * N * P) * elt,
        fmodel.memory_budget,
        f"the joint covariance of {B} inputs x M={M} outputs (shape ({N}, {N})) with its "
        f"Jacobian rows ({N}, {P})",
        "Pass fewer inputs per call, use functional_samples(x, n) (no (B·C)² matrix), "
        "or raise memory_budget=.",
    )


def joint_moments(fitted, x: object, *, differentiable: bool = False) -> tuple[Tensor, Tensor]:
    """Outputs at θ* and their joint covariance ``(B·M, B·M)`` (M outputs per sample).

    Args:
        fitted: The :class:`~laplace_ggn.FittedLaplace`.
        x: A checked model input of batch size B.
        differentiable: Keep the graph to ``x``.

    Returns:
        ``(f, cov)``: ``f`` of shape ``(B, C)`` (``(B, T, C)``) and ``cov`` of shape
        ``(f.numel(), f.numel())``.

    Raises:
        ValueError: If the Jacobian rows and the covariance exceed ``memory_budget`` (checked
            before they are formed).
        RuntimeError: If the covariance is not finite.
    """
    fm, post = fitted.fmodel, fitted.posterior
    B, M = batch_size_of(x), outputs_per_sample(fm, x)
    _check_joint_bytes(fm, B, M)
    if B == 0:
        f = fm.theta.new_zeros(0, fitted.statistics.n_outputs)
        return f, f.new_zeros(0, 0)
    if differentiable:
        check_differentiable_bytes(fm, B, M, "the joint covariance")
        J, f = jacobians_with_graph(fm, x, M)
    else:  # a Linear head: the rows from its features, without differentiating the network
        J, f = head_jacobians(fitted, x) or fm.jacobians(x, n_outputs=M)
    J = J.reshape(1, B * M, fm.n_params)
    with torch.set_grad_enabled(differentiable):
        cov = post.functional_covariance(J)[0]
    check_computed_finite(cov, "joint functional covariance J Σ Jᵀ")
    return f, cov


def joint_predict(fitted, x: object, *, differentiable: bool = False) -> JointPrediction:
    """The joint Gaussian predictive of a regression fit (see the module docstring).

    Returns:
        The :class:`JointPrediction`.

    Raises:
        ValueError: If the likelihood is not ``"regression"`` (the joint law of class
            probabilities has no closed form), or the memory check fails.
    """
    if fitted.kind is not Likelihood.REGRESSION:
        name = fitted.kind.value if fitted.kind is not None else fitted.likelihood.name
        raise ValueError(
            "predict(x, joint=True) gives the joint Gaussian of likelihood='regression'; got "
            f"likelihood={name!r}, whose joint predictive has no closed form. Use "
            "functional_covariance(x, joint=True) for the joint Gaussian over the outputs, or "
            "functional_samples(x, n) for draws consistent across inputs."
        )
    f, cov = joint_moments(fitted, x, differentiable=differentiable)
    sigma = fitted.hyperparameters.sigma_noise.detach().to(cov.dtype)
    C = f.shape[-1]
    noise = (sigma**2).expand(C).repeat(f.numel() // max(C, 1))
    if cov.requires_grad:
        cov = cov + torch.diag_embed(noise)
    else:  # a fresh matrix of this call: the noise added in place, no second (B·C)² matrix
        cov.diagonal().add_(noise)
    var = torch.diagonal(cov).reshape(f.shape)
    return JointPrediction(f, var, covariance=cov)
