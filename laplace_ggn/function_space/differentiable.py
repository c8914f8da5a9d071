r"""Predictives differentiable in the inputs: gradients reach ``x``, never the posterior.

The Jacobians at θ* keep their graph to ``x``
(:func:`~laplace_ggn.function_space.jacobians.jacobians_with_graph`); the posterior's
``functional_covariance`` and the likelihood's map to the predictive (every link: probit,
bridge, bridge_norm, mc with a seeded generator) are ordinary differentiable tensor
functions, so :math:`\partial\,\mathrm{pred}/\partial x` flows through
:math:`f(x, \theta_*)` and :math:`J(x)\Sigma J(x)^\top`.  θ*, Σ and the hyperparameters are
detached.  This path computes Jacobians also for a Linear head (whose usual path reads the
features without a graph); memory grows with B·C·P, checked against the budget.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import PredictMethod, check_computed_finite, check_generator, check_positive_int
from ..batches import batch_size_of
from ..glm import glm_from_moments
from ..likelihoods import Prediction
from ..predictive import resolve_options
from .jacobians import check_differentiable_bytes, jacobians_with_graph, outputs_per_sample

__all__ = ["differentiable_moments", "differentiable_predict"]


def differentiable_moments(fitted, x: object) -> tuple[Tensor, Tensor]:
    r"""Outputs at θ* and per-input :math:`J \Sigma J^\top`, both differentiable in ``x``.

    Returns:
        ``(f, cov)`` of shapes ``(B, C)`` and ``(B, C, C)`` (``(B, T, C)``, ``(B, T, C, C)``).

    Raises:
        ValueError: If the Jacobians with their graph exceed ``memory_budget``.
        RuntimeError: If the covariance is not finite.
    """
    fm = fitted.fmodel
    B, M = batch_size_of(x), outputs_per_sample(fm, x)
    check_differentiable_bytes(fm, B, M, "the differentiable predictive")
    if B == 0:
        C = fitted.statistics.n_outputs
        return fm.theta.new_zeros(0, C), fm.theta.new_zeros(0, C, C)
    J, f = jacobians_with_graph(fm, x, M)
    C = f.shape[-1]
    with torch.enable_grad():
        cov = fitted.posterior.functional_covariance(J.reshape(-1, C, fm.n_params))
    check_computed_finite(cov, "functional covariance J Σ Jᵀ (differentiable)")
    return f, cov.reshape(*f.shape, C)


def differentiable_predict(
    fitted,
    x: object,
    method: object = "glm",
    *,
    link: object = None,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Prediction:
    """The GLM predictive with a graph to ``x`` (tempered by T like :meth:`FittedLaplace.predict`).

    Returns:
        The :class:`~laplace_ggn.predictive.Prediction`, shapes ``(B, C)``.

    Raises:
        ValueError: If ``method`` is not ``"glm"`` or an option is invalid.
    """
    m, lk = resolve_options(fitted.likelihood, method, link)
    if m is not PredictMethod.GLM:
        raise ValueError(
            "differentiable=True applies to method='glm' (the linearised predictive); got "
            f"method={m.value!r}."
        )
    check_positive_int(n_samples, "n_samples")
    check_generator(generator)
    f, cov = differentiable_moments(fitted, x)
    hp = fitted.hyperparameters
    with torch.enable_grad():
        pred = glm_from_moments(
            f,
            cov,
            likelihood=fitted.likelihood,
            link=lk,
            sigma_noise=hp.sigma_noise.detach(),
            n_samples=n_samples,
            generator=generator,
            memory_budget=fitted.fmodel.memory_budget,
        )
        T = hp.predictive_temperature.detach()
        if not bool(T == 1):
            pred = fitted.likelihood.temper(pred, T)
    check_computed_finite(pred.mean, "predictive mean (differentiable)")
    check_computed_finite(pred.variance, "predictive variance (differentiable)")
    return pred
