r"""Validation-tuned predictive temperature (``method="marglik_temperature"``).

The evidence fixes the prior precision, and so the posterior's relative uncertainties: how
much more uncertain the predictive is far from the data than near it.  A single predictive
temperature T, :math:`p_T \propto \bar p^{1/T}` (see :func:`laplace_ggn.predictive.temper`),
is then chosen on held-out data to minimise the mean negative log likelihood.  T changes no
arg-max; it rescales the confidence of every prediction, undoing the under-confidence the
evidence-tuned posterior shows in distribution while keeping its larger uncertainty out of
distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..likelihoods import Bernoulli, Categorical, Prediction

__all__ = ["TemperatureResult", "tune_predictive_temperature"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class TemperatureResult:
    """Validation curve of :func:`tune_predictive_temperature`.

    Attributes:
        temperature: The chosen T, shape ``()``.
        grid: Temperatures of the coarse search, shape ``(K,)``, increasing.
        scores: Mean validation NLL at each of them, shape ``(K,)``.
        nll: Mean validation NLL at the chosen T (``nll_untempered`` at T = 1).
        nll_untempered: Mean validation NLL of the predictive without a temperature.
    """

    temperature: Tensor
    grid: Tensor
    scores: Tensor
    nll: float
    nll_untempered: float


def _mean_nll(probs: Tensor, y: Tensor, T: float, lik: Categorical | Bernoulli) -> float:
    pred = lik.temper(Prediction(probs, torch.zeros_like(probs)), T)
    return float(lik.predictive_nll(pred, y).mean(dtype=torch.float64))


def tune_predictive_temperature(
    probs: Tensor,
    y: Tensor,
    *,
    binary: bool = False,
    likelihood: Categorical | Bernoulli | None = None,
    log_range: tuple[float, float] = (-2.0, 2.0),
    n_points: int = 81,
    refine_steps: int = 40,
) -> TemperatureResult:
    r"""Choose T minimising the mean validation NLL of :math:`p_T \propto \bar p^{1/T}`.

    A log-spaced grid of ``n_points`` temperatures in ``10**log_range``, then a golden-section
    search on log T between the neighbours of the best grid point.

    Args:
        probs: Validation predictive probabilities, shape ``(N, C)`` (binary: ``(N, 1)``).
        y: Labels: class indices ``(N,)``, or 0/1 of shape ``(N,)`` / ``(N, 1)`` (binary).
        binary: One probability of class 1 per input.
        likelihood: The likelihood whose tempering and predictive NLL score ``probs``
            (default: ``Bernoulli()`` if ``binary``, else ``Categorical()``).
        log_range: Powers of 10 bounding the search.
        n_points: Grid points of the coarse search.
        refine_steps: Golden-section steps.

    Returns:
        The :class:`TemperatureResult`.

    Raises:
        ValueError: If there is no validation point.
        RuntimeError: If the validation NLL is not finite at any temperature.

    Example:
        >>> probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.4, 0.6]])
        >>> res = tune_predictive_temperature(probs, torch.tensor([0, 0, 1]))
        >>> float(res.temperature) < 1 and res.nll < res.nll_untempered
        True
    """
    lik = likelihood if likelihood is not None else Bernoulli() if binary else Categorical()
    if probs.shape[0] == 0:
        raise ValueError("val_loader must hold at least one data point; got none.")
    grid = torch.logspace(log_range[0], log_range[1], n_points, dtype=torch.float64)
    scores = torch.tensor([_mean_nll(probs, y, float(T), lik) for T in grid])
    finite = torch.isfinite(scores)
    if not bool(finite.any()):
        raise RuntimeError(
            "predictive temperature tuning must find a finite validation NLL; got none over "
            f"T in [{float(grid[0]):.3g}, {float(grid[-1]):.3g}]. The hyperparameters were left "
            "unchanged."
        )
    i = int(torch.where(finite, scores, torch.full_like(scores, math.inf)).argmin())
    lo = math.log(float(grid[max(i - 1, 0)]))
    hi = math.log(float(grid[min(i + 1, n_points - 1)]))
    best_t, best = float(grid[i]), float(scores[i])
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = _mean_nll(probs, y, math.exp(c), lik), _mean_nll(probs, y, math.exp(d), lik)
    for _ in range(refine_steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = _mean_nll(probs, y, math.exp(c), lik)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = _mean_nll(probs, y, math.exp(d), lik)
    for t, f in ((math.exp(c), fc), (math.exp(d), fd)):
        if math.isfinite(f) and f < best:
            best_t, best = t, f
    return TemperatureResult(
        torch.tensor(best_t, dtype=probs.dtype, device=probs.device),
        grid,
        scores,
        best,
        _mean_nll(probs, y, 1.0, lik),
    )
