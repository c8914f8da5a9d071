r"""The hyperparameters learned during training, and their steps on the Laplace evidence.

The learned values are :math:`u = \log\delta` (one per prior structure entry), :math:`\log\sigma`
(regression) and :math:`\log T` (classification and binary, the likelihood
:math:`\mathrm{softmax}(f/T)`), moved by one Adam optimiser (kept across refits, as in
Immer et al. 2021) ascending the evidence of the posterior refitted at the current weights.

σ enters the evidence exactly without a refit (the curvature is collected at unit noise and
scaled by :math:`1/\sigma^2`).  T enters it through the data term and the curvature: the
training loss :math:`\ell(T) = \sum_n -\log\mathrm{softmax}(f_n/T)_{y_n}` is evaluated exactly
at 9 temperatures (Chebyshev points) within a factor :math:`e^{\pm 1/2}` of the refit's
:math:`T_0` and interpolated by the polynomial through them in :math:`\log T` (relative error
below 1e-8 for smooth losses); the curvature of the refit,
:math:`G(T_0) = \sum_n J_n^\top \Lambda_n J_n / T_0^2`, is scaled as
:math:`(T_0/T)^2\,G(T_0)` (the output Hessian :math:`\Lambda_n` held at its value of the refit,
as the GGN holds the Jacobians), and :math:`\log T` stays within that factor of :math:`T_0`
until the next refit, where the curvature is collected at the new T again.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ..marglik import check_evidence, convert_prior
from ..marglik.evidence import prior_terms
from ..posteriors import PriorKind

__all__ = ["HyperState", "TemperatureTerm"]

#: Half-width of the log-temperature window of one refit, and its number of exact points.
LOG_T_WINDOW, N_T_POINTS = 0.5, 9


class TemperatureTerm:
    r"""The training loss as a function of :math:`\log T` near the refit's :math:`T_0`.

    Args:
        log_t0: :math:`\log T_0`.
        values: :math:`\ell(T_k)` at :math:`\log T_k = \log T_0 + w_k`, the Chebyshev points
            :meth:`offsets` of ``[-LOG_T_WINDOW, LOG_T_WINDOW]``, shape ``(N_T_POINTS,)``.
    """

    def __init__(self, log_t0: float, values: Tensor):
        self.log_t0 = log_t0
        z = self.offsets(torch.float64) / LOG_T_WINDOW
        V = torch.stack([z**k for k in range(N_T_POINTS)], 1)
        self.coef = torch.linalg.solve(V, values.to(torch.float64))

    @staticmethod
    def offsets(dtype: torch.dtype) -> Tensor:
        r"""The offsets :math:`w_k` of :math:`\log T_k` from :math:`\log T_0`, shape ``(K,)``."""
        k = torch.arange(N_T_POINTS, dtype=torch.float64)
        return (LOG_T_WINDOW * torch.cos(math.pi * (2 * k + 1) / (2 * N_T_POINTS))).to(dtype)

    def __call__(self, log_t: Tensor) -> Tensor:
        r"""The interpolated :math:`\ell(T)`, differentiable in ``log_t``."""
        z = (log_t - self.log_t0) / LOG_T_WINDOW
        out = torch.zeros_like(z)
        for c in self.coef.flip(0).to(dtype=log_t.dtype, device=log_t.device):  # Horner
            out = out * z + c
        return out


class HyperState:
    """log δ, log σ and log T with their Adam optimiser.

    Args:
        kind: The prior structure of δ.
        layout: The subset's layout.
        prior_precision: The initial δ (any structure; converted to ``kind``).
        sigma_noise: The initial σ.
        temperature: The initial T.
        tune_sigma_noise: Learn σ.
        tune_temperature: Learn T.
        lr: Adam's learning rate on the log values.
    """

    def __init__(
        self,
        kind: PriorKind,
        layout,
        prior_precision: Tensor,
        sigma_noise: Tensor,
        temperature: float,
        *,
        tune_sigma_noise: bool,
        tune_temperature: bool,
        lr: float,
    ):
        dt, dev = sigma_noise.dtype, sigma_noise.device
        self.kind, self.layout = kind, layout
        prec = convert_prior(prior_precision.to(dt), kind, layout)
        self.log_prec = torch.log(prec).detach().clone().requires_grad_(True)
        self.log_sigma = torch.log(sigma_noise.detach()).clone().requires_grad_(True)
        self.log_t = torch.tensor(math.log(temperature), dtype=dt, device=dev, requires_grad=True)
        self.tune_sigma_noise, self.tune_temperature = tune_sigma_noise, tune_temperature
        params = [self.log_prec]
        params += [self.log_sigma] if tune_sigma_noise else []
        params += [self.log_t] if tune_temperature else []
        self.optimizer = torch.optim.Adam(params, lr=lr)

    @property
    def prior_precision(self) -> Tensor:
        """δ, detached."""
        return torch.exp(self.log_prec.detach())

    @property
    def sigma_noise(self) -> Tensor:
        """σ, detached."""
        return torch.exp(self.log_sigma.detach())

    @property
    def temperature(self) -> float:
        """T."""
        return float(torch.exp(self.log_t.detach()))

    def evidence(self, fitted, data_term: TemperatureTerm | None, prior=None) -> Tensor:
        """The log evidence of ``fitted`` at the current values (differentiable in them).

        Args:
            fitted: The :class:`~laplace_ggn.FittedLaplace` refitted at the current weights.
            data_term: The training loss in log T (``None``: T is not learned).
            prior: ``fitted.prior(...)`` at a precision of this structure, checked once and
                reused with the current precision (default: checked here).

        Returns:
            The evidence, shape ``()``.
        """
        prec, sigma = torch.exp(self.log_prec), torch.exp(self.log_sigma)
        hp = fitted.hyperparameters
        prior = fitted.prior(self.prior_precision) if prior is None else prior
        if data_term is not None:
            scale = torch.exp(2 * (data_term.log_t0 - self.log_t)) / hp.temperature
            nll = data_term(self.log_t)
        else:
            sigma = sigma if self.tune_sigma_noise else hp.sigma_noise
            scale, nll = (
                hp.scale(sigma),
                fitted.likelihood.nll_from_statistics(fitted.statistics, sigma),
            )
        post = fitted.posterior.with_prior(replace(prior, precision=prec), scale)
        quad, prior_log_det = prior_terms(post)
        value = -nll - 0.5 * quad - 0.5 * post.log_det() + 0.5 * prior_log_det
        if not bool(torch.isfinite(value.detach())):
            check_evidence(value, post, fitted.statistics, fitted.likelihood, sigma)
        return value

    def ascend(self, fitted, data_term: TemperatureTerm | None, n_steps: int) -> float:
        """``n_steps`` Adam steps up the evidence of ``fitted``.

        Returns:
            The evidence at the final values.

        Raises:
            RuntimeError: If the evidence is not finite (the values are left as they were).
        """
        saved = [t.detach().clone() for t in (self.log_prec, self.log_sigma, self.log_t)]
        try:
            prior = fitted.prior(self.prior_precision)  # checked for the structure once
            for _ in range(n_steps):
                self.optimizer.zero_grad()
                (-self.evidence(fitted, data_term, prior)).backward()
                self.optimizer.step()
                if data_term is not None:
                    with torch.no_grad():
                        lo, hi = data_term.log_t0 - LOG_T_WINDOW, data_term.log_t0 + LOG_T_WINDOW
                        self.log_t.clamp_(lo, hi)
            with torch.no_grad():
                return float(self.evidence(fitted, data_term, prior))
        except (RuntimeError, ValueError) as err:
            with torch.no_grad():
                for t, v in zip((self.log_prec, self.log_sigma, self.log_t), saved):
                    t.copy_(v)
            raise RuntimeError(
                "marglik_training's hyperparameter steps must keep the evidence finite; "
                f"they failed ({type(err).__name__}: {err}). Try a smaller lr_hyper=, or "
                "another starting prior_precision."
            ) from err
