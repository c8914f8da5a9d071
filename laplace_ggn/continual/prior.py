r"""A prior with a mean, and a fitted posterior used as the prior of the next fit.

``LaplaceWrapper(..., prior_mean=m)`` with a tensor ``m`` of shape ``(P,)`` centres the
prior, :math:`p(\theta) = N(m, \Lambda_0^{-1})`: the evidence's prior term becomes
:math:`\tfrac12(\theta_*-m)^\top\Lambda_0(\theta_*-m)`; the posterior, its covariance and the
predictives do not depend on the prior mean (they are centred at θ*, the weights of the fit).

``prior_mean=la`` with a fitted wrapper ``la`` makes its posterior
:math:`N(\theta_1, \Lambda_1^{-1})`, :math:`\Lambda_1 = sG_1 + D`, the prior of the new fit:
the prior mean is θ₁, and the prior precision is :math:`sG_1 + D` with the curvature
:math:`G_1` that ``la`` holds and its diagonal prior precision D.  The new posterior is

.. math::
    \Lambda = sG_2 + \Lambda_1 = s(G_1 + G_2) + D,

held exactly as one curvature :math:`G_1 + G_2` of the same structure, and the evidence is
that of the new data given the old ones,

.. math::
    \log p(\mathcal D_2 \mid \mathcal D_1) \approx -\ell_2(\theta_*)
    - \tfrac12(\theta_*-\theta_1)^\top\Lambda_1(\theta_*-\theta_1)
    - \tfrac12\log|\Lambda| + \tfrac12\log|\Lambda_1|.

The curvature scale s (σ, τ) and D are those of the new wrapper, shared by both data sets:
they start at ``la``'s values (so the prior is exactly ``la``'s posterior), and tuning them
(``optimize_prior_precision``) moves D and s in :math:`\Lambda_1` and in Λ together.  Exact for
``full``, ``diag`` and ``lowrank`` with ``rank=None``; ``kfac`` (a sum of Kronecker products is
no Kronecker product) and top-k ``lowrank`` are refused here: use
``la.fit(loader, accumulate=True)``, which states its approximation, and ``la.log_prob`` as
the penalty of the next task (``docs/continual.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import Tensor

from .._checks import shape_str
from ..fitted import FittedLaplace
from ..hyperparameters import Hyperparameters
from ..posterior_states import describe, state_tensor
from ..posteriors import Prior
from ..structures import STRUCTURES
from .curvature import check_continual, curvature_quadratic

__all__ = [
    "CarriedCurvature",
    "check_saved_prior",
    "resolve_prior_mean",
    "restore_prior_base",
    "save_prior_base",
    "saved_prior_options",
]

#: Structures whose posterior becomes a prior exactly.
EXACT_PRIOR_STRUCTURES = ("full", "diag", "lowrank")


class CarriedCurvature:
    r"""The curvature :math:`G_0` of earlier data that a prior carries (``Prior.base``).

    The prior precision is :math:`sG_0 + D` (s: the curvature scale, D: the diagonal prior
    precision); its two terms of the evidence are :meth:`quadratic` and :meth:`log_det`.

    Args:
        structure: The structure's name.
        posterior: A posterior of that structure holding :math:`G_0` (any prior).
    """

    def __init__(self, structure: str, posterior: object):
        self.structure = structure
        self.posterior = posterior
        self.state = posterior.state_dict()

    def quadratic(self, delta: Tensor) -> Tensor:
        r""":math:`\delta^\top G_0 \delta` for δ of shape ``(P,)`` or ``(..., P)``."""
        return curvature_quadratic(self.structure, self.state, self.posterior.prior.layout, delta)

    def log_det(self, prior: Prior, scale: Tensor) -> Tensor:
        r""":math:`\log|sG_0 + D|` with D the diagonal precision of ``prior``, shape ``()``."""
        plain = Prior(prior.precision, prior.layout, prior.kind)
        return self.posterior.with_prior(plain, scale).log_det()


def _fitted_of(value: object) -> FittedLaplace | None:
    if isinstance(value, FittedLaplace):
        return value
    fitted = getattr(value, "fitted", None)
    return fitted if isinstance(fitted, FittedLaplace) else None


def resolve_prior_mean(
    prior_mean: object, options, layout, hp: Hyperparameters, given: tuple = (1.0, 1.0, 1.0)
) -> Hyperparameters:
    """The initial hyperparameters with the prior mean (and the curvature the prior carries).

    Args:
        prior_mean: ``None``, a tensor ``(P,)``, or a fitted wrapper (or its
            :class:`~laplace_ggn.FittedLaplace`) whose posterior becomes the prior.
        options: The new wrapper's :class:`~laplace_ggn.fit_options.FitOptions`.
        layout: The subset (``None`` before the fit for ``"last_layer"``).
        hp: The hyperparameters from the constructor's arguments.
        given: The constructor's ``(prior_precision, sigma_noise, temperature)``; they must be
            left at their defaults (1.0) with a fitted wrapper, whose values are taken.

    Returns:
        The hyperparameters with ``prior_mean`` (and ``prior_base``: the curvature every fit
        of the new wrapper adds) set.

    Raises:
        TypeError: If ``prior_mean`` is neither a tensor nor a fitted wrapper.
        ValueError: If the tensor is not ``(P,)`` or not finite, the wrapper is not fitted, or
            its structure, likelihood or subset cannot become this wrapper's prior exactly.
    """
    if prior_mean is None:
        return hp
    if isinstance(prior_mean, Tensor):
        if not prior_mean.is_floating_point() or prior_mean.ndim != 1:
            raise ValueError(
                f"prior_mean must be a floating tensor of shape (P,) or a fitted LaplaceWrapper; "
                f"got a {prior_mean.dtype} tensor of shape {shape_str(prior_mean.shape)}."
            )
        if not bool(torch.isfinite(prior_mean).all()):
            raise ValueError("prior_mean must be finite; got NaN or Inf entries.")
        mean = prior_mean.detach().to(dtype=options.reader.dtype, device=options.reader.device)
        hp = replace(hp, prior_mean=mean.clone())
        if layout is not None:
            options.spec.check_prior(hp.prior(layout))
        return hp
    prev = _fitted_of(prior_mean)
    if prev is None:
        fitted = getattr(prior_mean, "is_fitted", None) is False
        raise (ValueError if fitted else TypeError)(
            "prior_mean must be a tensor of shape (P,) or a fitted LaplaceWrapper; got "
            + ("an unfitted LaplaceWrapper. Call fit(train_loader) on it first." if fitted else
               f"{type(prior_mean).__name__}.")
        )  # fmt: skip
    defaults = all(not isinstance(v, Tensor) and v == 1.0 for v in given)
    return _from_fitted(prev, options, layout, defaults)


def _from_fitted(prev: FittedLaplace, options, layout, defaults: bool) -> Hyperparameters:
    name = prev.structure.name
    if name != options.structure:
        raise ValueError(
            f"prior_mean must be a wrapper of the same structure; got one of structure="
            f"{name!r} for structure={options.structure!r}."
        )
    if name not in EXACT_PRIOR_STRUCTURES or (name == "lowrank" and options.rank is not None):
        raise ValueError(
            f"a fitted wrapper becomes a prior exactly for structure 'full', 'diag' or "
            f"'lowrank' with rank=None; got structure={name!r}"
            + (f" with rank={options.rank}" if options.rank is not None else "")
            + ". Use la.fit(loader, accumulate=True) (its approximation is stated in "
            "docs/continual.md) and la.log_prob(theta) as the penalty of the next task."
        )
    check_continual(name, "a fitted wrapper as prior_mean", prev.hyperparameters.sigma_noise)
    if prev.likelihood.name != options.likelihood_model.name:
        raise ValueError(
            f"prior_mean must be a wrapper of the same likelihood; got {prev.likelihood.name!r} "
            f"for {options.likelihood_model.name!r}."
        )
    if layout is not None and (layout.names, layout.shapes) != (
        prev.layout.names,
        prev.layout.shapes,
    ):
        raise ValueError(
            f"prior_mean must be a wrapper of the same parameters; got {list(prev.layout.names)}"
            f" for this wrapper's {list(layout.names)}."
        )
    if not defaults:
        raise ValueError(
            "prior_precision, sigma_noise and temperature are taken from the prior wrapper when "
            "prior_mean is a fitted wrapper; got other values. Leave them out, and change them "
            "after fit() with set_hyperparameters() or optimize_prior_precision()."
        )
    base = CarriedCurvature(name, prev.posterior)
    hp = prev.hyperparameters
    ref = options.reader
    return replace(
        hp,
        prior_precision=hp.prior_precision.detach().to(dtype=ref.dtype, device=ref.device),
        predictive_temperature=torch.ones((), dtype=ref.dtype, device=ref.device),
        prior_mean=prev.posterior.mean.detach().clone(),
        prior_base=base,
    )


def save_prior_base(hp: Hyperparameters, logit_temperature: float = 1.0) -> dict:
    """The saved form of the prior's mean and carried curvature, and the logit temperature.

    Returns:
        ``{"logit_temperature": T}``, and ``"prior_mean"`` ``(P,)`` and ``"prior_curvature"``
        (a posterior state) where present.
    """
    out: dict = {"logit_temperature": float(logit_temperature)}
    if hp.prior_mean is not None:
        out["prior_mean"] = hp.prior_mean.detach().clone()
    if hp.prior_base is not None:
        out["prior_curvature"] = {
            k: v.detach().clone() if isinstance(v, Tensor) else v
            for k, v in hp.prior_base.state.items()
        }
    return out


def restore_prior_base(hp: Hyperparameters, state: dict, layout) -> Hyperparameters:
    """The hyperparameters with the carried curvature of a saved state (``prior_curvature``).

    Args:
        hp: The hyperparameters of the rebuilt wrapper (its prior mean already set).
        state: The checked state.
        layout: The subset.

    Returns:
        ``hp`` with ``prior_base`` set when the state carries a curvature.
    """
    saved = state.get("prior_curvature")
    if saved is None:
        return hp
    spec = STRUCTURES[state["structure"]]
    ref = hp.sigma_noise
    saved = {
        k: v.to(dtype=ref.dtype, device=ref.device) if isinstance(v, Tensor) else v
        for k, v in saved.items()
    }
    post = spec.posterior_cls.from_state_dict(saved, hp.prior_mean, hp.prior(layout), hp.scale())
    return replace(hp, prior_base=CarriedCurvature(state["structure"], post))


def saved_prior_options(state: Mapping) -> dict:
    """The constructor options ``prior_mean`` and ``logit_temperature`` of a checked state.

    Returns:
        ``{"prior_mean": tensor or None, "logit_temperature": T}``.
    """
    return {
        "prior_mean": state.get("prior_mean"),
        "logit_temperature": state.get("logit_temperature", 1.0),
    }


def check_saved_prior(
    state: Mapping, P: int, check: Callable, saved: object, check_posterior: Callable
) -> None:
    """Check the optional keys ``prior_mean``, ``prior_curvature``, ``logit_temperature`` of a state.

    Args:
        state: The saved state.
        P: The number of parameters of the saved subset.
        check: The structure's ``check_state``.
        saved: The saved subset it checks against.
        check_posterior: ``persistence``'s check of a saved posterior, ``(post, check, saved)``.

    Raises:
        ValueError: If a key holds an invalid value (named).
        TypeError: If ``prior_mean`` is not a floating tensor.
    """
    if "prior_mean" in state:
        state_tensor(state, "prior_mean", "state['prior_mean']", (P,))
    if "prior_curvature" in state:
        if "prior_mean" not in state:
            raise ValueError(
                "state['prior_curvature'] must come with state['prior_mean']; got none."
            )
        check_posterior(state["prior_curvature"], check, saved)
    t = state.get("logit_temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise ValueError(
            f"state['logit_temperature'] must be a finite float > 0; got {describe(t)}."
        )
