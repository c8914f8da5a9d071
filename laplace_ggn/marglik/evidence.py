"""The Laplace log evidence, and its O(P) form on a shared spectrum of the curvature."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..likelihoods import FitStatistics
from ..posteriors import PriorKind, spectrum_of

__all__ = [
    "SpectralEvidence",
    "check_evidence",
    "curvature_spectrum",
    "log_marginal_likelihood",
    "prior_terms",
]


def prior_terms(posterior) -> tuple[Tensor, Tensor]:
    r"""The prior's terms of the evidence: :math:`(\theta_*-\theta_0)^\top\Lambda_0(\theta_*-\theta_0)` and :math:`\log|\Lambda_0|`.

    A prior that carries the curvature :math:`G_0` of earlier data (a posterior used as the
    prior, :mod:`laplace_ggn.continual`) has :math:`\Lambda_0 = sG_0 + D` with the
    posterior's curvature scale s.

    Args:
        posterior: A posterior (its ``prior``, ``mean`` and, with a carried curvature, ``scale``).

    Returns:
        The quadratic form and the log determinant, shapes ``()``.
    """
    prior = posterior.prior
    quad, log_det = prior.quadratic(posterior.mean), prior.log_det()
    if prior.base is not None:
        quad = quad + posterior.scale * prior.base.quadratic(prior.centered(posterior.mean))
        log_det = prior.base.log_det(prior, posterior.scale)
    return quad, log_det


def log_marginal_likelihood(
    posterior, stats: FitStatistics, likelihood, sigma_noise: Tensor
) -> Tensor:
    r"""Laplace approximation of the log evidence, shape ``()``.

    Args:
        posterior: A posterior whose prior and curvature scale are the ones to evaluate.
        stats: Training-loss statistics at θ*.
        likelihood: The likelihood object (gives ℓ(θ*) as a function of σ).
        sigma_noise: σ, shape ``()`` (ignored for classification).

    Returns:
        The log marginal likelihood, differentiable in the prior precision and σ.
    """
    nll = likelihood.nll_from_statistics(stats, sigma_noise)
    quad, prior_log_det = prior_terms(posterior)
    return -nll - 0.5 * quad - 0.5 * posterior.log_det() + 0.5 * prior_log_det


def check_evidence(
    value: Tensor,
    posterior,
    stats: FitStatistics,
    likelihood,
    sigma_noise: Tensor,
    cause: BaseException | None = None,
) -> None:
    """Raise, naming the term that is not finite, if the evidence ``value`` is not finite.

    Args:
        value: The evidence, shape ``()``.
        posterior: The posterior it was computed from.
        stats: Training-loss statistics at θ*.
        likelihood: The likelihood object.
        sigma_noise: σ, shape ``()``.
        cause: An exception to chain (e.g. the failure of a tuning run).

    Raises:
        RuntimeError: If ``value`` is NaN or infinite.
    """
    if bool(torch.isfinite(value.detach()).all()):
        return
    with torch.no_grad():
        quad, prior_log_det = prior_terms(posterior)
        terms = {
            "the training loss ℓ(θ*)": likelihood.nll_from_statistics(stats, sigma_noise),
            "the prior term ½(θ*−θ₀)ᵀΛ₀(θ*−θ₀)": 0.5 * quad,
            "½ log|Λ| (posterior precision)": 0.5 * posterior.log_det(),
            "½ log|Λ₀| (prior precision)": 0.5 * prior_log_det,
        }
    bad = [f"{k} = {float(v):.3g}" for k, v in terms.items() if not bool(torch.isfinite(v))]
    detail = (
        "; ".join(bad)
        if bad
        else "every term is finite but their sum is not ("
        + ", ".join(f"{k} = {float(v):.3g}" for k, v in terms.items())
        + ")"
    )
    dtype = posterior.mean.dtype
    raise RuntimeError(
        f"log marginal likelihood must be finite; got {float(value.detach())} in {dtype}: "
        f"{detail}. The terms overflow {dtype} (|θ*| up to "
        f"{float(posterior.mean.detach().abs().max()):.3g}, loss sum {stats.loss_sum:.3g}); "
        "evaluate a float64 copy of the model (model.double()), or check it for saturated "
        "outputs."
    ) from cause


# ---------------------------------------------------------------------------------------------
# Evidence on a shared spectrum
# ---------------------------------------------------------------------------------------------


def curvature_spectrum(posterior, kind: PriorKind) -> Tensor | None:
    r"""Eigenvalues λ ``(P,)`` of the curvature with :math:`\log|sG+\Lambda_0| = \sum\log(s\lambda+a)`.

    The posterior's optional ``spectrum(kind)`` member (see
    :class:`~laplace_ggn.posteriors.Posterior`): the eigenbasis must also diagonalise the
    prior. True for the diag structure with any prior (λ = diag G, ``a`` per parameter) and,
    for a scalar prior, for full (eigenvalues of G, one ``eigvalsh`` cached on the posterior),
    KFAC (:math:`\lambda_B \otimes \lambda_A` per block and the exact diagonal of the other
    parameters) and low rank (its eigenvalues, zeros elsewhere).  The projected structure is
    the limit of an infinite curvature on the range: λ is ``inf`` on its R directions and 0 on
    the kernel.

    Args:
        posterior: A fitted posterior.
        kind: The prior structure that will be evaluated.

    Returns:
        λ in the order that matches the prior's per-parameter diagonal where that matters
        (diag structure), or ``None`` if no shared spectrum exists for this pair (or the prior
        carries the curvature of earlier data).
    """
    if posterior.prior.base is not None:
        return None
    return spectrum_of(posterior, kind)


class SpectralEvidence:
    r"""Evidence on a shared spectrum, with its gradient in closed form, O(P) per call.

    With :math:`a = \Lambda_0` per parameter (``a = e^u`` expanded to P), :math:`s` the
    curvature scale and :math:`d_i = s\lambda_i + a_i`:

    .. math::
        E = -\ell_\sigma - \tfrac12\textstyle\sum_i a_i\theta_{*i}^2
        - \tfrac12\sum_i\log d_i + \tfrac12\sum_i \log a_i, \qquad
        \frac{\partial E}{\partial u_k} = \sum_{i\in k}\tfrac12\big(1 - a_i\theta_{*i}^2
        - a_i/d_i\big), \qquad
        \frac{\partial E}{\partial\log\sigma} = \frac{SSE}{\sigma^2} - NC
        + s\textstyle\sum_i \lambda_i/d_i,

    the last for regression, where :math:`s = 1/(\tau\sigma^2)`.  Elementwise work is
    done in the posterior's dtype (float64 ``log``/``exp`` on CPU are much slower than float32)
    and the sums of the scalar-prior path are accumulated in float64.

    Args:
        lam: Spectrum λ, shape ``(P,)`` (see :func:`curvature_spectrum`).
        mean: θ* − θ₀, shape ``(P,)`` (θ₀ the prior mean).
        stats: Training-loss statistics at θ*.
        likelihood: The likelihood object.
        kind: Prior structure: ``u`` has shape ``()``, ``(T,)`` or ``(P,)``.
        layout: The subset's layout.
        temperature: τ.

    Infinite entries of λ (scalar prior only) are directions of infinite curvature, where the
    posterior has no variance: their :math:`\log d_i` is a constant that does not depend on
    the hyperparameters and is left out (the projected posterior), and :math:`1/d_i = 0`.

    Raises:
        ValueError: If λ holds an infinite entry and the prior is not scalar.
    """

    def __init__(
        self,
        lam: Tensor,
        mean: Tensor,
        stats: FitStatistics,
        likelihood,
        *,
        kind: PriorKind,
        layout,
        temperature: float,
    ):
        self.P = lam.shape[0]
        finite = ~torch.isposinf(lam)
        if not bool(finite.all()):
            if kind is not PriorKind.SCALAR:
                raise ValueError(
                    f"lam may hold infinite curvatures with a scalar prior only; got "
                    f"kind={kind.value!r}."
                )
            lam = lam[finite]
        self.lam = lam.detach()
        self.d2 = mean.detach().to(device=self.lam.device, dtype=self.lam.dtype) ** 2
        self.d2_sum = self.d2.sum(dtype=torch.float64)
        self.kind, self.layout = kind, layout
        self.stats, self.likelihood = stats, likelihood
        self.temperature = float(temperature)
        self.regression = likelihood.has_noise
        self._lam_np = self.lam.numpy() if self.lam.device.type == "cpu" else None
        if kind is PriorKind.LAYERWISE:
            numels = torch.tensor(layout.numels, device=self.lam.device)
            self.segments = torch.repeat_interleave(
                torch.arange(len(layout.numels), device=self.lam.device), numels
            )

    def _scale(self, log_sigma: Tensor) -> Tensor:
        if self.regression:
            return torch.exp(-2 * log_sigma) / self.temperature
        return torch.as_tensor(1.0 / self.temperature, dtype=self.lam.dtype)

    def scalar_value_and_grad(self, u: float, log_sigma: float) -> tuple[float, float, float]:
        """Scalar prior in Python floats: ``(E, ∂E/∂u, ∂E/∂log σ)``; a few vector ops per call.

        On CPU the vector work runs in NumPy: torch's ``log`` on CPU goes through MKL's vector
        math library, whose per-call cost (hundreds of µs when the cores are busy) would
        dominate an O(P) step.

        Returns:
            ``(E, ∂E/∂u, ∂E/∂log σ)`` as Python floats, with u the log prior precision.
        """
        alpha = math.exp(u)
        s = math.exp(-2 * log_sigma) / self.temperature if self.regression else 1 / self.temperature
        if self._lam_np is not None:
            d = self._lam_np * s
            d += alpha
            log_det = float(np.log(d).sum(dtype=np.float64))
            r = np.reciprocal(d, out=d)
            r_sum = float(r.sum(dtype=np.float64))
            lam_r = (
                float(np.dot(self._lam_np.astype(np.float64, copy=False), r))
                if self.regression
                else 0.0
            )
        else:
            d = self.lam * s
            d += alpha
            log_det = float(torch.log(d).sum(dtype=torch.float64))
            r = torch.reciprocal_(d)
            r_sum = float(r.sum(dtype=torch.float64))
            lam_r = float((self.lam * r).sum(dtype=torch.float64)) if self.regression else 0.0
        quad = alpha * float(self.d2_sum)
        nc = self.stats.n_data * self.stats.n_outputs
        sigma2 = math.exp(2 * log_sigma)
        if self.regression:
            nll = 0.5 * self.stats.loss_sum / sigma2 + 0.5 * nc * math.log(2 * math.pi * sigma2)
            gls = self.stats.loss_sum / sigma2 - nc + s * lam_r
        else:
            nll, gls = float(self.stats.loss_sum), 0.0
        E = -nll - 0.5 * quad - 0.5 * log_det + 0.5 * self.P * u
        return E, 0.5 * (self.P - quad - alpha * r_sum), gls

    def __call__(self, u: Tensor, log_sigma: Tensor) -> Tensor:
        """Log evidence at ``(u, log σ)``, shape ``()`` (differentiable by autograd too)."""
        return self.value_and_grad(u, log_sigma, grad=False)[0]

    def value_and_grad(self, u: Tensor, log_sigma: Tensor, *, grad: bool = True):
        """``(E, ∂E/∂u, ∂E/∂log σ)``; the gradients are ``None`` when ``grad`` is False."""
        s = self._scale(log_sigma)
        sigma = torch.exp(log_sigma)
        nll = self.likelihood.nll_from_statistics(self.stats, sigma)
        if self.kind is PriorKind.SCALAR:
            alpha = torch.exp(u)
            d = s * self.lam + alpha
            quad, prior_logdet = alpha * self.d2_sum, self.P * u
        else:
            a = torch.exp(u)
            if self.kind is PriorKind.LAYERWISE:
                a, u_full = a[self.segments], u[self.segments]
            else:
                u_full = u
            d = s * self.lam + a
            quad, prior_logdet = (a * self.d2).sum(), u_full.sum()
        E = -nll - 0.5 * quad - 0.5 * torch.log(d).sum() + 0.5 * prior_logdet
        if not grad:
            return E, None, None
        r = 1.0 / d
        if self.kind is PriorKind.SCALAR:
            gu = 0.5 * (self.P - quad - alpha * r.sum())
        else:
            per = 0.5 * (1.0 - a * self.d2 - a * r)
            gu = (
                per
                if self.kind is PriorKind.DIAGONAL
                else torch.zeros_like(u).index_add_(0, self.segments, per)
            )
        gls = None
        if self.regression:
            nc = self.stats.n_data * self.stats.n_outputs
            gls = self.stats.loss_sum / sigma**2 - nc + s * (self.lam * r).sum()
        return E, gu, gls
