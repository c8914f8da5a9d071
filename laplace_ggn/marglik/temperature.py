r"""Validation-tuned predictive temperature (``method="marglik_temperature"`` / ``"temperature"``).

The evidence fixes the prior precision, and so the posterior's relative uncertainties: how
much more uncertain the predictive is far from the data than near it.  A single predictive
temperature T, :math:`p_T \propto \bar p^{1/T}` (see :func:`laplace_ggn.predictive.temper`),
is then chosen on held-out data.  T changes no arg-max; it rescales the confidence of every
prediction, undoing the under-confidence the evidence-tuned posterior shows in distribution
while keeping its larger uncertainty out of distribution.

T is the mode of its posterior given the N validation points (``regularize=True``):

.. math::
    \hat T = \arg\min_T\; \sum_{n=1}^N -\log p_T(y_n\mid x_n)
    \;+\; \frac{1}{2N}\sum_{n=1}^N \frac1C\sum_{c=1}^C -\log p_T(c\mid x_n)
    \;+\; \tfrac12(\log T)^2 .

The second term is half a pseudo-observation whose label is uniform over the C classes (in
the spirit of Laplace's rule of succession: no error among N points is not an error rate of
zero): it keeps :math:`p_T` away from one-hot when the split is classified perfectly, where
the NLL alone decreases all the way to T → 0.  The third is a standard normal prior on log T,
centred at T = 1, worth about one validation point: it decides T when the split is too small
to.  Their share shrinks as 1/N, so with errors in the split the data decide (on the demo's
200 validation digits T moves from 0.45 to 0.48 for kfac, and the test NLL from 0.109 to
0.113).  The weights (``PSEUDO_WEIGHT``,
``PRIOR_WEIGHT``) are those of ``benchmarks/bench_calibration.py``: a whole pseudo-observation
is slightly better under shift and slightly worse in distribution, none lets T collapse on an
error-free split (``docs/calibration.md``).  A choice at the edge of the search range is
returned with a warning (:func:`temperature_edge_warning`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..likelihoods import Bernoulli, Categorical, Prediction

__all__ = ["TemperatureResult", "temperature_edge_warning", "tune_predictive_temperature"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
#: Weights, in validation points, of the uniform-label pseudo-observation and of the prior.
PSEUDO_WEIGHT, PRIOR_WEIGHT = 0.5, 1.0


@dataclass(frozen=True)
class TemperatureResult:
    """Validation curve of :func:`tune_predictive_temperature`.

    Attributes:
        temperature: The chosen T, shape ``()``.
        grid: Temperatures of the coarse search, shape ``(K,)``, increasing.
        scores: Mean validation NLL at each of them, shape ``(K,)``.
        nll: Mean validation NLL at the chosen T (``nll_untempered`` at T = 1).
        nll_untempered: Mean validation NLL of the predictive without a temperature.
        n_errors: Validation points whose arg-max is not their label.
        n_points: Validation points.
        regularized: Whether T is the posterior mode (pseudo-observation and prior on log T)
            rather than the minimiser of the validation NLL alone.
        at_edge: ``"smallest"`` / ``"largest"`` when T is the first / last point of the
            range, else ``None``.
    """

    temperature: Tensor
    grid: Tensor
    scores: Tensor
    nll: float
    nll_untempered: float
    n_errors: int = 0
    n_points: int = 0
    regularized: bool = True
    at_edge: str | None = None


class _Objective:
    """Mean validation NLL at T, and the objective the search minimises (one tempering each)."""

    def __init__(self, probs: Tensor, y: Tensor, lik, regularize: bool):
        self.probs, self.y, self.lik, self.regularize = probs, y, lik, regularize
        self.n = probs.shape[0]

    def terms(self, T: float) -> tuple[float, float]:
        """``(mean NLL, objective)`` at T: the summed NLL, plus the regularisers if set."""
        pred = self.lik.temper(Prediction(self.probs, torch.zeros_like(self.probs)), T)
        nll = float(self.lik.predictive_nll(pred, self.y).mean(dtype=torch.float64))
        if not self.regularize:
            return nll, nll * self.n
        p = pred.mean.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
        if p.shape[-1] == 1:  # binary: the probability of class 1
            uniform = -0.5 * (p.log() + (1 - p).clamp_min(1e-300).log()).sum(-1)
        else:
            uniform = -p.log().mean(-1)
        prior = 0.5 * math.log(T) ** 2
        return nll, nll * self.n + PSEUDO_WEIGHT * float(uniform.mean()) + PRIOR_WEIGHT * prior

    def nll(self, T: float) -> float:
        return self.terms(T)[0]

    def __call__(self, T: float) -> float:
        return self.terms(T)[1]


def tune_predictive_temperature(
    probs: Tensor,
    y: Tensor,
    *,
    binary: bool = False,
    likelihood: Categorical | Bernoulli | None = None,
    log_range: tuple[float, float] = (-2.0, 2.0),
    n_points: int = 81,
    refine_steps: int = 40,
    regularize: bool = True,
) -> TemperatureResult:
    r"""Choose T for :math:`p_T \propto \bar p^{1/T}` on validation predictions.

    A log-spaced grid of ``n_points`` temperatures in ``10**log_range``, then a golden-section
    search on log T between the neighbours of the best grid point.  With ``regularize`` (the
    default) the objective is the summed NLL plus half a pseudo-observation of uniform label
    and a standard normal prior on log T (module docstring); without it, the NLL alone (plain
    temperature scaling, which runs to the edge of the range when no validation point is
    misclassified).

    Args:
        probs: Validation predictive probabilities, shape ``(N, C)`` (binary: ``(N, 1)``).
        y: Labels: class indices ``(N,)``, or 0/1 of shape ``(N,)`` / ``(N, 1)`` (binary).
        binary: One probability of class 1 per input.
        likelihood: The likelihood whose tempering and predictive NLL score ``probs``
            (default: ``Bernoulli()`` if ``binary``, else ``Categorical()``).
        log_range: Powers of 10 bounding the search.
        n_points: Grid points of the coarse search.
        refine_steps: Golden-section steps.
        regularize: Use the pseudo-observation and the prior on log T.

    Returns:
        The :class:`TemperatureResult` (``at_edge`` set when T is at an end of the range;
        :func:`temperature_edge_warning` words it).

    Raises:
        ValueError: If there is no validation point.
        RuntimeError: If the validation NLL is not finite at any temperature.

    Example:
        >>> probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.4, 0.6]] * 20)
        >>> res = tune_predictive_temperature(probs, torch.tensor([0, 0, 1] * 20))
        >>> float(res.temperature) < 1 and res.nll < res.nll_untempered
        True
    """
    lik = likelihood if likelihood is not None else Bernoulli() if binary else Categorical()
    if probs.shape[0] == 0:
        raise ValueError("val_loader must hold at least one data point; got none.")
    objective = _Objective(probs, y, lik, regularize)
    grid = torch.logspace(log_range[0], log_range[1], n_points, dtype=torch.float64)
    scores, values = torch.tensor([objective.terms(float(T)) for T in grid]).T
    finite = torch.isfinite(scores)
    if not bool(finite.any()):
        raise RuntimeError(
            "predictive temperature tuning must find a finite validation NLL; got none over "
            f"T in [{float(grid[0]):.3g}, {float(grid[-1]):.3g}]. The hyperparameters were left "
            "unchanged."
        )
    values = torch.where(torch.isfinite(values), values, torch.full_like(values, math.inf))
    i = int(values.argmin())
    a = math.log(float(grid[max(i - 1, 0)]))
    b = math.log(float(grid[min(i + 1, n_points - 1)]))
    best_t, best = float(grid[i]), float(values[i])
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = objective(math.exp(c)), objective(math.exp(d))
    for _ in range(refine_steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = objective(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = objective(math.exp(d))
    for t, f in ((math.exp(c), fc), (math.exp(d), fd)):
        if math.isfinite(f) and f < best:
            best_t, best = t, f
    edge = None
    if i in (0, n_points - 1) and n_points > 1:
        # still at the end after refining: the objective falls all the way to the edge
        step = math.log(float(grid[1])) - math.log(float(grid[0]))
        if abs(math.log(best_t) - math.log(float(grid[i]))) < 1e-3 * step:
            edge = "smallest" if i == 0 else "largest"
    with torch.no_grad():
        if probs.shape[-1] == 1:
            wrong = (probs.reshape(-1) > 0.5) != (y.reshape(-1) > 0.5)
        else:
            wrong = probs.argmax(-1) != y.reshape(-1)
    return TemperatureResult(
        torch.tensor(best_t, dtype=probs.dtype, device=probs.device),
        grid,
        scores,
        objective.nll(best_t),
        objective.nll(1.0),
        n_errors=int(wrong.sum()),
        n_points=int(probs.shape[0]),
        regularized=regularize,
        at_edge=edge,
    )


def temperature_edge_warning(result: TemperatureResult) -> str | None:
    """The warning to give when T is at an end of its search range, naming what to do.

    Returns:
        The message, or ``None`` when T is inside the range.
    """
    if result.at_edge is None:
        return None
    lo, hi = float(result.grid[0]), float(result.grid[-1])
    sharper = result.at_edge == "smallest"
    why = (
        "the validation NLL keeps falling as the predictive sharpens"
        if sharper
        else "the validation NLL keeps falling as the predictive flattens towards uniform"
    )
    return (
        f"predictive temperature tuning chose T={float(result.temperature):.3g}, the "
        f"{result.at_edge} value of its range {lo:.3g}..{hi:.3g}: {why} ({result.n_errors} of "
        f"{result.n_points} validation points misclassified), so these data do not determine T. "
        "Pass a larger val_loader (with misclassified points), or keep T = 1 with "
        "method='marglik' (or la.set_hyperparameters(predictive_temperature=1.0))."
    )
