r"""A fitted Laplace approximation as one immutable object.

:class:`FittedLaplace` holds what one pass over the data produced — the functional model at
θ*, the parameter layout, the posterior, the fit statistics — with the likelihood and the
hyperparameters it was built with.  Predictions, Jacobians, the evidence, tuning and the
saved state all take it as their one argument; a change of hyperparameters is a new object
(:meth:`FittedLaplace.with_hyperparameters`, no refit).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from . import function_space as _function_space
from . import marglik as _marglik
from . import predictive as _predictive
from ._checks import (
    Likelihood,
    Link,
    PredictMethod,
    Structure,
    check_computed_finite,
    check_generator,
    is_integer,
)
from .collectors import dense_bytes
from .fit_options import gigabytes
from .functional import FunctionalModel
from .head import LinearHead
from .hyperparameters import Hyperparameters, check_sigma_noise
from .layout import ParamLayout
from .likelihoods import FitStatistics
from .model_io import InputSpec
from .posteriors import Prior
from .posteriors._common import standard_normal
from .posteriors.alternating import alternating_projection
from .predictive import Prediction
from .reader import BatchReader
from .structures import StructureSpec

__all__ = ["FittedLaplace", "sample_projected"]


@dataclass(frozen=True)
class FittedLaplace:
    r"""The result of a fit: :math:`N(\theta_*, \Sigma)` with everything needed to use it.

    Attributes:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel` at θ*.
        layout: The parameter subset (names, shapes; P entries).
        posterior: The posterior (a :class:`~laplace_ggn.posteriors.Posterior`).
        statistics: The :class:`~laplace_ggn.likelihoods.FitStatistics` of the training data.
        likelihood: The likelihood object (``likelihood.kind`` is the
            :class:`~laplace_ggn.Likelihood`).
        hyperparameters: The :class:`~laplace_ggn.hyperparameters.Hyperparameters` the
            posterior holds.
        structure: The :class:`~laplace_ggn.structures.StructureSpec` of the posterior.
        reader: The :class:`~laplace_ggn.reader.BatchReader` of the fit's batches.
        input_spec: The structure of the training inputs (``None``: not known).
        head: The subset's Linear head (features instead of Jacobians), or ``None``.
    """

    fmodel: FunctionalModel = field(repr=False)
    layout: ParamLayout = field(repr=False)
    posterior: object = field(repr=False)
    statistics: FitStatistics
    likelihood: object = field(repr=False)
    hyperparameters: Hyperparameters = field(repr=False)
    structure: StructureSpec = field(repr=False)
    reader: BatchReader = field(repr=False)
    input_spec: InputSpec | None = field(default=None, repr=False)
    head: LinearHead | None = field(default=None, repr=False)

    @property
    def kind(self) -> Likelihood | None:
        """The likelihood kind (``None`` for a user likelihood)."""
        return self.likelihood.kind

    @property
    def n_params(self) -> int:
        """P, the number of parameters of the subset."""
        return self.layout.n_params

    def prior(self, precision: Tensor | None = None) -> Prior:
        """The prior at ``precision`` (default: the current one), checked for the structure.

        Returns:
            The :class:`~laplace_ggn.posteriors.Prior`.

        Raises:
            ValueError: If the precision has the wrong shape or a kind the structure refuses.
        """
        prior = self.hyperparameters.prior(self.layout, precision)
        self.structure.check_prior(prior)
        return prior

    def posterior_at(
        self,
        prior_precision: float | Tensor | None = None,
        sigma_noise: float | Tensor | None = None,
    ):
        """The posterior with other hyperparameters (no refit; may be differentiable in them).

        Args:
            prior_precision: Precision of shape ``()``, ``(T,)`` or ``(P,)`` (default: current).
            sigma_noise: σ (default: current).

        Returns:
            The posterior.

        Raises:
            ValueError: If a value is invalid for the subset or the structure.
        """
        if prior_precision is None and sigma_noise is None:
            return self.posterior
        hp = self.hyperparameters
        prec = hp.prior_precision if prior_precision is None else prior_precision
        if isinstance(prec, Tensor):
            prec = prec.to(dtype=self.fmodel.dtype, device=self.fmodel.device)
        return self.posterior.with_prior(self.prior(prec), hp.scale(self.sigma_at(sigma_noise)))

    def sigma_at(self, sigma_noise: float | Tensor | None) -> Tensor:
        """σ as given (checked, not detached) or the current one.

        Returns:
            σ, shape ``()`` (or ``(D,)`` for a fit with one σ per output).

        Raises:
            ValueError: If it is not finite and positive, or not of the fit's shape.
            TypeError: If it is not a number.
        """
        if sigma_noise is None:
            return self.hyperparameters.sigma_noise
        return check_sigma_noise(
            sigma_noise,
            self.likelihood,
            dtype=self.fmodel.dtype,
            device=self.fmodel.device,
            applies_to_any=True,
            like=self.hyperparameters.sigma_noise,
        )

    def with_hyperparameters(self, hyperparameters: Hyperparameters) -> FittedLaplace:
        """The same fit under other hyperparameters (the posterior's ``with_prior``).

        Returns:
            The new object.

        Raises:
            ValueError: If the prior does not fit the subset or the structure.
        """
        hp = hyperparameters
        post = self.posterior.with_prior(
            self.prior(hp.prior_precision.detach()), hp.scale(hp.sigma_noise.detach())
        )
        return replace(self, posterior=post, hyperparameters=hp)

    def log_marginal_likelihood(
        self,
        prior_precision: float | Tensor | None = None,
        sigma_noise: float | Tensor | None = None,
    ) -> Tensor:
        r"""Laplace evidence :math:`\log p(\mathcal D)`, shape ``()``.

        Returns:
            The log marginal likelihood, differentiable in tensors that require grad.

        Raises:
            RuntimeError: If it is not finite (the message names the term that overflowed).
            ValueError: If a hyperparameter is invalid.
        """
        post = self.posterior_at(prior_precision, sigma_noise)
        sigma = self.sigma_at(sigma_noise)
        value = _marglik.log_marginal_likelihood(post, self.statistics, self.likelihood, sigma)
        _marglik.check_evidence(value, post, self.statistics, self.likelihood, sigma)
        return value

    def posterior_covariance(self, memory_budget: int) -> Tensor:
        """Dense posterior covariance Σ, shape ``(P, P)``, if it fits ``memory_budget`` bytes.

        Returns:
            Σ.

        Raises:
            ValueError: If P×P exceeds the budget (the message gives the GB needed).
            RuntimeError: If Σ is not finite.
        """
        P = self.n_params
        need = dense_bytes(P, self.fmodel.dtype)
        if need > memory_budget:
            raise ValueError(
                f"posterior_covariance() needs a dense ({P}, {P}) matrix of {gigabytes(need)}, "
                f"over the memory budget of {gigabytes(memory_budget)}. Use "
                "functional_covariance(x), sample(n) or posterior.covariance_matvec(V) instead, "
                "or raise memory_budget=."
            )
        Sigma = self.posterior.to_dense()
        check_computed_finite(Sigma, "posterior covariance Σ")
        return self.reader.result(Sigma)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``(n, P)`` parameter vectors of the subset drawn from the posterior.

        Returns:
            The draws.

        Raises:
            ValueError: If ``n`` is not a positive integer (Python, NumPy or 0-dim torch).
            TypeError: If ``generator`` is not a ``torch.Generator``.
            RuntimeError: If the draws are not finite.
        """
        if not is_integer(n) or n < 1:
            raise ValueError(f"n must be a positive integer; got {n!r}.")
        check_generator(generator)
        draws = self.posterior.sample(int(n), generator=generator)
        check_computed_finite(draws, "posterior samples")
        return self.reader.result(draws)

    def model_input(self, x: object, name: str = "x") -> object:
        """A checked model input on the model's device (see :class:`~laplace_ggn.reader.BatchReader`).

        Returns:
            The input.
        """
        return self.reader.model_input(x, self.input_spec, name)

    def jacobians(self, x: object) -> tuple[Tensor, Tensor]:
        """Jacobians ``(B, C, P)`` and outputs ``(B, C)`` at inputs ``x`` (checked here).

        Sequence outputs give ``(B, T, C, P)`` and ``(B, T, C)``.

        Returns:
            ``(J, f)``.

        Raises:
            RuntimeError: If they are not finite (numerical overflow).
        """
        x = self.model_input(x)
        seq = self.statistics.output_ndim != 2
        J, f = self.fmodel.jacobians(x, n_outputs=None if seq else self.statistics.n_outputs)
        check_computed_finite(f, "model output at the inputs")
        check_computed_finite(J, "Jacobians J(x)")
        return self.reader.result((J.reshape(*f.shape, J.shape[-1]), f))

    def functional_covariance(
        self, x: object, *, joint: bool = False, differentiable: bool = False
    ) -> Tensor:
        r""":math:`J(x)\Sigma J(x)^\top`, shape ``(B, C, C)`` (``(B, T, C, C)`` for sequences).

        ``joint`` / ``differentiable``: see :mod:`laplace_ggn.function_space`.

        Returns:
            The covariance, without observation noise.

        Raises:
            RuntimeError: If it is not finite (numerical overflow).
        """
        if joint is not False or differentiable is not False:
            return _function_space.functional_covariance(
                self, x, joint=joint, differentiable=differentiable
            )
        x = self.model_input(x)
        with torch.no_grad():
            _, cov = _predictive.functional_moments(
                self.fmodel,
                self.posterior,
                x,
                n_outputs=self.statistics.n_outputs,
                head=self.head,
            )
        check_computed_finite(cov, "functional covariance J Σ Jᵀ")
        return self.reader.result(cov)

    def predict(
        self,
        x: object,
        method: str | PredictMethod = "glm",
        *,
        link: str | Link | None = None,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        joint: bool = False,
        differentiable: bool = False,
    ) -> Prediction:
        """Predictive at ``x`` (see :meth:`LaplaceWrapper.predict`), tempered by T.

        Returns:
            The :class:`~laplace_ggn.predictive.Prediction` (``joint=True``: ``JointPrediction``).
        """
        if joint is not False or differentiable is not False:
            return _function_space.predict(
                self, x, method, link=link, n_samples=n_samples, generator=generator,
                joint=joint, differentiable=differentiable,
            )  # fmt: skip
        x = self.model_input(x)
        hp = self.hyperparameters
        pred = _predictive.predict(
            self.fmodel,
            self.posterior,
            x,
            likelihood=self.likelihood,
            method=method,
            link=link,
            sigma_noise=hp.sigma_noise,
            n_samples=n_samples,
            generator=generator,
            n_outputs=self.statistics.n_outputs,
            head=self.head,
        )
        T = hp.predictive_temperature
        return self.reader.result(pred if bool(T == 1) else self.likelihood.temper(pred, T))


def sample_projected(
    fitted: FittedLaplace,
    n: int,
    train_loader: object,
    *,
    n_iterations: int = 50,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    r"""Draw from the projected posterior by alternating projections over the training data.

    .. math::
        \theta = \theta_* + D^{-1/2}\,\Pi\, z, \qquad z \sim N(0, I),

    with Π the projection onto the kernel of the GGN (whitened by the prior D; for a scalar
    prior :math:`P_{ker} z/\sqrt\alpha`), applied matrix-free by cycling over the batches of
    ``train_loader`` (:func:`~laplace_ggn.posteriors.alternating.alternating_projection`):
    memory O(P·n) plus one batch's kernel rows, work linear in P, one pass over the data per
    cycle.  It needs no stored basis of the range, so it applies to models whose exact basis
    does not fit in memory; the training data must be passed again, as no reference to it is
    kept.

    Args:
        fitted: A fit of structure ``"projected"``.
        n: Number of samples.
        train_loader: The training batches of the fit (re-iterable; may shuffle).
        n_iterations: Maximal number of cycles over the loader.
        tol: Stop when a cycle changes the samples by less than ``tol`` (relative).
        generator: Random generator (on the model's device).
        progress: Show a progress bar over the cycles.

    Returns:
        Shape ``(n, P)``.

    Raises:
        ValueError: If the structure is not ``"projected"``.
        TypeError: If ``generator`` is not a ``torch.Generator``.
    """
    if fitted.structure.name != Structure.PROJECTED.value:
        raise ValueError(
            f"sample_projected() needs structure='projected'; got structure="
            f"{fitted.structure.name!r}. Fit LaplaceWrapper(..., structure='projected'), "
            "or use sample(n)."
        )
    check_generator(generator)
    post, fm = fitted.posterior, fitted.fmodel
    z = standard_normal(n, fitted.n_params, dtype=fm.dtype, device=fm.device, generator=generator)
    w = post.prior.diag().rsqrt()
    result = alternating_projection(
        fm,
        fitted.likelihood,
        train_loader,
        z.T.contiguous(),
        n_iterations=n_iterations,
        tol=tol,
        weights=None if post.prior.is_scalar else w,
        input_key=fitted.reader.input_key,
        target_key=fitted.reader.target_key,
        progress=progress,
    )
    return fitted.reader.result(post.mean + result.projected.T * w)
