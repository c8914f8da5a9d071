r"""Gaussian likelihood :math:`y \sim N(f, \sigma^2 I)`: regression."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._checks import DEFAULT_MEMORY_BUDGET, Likelihood, Link, PredictMethod, shape_str
from ._base import (
    BuiltinLikelihood,
    FitStatistics,
    Prediction,
    check_position_shapes,
    gaussian_predictive_nll,
    no_link,
    sample_moments,
)

if TYPE_CHECKING:  # the posteriors package imports this one
    from ..posteriors._output import OutputCovariance


class Gaussian(BuiltinLikelihood):
    r"""Gaussian likelihood :math:`y \sim N(f, \sigma^2 I)`; targets of the output's shape.

    The observation noise σ is a parameter (``has_noise``); the predictive is Gaussian, so it
    needs no link and no predictive temperature (σ calibrates it).
    """

    kind = Likelihood.REGRESSION
    has_noise = True
    predicts_probabilities = False
    metric_name = "RMSE"

    # -- targets ---------------------------------------------------------------------------

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

    def position_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Targets of outputs ``(B, T, C)`` as one row per position, ``(B·T, C)`` or ``(B·T,)``.

        Returns:
            The targets, shape ``(B·T, C)`` or ``(B·T,)``.

        Raises:
            ValueError: If ``y`` is neither ``(B, T, C)`` nor (for C = 1) ``(B, T)``.
        """
        C = f.shape[-1]
        shapes = [tuple(f.shape)] + ([tuple(f.shape[:-1])] if C == 1 else [])
        check_position_shapes(self.kind.value, f, y, shapes, where)
        return y.reshape(-1, C) if y.shape == f.shape else y.reshape(-1)

    def ignored(self, y: Tensor, n: int, ignore_index: int | None) -> None:
        """Regression targets are never skipped.

        Returns:
            ``None``.
        """
        return None

    def targets_from_outputs(self, f: Tensor) -> Tensor:
        """Targets made from outputs ``(B, C)``: the outputs themselves."""
        return f

    # -- loss and curvature ----------------------------------------------------------------

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed squared error Σ‖y - f‖², shape ``()``."""
        return ((y - f) ** 2).sum()

    @staticmethod
    def nll_from_statistics(stats: FitStatistics, sigma: Tensor) -> Tensor:
        r"""Summed NLL :math:`\frac{SSE}{2\sigma^2} + \frac{NC}{2}\log(2\pi\sigma^2)`, differentiable in σ."""
        if sigma.ndim:  # one σ per output: Σ_d SSE_d/(2σ_d²) + (N/2) log(2πσ_d²)
            if stats.output_loss_sums is None or len(stats.output_loss_sums) != sigma.shape[0]:
                raise ValueError(
                    f"sigma_noise of shape {tuple(sigma.shape)} needs the squared error of each "
                    "output, kept by a fit with sigma_noise of that shape; got a fit without it."
                )
            sse = torch.as_tensor(stats.output_loss_sums, dtype=sigma.dtype, device=sigma.device)
            n = stats.n_data
            return (0.5 * sse / sigma**2 + 0.5 * n * torch.log(2 * math.pi * sigma**2)).sum()
        nc = stats.n_data * stats.n_outputs
        return 0.5 * stats.loss_sum / sigma**2 + 0.5 * nc * torch.log(2 * math.pi * sigma**2)

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed negative log likelihood (σ a scalar or one per output), shape ``()``."""
        s2 = torch.as_tensor(sigma, dtype=f.dtype, device=f.device) ** 2
        return (0.5 * (y - f) ** 2 / s2 + 0.5 * torch.log(2 * math.pi * s2)).expand_as(f).sum()

    def sigma2(self, sigma: Tensor | float) -> Tensor | float:
        """σ², the factor the unit output Hessian is divided by."""
        return sigma**2

    def curvature_scale(self, sigma: Tensor, temperature: Tensor | float) -> Tensor:
        r"""Factor :math:`1/(\tau\sigma^2)` of the unit-σ GGN in the posterior precision."""
        return 1.0 / (temperature * sigma**2)

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∂ℓ/∂f at σ = 1, shape ``(B, C)``."""
        return f - y

    def hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """Unit output Hessian ``I``, shape ``(B, C, C)``."""
        B, C = f.shape
        return torch.eye(C, dtype=f.dtype, device=f.device).expand(B, C, C)

    def sqrt_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """Factor ``L`` with ``L Lᵀ = Λ`` (σ = 1), shape ``(B, C, C)``."""
        return self.hessian(f)

    def hessian_matvec(self, f: Tensor, u: Tensor, y: Tensor | None = None) -> Tensor:
        """``Λ_n u_n`` for each n, shapes ``(B, C)``."""
        return u

    def hessian_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """Diagonal of each unit output Hessian: ones, shape ``(n, C)``."""
        return torch.ones_like(f)

    def hessian_sum(self, f: Tensor, w: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\sum_n w_n \Lambda_n = (\sum_n w_n) I` for outputs ``(n, C)``, weights ``(n, 1)``."""
        C = f.shape[-1]
        return w.sum() * torch.eye(C, dtype=f.dtype, device=f.device)

    def neg_scores(self, f: Tensor, S: int, generator: torch.Generator | None) -> Tensor:
        r""":math:`-\nabla_f \log p(\hat y \mid f)` at σ = 1 for S draws per row of ``f`` ``(n, C)``.

        :math:`\hat y = f + \varepsilon`, so the negative score is :math:`-\varepsilon`.

        Returns:
            Shape ``(S, n, C)``.
        """
        n, C = f.shape
        return -torch.randn(S, n, C, dtype=f.dtype, device=f.device, generator=generator)

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Draw ``y ~ N(f, σ² I)``, shape ``(B, C)``."""
        eps = torch.randn(f.shape, dtype=f.dtype, device=f.device, generator=generator)
        return f + sigma * eps

    # -- predictive ------------------------------------------------------------------------

    def check_link(self, method: PredictMethod, link: Link | None) -> tuple[PredictMethod, None]:
        """The Gaussian predictive has no link: ``None`` and the default ``probit`` are ignored.

        Returns:
            ``(method, None)``.

        Raises:
            ValueError: If another link is given.
        """
        return no_link(self.name, method, link)

    def response(self, f: Tensor) -> Tensor:
        """Mean of y given the outputs: ``f`` itself."""
        return f

    def glm_predictive(
        self,
        mean: Tensor,
        cov: OutputCovariance,
        *,
        link: Link | None = None,
        sigma: Tensor | float = 1.0,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> Prediction:
        r"""Predictive of y under :math:`f \sim N(\mu, \Sigma_f)`: mean μ, variance diag(Σ_f) + σ².

        Args:
            mean: Outputs at θ*, shape ``(N, C)``.
            cov: Their covariances, a factored output covariance over the N rows.
            link: Ignored.
            sigma: σ.
            n_samples: Ignored.
            generator: Ignored.
            memory_budget: Ignored.

        Returns:
            The :class:`Prediction`, shapes ``(N, C)``.
        """
        s = torch.as_tensor(sigma, dtype=mean.dtype, device=mean.device)
        return Prediction(mean, cov.diagonal() + s**2)

    def sample_predictive(self, out: Tensor, sigma: Tensor | float = 1.0) -> Prediction:
        """Mean and sample variance of outputs ``(S, B, C)`` of sampled networks, plus σ².

        Returns:
            The :class:`Prediction`, shapes ``(B, C)``.
        """
        pred = sample_moments(out)
        s = torch.as_tensor(sigma, dtype=out.dtype, device=out.device)
        return Prediction(pred.mean, pred.variance + s**2)

    def predictive_nll(self, pred: Prediction, y: Tensor) -> Tensor:
        r"""Per-point :math:`\sum_c \tfrac12\log(2\pi v_c) + (y_c - m_c)^2 / (2 v_c)`, shape ``(B,)``.

        Returns:
            The NLL of each point, shape ``(B,)``.

        Raises:
            ValueError: If ``y`` does not match the prediction's batch size.
        """
        return gaussian_predictive_nll(pred, y)

    def temper(self, pred: Prediction, temperature: Tensor | float) -> Prediction:
        """A Gaussian predictive is not tempered (σ calibrates it): ``pred`` unchanged."""
        return pred

    # -- fit -------------------------------------------------------------------------------

    def fit_metric_sum(self, F: Tensor, y: Tensor) -> Tensor:
        """Summed squared error of outputs ``(S, B, C)`` against targets ``(B, C)``, shape ``(S,)``."""
        return ((F - y) ** 2).sum((-2, -1))

    def fit_metric(self, total: Tensor, n_data: int, n_outputs: int) -> Tensor:
        """RMSE from summed squared errors over N points of C outputs."""
        return (total / (n_data * n_outputs)).sqrt()
