r"""Heteroscedastic Gaussian :math:`y \sim N(\mu(x), \sigma^2(x))`: the network predicts the noise.

Outputs ``(B, 2·D)``: the first D columns are the mean μ, the last D the log-variance
:math:`s = \log\sigma^2` (the layout of a model trained with ``nn.GaussianNLLLoss`` on
``(mu, logvar.exp())``).  Per output column and sample,

.. math::
    \ell = \tfrac12\big(\log 2\pi + s + (y - \mu)^2 e^{-s}\big), \qquad
    \Lambda = \mathrm{diag}\big(e^{-s},\ \tfrac12\big),

the Fisher information in :math:`(\mu, s)` (the expected Hessian; the Hessian itself,
:math:`\begin{smallmatrix}e^{-s} & r e^{-s}\\ r e^{-s} & r^2 e^{-s}/2\end{smallmatrix}`
with :math:`r = y - \mu`, is indefinite away from the data).  It is positive definite, does
not depend on the targets, and equals the GGN through the natural parameters
:math:`\eta = (\mu/\sigma^2, -1/(2\sigma^2))` of Immer et al. (NeurIPS 2023, "Effective
Bayesian heteroscedastic regression with deep neural networks"): the Fisher transforms as a
metric, so pulling the natural-parameter Fisher back through :math:`f \mapsto \eta` gives the
same matrix.  The mean/log-variance layout is kept (rather than natural-parameter outputs)
because it is what ``GaussianNLLLoss`` users train, and the curvature, the evidence and the
posterior are the same; what differs is where the predictive is linearised (here in
:math:`(\mu, s)`).

Predictive: mean μ, variance :math:`\mathrm{Var}[\mu] + \mathbb E[\sigma^2]` (epistemic plus
aleatoric, reported apart); under the linearised Gaussian
:math:`\mathbb E[e^{s}] = e^{m_s + v_s/2}`.
"""

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
)

if TYPE_CHECKING:
    from ..posteriors._output import OutputCovariance

__all__ = ["HeteroscedasticGaussian"]


def _split(f: Tensor) -> tuple[Tensor, Tensor]:
    D = f.shape[-1] // 2
    return f[..., :D], f[..., D:]


