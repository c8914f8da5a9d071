"""The entry points behind ``functional_covariance`` / ``predict`` with ``joint`` or ``differentiable``.

:class:`~laplace_ggn.FittedLaplace` hands its call here when one of the two flags is set; the
default paths (per input, without graph) stay in :mod:`laplace_ggn.glm` and
:mod:`laplace_ggn.predictive`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import PredictMethod, as_enum
from ..likelihoods import Prediction
from .differentiable import differentiable_moments, differentiable_predict
from .joint import joint_moments, joint_predict

__all__ = ["check_flag", "functional_covariance", "predict"]


def check_flag(value: object, name: str) -> bool:
    """Check a flag.

    Returns:
        ``value``, a ``bool``.

    Raises:
        TypeError: Naming the flag and the type received.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__}.")
    return value


def functional_covariance(
    fitted, x: object, *, joint: bool = False, differentiable: bool = False
) -> Tensor:
    r""":math:`J \Sigma J^\top` per input ``(B, C, C)`` or joint ``(B, C, B, C)``.

    Args:
        fitted: The :class:`~laplace_ggn.FittedLaplace`.
        x: Model input of batch size B.
        joint: The covariances between inputs too.
        differentiable: Keep the graph to ``x`` (default: no graph, as every read path).

    Returns:
        ``(B, C, C)``, or ``(B, C, B, C)`` for ``joint=True`` (sequence outputs: ``(B, T, C, C)``
        / ``(B, T, C, B, T, C)``).
    """
    joint = check_flag(joint, "joint")
    differentiable = check_flag(differentiable, "differentiable")
    if not (joint or differentiable):
        return fitted.functional_covariance(x)
    x = fitted.model_input(x)
    if not joint:
        return fitted.reader.result(differentiable_moments(fitted, x)[1])
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        f, cov = joint_moments(fitted, x, differentiable=differentiable)
    return fitted.reader.result(cov.reshape(*f.shape, *f.shape))


def predict(
    fitted,
    x: object,
    method: object = "glm",
    *,
    link: object = None,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    joint: bool = False,
    differentiable: bool = False,
) -> Prediction:
    """The GLM predictive, joint over the inputs and/or differentiable in ``x``.

    Returns:
        A :class:`~laplace_ggn.function_space.JointPrediction` for ``joint=True``
        (regression), else a :class:`~laplace_ggn.predictive.Prediction`.

    Raises:
        ValueError: If ``joint=True`` with a likelihood other than regression or with
            ``method="nn"``, ``differentiable=True`` with ``method="nn"``, or an option is invalid.
    """
    joint = check_flag(joint, "joint")
    differentiable = check_flag(differentiable, "differentiable")
    if not (joint or differentiable):
        return fitted.predict(x, method, link=link, n_samples=n_samples, generator=generator)
    x = fitted.model_input(x)
    if joint:
        if as_enum(PredictMethod, method, "method") is not PredictMethod.GLM:
            raise ValueError(
                f"joint=True applies to method='glm' (the linearised predictive); got "
                f"method={method!r}. Use functional_samples(x, n) for joint draws."
            )
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            return fitted.reader.result(joint_predict(fitted, x, differentiable=differentiable))
    return fitted.reader.result(
        differentiable_predict(
            fitted, x, method, link=link, n_samples=n_samples, generator=generator
        )
    )
