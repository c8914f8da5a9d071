"""Bernoulli likelihood on one logit: binary classification."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import DEFAULT_MEMORY_BUDGET, Likelihood, Link, shape_str
from ._base import (
    ClassLikelihood,
    Prediction,
    check_batch_size,
    class_positions,
    sample_moments,
)

if TYPE_CHECKING:  # the posteriors package imports this one
    from ..posteriors._output import OutputCovariance


class Bernoulli(ClassLikelihood):
    """Bernoulli likelihood on a single logit ``(B, 1)``; targets 0/1 of shape ``(B,)``."""

    kind = Likelihood.BINARY

    # -- targets ---------------------------------------------------------------------------

    def check_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Return float targets of shape ``(B, 1)``.

        Raises:
            ValueError: If the model has more than one output, or targets are not 0/1.
        """
        loc = f" ({where})" if where else ""
        B, C = f.shape
        if C != 1:
            raise ValueError(
                f"binary likelihood needs a model with 1 output (a logit); got {C} outputs. "
                "Use likelihood='classification' for several classes."
            )
        if y.shape not in ((B,), (B, 1)):
            raise ValueError(
                f"binary targets{loc} must have shape ({B},) or ({B}, 1); got {shape_str(y.shape)}."
            )
        y = y.reshape(B, 1).to(f.dtype)
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(f"binary targets{loc} must be 0 or 1; got other values.")
        return y

    def position_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Targets ``(B, T)`` (or ``(B, T, 1)``) of outputs ``(B, T, 1)`` as ``(B·T,)``.

        Returns:
            The targets, shape ``(B·T,)``.

        Raises:
            ValueError: If ``y`` has neither shape.
        """
        return class_positions(self.kind.value, f, y, where)

    def targets_from_outputs(self, f: Tensor) -> Tensor:
        """Targets made from logits ``(B, 1)``: 1 where the logit is positive, shape ``(B, 1)``."""
        return (f > 0).to(f.dtype)

    # -- loss and curvature ----------------------------------------------------------------

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed binary cross-entropy, shape ``()``."""
        return F.binary_cross_entropy_with_logits(f, y, reduction="sum")

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed binary cross-entropy, shape ``()``."""
        return F.binary_cross_entropy_with_logits(f, y, reduction="sum")

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∂ℓ/∂f = σ(f) - y, shape ``(B, 1)``."""
        return torch.sigmoid(f) - y

    def hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """``p(1-p)``, shape ``(B, 1, 1)``."""
        p = torch.sigmoid(f)
        return (p * (1 - p)).unsqueeze(-1)

    def sqrt_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """``√(p(1-p))``, shape ``(B, 1, 1)``."""
        return self.hessian(f).sqrt()

    def hessian_matvec(self, f: Tensor, u: Tensor, y: Tensor | None = None) -> Tensor:
        """``p(1-p) u``, shapes ``(B, 1)``."""
        p = torch.sigmoid(f)
        return p * (1 - p) * u

    def hessian_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """``p(1-p)`` per row of ``f`` ``(n, 1)``, shape ``(n, 1)``."""
        p = torch.sigmoid(f)
        return p * (1 - p)

    def hessian_sum(self, f: Tensor, w: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\sum_n w_n p_n(1-p_n)` for logits ``(n, 1)``, weights ``(n, 1)``, shape ``(1, 1)``."""
        p = torch.sigmoid(f)
        return (w * p * (1 - p)).sum(0, keepdim=True)

    def neg_scores(self, f: Tensor, S: int, generator: torch.Generator | None) -> Tensor:
        r""":math:`p - \hat y` for S labels drawn per row of ``f`` ``(n, 1)``.

        Returns:
            Shape ``(S, n, 1)``.
        """
        n, C = f.shape
        p = torch.sigmoid(f)
        u = torch.rand(S, n, C, dtype=f.dtype, device=f.device, generator=generator)
        return p - (u < p).to(f.dtype)

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Draw 0/1 targets, shape ``(B, 1)``."""
        return torch.bernoulli(torch.sigmoid(f), generator=generator)

    # -- predictive ------------------------------------------------------------------------

    def response(self, f: Tensor) -> Tensor:
        """Probability of class 1, sigmoid(f), shape of ``f``."""
        return torch.sigmoid(f)

    def glm_predictive(
        self,
        mean: Tensor,
        cov: OutputCovariance,
        *,
        link: Link,
        sigma: Tensor | float = 1.0,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> Prediction:
        r"""Probability of class 1 under a logit :math:`N(\mu, \Sigma_f)` through the link.

        Args:
            mean: Logits at θ*, shape ``(N, 1)``.
            cov: Their variances, a factored output covariance over the N rows.
            link: ``probit``, ``bridge``, ``bridge_norm`` or ``mc``.
            sigma: Ignored.
            n_samples: S for the ``mc`` link.
            generator: Random generator for the ``mc`` link.
            memory_budget: Bytes for the draws of the ``mc`` link.

        Returns:
            The :class:`Prediction`, shapes ``(N, 1)``.
        """
        # the links work on the posteriors' output covariances, whose package imports this one
        from ..links import link_predictive

        return link_predictive(
            link,
            mean,
            cov,
            binary=True,
            n_samples=n_samples,
            generator=generator,
            memory_budget=memory_budget,
        )

    def sample_predictive(self, out: Tensor, sigma: Tensor | float = 1.0) -> Prediction:
        """Mean and sample variance of sigmoid probabilities of logits ``(S, B, 1)``.

        Returns:
            The :class:`Prediction`, shapes ``(B, 1)``.
        """
        return sample_moments(self.response(out))

    def predictive_nll(self, pred: Prediction, y: Tensor) -> Tensor:
        r"""Per-point :math:`-y\log\bar p - (1-y)\log(1-\bar p)`, shape ``(B,)``.

        Returns:
            The NLL of each point, shape ``(B,)``.

        Raises:
            ValueError: If ``y`` does not match the prediction's batch size.
        """
        check_batch_size(pred, y)
        tiny = torch.finfo(pred.mean.dtype).tiny
        p = pred.mean[:, 0]
        t = y.reshape(-1).to(p.dtype)
        return -(t * torch.log(p.clamp_min(tiny)) + (1 - t) * torch.log((1 - p).clamp_min(tiny)))

    def temper(self, pred: Prediction, temperature: Tensor | float) -> Prediction:
        r""":math:`p_T = \sigma(\mathrm{logit}(\bar p)/T)`, variance capped at :math:`p_T(1-p_T)`."""
        p = pred.mean
        T = torch.as_tensor(temperature, dtype=p.dtype, device=p.device)
        tiny = torch.finfo(p.dtype).tiny
        logit = torch.log(p.clamp_min(tiny)) - torch.log((1 - p).clamp_min(tiny))
        p_t = torch.sigmoid(logit / T)
        return Prediction(p_t, torch.minimum(pred.variance, p_t * (1 - p_t)))

    # -- fit -------------------------------------------------------------------------------

    def fit_metric_sum(self, F: Tensor, y: Tensor) -> Tensor:
        """Correct sign predictions of logits ``(S, B, 1)`` for 0/1 targets ``(B, 1)``, ``(S,)``."""
        return ((F > 0).to(F.dtype) == y).sum((-2, -1)).to(F.dtype)
