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

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._checks import check_finite, check_positive, shape_str

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

DEFAULT_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99)
"""Nominal levels of the central intervals reported by :func:`regression_metrics`."""


# --------------------------------------------------------------------------- validation


def _as_tensor(x: object, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(
        f"{name} must be a torch.Tensor or numpy.ndarray; got {type(x).__name__}. "
        "Convert lists with torch.tensor(...)."
    )


def _check_probs(probs: object) -> Tensor:
    # Validate probabilities; return them as (N,) (binary) or (N, C) with C >= 2.
    probs = _as_tensor(probs, "probs")
    if not probs.is_floating_point():
        raise TypeError(
            f"probs must be a floating-point tensor of probabilities; got dtype {probs.dtype}. "
            "Pass probabilities, not predicted labels."
        )
    if probs.ndim == 2 and probs.shape[1] == 1:
        probs = probs[:, 0]
    if probs.ndim not in (1, 2) or probs.shape[0] == 0:
        raise ValueError(
            "probs must have shape (N,) or (N, 1) (binary) or (N, C) (multiclass) with N >= 1; "
            f"got {shape_str(probs.shape)}."
        )
    check_finite(probs, "probs")
    lo, hi = float(probs.min()), float(probs.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"probs must lie in [0, 1]; got values in [{lo:.4g}, {hi:.4g}]. "
            "Apply softmax (or sigmoid for binary) to logits first."
        )
    if probs.ndim == 2:
        tol = math.sqrt(torch.finfo(probs.dtype).eps)
        err = float((probs.sum(dim=1) - 1.0).abs().max())
        if err > tol:
            raise ValueError(
                f"probs rows must sum to 1 (within {tol:.1e}); got a maximal deviation of "
                f"{err:.3g}. Apply softmax to logits, or pass the positive-class column "
                "alone for binary problems."
            )
    return probs


def _check_labels(labels: object, probs: Tensor) -> Tensor:
    labels = _as_tensor(labels, "labels")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"labels must be an integer or bool tensor; got dtype {labels.dtype}. "
            "Convert with labels.long()."
        )
    n = probs.shape[0]
    if labels.shape != (n,):
        raise ValueError(
            f"labels must have shape {shape_str((n,))} to match probs {shape_str(probs.shape)}; "
            f"got {shape_str(labels.shape)}."
        )
    if labels.device != probs.device:
        raise ValueError(
            f"labels must be on the device of probs ({probs.device}); got {labels.device}."
        )
    labels = labels.long()
    n_classes = 2 if probs.ndim == 1 else probs.shape[1]
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(
            f"labels must lie in {{0, ..., {n_classes - 1}}} for probs of shape "
            f"{shape_str(probs.shape)}; got values in [{lo}, {hi}]."
        )
    return labels


def _check_n_bins(n_bins: object) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int):
        raise TypeError(f"n_bins must be an int; got {type(n_bins).__name__}.")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
    return n_bins


def _check_classification(probs: object, labels: object) -> tuple[Tensor, Tensor]:
    p = _check_probs(probs)
    return p, _check_labels(labels, p)


def _check_regression(mean: object, var: object, y: object) -> tuple[Tensor, Tensor, Tensor]:
    mean, var, y = _as_tensor(mean, "mean"), _as_tensor(var, "var"), _as_tensor(y, "y")
    if not mean.is_floating_point():
        raise TypeError(f"mean must be a floating-point tensor; got dtype {mean.dtype}.")
    if mean.ndim not in (1, 2) or mean.shape[0] == 0:
        raise ValueError(
            f"mean must have shape (N,) or (N, C) with N >= 1; got {shape_str(mean.shape)}."
        )
    for name, t in (("var", var), ("y", y)):
        if t.shape != mean.shape:
            raise ValueError(
                f"{name} must have the shape of mean {shape_str(mean.shape)}; got "
                f"{shape_str(t.shape)}. Reshape, e.g. {name}.reshape(mean.shape)."
            )
        if t.device != mean.device:
            raise ValueError(
                f"{name} must be on the device of mean ({mean.device}); got {t.device}."
            )
    for name, t in (("mean", mean), ("var", var), ("y", y)):
        check_finite(t, name)
    check_positive(var, "var")
    return mean, var.to(mean.dtype), y.to(mean.dtype)


def _check_levels(levels: object) -> Tensor:
    lv = torch.as_tensor(levels, dtype=torch.float64).flatten()
    if lv.numel() == 0 or not bool(((lv > 0) & (lv < 1)).all()):
        raise ValueError(
            f"levels must be a non-empty sequence of numbers in (0, 1); got {lv.tolist()}."
        )
    return lv


# --------------------------------------------------------------------------- classification


