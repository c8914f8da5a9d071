"""Softmax categorical likelihood: classification into C classes."""

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


class Categorical(ClassLikelihood):
    """Softmax categorical likelihood; targets are class indices ``(B,)`` in ``[0, C)``."""

    kind = Likelihood.CLASSIFICATION

    # -- targets ---------------------------------------------------------------------------

    def check_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Return integer labels of shape ``(B,)`` and dtype ``torch.long``.

        Labels of any integer dtype (and ``bool``, as classes 0 and 1) are accepted, as are
        floating labels holding whole numbers.

        Raises:
            ValueError: If labels are not finite, not integral, of the wrong shape, or out of
                range.
        """
        loc = f" ({where})" if where else ""
        B, C = f.shape
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.shape != (B,):
            raise ValueError(
                f"classification targets{loc} must be class indices of shape ({B},); "
                f"got {shape_str(y.shape)}. One-hot targets are not accepted: use y.argmax(-1)."
            )
        if y.is_floating_point():
            finite = torch.isfinite(y)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(y).sum())
                raise ValueError(
                    f"classification targets{loc} must be finite class indices; got {n_nan} NaN "
                    f"and {int((~finite).sum()) - n_nan} Inf values."
                )
            if not bool((y == y.round()).all()):
                raise ValueError(
                    f"classification targets{loc} must be integer class indices; got "
                    f"non-integral values of dtype {y.dtype}."
                )
            y = y.long()
        elif y.dtype != torch.long:
            y = y.long()  # int8/16/32, uint8, bool: the losses need int64 indices
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
            raise ValueError(
                f"classification targets{loc} must lie in [0, {C - 1}] for a model with {C} "
                f"outputs; got values in [{int(y.min())}, {int(y.max())}]."
            )
        return y

    def position_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Targets ``(B, T)`` (or ``(B, T, 1)``) of outputs ``(B, T, C)`` as ``(B·T,)``.

        Returns:
            The targets, shape ``(B·T,)``.

        Raises:
            ValueError: If ``y`` has neither shape.
        """
        return class_positions(self.kind.value, f, y, where)

    def targets_from_outputs(self, f: Tensor) -> Tensor:
        """Targets made from outputs ``(B, C)``: the arg-max class, shape ``(B,)``."""
        return f.argmax(-1)

    # -- loss and curvature ----------------------------------------------------------------

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed cross-entropy, shape ``()``."""
        return F.cross_entropy(f, y, reduction="sum")

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed cross-entropy, shape ``()``."""
        return F.cross_entropy(f, y, reduction="sum")

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∂ℓ/∂f = softmax(f) - onehot(y), shape ``(B, C)``."""
        return torch.softmax(f, -1) - F.one_hot(y, f.shape[1]).to(f.dtype)

    def hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """``diag(p) - p pᵀ``, shape ``(B, C, C)``."""
        p = torch.softmax(f, -1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)

    def sqrt_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """``diag(√p) - p √pᵀ``, shape ``(B, C, C)``; ``L Lᵀ = Λ``."""
        p = torch.softmax(f, -1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1)

    def hessian_matvec(self, f: Tensor, u: Tensor, y: Tensor | None = None) -> Tensor:
        """``Λ_n u_n = p ⊙ u - p (pᵀu)``, shapes ``(B, C)``."""
        p = torch.softmax(f, -1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def hessian_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """``p - p²`` per row of ``f`` ``(n, C)``, shape ``(n, C)``."""
        p = torch.softmax(f, -1)
        return p - p * p

    def hessian_sum(self, f: Tensor, w: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\sum_n w_n (\mathrm{diag}(p_n) - p_n p_n^\top)`, weights ``(n, 1)``, shape ``(C, C)``."""
        p = torch.softmax(f, -1)
        return torch.diag((w * p).sum(0)) - (w * p).T @ p

    def neg_scores(self, f: Tensor, S: int, generator: torch.Generator | None) -> Tensor:
        r""":math:`p - \mathrm{onehot}(\hat y)` for S labels drawn per row of ``f`` ``(n, C)``.

        Labels are drawn by the inverse CDF of softmax(f).

        Returns:
            Shape ``(S, n, C)``.
        """
        n, C = f.shape
        p = torch.softmax(f, -1)
        u = torch.rand(n, S, dtype=f.dtype, device=f.device, generator=generator)
        y = torch.searchsorted(p.cumsum(-1), u).clamp_max(C - 1)  # (n, S)
        g = p.unsqueeze(0).repeat(S, 1, 1)
        g.scatter_add_(
            -1, y.T.unsqueeze(-1), torch.full((S, n, 1), -1.0, dtype=f.dtype, device=f.device)
        )
        return g

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Draw labels from softmax(f), shape ``(B,)``."""
        p = torch.softmax(f, -1)
        return torch.multinomial(p, 1, generator=generator)[:, 0]

    # -- predictive ------------------------------------------------------------------------

    def response(self, f: Tensor) -> Tensor:
        """Class probabilities softmax(f), shape of ``f``."""
        return torch.softmax(f, dim=-1)

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
        r"""Class probabilities under logits :math:`N(\mu, \Sigma_f)` through the link.

        Args:
            mean: Logits at θ*, shape ``(N, C)``.
            cov: Their covariances, a factored output covariance over the N rows.
            link: ``probit``, ``bridge``, ``bridge_norm`` or ``mc``.
            sigma: Ignored.
            n_samples: S for the ``mc`` link.
            generator: Random generator for the ``mc`` link.
            memory_budget: Bytes for the draws of the ``mc`` link.

        Returns:
            The :class:`Prediction`, shapes ``(N, C)``.
        """
        # the links work on the posteriors' output covariances, whose package imports this one
        from ..links import link_predictive

        return link_predictive(
            link,
            mean,
            cov,
            binary=False,
            n_samples=n_samples,
            generator=generator,
            memory_budget=memory_budget,
        )

    def sample_predictive(self, out: Tensor, sigma: Tensor | float = 1.0) -> Prediction:
        """Mean and sample variance of softmax probabilities of outputs ``(S, B, C)``.

        Returns:
            The :class:`Prediction`, shapes ``(B, C)``.
        """
        return sample_moments(self.response(out))

    def predictive_nll(self, pred: Prediction, y: Tensor) -> Tensor:
        r"""Per-point :math:`-\log \bar p_{y}` for class indices ``y`` ``(B,)``, shape ``(B,)``.

        Returns:
            The NLL of each point, shape ``(B,)``.

        Raises:
            ValueError: If ``y`` does not match the prediction's batch size.
        """
        check_batch_size(pred, y)
        tiny = torch.finfo(pred.mean.dtype).tiny
        p = pred.mean.gather(1, y.long().reshape(-1, 1))[:, 0]
        return -torch.log(p.clamp_min(tiny))

    def temper(self, pred: Prediction, temperature: Tensor | float) -> Prediction:
        r""":math:`p_T = \mathrm{softmax}(\log\bar p / T)`, variance capped at :math:`p_T(1-p_T)`."""
        p = pred.mean
        T = torch.as_tensor(temperature, dtype=p.dtype, device=p.device)
        tiny = torch.finfo(p.dtype).tiny
        p_t = torch.softmax(torch.log(p.clamp_min(tiny)) / T, dim=-1)
        return Prediction(p_t, torch.minimum(pred.variance, p_t * (1 - p_t)))

    # -- fit -------------------------------------------------------------------------------

    def fit_metric_sum(self, F: Tensor, y: Tensor) -> Tensor:
        """Correct arg-max predictions of outputs ``(S, B, C)`` for labels ``(B,)``, shape ``(S,)``."""
        return (F.argmax(-1) == y).sum(-1).to(F.dtype)
