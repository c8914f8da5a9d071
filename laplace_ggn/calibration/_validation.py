"""Input checks shared by the calibration metrics."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .._checks import check_finite, check_positive, is_integer, shape_str


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
    if not is_integer(n_bins):
        raise TypeError(f"n_bins must be an int; got {type(n_bins).__name__}.")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
    return int(n_bins)


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
