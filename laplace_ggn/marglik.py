r"""Laplace evidence and the tuning of the prior precision and the observation noise.

.. math::
    \log p(\mathcal D) \approx -\ell(\theta_*) - \tfrac12 (\theta_*-\theta_0)^\top \Lambda_0
    (\theta_*-\theta_0) - \tfrac12 \log|\Lambda| + \tfrac12 \log|\Lambda_0|,

with :math:`\Lambda = G/(\tau\sigma^2) + \Lambda_0` (the 2π terms of the Gaussian
approximation cancel; σ enters ℓ and G for regression).

Tuning by evidence (``method="marglik"``) runs Adam on the log hyperparameters.  Each step
reuses one factorisation of the curvature: when the precision is diagonal in a fixed basis —
a scalar prior with the full (eigenvalues of G), KFAC (products of factor eigenvalues) or
low-rank structure, and any prior with the diag structure — the evidence is a sum over the
P eigenvalues :math:`\lambda_i` of G,
:math:`\log|\Lambda| = \sum_i \log(s\lambda_i + \alpha_i)`, O(P) per step.  Otherwise the
evidence is evaluated through ``posterior.with_prior``: O(P) for KFAC with a layerwise prior,
but one Cholesky factorisation (O(P³)) per step for the full structure with a layerwise or
per-parameter prior (no shared factorisation diagonalises sG + D for a non-scalar D).

Tuning by validation (``method="gridsearch"``) scores each prior precision of a log-spaced
grid by the mean validation negative log predictive density.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._checks import Likelihood, Link, PredictMethod, as_enum, shape_str
from .likelihoods import FitStatistics
from .posteriors import DiagPosterior, FullPosterior, KFACPosterior, LowRankPosterior, PriorKind
from .predictive import (
    functional_moments,
    glm_from_moments,
    nn_predictive,
    predictive_nll,
    resolve_options,
)

__all__ = [
    "GridsearchResult",
    "MarglikResult",
    "SpectralEvidence",
    "TuneMethod",
    "TuningOptions",
    "check_grid",
    "check_tuning_options",
    "convert_prior",
    "curvature_spectrum",
    "default_grid",
    "gridsearch",
    "log_marginal_likelihood",
    "optimize_marglik",
]


class TuneMethod(str, enum.Enum):
    """How :meth:`LaplaceWrapper.optimize_prior_precision` tunes the hyperparameters."""

    MARGLIK = "marglik"
    GRIDSEARCH = "gridsearch"


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
    prior = posterior.prior
    nll = likelihood.nll_from_statistics(stats, sigma_noise)
    return (
        -nll
        - 0.5 * prior.quadratic(posterior.mean)
        - 0.5 * posterior.log_det()
        + 0.5 * prior.log_det()
    )


# ---------------------------------------------------------------------------------------------
# Evidence on a shared spectrum
# ---------------------------------------------------------------------------------------------


def curvature_spectrum(posterior, kind: PriorKind) -> Tensor | None:
    r"""Eigenvalues λ ``(P,)`` of the curvature with :math:`\log|sG+\Lambda_0| = \sum\log(s\lambda+a)`.

    The eigenbasis must also diagonalise the prior: true for the diag structure with any
    prior (λ = diag G, ``a`` per parameter) and, for a scalar prior, for full (eigenvalues of
    G, one ``eigh`` cached on the posterior), KFAC (:math:`\lambda_B \otimes \lambda_A` per
    block and the exact diagonal of the other parameters) and low rank (its eigenvalues,
    zeros elsewhere).

    Args:
        posterior: A fitted posterior.
        kind: The prior structure that will be evaluated.

    Returns:
        λ in the order that matches the prior's per-parameter diagonal where that matters
        (diag structure), or ``None`` if no shared spectrum exists for this pair.
    """
    if isinstance(posterior, DiagPosterior):
        return posterior.ggn_diag
    if kind is not PriorKind.SCALAR:
        return None
    if isinstance(posterior, FullPosterior):
        return posterior.eigenvalues
    if isinstance(posterior, KFACPosterior):
        parts = [torch.outer(e.lam_B, e.lam_A).reshape(-1) for e in posterior._eig]
        parts.append(posterior.curvature.diag.reshape(-1))
        return torch.cat(parts)
    if isinstance(posterior, LowRankPosterior):
        lam = posterior.eigenvalues
        return torch.cat([lam, lam.new_zeros(posterior.n_params - lam.shape[0])])
    return None


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
        mean: θ*, shape ``(P,)`` (the prior mean is 0).
        stats: Training-loss statistics at θ*.
        likelihood: The likelihood object.
        kind: Prior structure: ``u`` has shape ``()``, ``(T,)`` or ``(P,)``.
        layout: The subset's layout.
        temperature: τ.
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
        self.lam = lam.detach()
        self.d2 = mean.detach().to(device=self.lam.device, dtype=self.lam.dtype) ** 2
        self.d2_sum = self.d2.sum(dtype=torch.float64)
        self.P = self.lam.shape[0]
        self.kind, self.layout = kind, layout
        self.stats, self.likelihood = stats, likelihood
        self.temperature = float(temperature)
        self.regression = likelihood.kind is Likelihood.REGRESSION
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


# ---------------------------------------------------------------------------------------------
# Marginal-likelihood tuning
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarglikResult:
    """Outcome of :func:`optimize_marglik`.

    Attributes:
        prior_precision: Tuned precision, shape ``()``, ``(T,)`` or ``(P,)``.
        sigma_noise: Tuned (or unchanged) σ, shape ``()``.
        evidence: Log evidence before each step and at the end, shape ``(n_steps + 1,)``.
        shared_spectrum: Whether every step reused one spectrum of the curvature (O(P) steps).
    """

    prior_precision: Tensor
    sigma_noise: Tensor
    evidence: Tensor
    shared_spectrum: bool


class _Adam:
    """Adam ascent on one tensor (no autograd state; a few tensor ops per step)."""

    def __init__(
        self, x: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ):
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.m = torch.zeros_like(x)
        self.v = torch.zeros_like(x)
        self.t = 0

    def ascend(self, x: Tensor, g: Tensor) -> Tensor:
        self.t += 1
        self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        step = self.lr / (1 - self.b1**self.t)
        denom = (self.v / (1 - self.b2**self.t)).sqrt_().add_(self.eps)
        return x + step * self.m / denom


def _failure(step: int | str, detail: str = "") -> RuntimeError:
    return RuntimeError(
        f"marginal-likelihood tuning must keep the evidence finite; got a non-finite value or "
        f"an error at step {step}{detail}. The hyperparameters were left unchanged; try a "
        "smaller lr= or another starting prior_precision."
    )


def _optimize_scalar(
    spectral: SpectralEvidence,
    u: float,
    ls: float,
    *,
    dtype,
    device,
    tune_sigma_noise: bool,
    n_steps: int,
    lr: float,
    progress: bool,
) -> MarglikResult:
    """Adam on (log α, log σ) in Python floats over a shared spectrum."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    mu = vu = ms = vs = 0.0
    history = []
    for t in tqdm(range(1, n_steps + 1), disable=not progress, desc="marglik"):
        try:
            e, gu, gs = spectral.scalar_value_and_grad(u, ls)
        except (OverflowError, ValueError) as err:
            raise _failure(t - 1, f" ({type(err).__name__}: {err})") from err
        if not all(math.isfinite(v) for v in (e, gu, gs)):
            raise _failure(t - 1)
        history.append(e)
        mu, vu = b1 * mu + (1 - b1) * gu, b2 * vu + (1 - b2) * gu * gu
        u += lr * (mu / (1 - b1**t)) / (math.sqrt(vu / (1 - b2**t)) + eps)
        if tune_sigma_noise:
            ms, vs = b1 * ms + (1 - b1) * gs, b2 * vs + (1 - b2) * gs * gs
            ls += lr * (ms / (1 - b1**t)) / (math.sqrt(vs / (1 - b2**t)) + eps)
    try:
        e = spectral.scalar_value_and_grad(u, ls)[0]
    except (OverflowError, ValueError) as err:
        raise _failure(n_steps, f" ({type(err).__name__}: {err})") from err
    if not (math.isfinite(e) and 0 < math.exp(u) < math.inf and 0 < math.exp(ls) < math.inf):
        raise _failure(n_steps)
    history.append(e)
    return MarglikResult(
        torch.tensor(math.exp(u), dtype=dtype, device=device),
        torch.tensor(math.exp(ls), dtype=dtype, device=device),
        torch.from_numpy(np.asarray(history, dtype=np.float64)).to(dtype),
        True,
    )


