"""Calibration metrics of Gaussian regression predictives: NLL, RMSE, interval coverage."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import is_integer
from ._validation import _as_tensor, _check_levels, _check_regression

__all__ = [
    "DEFAULT_LEVELS",
    "RegressionCalibrationCurve",
    "gaussian_nll",
    "interval_coverage",
    "regression_calibration_curve",
    "regression_calibration_error",
    "regression_metrics",
    "rmse",
]


DEFAULT_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99)
"""Nominal levels of the central intervals reported by :func:`regression_metrics`."""


def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
    r"""Mean Gaussian negative log likelihood per sample, summed over outputs.

    .. math::
        \mathrm{NLL} = \frac1N \sum_n \sum_c \tfrac12\Big(\log(2\pi\sigma^2_{nc})
        + \frac{(y_{nc} - \mu_{nc})^2}{\sigma^2_{nc}}\Big)

    Args:
        mean: Predictive means :math:`\mu`, shape ``(N,)`` or ``(N, C)``.
        var: Predictive variances :math:`\sigma^2 > 0`, shape of ``mean``.
        y: Targets, shape of ``mean``.

    Returns:
        Mean NLL in nats, shape ``()``.

    Raises:
        TypeError: If an input is not a floating tensor or array.
        ValueError: If shapes disagree, a value is NaN/Inf, or a variance is not positive.

    Example:
        >>> gaussian_nll(torch.zeros(2), torch.ones(2), torch.zeros(2))
        tensor(0.9189)
    """
    mu, v, t = _check_regression(mean, var, y)
    per = 0.5 * (torch.log(2 * math.pi * v) + (t - mu).square() / v)
    return per.reshape(per.shape[0], -1).sum(dim=1).mean()


def rmse(mean: Tensor, y: Tensor) -> Tensor:
    r"""Root mean squared error over all ``N·C`` entries, :math:`\sqrt{\overline{(y-\mu)^2}}`.

    Args:
        mean: Predictive means, shape ``(N,)`` or ``(N, C)``.
        y: Targets, shape of ``mean``.

    Returns:
        RMSE, shape ``()``.

    Raises:
        TypeError: If an input is not a floating tensor or array.
        ValueError: If shapes disagree or a value is NaN/Inf.

    Example:
        >>> rmse(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]))
        tensor(3.5355)
    """
    mu, _, t = _check_regression(mean, torch.ones_like(_as_tensor(mean, "mean")), y)
    return (t - mu).square().mean().sqrt()


def _coverage(mu: Tensor, v: Tensor, t: Tensor, lv: Tensor) -> Tensor:
    # The level of the smallest central interval containing y: u = erf(|y - mu| / (sigma √2)),
    # so y lies in the central interval of level q exactly when u <= q.
    u = torch.special.erf((t - mu).abs() / (v.sqrt() * math.sqrt(2.0))).flatten()
    return (u[None, :].to(lv.dtype) <= lv[:, None]).to(lv.dtype).mean(dim=1)


def interval_coverage(
    mean: Tensor, var: Tensor, y: Tensor, *, levels: Sequence[float] = DEFAULT_LEVELS
) -> Tensor:
    r"""Observed coverage of central Gaussian intervals at nominal levels.

    The interval of level :math:`q` is :math:`\mu \pm z_q \sigma` with
    :math:`z_q = \Phi^{-1}(\tfrac{1+q}{2})`; its coverage is the fraction of the ``N·C``
    targets inside it.

    Args:
        mean: Predictive means, shape ``(N,)`` or ``(N, C)``.
        var: Predictive variances, shape of ``mean``.
        y: Targets, shape of ``mean``.
        levels: Nominal levels in ``(0, 1)``, length ``L``.

    Returns:
        Observed coverage per level, shape ``(L,)``, float64.

    Raises:
        TypeError: If an input is not a floating tensor or array.
        ValueError: If shapes disagree, a value is NaN/Inf, a variance is not positive, or a
            level is outside ``(0, 1)``.

    Example:
        >>> interval_coverage(torch.zeros(4), torch.ones(4), torch.tensor([0.1, -0.5, 1.0, 3.0]),
        ...                   levels=(0.5, 0.9))
        tensor([0.5000, 0.7500], dtype=torch.float64)
    """
    mu, v, t = _check_regression(mean, var, y)
    lv = _check_levels(levels).to(mu.device)
    return _coverage(mu, v, t, lv)


@dataclass(frozen=True)
class RegressionCalibrationCurve:
    """Observed against nominal coverage of central intervals.

    Attributes:
        nominal: Nominal levels, shape ``(L,)``.
        observed: Observed coverage per level, shape ``(L,)``.
    """

    nominal: Tensor
    observed: Tensor

    @property
    def error(self) -> Tensor:
        """Mean absolute gap between observed and nominal coverage, shape ``()``."""
        return (self.observed - self.nominal).abs().mean()


def _default_grid(n_levels: int) -> Tensor:
    return (torch.arange(n_levels, dtype=torch.float64) + 0.5) / n_levels


def regression_calibration_curve(
    mean: Tensor, var: Tensor, y: Tensor, *, n_levels: int = 20
) -> RegressionCalibrationCurve:
    r"""Observed coverage over the grid of nominal levels :math:`q_l = (l - \tfrac12)/L`.

    Args:
        mean: Predictive means, shape ``(N,)`` or ``(N, C)``.
        var: Predictive variances, shape of ``mean``.
        y: Targets, shape of ``mean``.
        n_levels: Number of levels ``L``.

    Returns:
        The curve, fields of shape ``(L,)``.

    Raises:
        TypeError: If an input is not a floating tensor or array, or ``n_levels`` not an int.
        ValueError: If shapes disagree, a value is NaN/Inf, a variance is not positive, or
            ``n_levels < 1``.

    Example:
        >>> c = regression_calibration_curve(torch.zeros(2), torch.ones(2),
        ...                                  torch.tensor([0.1, 2.0]), n_levels=2)
        >>> c.nominal
        tensor([0.2500, 0.7500], dtype=torch.float64)
        >>> c.observed
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    mu, v, t = _check_regression(mean, var, y)
    if not is_integer(n_levels):
        raise TypeError(f"n_levels must be an int; got {type(n_levels).__name__}.")
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1; got {n_levels}.")
    n_levels = int(n_levels)
    lv = _default_grid(n_levels).to(mu.device)
    return RegressionCalibrationCurve(nominal=lv, observed=_coverage(mu, v, t, lv))


