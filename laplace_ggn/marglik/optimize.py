"""Tuning the prior precision (and σ) by Adam on the Laplace evidence."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import marglik as _package
from ..likelihoods import FitStatistics
from ..posteriors import PriorKind
from .evidence import SpectralEvidence, log_marginal_likelihood

__all__ = ["MarglikResult", "convert_prior", "optimize_marglik"]


@dataclass(frozen=True)
class MarglikResult:
    """Outcome of :func:`optimize_marglik`.

    Attributes:
        prior_precision: Tuned precision, shape ``()``, ``(T,)`` or ``(P,)``.
        sigma_noise: Tuned (or unchanged) σ, shape ``()`` (``(D,)``: one per output).
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
    # Resolved on the package at call time, as when this was one module, so that
    # ``laplace_ggn.marglik.curvature_spectrum`` is the function in effect.
    lam = _package.curvature_spectrum(posterior, kind)
    work = dtype
    u = torch.log(prior_precision.detach().to(device=device, dtype=work)).clone()
    log_sigma = torch.log(sigma_noise.detach().to(device=device, dtype=work)).clone()
    if lam is not None:
        spectral = SpectralEvidence(
            lam,
            posterior.prior.centered(posterior.mean),
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
        and bool(torch.isfinite(sigma).all())
        and bool((sigma > 0).all())
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
