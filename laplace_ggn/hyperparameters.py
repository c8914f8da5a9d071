r"""The hyperparameters of a Laplace posterior and the scale and prior they imply.

.. math::
    \Lambda = s\,G + \Lambda_0, \qquad s = \frac{1}{\tau\sigma^2} \text{ (regression)},
    \quad s = \frac1\tau \text{ (classification, binary)},

with :math:`\Lambda_0` the prior precision (a scalar, one value per parameter tensor or one
per parameter), σ the observation noise and τ the temperature.  Classification predictions
are further tempered by a predictive temperature T (:math:`p_T \propto \bar p^{1/T}`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ._checks import Likelihood, check_positive
from .layout import ParamLayout
from .likelihoods import LikelihoodModel, get_likelihood
from .posteriors import Prior, make_prior

__all__ = [
    "Hyperparameters",
    "check_predictive_temperature",
    "check_prior_precision",
    "check_sigma_noise",
    "check_temperature",
]


def check_prior_precision(value: object, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A prior precision as a tensor of the model's dtype and device (not detached).

    Args:
        value: Float, or tensor of shape ``()``, ``(T,)`` or ``(P,)``.
        dtype: The model's dtype.
        device: The model's device.

    Returns:
        The precision, its shape unchanged.

    Raises:
        TypeError: If ``value`` is not a float or a tensor.
        ValueError: If an entry is not finite and > 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"prior_precision must be a float or a tensor; got {type(value).__name__}.")
    t = torch.as_tensor(value, dtype=dtype, device=device)
    check_positive(t.detach(), "prior_precision")
    return t


def check_sigma_noise(
    value: object,
    likelihood: Likelihood | LikelihoodModel,
    *,
    dtype: torch.dtype,
    device: torch.device,
    applies_to_any: bool = False,
    like: Tensor | None = None,
) -> Tensor:
    """The observation noise σ as a tensor of shape ``()`` or ``(D,)`` (not detached).

    Args:
        value: Float, 0-dim tensor, or tensor ``(D,)`` (one σ per output, regression).
        likelihood: σ other than 1 applies to regression only.
        dtype: The model's dtype.
        device: The model's device.
        applies_to_any: Accept any scalar σ for every likelihood (an evaluation point of the
            evidence, where σ does not enter outside regression).
        like: The σ of a fit: a new value must have its shape (a scalar is expanded to
            ``(D,)`` when the fit has one σ per output).

    Returns:
        σ, shape ``()`` or ``(D,)``.

    Raises:
        TypeError: If ``value`` is not a float or a tensor.
        ValueError: If it is not finite and positive, has another shape than ``()`` or
            ``(D,)`` (or than ``like``), or is not 1 outside regression.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(
            f"sigma_noise must be a float or a 0-dim tensor; got {type(value).__name__}."
        )
    s = torch.as_tensor(value, dtype=dtype, device=device)
    if s.ndim > 1 or (s.ndim == 1 and s.shape[0] < 1):
        raise ValueError(
            f"sigma_noise must be a scalar or have shape (D,), one σ per output; got shape "
            f"{tuple(s.shape)}."
        )
    check_positive(s.detach(), "sigma_noise")
    lik = get_likelihood(likelihood)
    if not lik.has_noise and (s.ndim == 1 or (not applies_to_any and float(s) != 1.0)):
        shown = s.tolist() if s.ndim else float(s)
        raise ValueError(
            f"sigma_noise applies to likelihood='regression' only; got sigma_noise="
            f"{shown} with likelihood={lik.name!r}."
        )
    if like is not None and s.shape != like.shape:
        if like.ndim == 1 and s.ndim == 0:
            return s.expand(like.shape).clone()
        raise ValueError(
            f"sigma_noise must have the shape of the fit's σ, {tuple(like.shape)}; got shape "
            f"{tuple(s.shape)}."
            + (
                " One σ per output needs a fit with LaplaceWrapper(..., sigma_noise="
                "torch.ones(D)), whose curvature is kept per output."
                if like.ndim == 0
                else ""
            )
        )
    return s


