r"""Poisson likelihood on log-rates: counts :math:`y \sim \mathrm{Poisson}(e^{f})`.

Written as a :class:`~laplace_ggn.likelihoods.BaseLikelihood` (the extension point users
have): its NLL alone would give the curvature by automatic differentiation; the closed forms
below replace it because they are exact, cheaper and independent of the targets.

.. math::
    \ell = e^{f} - y f + \log y!, \qquad \Lambda = \mathrm{diag}(e^{f}) \text{ (Hessian = Fisher)}.

Predictive of the count under :math:`f \sim N(m, v)`: rate mean
:math:`\mathbb E[\lambda] = e^{m + v/2}`, rate variance
:math:`\mathrm{Var}[\lambda] = (e^{v} - 1)e^{2m + v}`, count variance
:math:`\mathbb E[\lambda] + \mathrm{Var}[\lambda]` (aleatoric plus epistemic).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._checks import DEFAULT_MEMORY_BUDGET, Likelihood, Link, shape_str
from ._base import Prediction, check_batch_size
from .base import BaseLikelihood

if TYPE_CHECKING:
    from ..posteriors._output import OutputCovariance

__all__ = ["Poisson"]


class Poisson(BaseLikelihood):
    """Poisson counts with log-rate outputs ``(B, C)``; targets counts ``(B, C)`` (``(B,)``: C = 1)."""

    name = "poisson"
    kind = Likelihood.POISSON
    needs_targets = False
    samples_targets = True
    identity_response = False

    def per_sample_nll(self, f: Tensor, y: Tensor) -> Tensor:
        r""":math:`\sum_c e^{f_c} - y_c f_c + \log y_c!`, shape ``(n,)``."""
        return (torch.exp(f) - y * f + torch.lgamma(y + 1)).sum(-1)

    def check_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Counts of the outputs' shape (``(B,)`` for C = 1) in ``f``'s dtype.

        Returns:
            The targets, shape ``(B, C)``.

        Raises:
            ValueError: If the shape is wrong or a count is negative or not whole.
        """
        loc = f" ({where})" if where else ""
        if f.shape[1] == 1 and y.shape == f.shape[:1]:
            y = y.unsqueeze(1)
        if y.shape != f.shape:
            raise ValueError(
                f"poisson targets{loc} must have the output's shape {shape_str(f.shape)}"
                + (f" or ({f.shape[0]},)" if f.shape[1] == 1 else "")
                + f"; got {shape_str(y.shape)}."
            )
        y = y.to(f.dtype)
        if y.numel() and not bool(((y >= 0) & (y == y.round())).all()):
            raise ValueError(
                f"poisson targets{loc} must be counts (whole numbers >= 0); got values in "
                f"[{float(y.min())}, {float(y.max())}] that are not."
            )
        return y

    def position_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Counts ``(B, T, C)`` (or ``(B, T)`` for C = 1) of outputs ``(B, T, C)`` as rows.

        Returns:
            Shape ``(B·T, C)`` or ``(B·T,)``.
        """
        y = y.unsqueeze(-1) if y.shape == f.shape[:-1] and f.shape[-1] == 1 else y
        return super().position_targets(f, y, where).reshape(-1, f.shape[-1])

    def targets_from_outputs(self, f: Tensor) -> Tensor:
        """The rounded rates, shape ``(B, C)``."""
        return torch.exp(f).round()

    # -- curvature in closed form ------------------------------------------------------------

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """:math:`e^f - y`, shape ``(n, C)``."""
        return torch.exp(f) - y

    def hessian_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """:math:`e^f`, shape ``(n, C)``."""
        return torch.exp(f)

    def hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\mathrm{diag}(e^f)`, shape ``(n, C, C)``."""
        return torch.diag_embed(torch.exp(f))

    def sqrt_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\mathrm{diag}(e^{f/2})`, shape ``(n, C, C)``."""
        return torch.diag_embed(torch.exp(0.5 * f))

    def hessian_matvec(self, f: Tensor, u: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`e^f \odot u` for ``u`` of shape ``(..., *f.shape)``."""
        return torch.exp(f) * u

    def hessian_sum(self, f: Tensor, w: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\mathrm{diag}(\sum_n w_n e^{f_n})`, shape ``(C, C)``."""
        return torch.diag((w * torch.exp(f)).sum(0))

    def sample_targets(self, f: Tensor, generator: torch.Generator | None) -> Tensor:
        r"""Counts :math:`\hat y \sim \mathrm{Poisson}(e^f)`, shape of ``f``."""
        return torch.poisson(torch.exp(f), generator=generator)

    # -- predictive --------------------------------------------------------------------------

    def response(self, f: Tensor) -> Tensor:
        """The rate :math:`e^f`."""
        return torch.exp(f)

    def glm_predictive(
        self,
        mean: Tensor,
        cov: OutputCovariance,
        *,
        link: Link | None = Link.MC,
        sigma: Tensor | float = 1.0,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> Prediction:
        r"""Count mean :math:`e^{m+v/2}` and variance :math:`\mathbb E[\lambda] + \mathrm{Var}[\lambda]`, in closed form.

        Args:
            mean: Log-rates at θ*, shape ``(N, C)``.
            cov: Their covariances, a factored output covariance over the N rows.
            link: Ignored (closed form).
            sigma: Ignored.
            n_samples: Ignored.
            generator: Ignored.
            memory_budget: Ignored.

        Returns:
            The :class:`Prediction`, shapes ``(N, C)``; epistemic :math:`\mathrm{Var}[\lambda]`,
            aleatoric :math:`\mathbb E[\lambda]`.
        """
        v = cov.diagonal()
        rate = torch.exp(mean + 0.5 * v)
        var_rate = torch.expm1(v) * rate**2
        return Prediction(rate, rate + var_rate, var_rate, rate)

    def sample_predictive(self, out: Tensor, sigma: Tensor | float = 1.0) -> Prediction:
        """Mean rate and count variance over sampled log-rates ``(S, B, C)``.

        Returns:
            The :class:`Prediction`, shapes ``(B, C)``, with both parts.
        """
        lam = torch.exp(out)
        rate = lam.mean(0)
        var_rate = lam.var(dim=0, correction=1) if out.shape[0] > 1 else torch.zeros_like(rate)
        return Prediction(rate, rate + var_rate, var_rate, rate)

    def predictive_nll(self, pred: Prediction, y: Tensor) -> Tensor:
        r"""NLL of counts under the negative binomial with the predictive's mean and variance.

        With mean m and variance v > m: :math:`r = m^2/(v - m)`, :math:`p = m/v`; as
        :math:`v \to m` it tends to the Poisson of rate m (used where v - m is below 1e-8 m).

        Returns:
            The NLL of each point, summed over outputs, shape ``(B,)``.

        Raises:
            ValueError: If ``y`` does not match the prediction's batch size.
        """
        check_batch_size(pred, y)
        m = pred.mean.clamp_min(torch.finfo(pred.mean.dtype).tiny)
        y = y.reshape(m.shape).to(m.dtype)
        excess = pred.variance - m
        poisson = m - y * torch.log(m) + torch.lgamma(y + 1)
        nb_ok = excess > 1e-8 * m
        r = m**2 / torch.where(nb_ok, excess, torch.ones_like(m))
        log_p = torch.log(m / torch.where(nb_ok, pred.variance, m + 1))
        log_q = torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-12))
        nb = -(torch.lgamma(y + r) - torch.lgamma(r) - torch.lgamma(y + 1) + r * log_p + y * log_q)
        return torch.where(nb_ok, nb, poisson).sum(-1)

    def fit_metric_sum(self, F: Tensor, y: Tensor) -> Tensor:
        """Summed NLL of log-rates ``(S, n, C)``, shape ``(S,)``."""
        return (torch.exp(F) - y * F + torch.lgamma(y + 1)).sum((-2, -1))

    def __repr__(self) -> str:
        return "Poisson()"
