r"""The linearised (GLM) predictive: outputs at θ* and their covariances, mapped by the likelihood.

:math:`f(x) \sim N(f(x, \theta_*), J(x) \Sigma J(x)^\top)`.  The covariances come in the
factored forms of :mod:`laplace_ggn.posteriors._output`: from the features of a Linear head
without Jacobians, or from Jacobians computed in chunks under the memory budget.  The
likelihood maps them to its predictive (regression: + σ²; classification: a link of
:mod:`laplace_ggn.links`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import DEFAULT_MEMORY_BUDGET, Likelihood, Link, check_computed_finite, check_memory
from .batches import batch_size_of
from .likelihoods import LikelihoodModel, Prediction, get_likelihood
from .posteriors._output import DenseOutputCovariance, OutputCovariance

__all__ = [
    "check_dense_covariance",
    "functional_moments",
    "glm_from_moments",
    "glm_predictive",
    "output_covariance",
]


def check_dense_covariance(N: int, C: int, dtype: torch.dtype, budget: int, hint: str = "") -> None:
    """Refuse dense output covariances ``(N, C, C)`` over the memory budget, before forming them.

    Raises:
        ValueError: Naming the size and the way out.
    """
    size = torch.empty((), dtype=dtype).element_size()
    check_memory(
        N * C * C * size,
        budget,
        f"the dense output covariances J Σ Jᵀ of {N} rows (shape ({N}, {C}, {C}))",
        f"Pass fewer inputs per call{hint}, or raise memory_budget=.",
    )


def glm_from_moments(
    f: Tensor,
    cov: Tensor | OutputCovariance,
    *,
    likelihood: Likelihood | LikelihoodModel,
    link: Link | None,
    sigma_noise: Tensor | float = 1.0,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Prediction:
    r"""Map the linearised outputs :math:`N(f, \Sigma_f)` to the predictive.

    Regression: mean ``f``, variance :math:`\mathrm{diag}(\Sigma_f) + \sigma^2`.
    Classification and binary: the link (see the module docstring).  Outputs ``(B, T, C)``
    are B·T independent Gaussians over C logits.

    Args:
        f: Outputs at θ*, shape ``(B, C)`` or ``(B, T, C)``.
        cov: Functional covariances :math:`J \Sigma J^\top`, shape ``(*f.shape, C)``, or a
            factored :class:`~laplace_ggn.posteriors._output.OutputCovariance` over the
            ``f.numel() / C`` rows of ``f``.
        likelihood: The likelihood.
        link: The link or its name (ignored for regression).
        sigma_noise: σ (regression).
        n_samples: S for the ``mc`` link.
        generator: Random generator for the ``mc`` link.
        memory_budget: Bytes for the draws of the ``mc`` link.

    Returns:
        The :class:`Prediction`, shapes of ``f``.
    """
    link = None if link is None else Link(link)  # a name: not silently the mc branch
    C = f.shape[-1]
    rows = f.reshape(-1, C)
    op = DenseOutputCovariance(cov.reshape(-1, C, C)) if isinstance(cov, Tensor) else cov
    pred = get_likelihood(likelihood).glm_predictive(
        rows,
        op,
        link=link,
        sigma=sigma_noise,
        n_samples=n_samples,
        generator=generator,
        memory_budget=memory_budget,
    )
    return pred.reshape(*f.shape[:-1], pred.mean.shape[-1])


def output_covariance(
    fmodel, posterior, x: object, *, n_outputs: int, head=None
) -> tuple[Tensor, OutputCovariance]:
    r"""Outputs at θ* and :math:`J(x) \Sigma J(x)^\top` per position, in factored form.

    With a :class:`~laplace_ggn.head.LinearHead` (the subset is one Linear layer whose output
    is the model output) and a posterior with ``linear_head_covariance``, the covariances
    come from the features entering the layer: no Jacobian, nothing differentiated through
    the body, memory independent of C·P.  Otherwise (or when the head check fails for this
    call) Jacobians are computed in chunks and go through ``posterior.functional_covariance``.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        posterior: Any posterior structure.
        x: Model input of batch size B.
        n_outputs: C.
        head: The subset's Linear head, or ``None``.

    Returns:
        ``(f, cov)``: outputs ``(B, C)`` or ``(B, T, C)`` and the covariances of the
        N = B (or B·T) rows.

    Raises:
        ValueError: If the Jacobians are needed and one sample's, or the dense covariances of
            the N rows, exceed ``fmodel.memory_budget`` (checked before they are formed).
    """
    first = next(iter(fmodel.chunks(x, 1)), None)
    if first is None:  # an input of 0 rows
        z = fmodel.theta.new_zeros(0, n_outputs)
        return z, DenseOutputCovariance(z.new_zeros(0, n_outputs, n_outputs))
    if head is not None and hasattr(posterior, "linear_head_covariance"):
        got = head.features(x)
        if got is not None:
            phi, f = got
            return f, posterior.linear_head_covariance(phi, head.index)
    P = fmodel.n_params
    f0 = fmodel.forward(first)
    M, C = f0[0].numel(), f0.shape[-1]  # M = T·C for outputs (B, T, C)
    elt = fmodel.theta.element_size()
    check_memory(
        M * P * elt,
        fmodel.memory_budget,
        f"one sample's Jacobian J(x) (M={M} outputs x P={P} parameters)",
        "The subset is not one Linear output layer, whose covariances would come from its "
        "features; pass subset='last_layer', use method='nn', or raise memory_budget=.",
    )
    check_dense_covariance(batch_size_of(x) * (M // C), C, fmodel.dtype, fmodel.memory_budget)
    per_sample = 4 * M * P * elt
    fs, covs = [], []
    for xc in fmodel.chunks(x, fmodel.chunk_size(per_sample)):
        J, f = fmodel.jacobians(xc, n_outputs=M)
        fs.append(f)
        covs.append(posterior.functional_covariance(J.reshape(-1, f.shape[-1], P)))
    return torch.cat(fs), DenseOutputCovariance(torch.cat(covs))


def functional_moments(
    fmodel, posterior, x: object, *, n_outputs: int, head=None
) -> tuple[Tensor, Tensor]:
    r"""Outputs at θ* and :math:`J(x) \Sigma J(x)^\top` as dense matrices.

    Σ is never formed: see :func:`output_covariance`.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        posterior: Any posterior structure.
        x: Model input of batch size B.
        n_outputs: C.
        head: The subset's Linear head, or ``None``.

    Returns:
        ``(f, cov)`` of shapes ``(B, C)`` and ``(B, C, C)`` (``(B, T, C)`` and
        ``(B, T, C, C)`` for sequence outputs).

    Raises:
        ValueError: If the dense covariances exceed ``fmodel.memory_budget``.
    """
    f, op = output_covariance(fmodel, posterior, x, n_outputs=n_outputs, head=head)
    C = f.shape[-1]
    check_dense_covariance(f.numel() // max(C, 1), C, f.dtype, fmodel.memory_budget)
    return f, op.to_dense().reshape(*f.shape, C)


def glm_predictive(
    fmodel,
    posterior,
    x: object,
    *,
    likelihood: Likelihood | LikelihoodModel,
    link: Link | None,
    sigma_noise: Tensor | float = 1.0,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    n_outputs: int,
    head=None,
) -> Prediction:
    """Linearised predictive at inputs ``x`` (see :func:`glm_from_moments`).

    Returns:
        The :class:`Prediction`, shapes ``(B, C)`` (``(B, T, C)`` for sequence outputs).

    Raises:
        RuntimeError: If the functional covariance is not finite.
    """
    with torch.no_grad():  # the Jacobians switch autograd on for themselves
        f, cov = output_covariance(fmodel, posterior, x, n_outputs=n_outputs, head=head)
        check_computed_finite(
            cov.M if isinstance(cov, DenseOutputCovariance) else cov.diagonal(),
            "functional covariance J Σ Jᵀ (GLM predictive)",
        )
        return glm_from_moments(
            f,
            cov,
            likelihood=likelihood,
            link=link,
            sigma_noise=sigma_noise,
            n_samples=n_samples,
            generator=generator,
            memory_budget=fmodel.memory_budget,
        )