class HeteroscedasticGaussian(BuiltinLikelihood):
    r"""Gaussian with input-dependent noise; outputs ``(B, 2·D)`` = (μ, log σ²).

    See the module docstring for the curvature and the predictive.
    """

    kind = Likelihood.HETEROSCEDASTIC
    has_noise = False
    predicts_probabilities = False
    metric_name = "RMSE"

    # -- targets ---------------------------------------------------------------------------

    def _check_outputs(self, f: Tensor) -> int:
        C = f.shape[-1]
        if C % 2:
            raise ValueError(
                f"heteroscedastic likelihood needs model outputs (B, 2·D): the mean and the "
                f"log-variance of D targets; got {C} outputs (odd)."
            )
        return C // 2

    def check_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Targets ``(B, D)`` (``(B,)`` accepted for D = 1) in ``f``'s dtype.

        Returns:
            The targets, shape ``(B, D)``.

        Raises:
            ValueError: If the outputs are not ``(B, 2·D)`` or the targets not ``(B, D)``.
        """
        D = self._check_outputs(f)
        B = f.shape[0]
        y = y.to(f.dtype)
        if y.shape == (B, D):
            return y
        if D == 1 and y.shape == (B,):
            return y.unsqueeze(1)
        loc = f" ({where})" if where else ""
        raise ValueError(
            f"heteroscedastic targets{loc} must have shape ({B}, {D}) for outputs "
            f"{shape_str(f.shape)} (mean and log-variance of {D} targets)"
            + (f" or ({B},)" if D == 1 else "")
            + f"; got {shape_str(y.shape)}."
        )

    def position_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Targets ``(B, T, D)`` (or ``(B, T)`` for D = 1) of outputs ``(B, T, 2·D)``.

        Returns:
            The targets, shape ``(B·T, D)`` or ``(B·T,)``.

        Raises:
            ValueError: If ``y`` has neither shape.
        """
        D = self._check_outputs(f)
        lead = tuple(f.shape[:-1])
        shapes = [(*lead, D)] + ([lead] if D == 1 else [])
        check_position_shapes(self.name, f, y, shapes, where)
        return y.reshape(-1, D) if y.ndim == 3 else y.reshape(-1)

    def ignored(self, y: Tensor, n: int, ignore_index: int | None) -> None:
        """Regression targets are never skipped.

        Returns:
            ``None``.
        """
        return None

    def targets_from_outputs(self, f: Tensor) -> Tensor:
        """The predicted means μ, shape ``(B, D)``."""
        return _split(f)[0]

    # -- loss and curvature ----------------------------------------------------------------

    def per_sample_nll(self, f: Tensor, y: Tensor) -> Tensor:
        r""":math:`\sum_d \tfrac12(\log 2\pi + s_d + (y_d - \mu_d)^2 e^{-s_d})`, shape ``(n,)``."""
        mu, s = _split(f)
        return 0.5 * (math.log(2 * math.pi) + s + (y - mu) ** 2 * torch.exp(-s)).sum(-1)

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed NLL, shape ``()``."""
        return self.per_sample_nll(f, y).sum()

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed NLL, shape ``()`` (the noise is predicted; σ plays no role)."""
        return self.per_sample_nll(f, y).sum()

    @staticmethod
    def nll_from_statistics(stats: FitStatistics, sigma: Tensor) -> Tensor:
        """Summed NLL of the fit, shape ``()``."""
        return torch.as_tensor(stats.loss_sum, dtype=sigma.dtype, device=sigma.device)

    def sigma2(self, sigma: Tensor | float) -> float:
        """1: the noise is an output."""
        return 1.0

    def curvature_scale(self, sigma: Tensor, temperature: Tensor | float) -> Tensor:
        r"""Factor :math:`1/\tau` of the curvature in the posterior precision."""
        return torch.as_tensor(1.0 / temperature, dtype=sigma.dtype, device=sigma.device)

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        r"""∂ℓ/∂(μ, s) = :math:`(-r e^{-s}, \tfrac12(1 - r^2 e^{-s}))`, shape ``(B, 2·D)``."""
        mu, s = _split(f)
        w = torch.exp(-s)
        r = y - mu
        return torch.cat([-r * w, 0.5 * (1 - r * r * w)], dim=-1)

    def hessian_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        r"""The Fisher's diagonal :math:`(e^{-s}, \tfrac12)`, shape ``(n, 2·D)``."""
        _, s = _split(f)
        return torch.cat([torch.exp(-s), torch.full_like(s, 0.5)], dim=-1)

    def hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """The Fisher, diagonal, shape ``(n, 2·D, 2·D)``."""
        return torch.diag_embed(self.hessian_diagonal(f))

    def sqrt_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\mathrm{diag}(e^{-s/2}, 1/\sqrt2)`, shape ``(n, 2·D, 2·D)``."""
        return torch.diag_embed(self.hessian_diagonal(f).sqrt())

    def hessian_matvec(self, f: Tensor, u: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\Lambda_n u_n` for ``u`` of shape ``(..., *f.shape)``."""
        return self.hessian_diagonal(f) * u

    def hessian_sum(self, f: Tensor, w: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\sum_n w_n \Lambda_n`, weights ``(n, 1)``, shape ``(2·D, 2·D)``."""
        return torch.diag((w * self.hessian_diagonal(f)).sum(0))

    def neg_scores(self, f: Tensor, S: int, generator: torch.Generator | None) -> Tensor:
        r""":math:`\nabla_f \ell(f, \hat y)`, :math:`\hat y = \mu + \sigma\varepsilon`: :math:`(-\varepsilon/\sigma, \tfrac12(1-\varepsilon^2))`.

        Returns:
            Shape ``(S, n, 2·D)``.
        """
        _, s = _split(f)
        eps = torch.randn((S, *s.shape), dtype=f.dtype, device=f.device, generator=generator)
        return torch.cat([-eps * torch.exp(-0.5 * s), 0.5 * (1 - eps * eps)], dim=-1)

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        r"""Draw :math:`y = \mu + e^{s/2}\varepsilon`, shape ``(B, D)``."""
        mu, s = _split(f)
        eps = torch.randn(mu.shape, dtype=f.dtype, device=f.device, generator=generator)
        return mu + torch.exp(0.5 * s) * eps

    # -- predictive ------------------------------------------------------------------------

    def check_link(self, method: PredictMethod, link: Link | None) -> tuple[PredictMethod, None]:
        """No link (the predictive is Gaussian): ``None`` and the default ``probit`` are ignored.

        Returns:
            ``(method, None)``.

        Raises:
            ValueError: If another link is given.
        """
        return no_link(self.name, method, link)

    def response(self, f: Tensor) -> Tensor:
        """The predicted means μ."""
        return _split(f)[0]

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
        r"""Mean μ and variance :math:`v_\mu + e^{m_s + v_s/2}` under :math:`f \sim N(m, \Sigma_f)`.

        Args:
            mean: Outputs at θ*, shape ``(N, 2·D)``.
            cov: Their covariances, a factored output covariance over the N rows.
            link: Ignored.
            sigma: Ignored.
            n_samples: Ignored.
            generator: Ignored.
            memory_budget: Ignored.

        Returns:
            The :class:`Prediction`, shapes ``(N, D)``, with the epistemic part
            :math:`\mathrm{Var}[\mu]` and the aleatoric part :math:`\mathbb E[\sigma^2]`.
        """
        m, m_s = _split(mean)
        v, v_s = _split(cov.diagonal())
        aleatoric = torch.exp(m_s + 0.5 * v_s)
        return Prediction(m, v + aleatoric, v, aleatoric)

    def sample_predictive(self, out: Tensor, sigma: Tensor | float = 1.0) -> Prediction:
        """Mean of μ, its sample variance plus the mean of σ², over outputs ``(S, B, 2·D)``.

        Returns:
            The :class:`Prediction`, shapes ``(B, D)``, with both parts.
        """
        mu, s = _split(out)
        S = out.shape[0]
        epistemic = mu.var(dim=0, correction=1) if S > 1 else torch.zeros_like(mu[0])
        aleatoric = torch.exp(s).mean(0)
        return Prediction(mu.mean(0), epistemic + aleatoric, epistemic, aleatoric)

    def predictive_nll(self, pred: Prediction, y: Tensor) -> Tensor:
        r"""Gaussian NLL of the predictive's moments, ``(B,)`` .

        Returns:
            The NLL of each point, shape ``(B,)``.

        Raises:
            ValueError: If ``y`` does not match the prediction's batch size.
        """
        return gaussian_predictive_nll(pred, y)

    def temper(self, pred: Prediction, temperature: Tensor | float) -> Prediction:
        """A Gaussian predictive is not tempered: ``pred`` unchanged."""
        return pred

    # -- fit -------------------------------------------------------------------------------

    def fit_metric_sum(self, F: Tensor, y: Tensor) -> Tensor:
        """Summed squared error of the means of outputs ``(S, B, 2·D)``, shape ``(S,)``."""
        return ((_split(F)[0] - y) ** 2).sum((-2, -1))

    def fit_metric(self, total: Tensor, n_data: int, n_outputs: int) -> Tensor:
        """RMSE of the means over N points of D targets (``n_outputs`` = 2·D)."""
        return (total / (n_data * max(1, n_outputs // 2))).sqrt()