def convert_prior(precision: Tensor, kind: PriorKind, layout) -> Tensor:
    """Bring a prior precision to another structure (geometric means when coarsening).

    Args:
        precision: shape ``()``, ``(T,)`` or ``(P,)``.
        kind: Target structure.
        layout: The subset's layout.

    Returns:
        shape ``()`` (scalar), ``(T,)`` (layerwise) or ``(P,)`` (diagonal).
    """
    T, P = len(layout.names), layout.n_params
    p = precision.detach()
    same = {
        PriorKind.SCALAR: p.ndim == 0 or p.shape == (1,),
        PriorKind.LAYERWISE: p.shape == (T,),
        PriorKind.DIAGONAL: p.shape == (P,),
    }[kind]
    if same:
        return p.reshape(()).clone() if kind is PriorKind.SCALAR else p.clone()
    if p.ndim == 0 or p.shape == (1,):
        full = p.reshape(()).expand(P)
    elif p.shape == (T,) and T != P:
        full = layout.expand_per_tensor(p)
    else:
        full = p
    logs = torch.log(full)
    if kind is PriorKind.SCALAR:
        return torch.exp(logs.mean())
    if kind is PriorKind.LAYERWISE:
        return torch.exp(
            torch.stack([logs[sl].mean() for sl in (layout.slice_of(n) for n in layout.names)])
        )
    return torch.exp(logs).clone()


