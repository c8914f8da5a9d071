"""Tuning methods as objects: each holds its validated options and tunes a fitted posterior.

:class:`Marglik` (Laplace evidence), :class:`GridSearch` (validation NLL over a grid of
scalar precisions), and in :mod:`.tempering` :class:`MarglikTemperature` (evidence, then a
predictive temperature on validation data) and :class:`Temperature` (T alone).  Each validates its own options at construction and has
``tune(fitted, *, progress=False) -> Tuned``, the new hyperparameters and the curves, changing
nothing itself.  :func:`tuning_method` converts the strings of
``LaplaceWrapper.optimize_prior_precision(method, **options)`` into these objects once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .._checks import Likelihood, Link, PredictMethod, as_enum
from ..likelihoods import get_likelihood
from ..posteriors import PriorKind
from ..predictive import resolve_options
from .options import (
    Tuned,
    TuneMethod,
    check_classification,
    check_marglik_options,
    check_predictive_options,
    check_regression,
    check_scored,
    residual_sigma,
    run_marglik,
)
from .tempering import MarglikTemperature, Temperature
from .validation import check_grid, default_grid, grid_edge_warning, gridsearch

__all__ = ["GridSearch", "Marglik", "MarglikTemperature", "Temperature", "tuning_method"]


@dataclass(frozen=True)
class Marglik:
    """Maximise the Laplace evidence over the log prior precision (and log σ) with Adam.

    Args:
        prior_structure: ``"scalar"``, ``"layerwise"`` or ``"diagonal"`` (``None``: the
            structure of the current prior precision).
        n_steps: Adam steps.
        lr: Adam learning rate on the log hyperparameters.
        tune_sigma_noise: Tune σ jointly (regression).  For a structure without correlations
            (diag) σ is the root mean squared training residual instead, and α is tuned at it
            (:func:`~laplace_ggn.marglik.options.residual_sigma`).

    Raises:
        ValueError: If an option is out of range.
    """

    prior_structure: str | PriorKind | None = None
    n_steps: int = 100
    lr: float = 0.1
    tune_sigma_noise: bool = False

    name = TuneMethod.MARGLIK

    def __post_init__(self):
        check_marglik_options(self)

    def check(self, likelihood: Likelihood) -> None:
        """Refuse options that do not apply to ``likelihood``.

        Raises:
            ValueError: If ``tune_sigma_noise`` is asked for outside regression.
        """
        if self.tune_sigma_noise:
            check_regression(likelihood)

    def tune(self, fitted, *, progress: bool = False) -> Tuned:
        """Tune ``fitted`` (a :class:`~laplace_ggn.FittedLaplace`); T is reset to 1.

        Returns:
            The :class:`Tuned` hyperparameters and the evidence curve.
        """
        self.check(fitted.likelihood)
        tune_sigma = self.tune_sigma_noise
        if tune_sigma and not fitted.structure.correlated:
            # σ from the residuals; the evidence then tunes α at that σ
            hp = fitted.hyperparameters.replace(sigma_noise=residual_sigma(fitted))
            fitted, tune_sigma = fitted.with_hyperparameters(hp), False
        result = run_marglik(self, fitted, tune_sigma_noise=tune_sigma, progress=progress)
        hp = fitted.hyperparameters.replace(
            prior_precision=result.prior_precision,
            sigma_noise=result.sigma_noise if self.tune_sigma_noise else None,
            predictive_temperature=1.0,
        )
        return Tuned(hp, marglik=result)


@dataclass(frozen=True)
class GridSearch:
    """Choose a scalar prior precision on a log grid by the mean validation NLL.

    Args:
        val_loader: Held-out ``(input, target)`` batches.
        grid: Explicit precisions (not with ``log_range`` / ``n_points``).
        log_range: ``(lo, hi)`` powers of 10 of the grid (default ``(-4, 4)``).
        n_points: Grid points (default 41).
        predict_method: Predictive scored on the validation data.
        link: Link of that predictive.
        n_samples: S of that predictive.
        generator: Random generator of that predictive.

    Raises:
        ValueError: If an option is invalid, or ``grid`` comes with ``log_range`` /
            ``n_points``.
        TypeError: If ``generator`` is not a ``torch.Generator``.
    """

    val_loader: object
    grid: object = None
    log_range: tuple[float, float] | None = None
    n_points: int | None = None
    predict_method: str | PredictMethod = "glm"
    link: str | Link | None = None
    n_samples: int = 100
    generator: torch.Generator | None = None
    points: Tensor = field(init=False, repr=False)

    name = TuneMethod.GRIDSEARCH

    def __post_init__(self):
        check_predictive_options(self, self.name.value)
        if self.grid is not None:
            if self.log_range is not None or self.n_points is not None:
                raise ValueError(
                    "grid must not be combined with log_range / n_points; got both. Pass either "
                    "an explicit grid or a log-range and a number of points."
                )
            points = check_grid(self.grid)
        else:
            lo_hi = (-4.0, 4.0) if self.log_range is None else self.log_range
            points = default_grid(lo_hi, 41 if self.n_points is None else self.n_points)
        object.__setattr__(self, "points", points)

    def check(self, likelihood: Likelihood) -> None:
        """Refuse a predictive that does not apply to ``likelihood``.

        Raises:
            ValueError: If the method / link pair is invalid for it, or its predictive has no
                targets to score (reward modelling).
        """
        check_scored(likelihood)
        resolve_options(likelihood, self.predict_method, self.link)

    def tune(self, fitted, *, progress: bool = False) -> Tuned:
        """Score every grid point on the validation data; T is reset to 1.

        Returns:
            The :class:`Tuned` precision, the validation curve and an edge warning.
        """
        self.check(fitted.likelihood)
        method, link = resolve_options(fitted.likelihood, self.predict_method, self.link)
        batches = fitted.reader.validation_batches(self.val_loader, fitted.input_spec)
        result = gridsearch(
            fitted.fmodel,
            posterior_at=lambda a: fitted.posterior_at(a, None),
            batches=batches,
            likelihood=fitted.likelihood,
            lik=fitted.likelihood,
            grid=self.points.to(fitted.fmodel.dtype),
            method=method,
            link=link,
            sigma_noise=fitted.hyperparameters.sigma_noise,
            n_samples=self.n_samples,
            generator=self.generator,
            n_outputs=fitted.statistics.n_outputs,
            progress=progress,
            ignore_index=fitted.reader.ignore_index,
            head=fitted.head,
        )
        hp = fitted.hyperparameters.replace(prior_precision=result.best, predictive_temperature=1.0)
        edge = grid_edge_warning(result, explicit_grid=self.grid is not None)
        return Tuned(hp, gridsearch=result, warning=edge)


_METHODS = {m.name: m for m in (Marglik, GridSearch, MarglikTemperature, Temperature)}


def _keywords(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.init]


def default_method(likelihood: Likelihood, val_loader: object) -> TuneMethod:
    """The method of ``optimize_prior_precision()`` without ``method``.

    Without a validation loader, the evidence (it needs nothing beyond the fit); with one,
    the evidence for α and a predictive temperature on the loader (the best validation-based
    method of ``benchmarks/bench_calibration.py``, see ``docs/calibration.md``).

    Returns:
        ``TuneMethod.MARGLIK`` or ``TuneMethod.MARGLIK_TEMPERATURE``.

    Raises:
        ValueError: If ``val_loader`` is given for a likelihood without a temperature.
    """
    if val_loader is None:
        return TuneMethod.MARGLIK
    lik = get_likelihood(likelihood)
    if not lik.predicts_probabilities or lik.items_per_sample > 1:
        raise ValueError(
            "val_loader without a method selects method='marglik_temperature', which needs "
            f"likelihood 'classification' or 'binary'; got likelihood={lik.name!r}. Name the "
            "method: method='gridsearch' (α by validation NLL at the current σ), or "
            "method='marglik' with tune_sigma_noise=True (α and σ by the evidence, no loader)."
        )
    return TuneMethod.MARGLIK_TEMPERATURE


def tuning_method(method: object, likelihood: Likelihood, **given: object):
    """The tuning object of ``optimize_prior_precision(method, **options)``, checked.

    Options left at ``None`` / ``False`` are not set.  An option of another method is
    refused, naming the methods it applies to and the options of this one.

    Args:
        method: ``"marglik"``, ``"gridsearch"``, ``"marglik_temperature"``,
            ``"temperature"``, a tuning object (then no option may be set), or ``None``
            (:func:`default_method`: the evidence, or with ``val_loader`` the evidence and T).
        likelihood: The wrapper's likelihood.
        **given: The keyword options as passed.

    Returns:
        A :class:`Marglik`, :class:`GridSearch`, :class:`MarglikTemperature` or
        :class:`Temperature`.

    Raises:
        ValueError: If an option is invalid, belongs to another method, or does not apply to
            ``likelihood``.
        TypeError: If ``generator`` is not a ``torch.Generator``.
    """
    given = {k: v for k, v in given.items() if v is not None and v is not False}
    if method is None:
        method = default_method(likelihood, given.get("val_loader"))
    if isinstance(method, tuple(_METHODS.values())):
        if given:
            raise ValueError(
                f"{', '.join(given)} must be left unset with a tuning object; got "
                f"{', '.join(f'{k}={v!r}' for k, v in given.items())}. Set them on the "
                f"{type(method).__name__}(...) instead."
            )
        method.check(likelihood)
        return method
    cls = _METHODS[as_enum(TuneMethod, method, "method")]
    accepts = _keywords(cls)
    wrong = [k for k in given if k not in accepts]
    if wrong:
        others = [
            m.value for m, c in _METHODS.items() if c is not cls and set(wrong) <= set(_keywords(c))
        ]
        where = " or ".join(repr(o) for o in others) or "no single method"
        raise ValueError(
            f"{', '.join(wrong)} must be left unset with method={cls.name.value!r}; got "
            f"{', '.join(f'{k}={given[k]!r}' for k in wrong)}. They apply to method={where}; "
            f"{cls.__name__} takes {', '.join(accepts)}."
        )
    # the likelihood is refused before the options are
    if cls in (MarglikTemperature, Temperature):
        check_classification(likelihood, cls.name.value)
    if given.get("tune_sigma_noise"):
        check_regression(likelihood)
    if "val_loader" in accepts:  # required: its absence is named by the constructor
        given = {"val_loader": None, **given}
    obj = cls(**given)
    obj.check(likelihood)
    return obj