def regression_calibration_error(
    mean: Tensor, var: Tensor, y: Tensor, *, n_levels: int = 20
) -> Tensor:
    r"""Mean absolute gap between observed and nominal coverage over ``L`` levels.

    .. math::
        \mathrm{RCE} = \frac1L \sum_l \lvert \hat q_l - q_l \rvert, \qquad
        \hat q_l = \frac{1}{NC} \sum_{n,c} \mathbb 1\big[\lvert y_{nc} - \mu_{nc}\rvert
        \le z_{q_l} \sigma_{nc}\big]

    Args:
        mean: Predictive means, shape ``(N,)`` or ``(N, C)``.
        var: Predictive variances, shape of ``mean``.
        y: Targets, shape of ``mean``.
        n_levels: Number of levels ``L`` of :func:`regression_calibration_curve`.

    Returns:
        The error in ``[0, 1)``, shape ``()``, float64.

    Raises:
        TypeError: If an input is not a floating tensor or array, or ``n_levels`` not an int.
        ValueError: If shapes disagree, a value is NaN/Inf, a variance is not positive, or
            ``n_levels < 1``.

    Example:
        >>> regression_calibration_error(torch.zeros(2), torch.ones(2), torch.tensor([0.1, 2.0]),
        ...                              n_levels=2)
        tensor(0.2500, dtype=torch.float64)
    """
    return regression_calibration_curve(mean, var, y, n_levels=n_levels).error


def regression_metrics(
    mean: Tensor, var: Tensor, y: Tensor, *, levels: Sequence[float] = DEFAULT_LEVELS
) -> dict[str, float]:
    """Gaussian NLL, RMSE, calibration error and interval coverage of one set of predictions.

    Args:
        mean: Predictive means, shape ``(N,)`` or ``(N, C)``.
        var: Predictive variances, shape of ``mean``.
        y: Targets, shape of ``mean``.
        levels: Nominal levels whose coverage is reported as ``"coverage_<100·level>"``.

    Returns:
        ``{"nll", "rmse", "calibration_error", "coverage_50", ...}`` mapped to Python floats.

    Raises:
        TypeError: If an input is not a floating tensor or array.
        ValueError: If shapes disagree, a value is NaN/Inf, a variance is not positive, or a
            level is outside ``(0, 1)``.

    Example:
        >>> m = regression_metrics(torch.zeros(2), torch.ones(2), torch.zeros(2), levels=(0.9,))
        >>> list(m), m["coverage_90"]
        (['nll', 'rmse', 'calibration_error', 'coverage_90'], 1.0)
    """
    mu, v, t = _check_regression(mean, var, y)
    lv = _check_levels(levels)
    cov = interval_coverage(mu, v, t, levels=lv.tolist())
    out = {
        "nll": float(gaussian_nll(mu, v, t)),
        "rmse": float(rmse(mu, t)),
        "calibration_error": float(regression_calibration_error(mu, v, t)),
    }
    for q, c in zip(lv.tolist(), cov.tolist()):
        out[f"coverage_{round(100 * q, 2):g}"] = c
    return out