def optimize_marglik(
    posterior,
    stats: FitStatistics,
    likelihood,
    *,
    posterior_at: Callable[[Tensor, Tensor], object],
    prior_precision: Tensor,
    kind: PriorKind,
    sigma_noise: Tensor,
    temperature: float,
    tune_sigma_noise: bool = False,
    n_steps: int = 100,
    lr: float = 0.1,
    progress: bool = False,
) -> MarglikResult:
    r"""Maximise the Laplace evidence over log α (and log σ) with Adam.

    Uses :func:`curvature_spectrum` when one exists (each step O(P)), otherwise the
    evidence of ``posterior_at(α, σ)`` (whatever ``with_prior`` costs for the structure).

    Args:
        posterior: The fitted posterior (its cached factorisations are reused).
        stats: Training-loss statistics at θ*.
        likelihood: The likelihood object.
        posterior_at: ``(prior_precision, sigma) -> posterior`` with those hyperparameters.
        prior_precision: Initial precision in the structure ``kind``.
        kind: Prior structure to tune.
        sigma_noise: Initial σ, shape ``()``.
        temperature: τ.
        tune_sigma_noise: Tune σ jointly (regression).
        n_steps: Adam steps.
        lr: Adam learning rate on the log parameters.
        progress: Show a progress bar.

    Returns:
        The :class:`MarglikResult`.

    Raises:
        RuntimeError: If the evidence or a tuned value is not finite.
    """
    dtype, device = prior_precision.dtype, prior_precision.device
    lam = curvature_spectrum(posterior, kind)
    work = dtype
    u = torch.log(prior_precision.detach().to(device=device, dtype=work)).clone()
    log_sigma = torch.log(sigma_noise.detach().to(device=device, dtype=work)).clone()
    if lam is not None:
        spectral = SpectralEvidence(
            lam,
            posterior.mean,
            stats,
            likelihood,
            kind=kind,
            layout=posterior.prior.layout,
            temperature=temperature,
        )

        def value_and_grad(u: Tensor, log_sigma: Tensor):
            return spectral.value_and_grad(u, log_sigma)
    else:

        def value_and_grad(u: Tensor, log_sigma: Tensor):
            u = u.detach().requires_grad_(True)
            ls = log_sigma.detach().requires_grad_(tune_sigma_noise)
            sigma = torch.exp(ls)
            e = log_marginal_likelihood(posterior_at(torch.exp(u), sigma), stats, likelihood, sigma)
            grads = torch.autograd.grad(e, [u, ls] if tune_sigma_noise else [u])
            return e.detach(), grads[0], grads[1] if tune_sigma_noise else None

    if lam is not None and kind is PriorKind.SCALAR:
        return _optimize_scalar(
            spectral,
            float(u),
            float(log_sigma),
            dtype=dtype,
            device=device,
            tune_sigma_noise=tune_sigma_noise,
            n_steps=n_steps,
            lr=lr,
            progress=progress,
        )
    adam_u, adam_s = _Adam(u, lr), _Adam(log_sigma, lr)
    history = []
    try:
        for _ in tqdm(range(n_steps), disable=not progress, desc="marglik"):
            e, gu, gls = value_and_grad(u, log_sigma)
            history.append(e.detach())
            u = adam_u.ascend(u, gu)
            if tune_sigma_noise:
                log_sigma = adam_s.ascend(log_sigma, gls)
        history.append(value_and_grad(u, log_sigma)[0].detach())
    except (RuntimeError, ValueError) as err:
        raise RuntimeError(
            f"marginal-likelihood tuning must keep the evidence finite; it failed at step "
            f"{len(history)} ({type(err).__name__}: {err}). The hyperparameters were left "
            "unchanged; try a smaller lr= or another starting prior_precision."
        ) from err
    hist = torch.stack(history)
    alpha, sigma = torch.exp(u), torch.exp(log_sigma)
    if not (
        bool(torch.isfinite(hist).all())
        and bool(torch.isfinite(alpha).all())
        and bool((alpha > 0).all())
        and bool(torch.isfinite(sigma))
        and float(sigma) > 0
    ):
        bad = (
            int((~torch.isfinite(hist)).nonzero()[0])
            if not bool(torch.isfinite(hist).all())
            else n_steps
        )
        raise RuntimeError(
            f"marginal-likelihood tuning must keep the evidence finite; got a non-finite value "
            f"at step {bad}. The hyperparameters were left unchanged; try a smaller lr= or "
            "another starting prior_precision."
        )
    return MarglikResult(
        alpha.to(dtype).reshape(prior_precision.shape),
        sigma.to(dtype),
        hist.to(dtype),
        lam is not None,
    )


