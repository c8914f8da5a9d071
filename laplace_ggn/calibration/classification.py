"""Calibration metrics of classifiers: accuracy, NLL, Brier score, ECE/MCE, reliability curves."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._validation import _check_classification, _check_n_bins, _check_probs

__all__ = [
    "ReliabilityCurve",
    "accuracy",
    "brier_score",
    "classification_metrics",
    "confidence_histogram",
    "expected_calibration_error",
    "max_probability",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "reliability_curve",
]


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
