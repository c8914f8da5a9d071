r"""The double-sided cubic-spline (DSCS) GP of Kristiadi, Hein & Hennig (NeurIPS 2021).

A Bayesian linear model on the ReLU features :math:`\mathrm{ReLU}(x_i - c)` (:math:`c \ge 0`)
and :math:`\mathrm{ReLU}(c - x_i)` (:math:`c \le 0`) of every input coordinate, with one
Gaussian weight per feature and infinitely many features, is the GP with kernel

.. math::
    k(x, x') = \frac{\sigma^2}{d} \sum_{i=1}^{d} k^1(x_i, x'_i), \qquad
    k^1(a, b) = \tfrac13 m^3 + \tfrac12 m^2 \lvert a - b\rvert
    \quad (m = \min(\lvert a\rvert, \lvert b\rvert), \ ab > 0;\ 0 \text{ otherwise}),

whose variance :math:`k(x, x) = \frac{\sigma^2}{3d}\sum_i \lvert x_i\rvert^3` grows like
:math:`\lVert x\rVert^3`. Added to every logit of a linearised ReLU network (whose mean grows
like :math:`\lVert x\rVert` and variance like :math:`\lVert x\rVert^2`), it sends the probit
ratio :math:`\mu/\sqrt{v}` to zero far from the data, so the predictive tends to uniform.
The residual enters with its prior (it is not conditioned on the training data), which
over-estimates the variance near the data by at most :math:`k(x, x)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import Link, PredictMethod, check_computed_finite
from ..glm import functional_moments, glm_from_moments
from ..predictive import resolve_options

__all__ = ["dscs_kernel", "dscs_variance", "predict_relu_gp"]


def _features(h: object, name: str) -> Tensor:
    if not isinstance(h, Tensor) or not h.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of shape (B, ...); got {type(h).__name__}"
                        + (f" of dtype {h.dtype}" if isinstance(h, Tensor) else "") + ".")  # fmt: skip
    if h.ndim < 1 or h.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, ...) with B ≥ 1; got {tuple(h.shape)}.")
    return h.reshape(h.shape[0], -1)


def _check_variance(variance: object) -> float:
    if isinstance(variance, bool) or not isinstance(variance, (int, float)):
        raise TypeError(f"variance must be a float ≥ 0; got {type(variance).__name__}.")
    if not (variance >= 0 and variance < float("inf")):
        raise ValueError(f"variance must be a finite float ≥ 0; got {variance!r}.")
    return float(variance)


def dscs_kernel(h1: Tensor, h2: Tensor, variance: float = 1.0) -> Tensor:
    r"""The DSCS kernel matrix :math:`k(h_1, h_2)`, shape ``(B1, B2)``.

    Args:
        h1: Features, shape ``(B1, ...)`` (flattened to ``(B1, d)``).
        h2: Features, shape ``(B2, ...)`` with the same ``d``.
        variance: σ² ≥ 0.

    Returns:
        The kernel matrix.

    Raises:
        ValueError: If the widths differ or σ² is negative or not finite.
        TypeError: If an input is not a floating tensor.
    """
    a, b = _features(h1, "h1")[:, None, :], _features(h2, "h2")[None, :, :]
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"h1 and h2 must have the same number of features; got {a.shape[-1]} "
                         f"and {b.shape[-1]}.")  # fmt: skip
    m = torch.minimum(a.abs(), b.abs()) * (a * b > 0)
    k1 = m**3 / 3 + m**2 * (a - b).abs() / 2
    return _check_variance(variance) * k1.mean(-1)


def dscs_variance(h: Tensor, variance: float = 1.0) -> Tensor:
    r"""The diagonal :math:`k(h, h) = \frac{\sigma^2}{3d}\sum_i \lvert h_i\rvert^3`, shape ``(B,)``.

    Args:
        h: Features, shape ``(B, ...)`` (flattened to ``(B, d)``).
        variance: σ² ≥ 0.

    Returns:
        The variances.

    Raises:
        ValueError: If σ² is negative or not finite.
        TypeError: If ``h`` is not a floating tensor.
    """
    return _check_variance(variance) * _features(h, "h").abs().pow(3).mean(-1) / 3


def predict_relu_gp(
    la: object,
    x: Tensor,
    *,
    variance: float,
    link: str | Link | None = None,
    features: Callable[[Tensor], Tensor] | None = None,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
):
    r"""GLM predictive of a fitted wrapper with the DSCS residual added to every output.

    Logits :math:`N(f(x), J\Sigma J^\top + k(h, h) I)` with :math:`h` = ``features(x)``
    (default: ``x`` itself, flattened; use standardised inputs, the kernel's origin is 0),
    through the link, then tempered by the wrapper's predictive temperature T.

    Args:
        la: A fitted :class:`~laplace_ggn.LaplaceWrapper`.
        x: Input tensor of batch size B.
        variance: σ² of the residual; 0 gives ``la.predict(x, link=link)``.
        link: ``"probit"`` (default), ``"bridge"``, ``"bridge_norm"`` or ``"mc"``.
        features: Map from ``x`` to the ``(B, ...)`` features the kernel reads.
        n_samples: S of ``link="mc"``.
        generator: Random generator of ``link="mc"``.

    Returns:
        The :class:`~laplace_ggn.predictive.Prediction`, shapes ``(B, C)``.

    Raises:
        ValueError: If ``la`` is unfitted, the outputs are sequences, or an option is invalid.
        TypeError: If ``x``, ``features(x)`` or ``variance`` has the wrong type.
    """
    fitted = getattr(la, "fitted", None)
    if fitted is None:
        raise ValueError(
            "predict_relu_gp needs a fitted LaplaceWrapper; call fit(train_loader) first."
        )
    variance = _check_variance(variance)
    _, lk = resolve_options(fitted.likelihood, PredictMethod.GLM, link)
    h = _features(x if features is None else features(x), "features(x)" if features else "x")
    with torch.no_grad():
        f, cov = functional_moments(fitted.fmodel, fitted.posterior, fitted.model_input(x),
                                    n_outputs=fitted.statistics.n_outputs, head=fitted.head)  # fmt: skip
    if cov.ndim != 3 or h.shape[0] != f.shape[0]:
        raise ValueError(f"predict_relu_gp needs outputs (B, C) and B feature rows; got outputs "
                         f"{tuple(f.shape)} and features {tuple(h.shape)}.")  # fmt: skip
    extra = dscs_variance(h.to(cov), variance)
    cov = cov + extra[:, None, None] * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    hp = fitted.hyperparameters
    pred = glm_from_moments(f.detach(), cov, likelihood=fitted.likelihood, link=lk,
                            sigma_noise=hp.sigma_noise, n_samples=n_samples, generator=generator)  # fmt: skip
    check_computed_finite(pred.mean, "predictive mean (predict_relu_gp)")
    T = hp.predictive_temperature
    return fitted.reader.result(pred if bool(T == 1) else fitted.likelihood.temper(pred, T))