# ---------------------------------------------------------------------------------------------
# Grid search on validation data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridsearchResult:
    """Validation curve of :func:`gridsearch`.

    Attributes:
        grid: Prior precisions tried, shape ``(K,)``, increasing.
        scores: Mean validation negative log predictive density, shape ``(K,)`` (``inf``
            where the evaluation failed).
        best_index: Index of the chosen precision (ties go to the larger precision).
    """

    grid: Tensor
    scores: Tensor
    best_index: int

    @property
    def best(self) -> Tensor:
        """The chosen prior precision, shape ``()``."""
        return self.grid[self.best_index]


def default_grid(
    log_range: tuple[float, float] = (-4.0, 4.0), n_points: int = 41, *, dtype=torch.float64
) -> Tensor:
    """Log-spaced grid ``10**lo .. 10**hi`` of ``n_points``, shape ``(n_points,)``.

    Raises:
        ValueError: If the range is not two finite numbers ``lo <= hi`` or ``n_points < 1``.
    """
    if (
        not isinstance(log_range, Sequence)
        or len(log_range) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in log_range)
        or log_range[0] > log_range[1]
    ):
        raise ValueError(
            f"log_range must be two finite numbers (lo, hi) with lo <= hi (powers of 10); "
            f"got {log_range!r}."
        )
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1:
        raise ValueError(f"n_points must be a positive integer; got {n_points!r}.")
    return torch.logspace(float(log_range[0]), float(log_range[1]), n_points, dtype=dtype)


def check_grid(grid: object, *, dtype=torch.float64) -> Tensor:
    """Validate a user grid: a non-empty 1-D sequence of finite positive precisions, sorted.

    Returns:
        The grid sorted increasingly, shape ``(K,)``.

    Raises:
        ValueError: If it is empty, not 1-D, or holds a value that is not finite and > 0.
    """
    g = torch.as_tensor(grid, dtype=dtype).detach()
    if g.ndim != 1 or g.numel() == 0:
        raise ValueError(
            f"grid must be a non-empty 1-D sequence of precisions; got shape "
            f"{shape_str(g.shape) if g.ndim else '()'}."
        )
    if not bool(torch.isfinite(g).all()) or not bool((g > 0).all()):
        raise ValueError(
            f"grid values must be finite and > 0; got {g[:5].tolist()}"
            + ("..." if g.numel() > 5 else "")
            + "."
        )
    return torch.sort(g).values


