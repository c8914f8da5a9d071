r"""Calibration metrics of predictive distributions (numbers only; the figures are in ``plots``).

Classification takes predicted probabilities and integer labels:

* multiclass: ``probs`` of shape ``(N, C)`` with ``C >= 2``, rows summing to one, and
  ``labels`` in ``{0, ..., C-1}``; calibration is *top-label*: the binned quantity is the
  confidence :math:`\max_c p_{nc}` and the event is "the arg-max class is correct";
* binary: ``probs`` of shape ``(N,)`` or ``(N, 1)`` holding the probability of the positive
  class, and ``labels`` in ``{0, 1}``; calibration is of the *positive class*: the binned
  quantity is :math:`p_n` and the event is :math:`y_n = 1` (as in scikit-learn's
  ``calibration_curve``).

Regression takes a Gaussian predictive per output, mean and variance of shape ``(N,)`` or
``(N, C)``, and targets of the same shape.

Bins are the ``M`` equal-width intervals :math:`[b_{m-1}, b_m)` with
:math:`b_m = m / M`; the last one is closed, :math:`[b_{M-1}, 1]`.
"""

from .classification import (
    ReliabilityCurve,
    accuracy,
    brier_score,
    classification_metrics,
    confidence_histogram,
    expected_calibration_error,
    max_probability,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_curve,
)
from .regression import DEFAULT_LEVELS as DEFAULT_LEVELS
from .regression import (
    RegressionCalibrationCurve,
    gaussian_nll,
    interval_coverage,
    regression_calibration_curve,
    regression_calibration_error,
    regression_metrics,
    rmse,
)

__all__ = [
    "ReliabilityCurve",
    "RegressionCalibrationCurve",
    "accuracy",
    "negative_log_likelihood",
    "brier_score",
    "expected_calibration_error",
    "maximum_calibration_error",
    "reliability_curve",
    "max_probability",
    "confidence_histogram",
    "classification_metrics",
    "gaussian_nll",
    "rmse",
    "interval_coverage",
    "regression_calibration_curve",
    "regression_calibration_error",
    "regression_metrics",
]
