r"""Observation models: negative log likelihood, output Hessian, predictive mapping and fit.

Each likelihood works on network outputs ``f`` of shape ``(B, C)``.  The output Hessian
:math:`\Lambda_n = \nabla^2_f(-\log p(y_n \mid f_n))` does not depend on ``y`` for these models,
and each has a factor :math:`L_n` with :math:`L_n L_n^\top = \Lambda_n`:

- Gaussian with noise σ: :math:`\Lambda = I/\sigma^2`, :math:`L = I/\sigma`.
- Softmax categorical: :math:`\Lambda = \mathrm{diag}(p) - p p^\top`,
  :math:`L = \mathrm{diag}(\sqrt p) - p \sqrt p^\top`.
- Bernoulli with one logit: :math:`\Lambda = p(1-p)`, :math:`L = \sqrt{p(1-p)}`.

Curvature is always collected at σ = 1 ("unit" Hessian); the posterior rescales it by
:math:`1/(\tau\sigma^2)` so that σ and the temperature τ can be tuned without a new pass.

A likelihood object also owns what depends on the observation model elsewhere: the checks
and mapping of targets (class labels, ``ignore_index``, positions of outputs ``(B, T, C)``),
the predictive mapping (regression mean and variance with σ², class probabilities through
a link), the predictive NLL and temperature, and the fit metric (RMSE or accuracy).  The
option :class:`~laplace_ggn._checks.Likelihood` is converted into one once, by
:func:`get_likelihood`.
"""

from __future__ import annotations

from .._checks import Likelihood, as_enum
from ._base import DEFAULT_IGNORE_INDEX, FitStatistics, Prediction
from .bernoulli import Bernoulli
from .categorical import Categorical
from .curvature import OutputCurvature, as_output_curvature, observations
from .gaussian import Gaussian

__all__ = [
    "DEFAULT_IGNORE_INDEX",
    "Bernoulli",
    "Categorical",
    "FitStatistics",
    "Gaussian",
    "LikelihoodModel",
    "OutputCurvature",
    "Prediction",
    "as_output_curvature",
    "get_likelihood",
    "observations",
]

#: Any of the likelihood objects.
LikelihoodModel = Gaussian | Categorical | Bernoulli

_MODELS = {
    Likelihood.REGRESSION: Gaussian,
    Likelihood.CLASSIFICATION: Categorical,
    Likelihood.BINARY: Bernoulli,
}


def get_likelihood(kind: Likelihood | str | LikelihoodModel) -> LikelihoodModel:
    """Return the likelihood object for a :class:`~laplace_ggn._checks.Likelihood` option.

    Args:
        kind: A member, its string (``"regression"``, ``"classification"``, ``"binary"``), or
            a likelihood object (returned as it is).

    Returns:
        The likelihood object.

    Raises:
        ValueError: If ``kind`` is not a valid option.

    Example:
        >>> get_likelihood("binary").metric_name
        'accuracy'
    """
    if isinstance(kind, (Gaussian, Categorical, Bernoulli)):
        return kind
    return _MODELS[as_enum(Likelihood, kind, "likelihood")]()
