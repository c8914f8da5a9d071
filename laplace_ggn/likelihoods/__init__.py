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

Beyond the three: the heteroscedastic Gaussian (outputs = mean and log-variance), Poisson
counts on log-rates, and reward modelling (Bradley–Terry on pairs).  Any object with the
members of :class:`LikelihoodModel` is a likelihood too: subclass :class:`BaseLikelihood`
(everything derived from a per-sample NLL) or call :func:`from_nll` (``docs/likelihoods.md``).
"""

from __future__ import annotations

from .._checks import Likelihood, as_enum
from ._base import DEFAULT_IGNORE_INDEX, FitStatistics, Prediction
from .base import BaseLikelihood
from .bernoulli import Bernoulli
from .categorical import Categorical
from .curvature import OutputCurvature, as_output_curvature, observations
from .from_nll import from_nll
from .gaussian import Gaussian
from .heteroscedastic import HeteroscedasticGaussian
from .poisson import Poisson
from .protocol import REQUIRED_MEMBERS, LikelihoodModel
from .reward import RewardModeling

__all__ = [
    "DEFAULT_IGNORE_INDEX",
    "BaseLikelihood",
    "Bernoulli",
    "Categorical",
    "FitStatistics",
    "Gaussian",
    "HeteroscedasticGaussian",
    "LikelihoodModel",
    "OutputCurvature",
    "Poisson",
    "Prediction",
    "RewardModeling",
    "as_output_curvature",
    "from_nll",
    "get_likelihood",
    "observations",
    "restore_likelihood",
]

_MODELS = {
    Likelihood.REGRESSION: Gaussian,
    Likelihood.CLASSIFICATION: Categorical,
    Likelihood.BINARY: Bernoulli,
    Likelihood.HETEROSCEDASTIC: HeteroscedasticGaussian,
    Likelihood.POISSON: Poisson,
    Likelihood.REWARD_MODELING: RewardModeling,
}


def get_likelihood(kind: Likelihood | str | LikelihoodModel) -> LikelihoodModel:
    """Return the likelihood object for a ``likelihood=`` option.

    Args:
        kind: A :class:`~laplace_ggn._checks.Likelihood` member, its string (``"regression"``,
            ``"classification"``, ``"binary"``, ``"heteroscedastic"``, ``"poisson"``,
            ``"reward_modeling"``), or a likelihood object (returned as it is).

    Returns:
        The likelihood object.

    Raises:
        ValueError: If ``kind`` is a string that names no likelihood.
        TypeError: If ``kind`` is an object without the members of :class:`LikelihoodModel`.

    Example:
        >>> get_likelihood("binary").metric_name
        'accuracy'
    """
    if isinstance(kind, (Likelihood, str)):
        return _MODELS[as_enum(Likelihood, kind, "likelihood")]()
    missing = [m for m in REQUIRED_MEMBERS if not hasattr(kind, m)]
    if isinstance(kind, type) or missing:
        got = f"the class {kind.__name__}" if isinstance(kind, type) else type(kind).__name__
        detail = " (pass an instance)" if isinstance(kind, type) else f" without {missing[:4]}"
        raise TypeError(
            f"likelihood must be one of {[m.value for m in Likelihood]} or a likelihood object "
            f"(laplace_ggn.likelihoods.LikelihoodModel: a BaseLikelihood subclass or "
            f"from_nll(nll)); got {got}{detail}."
        )
    return kind


def restore_likelihood(name: str, params: dict, likelihood: object = None) -> object:
    """The likelihood a state was saved with, with its saved parameters.

    Args:
        name: The saved ``likelihood.name``.
        params: The saved ``likelihood.state_dict()``.
        likelihood: The likelihood object to restore a user likelihood into (its NLL is code,
            which a state does not hold); ``None`` for a built-in one.

    Returns:
        A built-in likelihood's name, or a likelihood object with the saved parameters.

    Raises:
        ValueError: If a user likelihood is not given, or ``likelihood`` has another name.
    """
    params = dict(params)
    if likelihood is None:
        if name not in {m.value for m in Likelihood}:
            raise ValueError(
                f"likelihood must be given to from_state_dict for a state saved with the user "
                f"likelihood {name!r}; got None. A state holds its parameters, not its code: "
                "pass likelihood=<the same likelihood object>."
            )
        return name if not params else get_likelihood(name).with_state(params)
    lik = get_likelihood(likelihood)
    if lik.name != name:
        raise ValueError(
            f"likelihood must be the one the state was saved with, {name!r}; got likelihood "
            f"{lik.name!r}."
        )
    return lik.with_state(params)