def gridsearch(
    fmodel,
    *,
    posterior_at: Callable[[Tensor], object],
    batches: list[tuple[object, Tensor]],
    likelihood: Likelihood,
    lik,
    grid: Tensor,
    method: str | PredictMethod = "glm",
    link: str | Link | None = None,
    sigma_noise: Tensor | float = 1.0,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    n_outputs: int,
    progress: bool = False,
) -> GridsearchResult:
    r"""Score each prior precision by the mean validation NLL of the predictive.

    Every grid point is evaluated on its own (a new posterior and a new sum); GLM Jacobians
    of the validation inputs are computed once and shared when they fit the memory budget.
    The chosen point minimises the score; among equal scores (within 1e-12 relative) the
    largest precision wins.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        posterior_at: ``prior_precision -> posterior``.
        batches: Validation ``(x, y)`` pairs (inputs on the model's device).
        likelihood: The likelihood kind.
        lik: The likelihood object (checks the targets).
        grid: Prior precisions, shape ``(K,)``, increasing.
        method: ``"glm"`` or ``"nn"``.
        link: Link of the predictive.
        sigma_noise: σ (regression).
        n_samples: S for ``mc`` / ``nn``.
        generator: Random generator for ``mc`` / ``nn``.
        n_outputs: C.
        progress: Show a progress bar.

    Returns:
        The :class:`GridsearchResult`.

    Raises:
        ValueError: If the options are invalid or there is no validation data.
        RuntimeError: If no grid point gives a finite score.
    """
    m, lk = resolve_options(likelihood, method, link)
    if not batches:
        raise ValueError("val_loader must yield at least one batch; got an empty loader.")
    P, elt = fmodel.n_params, fmodel.theta.element_size()
    prepared = []
    n_val = sum(_batch_len(y) for _, y in batches)
    cache = m is PredictMethod.GLM and n_val * n_outputs * P * elt <= fmodel.memory_budget
    with torch.no_grad():
        for x, y in batches:
            if cache:
                J, f = fmodel.jacobians(x, n_outputs=n_outputs)
                prepared.append((x, J, f, lik.check_targets(f, y.to(fmodel.device), "val_loader")))
            else:
                f = fmodel.forward(x)
                prepared.append(
                    (x, None, f, lik.check_targets(f, y.to(fmodel.device), "val_loader"))
                )
    scores = []
    for alpha in tqdm(grid.tolist(), disable=not progress, desc="gridsearch"):
        total = 0.0
        try:
            post = posterior_at(torch.tensor(alpha, dtype=fmodel.dtype, device=fmodel.device))
            with torch.no_grad():
                for x, J, f, y in prepared:
                    if m is PredictMethod.NN:
                        pred = nn_predictive(
                            fmodel,
                            post,
                            x,
                            likelihood=likelihood,
                            sigma_noise=sigma_noise,
                            n_samples=n_samples,
                            generator=generator,
                            n_outputs=n_outputs,
                        )
                    else:
                        if J is None:
                            f, cov = functional_moments(fmodel, post, x, n_outputs=n_outputs)
                        else:
                            cov = post.functional_covariance(J)
                        pred = glm_from_moments(
                            f,
                            cov,
                            likelihood=likelihood,
                            link=lk,
                            sigma_noise=sigma_noise,
                            n_samples=n_samples,
                            generator=generator,
                            memory_budget=fmodel.memory_budget,
                        )
                    total += float(predictive_nll(pred, y, likelihood).sum())
            score = total / n_val
        except (RuntimeError, ValueError):
            score = math.inf
        scores.append(score if math.isfinite(score) else math.inf)
    s = torch.tensor(scores, dtype=torch.float64)
    if not bool(torch.isfinite(s).any()):
        raise RuntimeError(
            "gridsearch must find a grid point with a finite validation NLL; every point "
            f"failed over the grid {grid.min().item():.3g}..{grid.max().item():.3g}. The "
            "hyperparameters were left unchanged."
        )
    best = s.min()
    tol = 1e-12 * max(1.0, abs(float(best)))
    idx = int((s <= best + tol).nonzero().max())
    return GridsearchResult(grid.detach().clone(), s, idx)