def _event_probability(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    # Binned quantity and its event: (confidence, correct) or (p(y=1), y).
    if probs.ndim == 1:
        return probs, labels.to(probs.dtype)
    conf, pred = probs.max(dim=1)
    return conf, (pred == labels).to(probs.dtype)


def _prob_of_label(probs: Tensor, labels: Tensor) -> Tensor:
    if probs.ndim == 1:
        return torch.where(labels == 1, probs, 1.0 - probs)
    return probs.gather(1, labels[:, None])[:, 0]


def accuracy(probs: Tensor, labels: Tensor) -> Tensor:
    r"""Fraction of correct arg-max predictions (binary: :math:`p_n > 0.5` predicts class 1).

    Args:
        probs: Probabilities, shape ``(N, C)``, or ``(N,)`` / ``(N, 1)`` of the positive class.
        labels: Integer labels, shape ``(N,)``.

    Returns:
        Accuracy in ``[0, 1]``, shape ``()``.

    Raises:
        TypeError: If an input has the wrong type or dtype.
        ValueError: If shapes disagree, labels are out of range, or probs are not probabilities.

    Example:
        >>> accuracy(torch.tensor([[0.9, 0.1], [0.4, 0.6]]), torch.tensor([0, 0]))
        tensor(0.5000)
    """
    p, y = _check_classification(probs, labels)
    pred = (p > 0.5).long() if p.ndim == 1 else p.argmax(dim=1)
    return (pred == y).to(p.dtype).mean()


def negative_log_likelihood(probs: Tensor, labels: Tensor) -> Tensor:
    r"""Mean negative log likelihood of the labels, :math:`-\frac1N \sum_n \log p_{n, y_n}`.

    Probabilities are clipped to :math:`[\epsilon, 1-\epsilon]`, :math:`\epsilon` the machine
    epsilon of their dtype, so that a zero probability on the true class gives a finite value
    (the convention of scikit-learn's ``log_loss``).

    Args:
        probs: Probabilities, shape ``(N, C)``, or ``(N,)`` / ``(N, 1)`` of the positive class.
        labels: Integer labels, shape ``(N,)``.

    Returns:
        Mean NLL in nats, shape ``()``.

    Raises:
        TypeError: If an input has the wrong type or dtype.
        ValueError: If shapes disagree, labels are out of range, or probs are not probabilities.

    Example:
        >>> negative_log_likelihood(torch.tensor([[0.5, 0.5]]), torch.tensor([1]))
        tensor(0.6931)
    """
    p, y = _check_classification(probs, labels)
    eps = torch.finfo(p.dtype).eps
    return -_prob_of_label(p, y).clamp(eps, 1.0 - eps).log().mean()


def brier_score(probs: Tensor, labels: Tensor) -> Tensor:
    r"""Mean Brier score.

    Multiclass, the squared error summed over classes and averaged over samples (range
    ``[0, 2]``); binary, the squared error of the positive-class probability (range ``[0, 1]``,
    half the two-class sum). Both agree with scikit-learn's ``brier_score_loss``.

    .. math::
        \mathrm{BS} = \frac1N \sum_n \sum_c (p_{nc} - \mathbb 1[y_n = c])^2, \qquad
        \mathrm{BS}_\text{binary} = \frac1N \sum_n (p_n - y_n)^2.

    Args:
        probs: Probabilities, shape ``(N, C)``, or ``(N,)`` / ``(N, 1)`` of the positive class.
        labels: Integer labels, shape ``(N,)``.

    Returns:
        Brier score, shape ``()``.

    Raises:
        TypeError: If an input has the wrong type or dtype.
        ValueError: If shapes disagree, labels are out of range, or probs are not probabilities.

    Example:
        >>> brier_score(torch.tensor([[0.75, 0.25]]), torch.tensor([0]))
        tensor(0.1250)
    """
    p, y = _check_classification(probs, labels)
    if p.ndim == 1:
        return (p - y.to(p.dtype)).square().mean()
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    return (p - onehot).square().sum(dim=1).mean()


def _calibration_error(probs: Tensor, labels: Tensor, n_bins: int, norm: str) -> Tensor:
    # imported here: torchmetrics imports matplotlib when present, which plain metrics do not need
    from torchmetrics.functional.classification import binary_calibration_error

    p, y = _check_classification(probs, labels)
    n_bins = _check_n_bins(n_bins)
    conf, event = _event_probability(p, y)
    # torchmetrics gives a confidence of exactly 1 a bin of its own; moving it to the largest
    # float below 1 puts it in the closed last bin [b_{M-1}, 1] (a change of one ulp).
    conf = conf.clamp(max=torch.nextafter(torch.ones((), dtype=conf.dtype), conf.new_zeros(())))
    return binary_calibration_error(conf, event.long(), n_bins=n_bins, norm=norm)


def expected_calibration_error(probs: Tensor, labels: Tensor, *, n_bins: int = 15) -> Tensor:
    r"""Compute the expected calibration error over equal-width bins (through torchmetrics).

    .. math::
        \mathrm{ECE} = \sum_{m=1}^{M} \frac{n_m}{N}\, \lvert \mathrm{acc}_m - \mathrm{conf}_m \rvert

    with :math:`n_m` the number of samples whose confidence (binary: positive-class
    probability) falls in bin ``m``, :math:`\mathrm{conf}_m` their mean confidence and
    :math:`\mathrm{acc}_m` their accuracy (binary: frequency of class 1).

    Args:
        probs: Probabilities, shape ``(N, C)``, or ``(N,)`` / ``(N, 1)`` of the positive class.
        labels: Integer labels, shape ``(N,)``.
        n_bins: Number of equal-width bins ``M`` on ``[0, 1]``.

    Returns:
        ECE in ``[0, 1]``, shape ``()``.

    Raises:
        TypeError: If an input has the wrong type or dtype, or ``n_bins`` is not an int.
        ValueError: If shapes disagree, labels are out of range, probs are not probabilities,
            or ``n_bins < 1``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]], dtype=torch.float64)
        >>> expected_calibration_error(probs, torch.tensor([0, 1]), n_bins=2)
        tensor(0.3500, dtype=torch.float64)
    """
    return _calibration_error(probs, labels, n_bins, "l1")


def maximum_calibration_error(probs: Tensor, labels: Tensor, *, n_bins: int = 15) -> Tensor:
    r"""Compute the maximum calibration error over non-empty bins (through torchmetrics).

    .. math::
        \mathrm{MCE} = \max_{m:\, n_m > 0} \lvert \mathrm{acc}_m - \mathrm{conf}_m \rvert

    Args:
        probs: Probabilities, shape ``(N, C)``, or ``(N,)`` / ``(N, 1)`` of the positive class.
        labels: Integer labels, shape ``(N,)``.
        n_bins: Number of equal-width bins ``M`` on ``[0, 1]``.

    Returns:
        MCE in ``[0, 1]``, shape ``()``.

    Raises:
        TypeError: If an input has the wrong type or dtype, or ``n_bins`` is not an int.
        ValueError: If shapes disagree, labels are out of range, probs are not probabilities,
            or ``n_bins < 1``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]], dtype=torch.float64)
        >>> maximum_calibration_error(probs, torch.tensor([0, 1]), n_bins=2)
        tensor(0.3500, dtype=torch.float64)
    """
    return _calibration_error(probs, labels, n_bins, "max")


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin data of a reliability diagram over ``M`` equal-width bins.

    Attributes:
        confidence: Mean confidence (binary: mean positive-class probability) per bin,
            shape ``(M,)``; NaN for empty bins.
        accuracy: Accuracy (binary: frequency of class 1) per bin, shape ``(M,)``; NaN for
            empty bins.
        counts: Number of samples per bin, shape ``(M,)``, integer.
        edges: Bin edges ``m / M``, shape ``(M + 1,)``.
    """

    confidence: Tensor
    accuracy: Tensor
    counts: Tensor
    edges: Tensor

    @property
    def nonempty(self) -> Tensor:
        """Mask of the bins holding at least one sample, shape ``(M,)``."""
        return self.counts > 0

    @property
    def ece(self) -> Tensor:
        """Expected calibration error computed from the bins, shape ``()``."""
        m = self.nonempty
        w = self.counts[m].to(self.confidence.dtype) / self.counts.sum()
        return (w * (self.accuracy[m] - self.confidence[m]).abs()).sum()


def _bin_index(values: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=values.dtype, device=values.device)
    idx = (torch.bucketize(values, edges, right=True) - 1).clamp(0, n_bins - 1)
    return idx, edges


def reliability_curve(probs: Tensor, labels: Tensor, *, n_bins: int = 15) -> ReliabilityCurve:
    r"""Bin the predictions by confidence and compare mean confidence with accuracy per bin.

    Binary input bins the positive-class probability against the frequency of class 1; its
    non-empty bins equal scikit-learn's ``calibration_curve(labels, probs, n_bins=M)``
    (which drops empty bins).

    Args:
        probs: Probabilities, shape ``(N, C)``, or ``(N,)`` / ``(N, 1)`` of the positive class.
        labels: Integer labels, shape ``(N,)``.
        n_bins: Number of equal-width bins ``M`` on ``[0, 1]``.

    Returns:
        The per-bin data, each field of shape ``(M,)`` (``edges``: ``(M + 1,)``).

    Raises:
        TypeError: If an input has the wrong type or dtype, or ``n_bins`` is not an int.
        ValueError: If shapes disagree, labels are out of range, probs are not probabilities,
            or ``n_bins < 1``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
        >>> curve = reliability_curve(probs, torch.tensor([0, 1, 1]), n_bins=2)
        >>> curve.counts
        tensor([0, 3])
        >>> curve.accuracy
        tensor([   nan, 0.6667], dtype=torch.float64)
    """
    p, y = _check_classification(probs, labels)
    n_bins = _check_n_bins(n_bins)
    conf, event = _event_probability(p, y)
    idx, edges = _bin_index(conf, n_bins)
    counts = torch.bincount(idx, minlength=n_bins)
    sum_conf = torch.zeros(n_bins, dtype=p.dtype, device=p.device).index_add_(0, idx, conf)
    sum_event = torch.zeros(n_bins, dtype=p.dtype, device=p.device).index_add_(0, idx, event)
    c = counts.to(p.dtype)
    nan = torch.full_like(c, float("nan"))
    return ReliabilityCurve(
        confidence=torch.where(counts > 0, sum_conf / c, nan),
        accuracy=torch.where(counts > 0, sum_event / c, nan),
        counts=counts,
        edges=edges,
    )


def max_probability(probs: Tensor) -> Tensor:
    r"""Confidence of each prediction, :math:`\max_c p_{nc}` (binary: :math:`\max(p_n, 1-p_n)`).

    Args:
        probs: Probabilities, shape ``(N, C)``, or ``(N,)`` / ``(N, 1)`` of the positive class.

    Returns:
        Confidences, shape ``(N,)``.

    Raises:
        TypeError: If ``probs`` is not a floating-point tensor or array.
        ValueError: If ``probs`` has a bad shape or does not hold probabilities.

    Example:
        >>> max_probability(torch.tensor([0.2, 0.7]))
        tensor([0.8000, 0.7000])
    """
    p = _check_probs(probs)
    return torch.maximum(p, 1.0 - p) if p.ndim == 1 else p.max(dim=1).values


def confidence_histogram(probs: Tensor, *, n_bins: int = 15) -> tuple[Tensor, Tensor]:
    """Count the :func:`max_probability` confidences in ``n_bins`` equal-width bins.

    Args:
        probs: Probabilities, shape ``(N, C)``, or ``(N,)`` / ``(N, 1)`` of the positive class.
        n_bins: Number of bins ``M``.

    Returns:
        ``(counts, edges)`` of shapes ``(M,)`` (integer) and ``(M + 1,)``.

    Raises:
        TypeError: If ``probs`` is not floating point, or ``n_bins`` is not an int.
        ValueError: If ``probs`` does not hold probabilities, or ``n_bins < 1``.

    Example:
        >>> counts, edges = confidence_histogram(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), n_bins=2)
        >>> counts
        tensor([0, 2])
    """
    conf = max_probability(probs)
    n_bins = _check_n_bins(n_bins)
    idx, edges = _bin_index(conf, n_bins)
    return torch.bincount(idx, minlength=n_bins), edges


def classification_metrics(probs: Tensor, labels: Tensor, *, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, Brier score, ECE and MCE of one set of predictions.

    Args:
        probs: Probabilities, shape ``(N, C)``, or ``(N,)`` / ``(N, 1)`` of the positive class.
        labels: Integer labels, shape ``(N,)``.
        n_bins: Number of bins for ECE and MCE.

    Returns:
        ``{"accuracy", "nll", "brier", "ece", "mce"}`` mapped to Python floats.

    Raises:
        TypeError: If an input has the wrong type or dtype, or ``n_bins`` is not an int.
        ValueError: If shapes disagree, labels are out of range, probs are not probabilities,
            or ``n_bins < 1``.

    Example:
        >>> m = classification_metrics(torch.tensor([[0.75, 0.25]]), torch.tensor([0]))
        >>> sorted(m), m["brier"]
        (['accuracy', 'brier', 'ece', 'mce', 'nll'], 0.125)
    """
    p, y = _check_classification(probs, labels)
    n_bins = _check_n_bins(n_bins)
    return {
        "accuracy": float(accuracy(p, y)),
        "nll": float(negative_log_likelihood(p, y)),
        "brier": float(brier_score(p, y)),
        "ece": float(expected_calibration_error(p, y, n_bins=n_bins)),
        "mce": float(maximum_calibration_error(p, y, n_bins=n_bins)),
    }


# --------------------------------------------------------------------------- regression


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
    if isinstance(n_levels, bool) or not isinstance(n_levels, int):
        raise TypeError(f"n_levels must be an int; got {type(n_levels).__name__}.")
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1; got {n_levels}.")
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
