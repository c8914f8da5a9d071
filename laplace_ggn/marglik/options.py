"""Tuning methods and the validation of the options of a tuning call."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import Likelihood, Link, PredictMethod, as_enum, is_integer
from ..posteriors import PriorKind
from ..predictive import resolve_options
from .validation import check_grid, default_grid

__all__ = ["TuneMethod", "TuningOptions", "check_tuning_options"]


class TuneMethod(str, enum.Enum):
    """How :meth:`LaplaceWrapper.optimize_prior_precision` tunes the hyperparameters."""

    MARGLIK = "marglik"
    GRIDSEARCH = "gridsearch"
    MARGLIK_TEMPERATURE = "marglik_temperature"


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
_PREDICTIVE = ("val_loader", "predict_method", "link", "n_samples", "generator")
#: The options each method accepts (the others must be left unset).
_ACCEPTS = {
    TuneMethod.MARGLIK: set(_MARGLIK_ONLY),
    TuneMethod.GRIDSEARCH: set(_GRID_ONLY),
    TuneMethod.MARGLIK_TEMPERATURE: {"n_steps", "lr", "prior_structure", *_PREDICTIVE},
}


def check_tuning_options(likelihood: Likelihood, method: object, **given: object) -> TuningOptions:
    """Validate the options of a tuning call before anything runs.

    Options that belong to the other method must be left unset (``None`` / ``False``).

    Args:
        likelihood: The wrapper's likelihood.
        method: ``"marglik"``, ``"gridsearch"`` or ``"marglik_temperature"``.
        **given: The keyword options as passed.

    Returns:
        The :class:`TuningOptions`.

    Raises:
        ValueError: If an option is invalid, set for the wrong method, or
            ``tune_sigma_noise`` is asked for outside regression, or
            ``"marglik_temperature"`` for regression.
        TypeError: If ``generator`` is not a ``torch.Generator``.
    """
    m = as_enum(TuneMethod, method, "method")
    wrong = [k for k in (*_MARGLIK_ONLY, *_GRID_ONLY) if k not in _ACCEPTS[m]]
    wrong = [k for k in wrong if given.get(k) not in (None, False)]
    if wrong:
        others = [o.value for o in TuneMethod if o is not m and set(wrong) <= _ACCEPTS[o]]
        where = " or ".join(repr(o) for o in others) or "no single method"
        raise ValueError(
            f"{', '.join(wrong)} must be left unset with method={m.value!r}; got "
            f"{', '.join(f'{k}={given[k]!r}' for k in wrong)}. They apply to method={where}."
        )
    if m is TuneMethod.MARGLIK_TEMPERATURE and likelihood is Likelihood.REGRESSION:
        raise ValueError(
            "method='marglik_temperature' needs likelihood 'classification' or 'binary'; got "
            "likelihood='regression'. A Gaussian predictive is calibrated through σ: use "
            "method='marglik' with tune_sigma_noise=True."
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
    if not is_integer(n_steps) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer; got {n_steps!r}.")
    n_steps = int(n_steps)
    lr = 0.1 if given.get("lr") is None else given["lr"]
    if (
        isinstance(lr, bool)
        or not isinstance(lr, (int, float))
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise ValueError(f"lr must be a finite float > 0; got {lr!r}.")
    grid = None
    predict_method, link, n_samples = PredictMethod.GLM, None, 100
    if m is not TuneMethod.MARGLIK and given.get("val_loader") is None:
        raise ValueError(
            f"val_loader must be given with method={m.value!r}; got None. Pass a loader of "
            "held-out (input, target) batches, or use method='marglik'."
        )
    if m is TuneMethod.GRIDSEARCH:
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
    if m is not TuneMethod.MARGLIK:
        predict_method, link = resolve_options(
            likelihood,
            "glm" if given.get("predict_method") is None else given["predict_method"],
            given.get("link"),
        )
        n_samples = 100 if given.get("n_samples") is None else given["n_samples"]
        if not is_integer(n_samples) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}.")
        n_samples = int(n_samples)
        gen = given.get("generator")
        if gen is not None and not isinstance(gen, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None; got {type(gen).__name__}."
            )
    return TuningOptions(m, kind, n_steps, float(lr), grid, predict_method, link, n_samples)