def _batch_len(y: Tensor) -> int:
    return int(y.shape[0]) if y.ndim else 1


@dataclass(frozen=True)
class TuningOptions:
    """Validated options of :meth:`LaplaceWrapper.optimize_prior_precision`."""

    method: TuneMethod
    kind: PriorKind | None
    n_steps: int
    lr: float
    grid: Tensor | None
    predict_method: PredictMethod
    link: Link | None
    n_samples: int


_MARGLIK_ONLY = ("n_steps", "lr", "tune_sigma_noise", "prior_structure")
_GRID_ONLY = (
    "val_loader",
    "grid",
    "log_range",
    "n_points",
    "predict_method",
    "link",
    "n_samples",
    "generator",
)


def check_tuning_options(likelihood: Likelihood, method: object, **given: object) -> TuningOptions:
    """Validate the options of a tuning call before anything runs.

    Options that belong to the other method must be left unset (``None`` / ``False``).

    Args:
        likelihood: The wrapper's likelihood.
        method: ``"marglik"`` or ``"gridsearch"``.
        **given: The keyword options as passed.

    Returns:
        The :class:`TuningOptions`.

    Raises:
        ValueError: If an option is invalid, set for the wrong method, or
            ``tune_sigma_noise`` is asked for outside regression.
        TypeError: If ``generator`` is not a ``torch.Generator``.
    """
    m = as_enum(TuneMethod, method, "method")
    foreign = _GRID_ONLY if m is TuneMethod.MARGLIK else _MARGLIK_ONLY
    wrong = [k for k in foreign if given.get(k) not in (None, False)]
    if wrong:
        other = "gridsearch" if m is TuneMethod.MARGLIK else "marglik"
        raise ValueError(
            f"{', '.join(wrong)} must be left unset with method={m.value!r}; got "
            f"{', '.join(f'{k}={given[k]!r}' for k in wrong)}. They apply to method={other!r}."
        )
    if given.get("tune_sigma_noise") and likelihood is not Likelihood.REGRESSION:
        raise ValueError(
            f"tune_sigma_noise=True needs likelihood='regression'; got likelihood="
            f"{likelihood.value!r}, which has no observation noise."
        )
    kind = None
    if given.get("prior_structure") is not None:
        kind = as_enum(PriorKind, given["prior_structure"], "prior_structure")
    n_steps = 100 if given.get("n_steps") is None else given["n_steps"]
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer; got {n_steps!r}.")
    lr = 0.1 if given.get("lr") is None else given["lr"]
    if (
        isinstance(lr, bool)
        or not isinstance(lr, (int, float))
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise ValueError(f"lr must be a finite float > 0; got {lr!r}.")
    grid = None
    predict_method, link, n_samples = PredictMethod.GLM, None, 100
    if m is TuneMethod.GRIDSEARCH:
        if given.get("val_loader") is None:
            raise ValueError(
                "val_loader must be given with method='gridsearch'; got None. Pass a loader of "
                "held-out (input, target) batches, or use method='marglik'."
            )
        if given.get("grid") is not None:
            if given.get("log_range") is not None or given.get("n_points") is not None:
                raise ValueError(
                    "grid must not be combined with log_range / n_points; got both. Pass either "
                    "an explicit grid or a log-range and a number of points."
                )
            grid = check_grid(given["grid"])
        else:
            lo_hi = (-4.0, 4.0) if given.get("log_range") is None else given["log_range"]
            n = 41 if given.get("n_points") is None else given["n_points"]
            grid = default_grid(lo_hi, n)
        predict_method, link = resolve_options(
            likelihood,
            "glm" if given.get("predict_method") is None else given["predict_method"],
            given.get("link"),
        )
        n_samples = 100 if given.get("n_samples") is None else given["n_samples"]
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}.")
        gen = given.get("generator")
        if gen is not None and not isinstance(gen, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None; got {type(gen).__name__}."
            )
    return TuningOptions(m, kind, n_steps, float(lr), grid, predict_method, link, n_samples)
