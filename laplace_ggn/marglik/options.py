"""The pieces the tuning methods share: their names, their result and their option checks.

The methods themselves are in :mod:`laplace_ggn.marglik.methods`.
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import Likelihood, Link, PredictMethod, as_enum, check_generator, is_integer
from ..likelihoods import LikelihoodModel, get_likelihood
from ..posteriors import PriorKind
from .evidence import check_evidence, log_marginal_likelihood
from .optimize import MarglikResult, convert_prior, optimize_marglik
from .temperature import TemperatureResult
from .validation import GridsearchResult

__all__ = [
    "TuneMethod",
    "Tuned",
    "check_classification",
    "check_marglik_options",
    "check_predictive_options",
    "check_regression",
    "check_scored",
    "residual_sigma",
    "run_marglik",
]


class TuneMethod(str, enum.Enum):
    """The names ``optimize_prior_precision(method=...)`` accepts."""

    MARGLIK = "marglik"
    GRIDSEARCH = "gridsearch"
    MARGLIK_TEMPERATURE = "marglik_temperature"
    TEMPERATURE = "temperature"


@dataclass(frozen=True)
class Tuned:
    """What a tuning method found; the caller applies it.

    Attributes:
        hyperparameters: The tuned :class:`~laplace_ggn.hyperparameters.Hyperparameters`.
        marglik: The evidence curve, if the evidence was maximised.
        gridsearch: The validation curve of a grid search.
        temperature: The predictive-temperature search.
        warning: A message to pass on to the user (e.g. a choice at the edge of the grid).
    """

    #: Every attribute name :meth:`results` may use (a refit clears them all).
    RESULT_NAMES: ClassVar[tuple[str, ...]] = (
        "marglik_result_",
        "gridsearch_result_",
        "temperature_result_",
    )

    hyperparameters: object
    marglik: MarglikResult | None = None
    gridsearch: GridsearchResult | None = None
    temperature: TemperatureResult | None = None
    warning: str | None = None

    def results(self) -> dict[str, object]:
        """The curves found, under the names ``LaplaceWrapper`` keeps them.

        Returns:
            ``{"marglik_result_": ..., "gridsearch_result_": ..., "temperature_result_": ...}``,
            the curves that are not ``None``.
        """
        curves = {"marglik": self.marglik, "gridsearch": self.gridsearch}
        curves["temperature"] = self.temperature
        return {f"{name}_result_": c for name, c in curves.items() if c is not None}


def check_marglik_options(method: object) -> None:
    """Validate ``prior_structure``, ``n_steps`` and ``lr`` of an evidence-based method."""
    if method.prior_structure is not None:
        kind = as_enum(PriorKind, method.prior_structure, "prior_structure")
        object.__setattr__(method, "prior_structure", kind)
    if not is_integer(method.n_steps) or method.n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer; got {method.n_steps!r}.")
    object.__setattr__(method, "n_steps", int(method.n_steps))
    lr = method.lr
    if (
        isinstance(lr, bool)
        or not isinstance(lr, (int, float))
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise ValueError(f"lr must be a finite float > 0; got {lr!r}.")
    object.__setattr__(method, "lr", float(lr))


def check_predictive_options(method: object, name: str) -> None:
    """Validate ``val_loader``, ``predict_method``, ``link``, ``n_samples``, ``generator``."""
    if method.val_loader is None:
        raise ValueError(
            f"val_loader must be given with method={name!r}; got None. Pass a loader of "
            "held-out (input, target) batches, or use method='marglik'."
        )
    method_ = as_enum(PredictMethod, method.predict_method, "predict_method")
    object.__setattr__(method, "predict_method", method_)
    if method.link is not None:
        object.__setattr__(method, "link", as_enum(Link, method.link, "link"))
    if not is_integer(method.n_samples) or method.n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer; got {method.n_samples!r}.")
    object.__setattr__(method, "n_samples", int(method.n_samples))
    check_generator(method.generator)


def check_regression(likelihood: Likelihood | LikelihoodModel) -> None:
    """Refuse tuning σ for a likelihood without observation noise (outside regression)."""
    lik = get_likelihood(likelihood)
    if not lik.has_noise:
        raise ValueError(
            f"tune_sigma_noise=True needs likelihood='regression'; got likelihood="
            f"{lik.name!r}, which has no observation noise."
        )


def check_classification(
    likelihood: Likelihood | LikelihoodModel, name: str = "marglik_temperature"
) -> None:
    """Refuse a predictive temperature for a predictive of no probabilities (regression)."""
    lik = get_likelihood(likelihood)
    if not lik.predicts_probabilities:
        hint = (
            " A Gaussian predictive is calibrated through σ: use method='marglik' with "
            "tune_sigma_noise=True."
            if lik.has_noise
            else " Use method='marglik'."
        )
        raise ValueError(
            f"method={name!r} needs likelihood 'classification' or 'binary'; "
            f"got likelihood={lik.name!r}.{hint}"
        )


def check_scored(likelihood: Likelihood | LikelihoodModel) -> None:
    """Refuse a validation search for a likelihood whose predictions have no targets.

    Raises:
        ValueError: For samples of several items (reward modelling predicts single items).
    """
    lik = get_likelihood(likelihood)
    if lik.items_per_sample > 1:
        raise ValueError(
            f"method='gridsearch' scores the predictive of held-out samples; got likelihood="
            f"{lik.name!r}, whose predictive is of single items (a sample holds "
            f"{lik.items_per_sample}). Use method='marglik'."
        )


def residual_sigma(fitted) -> Tensor:
    r"""σ from the training residuals at θ*: :math:`\hat\sigma^2 = \mathrm{SSE}/(N C)`.

    The σ of a structure whose evidence has no correlations (diag).  The evidence's own
    estimate solves :math:`\sigma^2 = \mathrm{SSE}/(NC - \gamma)` with the effective number
    of parameters :math:`\gamma = \sum_i s\lambda_i/(s\lambda_i + \alpha_i)`; on the diagonal
    of G it counts every parameter as determined on its own (on the 1-D gap data of
    ``benchmarks/bench_calibration.py``, 520–860 for 120 points where the full GGN gives
    7.4–7.7), γ exceeds NC and σ runs away (0.71–0.78 for a true 0.2).  The residuals alone leave out the correction, an
    underestimate of σ² by the factor 1 − γ/(NC), small for a network trained with a prior
    (6 % there).  One σ per output when the fit has one.

    Returns:
        σ, shape ``()`` or ``(D,)``, in the fit's dtype.

    Raises:
        ValueError: If the residuals are all zero (an interpolating fit leaves σ undetermined).
    """
    stats, hp = fitted.statistics, fitted.hyperparameters
    ref = hp.sigma_noise
    if ref.ndim and stats.output_loss_sums is not None:
        sse = torch.tensor(stats.output_loss_sums, dtype=torch.float64)
        n = stats.n_data
    else:
        sse = torch.tensor(float(stats.loss_sum), dtype=torch.float64)
        n = stats.n_data * stats.n_outputs
    if not bool((sse > 0).all()):
        raise ValueError(
            "tune_sigma_noise=True with structure='diag' estimates σ from the training residuals; "
            "got a zero residual sum of squares (the network interpolates its training data). "
            "Set sigma_noise= yourself, or use a structure with correlations (kfac, full)."
        )
    return (sse / n).sqrt().to(dtype=ref.dtype, device=ref.device).expand_as(ref).clone()


def run_marglik(method, fitted, *, tune_sigma_noise: bool, progress: bool) -> MarglikResult:
    """Adam on the evidence from the fitted hyperparameters (see :func:`optimize_marglik`).

    Returns:
        The :class:`MarglikResult` with the optimised hyperparameters and the curve.

    Raises:
        RuntimeError: If the evidence is not finite (naming the overflowing term when it is
            not finite at the start already).
    """
    hp = fitted.hyperparameters
    kind = method.prior_structure or fitted.posterior.prior.kind
    init = convert_prior(hp.prior_precision, kind, fitted.layout)
    fitted.posterior_at(init, None)  # validates the prior structure for this posterior
    try:
        return optimize_marglik(
            fitted.posterior,
            fitted.statistics,
            fitted.likelihood,
            posterior_at=fitted.posterior_at,
            prior_precision=init,
            kind=kind,
            sigma_noise=hp.sigma_noise,
            temperature=hp.temperature,
            tune_sigma_noise=tune_sigma_noise,
            n_steps=method.n_steps,
            lr=method.lr,
            progress=progress,
        )
    except RuntimeError as err:
        # name the overflowing term when the evidence is not finite at the start already
        start, value = fitted.posterior_at(init, None), None
        stats, lik, sigma = fitted.statistics, fitted.likelihood, hp.sigma_noise
        with contextlib.suppress(RuntimeError, ValueError):
            value = log_marginal_likelihood(start, stats, lik, sigma)
        if value is not None:
            check_evidence(value, start, stats, lik, sigma, err)
        raise
