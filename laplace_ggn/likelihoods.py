r"""Observation models: negative log likelihood, output Hessian and its square root.

Each likelihood works on network outputs ``f`` of shape ``(B, C)``.  The output Hessian
:math:`\Lambda_n = \nabla^2_f(-\log p(y_n \mid f_n))` does not depend on ``y`` for these models,
and each has a factor :math:`L_n` with :math:`L_n L_n^\top = \Lambda_n`:

- Gaussian with noise σ: :math:`\Lambda = I/\sigma^2`, :math:`L = I/\sigma`.
- Softmax categorical: :math:`\Lambda = \mathrm{diag}(p) - p p^\top`,
  :math:`L = \mathrm{diag}(\sqrt p) - p \sqrt p^\top`.
- Bernoulli with one logit: :math:`\Lambda = p(1-p)`, :math:`L = \sqrt{p(1-p)}`.

Curvature is always collected at σ = 1 ("unit" Hessian); the posterior rescales it by
:math:`1/(\tau\sigma^2)` so that σ and the temperature τ can be tuned without a new pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import Likelihood, shape_str

__all__ = [
    "Gaussian",
    "Categorical",
    "Bernoulli",
    "FitStatistics",
    "get_likelihood",
]


@dataclass(frozen=True)
class FitStatistics:
    """Sufficient statistics of the training loss at θ*, enough to recompute ℓ(θ*) for any σ.

    Attributes:
        n_data: Number of training points N.
        n_outputs: Number of outputs C.
        loss_sum: Summed NLL (classification) or summed squared error Σ‖y - f‖² (regression).
    """

    n_data: int
    n_outputs: int
    loss_sum: float


class Gaussian:
    r"""Gaussian likelihood :math:`y \sim N(f, \sigma^2 I)`; targets of the output's shape."""

    kind = Likelihood.REGRESSION

    def check_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Return ``y`` reshaped to ``f``'s shape ``(B, C)``.

        Raises:
            ValueError: If ``y`` does not have the shape of ``f`` (or ``(B,)`` when C = 1).
        """
        loc = f" ({where})" if where else ""
        if not y.is_floating_point():
            y = y.to(f.dtype)
        if y.shape == f.shape:
            return y
        if f.shape[1] == 1 and y.shape == f.shape[:1]:
            return y.unsqueeze(1)
        raise ValueError(
            f"regression targets{loc} must have the output's shape {shape_str(f.shape)}"
            + (f" or ({f.shape[0]},)" if f.shape[1] == 1 else "")
            + f"; got {shape_str(y.shape)}."
        )

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed squared error Σ‖y - f‖², shape ``()``."""
        return ((y - f) ** 2).sum()

    @staticmethod
    def nll_from_statistics(stats: FitStatistics, sigma: Tensor) -> Tensor:
        r"""Summed NLL :math:`\frac{SSE}{2\sigma^2} + \frac{NC}{2}\log(2\pi\sigma^2)`, differentiable in σ."""
        nc = stats.n_data * stats.n_outputs
        return 0.5 * stats.loss_sum / sigma**2 + 0.5 * nc * torch.log(2 * math.pi * sigma**2)

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed negative log likelihood, shape ``()``."""
        sigma = torch.as_tensor(sigma, dtype=f.dtype, device=f.device)
        n = f.numel()
        return 0.5 * ((y - f) ** 2).sum() / sigma**2 + 0.5 * n * torch.log(2 * math.pi * sigma**2)

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∂ℓ/∂f at σ = 1, shape ``(B, C)``."""
        return f - y

    def hessian(self, f: Tensor) -> Tensor:
        """Unit output Hessian ``I``, shape ``(B, C, C)``."""
        B, C = f.shape
        return torch.eye(C, dtype=f.dtype, device=f.device).expand(B, C, C)

    def sqrt_hessian(self, f: Tensor) -> Tensor:
        """Factor ``L`` with ``L Lᵀ = Λ`` (σ = 1), shape ``(B, C, C)``."""
        return self.hessian(f)

    def hessian_matvec(self, f: Tensor, u: Tensor) -> Tensor:
        """``Λ_n u_n`` for each n, shapes ``(B, C)``."""
        return u

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Draw ``y ~ N(f, σ² I)``, shape ``(B, C)``."""
        eps = torch.randn(f.shape, dtype=f.dtype, device=f.device, generator=generator)
        return f + sigma * eps


class Categorical:
    """Softmax categorical likelihood; targets are class indices ``(B,)`` in ``[0, C)``."""

    kind = Likelihood.CLASSIFICATION

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

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed cross-entropy, shape ``()``."""
        return F.cross_entropy(f, y, reduction="sum")

    @staticmethod
    def nll_from_statistics(stats: FitStatistics, sigma: Tensor) -> Tensor:
        """Summed NLL (σ plays no role)."""
        return torch.as_tensor(stats.loss_sum, dtype=sigma.dtype, device=sigma.device)

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed cross-entropy, shape ``()``."""
        return F.cross_entropy(f, y, reduction="sum")

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∂ℓ/∂f = softmax(f) - onehot(y), shape ``(B, C)``."""
        return torch.softmax(f, -1) - F.one_hot(y, f.shape[1]).to(f.dtype)

    def hessian(self, f: Tensor) -> Tensor:
        """``diag(p) - p pᵀ``, shape ``(B, C, C)``."""
        p = torch.softmax(f, -1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)

    def sqrt_hessian(self, f: Tensor) -> Tensor:
        """``diag(√p) - p √pᵀ``, shape ``(B, C, C)``; ``L Lᵀ = Λ``."""
        p = torch.softmax(f, -1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1)

    def hessian_matvec(self, f: Tensor, u: Tensor) -> Tensor:
        """``Λ_n u_n = p ⊙ u - p (pᵀu)``, shapes ``(B, C)``."""
        p = torch.softmax(f, -1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Draw labels from softmax(f), shape ``(B,)``."""
        p = torch.softmax(f, -1)
        return torch.multinomial(p, 1, generator=generator)[:, 0]


class Bernoulli:
    """Bernoulli likelihood on a single logit ``(B, 1)``; targets 0/1 of shape ``(B,)``."""

    kind = Likelihood.BINARY

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

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed binary cross-entropy, shape ``()``."""
        return F.binary_cross_entropy_with_logits(f, y, reduction="sum")

    @staticmethod
    def nll_from_statistics(stats: FitStatistics, sigma: Tensor) -> Tensor:
        """Summed NLL (σ plays no role)."""
        return Categorical.nll_from_statistics(stats, sigma)

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed binary cross-entropy, shape ``()``."""
        return F.binary_cross_entropy_with_logits(f, y, reduction="sum")

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∂ℓ/∂f = σ(f) - y, shape ``(B, 1)``."""
        return torch.sigmoid(f) - y

    def hessian(self, f: Tensor) -> Tensor:
        """``p(1-p)``, shape ``(B, 1, 1)``."""
        p = torch.sigmoid(f)
        return (p * (1 - p)).unsqueeze(-1)

    def sqrt_hessian(self, f: Tensor) -> Tensor:
        """``√(p(1-p))``, shape ``(B, 1, 1)``."""
        return self.hessian(f).sqrt()

    def hessian_matvec(self, f: Tensor, u: Tensor) -> Tensor:
        """``p(1-p) u``, shapes ``(B, 1)``."""
        p = torch.sigmoid(f)
        return p * (1 - p) * u

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Draw 0/1 targets, shape ``(B, 1)``."""
        return torch.bernoulli(torch.sigmoid(f), generator=generator)


def get_likelihood(kind: Likelihood) -> Gaussian | Categorical | Bernoulli:
    """Return the likelihood object for a :class:`~laplace_ggn._checks.Likelihood` member."""
    return {
        Likelihood.REGRESSION: Gaussian,
        Likelihood.CLASSIFICATION: Categorical,
        Likelihood.BINARY: Bernoulli,
    }[kind]()
