"""The tuning objects of a validation-tuned predictive temperature.

:class:`MarglikTemperature` (the prior precision by the evidence, then T by validation) and
:class:`Temperature` (T alone, the prior precision kept).  Both score the GLM (or sampled)
predictive of the validation inputs once and search T on those probabilities
(:func:`~laplace_ggn.marglik.temperature.tune_predictive_temperature`); a T at the edge of
its range comes back with a warning naming what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import Likelihood, Link, PredictMethod
from ..posteriors import PriorKind
from ..predictive import predict, resolve_options
from .options import (
    Tuned,
    TuneMethod,
    check_classification,
    check_marglik_options,
    check_predictive_options,
    run_marglik,
)
from .temperature import temperature_edge_warning, tune_predictive_temperature

__all__ = ["MarglikTemperature", "Temperature", "validation_temperature"]


def validation_temperature(method, fitted, prior_precision: Tensor | None, batches: list):
    """T on the validation predictive of ``fitted`` at ``prior_precision``.

    Args:
        method: The tuning object (its ``predict_method``, ``link``, ``n_samples``,
            ``generator``).
        fitted: The :class:`~laplace_ggn.FittedLaplace`.
        prior_precision: The prior precision the predictive is scored at (``None``: the
            current one).
        batches: The validation batches, read by ``fitted.reader``.

    Returns:
        The :class:`~laplace_ggn.marglik.TemperatureResult`.
    """
    pm, link = resolve_options(fitted.likelihood, method.predict_method, method.link)
    post = fitted.posterior_at(prior_precision, None)
    probs, labels = [], []
    for x, y in batches:
        pred = predict(
            fitted.fmodel,
            post,
            x,
            likelihood=fitted.likelihood,
            method=pm,
            link=link,
            n_samples=method.n_samples,
            generator=method.generator,
            n_outputs=fitted.statistics.n_outputs,
            head=fitted.head,
        )
        probs.append(pred.mean)
        y = y.to(fitted.fmodel.device)
        labels.append(fitted.likelihood.check_targets(pred.mean, y, "val_loader"))
    return tune_predictive_temperature(
        torch.cat(probs), torch.cat(labels), likelihood=fitted.likelihood
    )


def _batches(fitted, val_loader) -> list:
    batches = fitted.reader.validation_batches(val_loader, fitted.input_spec)
    if not batches:
        raise ValueError("val_loader must yield at least one batch; got an empty loader.")
    return batches


class _ValidationPredictive:
    """The check of the methods that score a predictive on validation data."""

    def check(self, likelihood: Likelihood) -> None:
        """Refuse regression and a predictive that does not apply to ``likelihood``.

        Raises:
            ValueError: If ``likelihood`` is regression or the method / link pair invalid.
        """
        check_classification(likelihood, self.name.value)
        resolve_options(likelihood, self.predict_method, self.link)


@dataclass(frozen=True)
class MarglikTemperature(_ValidationPredictive):
    """The prior precision by the evidence, then a predictive temperature on validation data.

    Classification and binary only (see ``docs/calibration.md``).  T is the mode of its
    posterior given the validation points (a pseudo-observation of uniform label and a prior
    on log T keep it finite when no validation point is misclassified, see
    :mod:`laplace_ggn.marglik.temperature`).  ``optimize_prior_precision(val_loader=val)``
    with no method uses this one.

    Args:
        val_loader: Held-out ``(input, target)`` batches.
        prior_structure: As for :class:`Marglik`.
        n_steps: As for :class:`Marglik`.
        lr: As for :class:`Marglik`.
        predict_method: Predictive scored on the validation data.
        link: Link of that predictive.
        n_samples: S of that predictive.
        generator: Random generator of that predictive.

    Raises:
        ValueError: If an option is invalid.
        TypeError: If ``generator`` is not a ``torch.Generator``.
    """

    val_loader: object
    prior_structure: str | PriorKind | None = None
    n_steps: int = 100
    lr: float = 0.1
    predict_method: str | PredictMethod = "glm"
    link: str | Link | None = None
    n_samples: int = 100
    generator: torch.Generator | None = None

    name = TuneMethod.MARGLIK_TEMPERATURE

    def __post_init__(self):
        check_marglik_options(self)
        check_predictive_options(self, self.name.value)

    def tune(self, fitted, *, progress: bool = False) -> Tuned:
        """Tune α by the evidence, then T on the validation data at that α.

        Returns:
            The :class:`Tuned` hyperparameters, the evidence curve, the temperature search
            and a warning when T is at the edge of its range.

        Raises:
            ValueError: If the validation loader yields no batch.
        """
        self.check(fitted.likelihood)
        batches = _batches(fitted, self.val_loader)
        result = run_marglik(self, fitted, tune_sigma_noise=False, progress=progress)
        temp = validation_temperature(self, fitted, result.prior_precision, batches)
        hp = fitted.hyperparameters.replace(
            prior_precision=result.prior_precision, predictive_temperature=temp.temperature
        )
        return Tuned(hp, marglik=result, temperature=temp, warning=temperature_edge_warning(temp))


@dataclass(frozen=True)
class Temperature(_ValidationPredictive):
    """A predictive temperature on validation data, keeping the current prior precision.

    Classification and binary only: calibrates the Laplace predictive of a prior precision
    chosen some other way (set by hand, by :class:`Marglik` or by training with the
    evidence).  T as in :class:`MarglikTemperature`.

    Args:
        val_loader: Held-out ``(input, target)`` batches.
        predict_method: Predictive scored on the validation data.
        link: Link of that predictive.
        n_samples: S of that predictive.
        generator: Random generator of that predictive.

    Raises:
        ValueError: If an option is invalid.
        TypeError: If ``generator`` is not a ``torch.Generator``.
    """

    val_loader: object
    predict_method: str | PredictMethod = "glm"
    link: str | Link | None = None
    n_samples: int = 100
    generator: torch.Generator | None = None

    name = TuneMethod.TEMPERATURE

    def __post_init__(self):
        check_predictive_options(self, self.name.value)

    def tune(self, fitted, *, progress: bool = False) -> Tuned:
        """T on the validation data at the current prior precision (``progress`` unused).

        Returns:
            The :class:`Tuned` hyperparameters (the prior precision and σ unchanged), the
            temperature search and a warning when T is at the edge of its range.

        Raises:
            ValueError: If the validation loader yields no batch.
        """
        self.check(fitted.likelihood)
        batches = _batches(fitted, self.val_loader)
        temp = validation_temperature(self, fitted, None, batches)
        hp = fitted.hyperparameters.replace(predictive_temperature=temp.temperature)
        return Tuned(hp, temperature=temp, warning=temperature_edge_warning(temp))