def check_temperature(value: object) -> float:
    """The temperature τ as a float.

    Returns:
        τ.

    Raises:
        TypeError: If ``value`` is not a number.
        ValueError: If it is not finite and > 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"temperature must be a float; got {type(value).__name__}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be finite and > 0; got {value}.")
    return float(value)


def check_predictive_temperature(
    value: object, likelihood: Likelihood, *, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The predictive temperature T as a detached 0-dim tensor.

    Returns:
        T, shape ``()``.

    Raises:
        TypeError: If ``value`` is not a number.
        ValueError: If it is not a finite positive scalar, or not 1 for regression.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"predictive_temperature must be a float; got {type(value).__name__}.")
    t = torch.as_tensor(value, dtype=dtype, device=device).detach()
    if t.ndim != 0:
        raise ValueError(f"predictive_temperature must be a scalar; got shape {tuple(t.shape)}.")
    check_positive(t, "predictive_temperature")
    lik = get_likelihood(likelihood)
    if not lik.predicts_probabilities and float(t) != 1.0:
        hint = " (whose predictive is calibrated through sigma_noise)" if lik.has_noise else ""
        raise ValueError(
            f"predictive_temperature applies to likelihood 'classification' or 'binary'; got "
            f"predictive_temperature={float(t)} with likelihood={lik.name!r}{hint}."
        )
    return t


@dataclass(frozen=True)
class Hyperparameters:
    """Validated prior precision, σ, τ and predictive temperature T.

    Build it with :meth:`create`, which validates every value; :meth:`replace` validates the
    values it changes.

    Attributes:
        likelihood: The likelihood (σ and T apply to one kind each).
        prior_precision: Shape ``()``, ``(T,)`` or ``(P,)``.
        sigma_noise: σ, shape ``()``, or ``(D,)`` with one σ per output.
        temperature: τ, dividing the curvature.
        predictive_temperature: T of classification predictions, shape ``()``.
        prior_mean: θ₀, shape ``(P,)`` (``None``: 0); not tuned.
        prior_base: Curvature of earlier data carried into the prior (``None``: none; see
            :class:`~laplace_ggn.posteriors.Prior`); not tuned.
    """

    likelihood: Likelihood | LikelihoodModel
    prior_precision: Tensor
    sigma_noise: Tensor
    temperature: float
    predictive_temperature: Tensor
    prior_mean: Tensor | None = None
    prior_base: object = None

    @classmethod
    def create(
        cls,
        likelihood: Likelihood | LikelihoodModel,
        *,
        prior_precision: object = 1.0,
        sigma_noise: object = 1.0,
        temperature: object = 1.0,
        predictive_temperature: object = 1.0,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Hyperparameters:
        """Validate every value and convert it to the model's dtype and device.

        Returns:
            The hyperparameters.

        Raises:
            TypeError: If a value has the wrong type.
            ValueError: If a value is out of range or does not apply to ``likelihood``.
        """
        prec = check_prior_precision(prior_precision, dtype=dtype, device=device)
        sigma = check_sigma_noise(sigma_noise, likelihood, dtype=dtype, device=device)
        tau = check_temperature(temperature)
        T = check_predictive_temperature(
            predictive_temperature, likelihood, dtype=dtype, device=device
        )
        return cls(likelihood, prec, sigma, tau, T)

    def replace(
        self,
        *,
        prior_precision: object = None,
        sigma_noise: object = None,
        predictive_temperature: object = None,
    ) -> Hyperparameters:
        """New hyperparameters with the given values (``None`` keeps a value), all detached.

        Returns:
            The new hyperparameters.

        Raises:
            TypeError: If a value has the wrong type.
            ValueError: If a value is out of range or does not apply to the likelihood.
        """
        ref = self.sigma_noise
        kw = {"dtype": ref.dtype, "device": ref.device}
        prec = self.prior_precision
        if prior_precision is not None:
            prec = check_prior_precision(prior_precision, **kw)
        sigma = self.sigma_noise
        if sigma_noise is not None:
            sigma = check_sigma_noise(sigma_noise, self.likelihood, like=self.sigma_noise, **kw)
        T = self.predictive_temperature
        if predictive_temperature is not None:
            T = check_predictive_temperature(predictive_temperature, self.likelihood, **kw)
        return replace(
            self,
            prior_precision=prec.detach(),
            sigma_noise=sigma.detach(),
            predictive_temperature=T,
        )

    def scale(self, sigma_noise: Tensor | None = None) -> Tensor:
        r"""The factor s of :math:`\Lambda = sG + \Lambda_0`, shape ``()``.

        Args:
            sigma_noise: σ to use instead of the current one (regression; may require grad).

        Returns:
            :math:`1/(\tau\sigma^2)` for regression (shape ``(D,)`` with one σ per output),
            :math:`1/\tau` otherwise.
        """
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        return get_likelihood(self.likelihood).curvature_scale(sigma, self.temperature)

    def prior(self, layout: ParamLayout, precision: Tensor | None = None) -> Prior:
        """The prior of the subset, shape-checked against it.

        Args:
            layout: The parameter subset.
            precision: A precision to use instead of the current one (may require grad).

        Returns:
            The :class:`~laplace_ggn.posteriors.Prior`.

        Raises:
            ValueError: If the precision's shape fits neither a scalar, one value per tensor
                nor one per parameter of ``layout``, or the prior mean is not ``(P,)``.
        """
        prec = self.prior_precision if precision is None else precision
        ref = self.sigma_noise
        return make_prior(
            prec, layout, dtype=ref.dtype, device=ref.device, mean=self.prior_mean,
            base=self.prior_base,
        )  # fmt: skip
