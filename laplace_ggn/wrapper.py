r"""`LaplaceWrapper`: the user-facing composition of likelihood, subset, curvature and posterior.

No mathematics and no state beyond its options and the fitted result: options are validated by
:class:`~laplace_ggn.fit_options.FitOptions` / :class:`~laplace_ggn.hyperparameters.Hyperparameters`,
the data pass is :func:`~laplace_ggn.fitting.fit_laplace`, its result a
:class:`~laplace_ggn.FittedLaplace` (:attr:`LaplaceWrapper.fitted`) that predicts, is tuned
(:mod:`laplace_ggn.marglik`) and saved (:mod:`laplace_ggn.persistence`).

Curvature is computed on a private copy of the model in eval mode (BatchNorm statistics
frozen, dropout off); the user's model is never modified.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from . import continual as _continual
from . import function_space as _function_space
from . import marglik as _marglik
from ._checks import DEFAULT_MEMORY_BUDGET, Curvature, Likelihood, Link, PredictMethod, Structure
from .diagnostics import KernelDecomposition, decompose_fitted
from .fit_options import FitOptions
from .fitted import FittedLaplace, sample_projected
from .fitting import fit_laplace, initial_state, restore_fitted
from .hyperparameters import Hyperparameters
from .likelihoods import DEFAULT_IGNORE_INDEX, LikelihoodModel
from .persistence import check_state, save_state, saved_options
from .predictive import Prediction, resolve_options
from .structures import STRUCTURES

__all__ = ["LaplaceWrapper"]


class LaplaceWrapper:
    r"""Laplace posterior of a trained network from its generalised Gauss-Newton matrix.

    .. math::
        \Sigma^{-1} = \Lambda = G / \tau + \Lambda_0 .

    Long descriptions: ``docs/api.md`` (every option), ``docs/structures.md``, ``docs/predictive.md``,
    ``docs/your-model.md``.  Every method but :meth:`fit` raises ``RuntimeError`` before a fit.

    Args:
        model: Trained network with outputs ``(B, C)``, ``(B,)`` or ``(B, T, C)``; never modified.
        likelihood: ``"regression"``, ``"classification"``, ``"binary"``,
            ``"heteroscedastic"``, ``"poisson"``, ``"reward_modeling"``, or a likelihood object
            (``docs/likelihoods.md``: ``likelihoods.from_nll(nll)``, a ``BaseLikelihood``).
        structure: ``"full"``, ``"diag"``, ``"kfac"``, ``"lowrank"``, ``"projected"`` or
            another name of :data:`~laplace_ggn.structures.STRUCTURES`.
        subset: ``"all"``, ``"trainable"``, ``"last_layer"`` or a list of parameter names.
        prior_precision: Float, or tensor of shape ``(T,)`` or ``(P,)``.
        sigma_noise: Observation noise σ (regression only): a scalar, or ``(D,)`` per output.
        temperature: τ, the curvature is divided by it.
        rank: ``lowrank`` / ``projected``: ``None`` (exact) or k (top-k); ``ella``: K features.
        n_context: ``gp`` / ``ella``: M context samples (``None``: all; ``docs/gp.md``).
        curvature: ``"ggn"`` (exact) or ``"mc"`` (Monte-Carlo Fisher).
        n_mc_samples: S, label draws per sample of ``curvature="mc"`` (default 1).
        ignore_index: Classification / binary targets equal to it are skipped.
        input_key: Key of the inputs in mapping batches (``None``: every other key).
        target_key: Key of the targets (``None``: ``"target"``, ``"labels"`` or ``"label"``).
        memory_budget: Bytes for chunked intermediates and the largest dense structure.
        output_fn: Map from the model's output to the ``(B, C)`` tensor (not saved).
        prior_mean: θ₀ ``(P,)``, or a fitted wrapper whose posterior is the prior (``docs/continual.md``).
        logit_temperature: T of the likelihood ``softmax(f / T)``: outputs are divided by it.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or an option has the wrong type.
        ValueError: If an option is invalid; the message lists the valid ones.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> la = LaplaceWrapper(model, "classification", structure="diag").fit(DataLoader(data, 8))
        >>> la.sample(5).shape
        torch.Size([5, 67])
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood | LikelihoodModel = "classification",
        *,
        structure: str | Structure = "kfac",
        subset: str | list[str] = "all",
        prior_precision: float | Tensor = 1.0,
        sigma_noise: float | Tensor = 1.0,
        temperature: float = 1.0,
        rank: int | None = None,
        curvature: str | Curvature = "ggn",
        n_mc_samples: int | None = None,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        input_key: str | None = None,
        target_key: str | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        output_fn: Callable[[object], Tensor] | None = None,
        prior_mean: Tensor | LaplaceWrapper | None = None,
        logit_temperature: float = 1.0,
        n_context: int | None = None,
    ):
        o = self._options = FitOptions.create(
            model, likelihood, structure=structure, subset=subset, rank=rank,
            curvature=curvature, n_mc_samples=n_mc_samples, ignore_index=ignore_index,
            input_key=input_key, target_key=target_key, memory_budget=memory_budget,
            output_fn=output_fn, logit_temperature=logit_temperature, n_context=n_context,
        )  # fmt: skip
        self._layout, self._initial = initial_state(
            o, prior_precision=prior_precision, sigma_noise=sigma_noise, temperature=temperature
        )
        self._initial = _continual.resolve_prior_mean(
            prior_mean, o, self._layout, self._initial, (prior_precision, sigma_noise, temperature)
        )
        # the options as public attributes (la.structure, la.rank, la.input_key, ...)
        vars(self).update(o.attributes(), temperature=self._initial.temperature)
        #: The :class:`~laplace_ggn.FittedLaplace` of the last fit (``None`` before).
        self.fitted: FittedLaplace | None = None

    def _require_fit(self, what: str) -> FittedLaplace:
        if self.fitted is None:
            raise RuntimeError(f"{what} needs a fitted posterior; call fit(train_loader) first.")
        return self.fitted

    @property
    def hyperparameters(self) -> Hyperparameters:
        """The current :class:`~laplace_ggn.Hyperparameters`."""
        return self._initial if self.fitted is None else self.fitted.hyperparameters

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`from_state_dict`) has produced a posterior."""
        return self.fitted is not None

    @property
    def posterior(self):
        """The fitted posterior; RuntimeError if unfitted."""
        return self._require_fit("posterior").posterior

    @property
    def n_params(self) -> int:
        """P of the subset; RuntimeError for ``"last_layer"`` before the fit."""
        if self.fitted is None and self._layout is None:
            raise RuntimeError("n_params of subset='last_layer' is known after fit(train_loader).")
        return (self._layout if self.fitted is None else self.fitted.layout).n_params

    @property
    def prior_precision(self) -> Tensor:
        """Current prior precision, shape ``()``, ``(T,)`` or ``(P,)``."""
        return self.hyperparameters.prior_precision.detach()

    @property
    def sigma_noise(self) -> Tensor:
        """Current observation noise σ, shape ``()``."""
        return self.hyperparameters.sigma_noise.detach()

    @property
    def predictive_temperature(self) -> Tensor:
        """Current predictive temperature T of classification, shape ``()``."""
        return self.hyperparameters.predictive_temperature.detach()

    def fit(
        self,
        train_loader: Iterable,
        *,
        progress: bool | None = None,
        distributed: bool | None = None,
        process_group: object = None,
        generator: torch.Generator | None = None,
        accumulate: bool = False,
    ) -> LaplaceWrapper:
        """Collect the curvature in one pass over the data and build the posterior.

        Args:
            train_loader: Iterable of ``(x, y)`` batches or mappings.
            progress: Show a tqdm bar (``None``: for 20 batches or more).
            distributed: Reduce over ``torch.distributed`` ranks (``None``: if initialised).
            process_group: Group to reduce over (default: the default group).
            generator: Random generator of the label draws of ``curvature="mc"``.
            accumulate: Add to the stored fit's curvature, keeping its hyperparameters (``docs/continual.md``).

        Returns:
            ``self``, fitted at the constructor's hyperparameters (``accumulate=True``: the stored
            fit's; a refit drops the ``*_result_`` curves of tuning); on error the previous is kept.

        Raises:
            ValueError: If the data is empty, malformed, not finite or does not fit the likelihood,
                or the structure exceeds the memory budget.
            TypeError: If the loader, targets or ``generator`` have the wrong type.
        """
        stored = _continual.stored_fit(self.fitted) if accumulate else None
        fitted = fit_laplace(
            self._options, self._initial if stored is None else stored.hyperparameters,
            self._layout, train_loader, progress=progress, distributed=distributed,
            process_group=process_group, generator=generator,
        )  # fmt: skip
        self.fitted = _continual.combine(fitted, stored, rank=self.rank)
        self._layout = self.fitted.layout
        for name in _marglik.Tuned.RESULT_NAMES:
            vars(self).pop(name, None)
        return self

    def posterior_covariance(self) -> Tensor:
        """Dense Σ, shape ``(P, P)``; ``ValueError`` with the GB needed if over the budget."""
        return self._require_fit("posterior_covariance()").posterior_covariance(self.memory_budget)

    def log_marginal_likelihood(
        self,
        prior_precision: float | Tensor | None = None,
        sigma_noise: float | Tensor | None = None,
    ) -> Tensor:
        r"""Laplace evidence :math:`\log p(\mathcal D)`, differentiable in both arguments.

        Args:
            prior_precision: Shape ``()``, ``(T,)`` or ``(P,)`` (default: the current one).
            sigma_noise: σ, shape ``()`` (default: the current one).

        Returns:
            The log marginal likelihood, shape ``()``.
        """
        fitted = self._require_fit("log_marginal_likelihood()")
        return fitted.log_marginal_likelihood(prior_precision, sigma_noise)

    def set_hyperparameters(
        self,
        *,
        prior_precision: float | Tensor | None = None,
        sigma_noise: float | Tensor | None = None,
        predictive_temperature: float | Tensor | None = None,
    ) -> LaplaceWrapper:
        """Replace the prior precision, σ and/or T without a refit (``None``: keep).

        Returns:
            ``self``; an invalid value raises ``ValueError`` / ``TypeError`` and changes nothing.
        """
        fitted = self._require_fit("set_hyperparameters()")
        hp = fitted.hyperparameters.replace(
            prior_precision=prior_precision, sigma_noise=sigma_noise,
            predictive_temperature=predictive_temperature,
        )  # fmt: skip
        self.fitted = fitted.with_hyperparameters(hp)
        return self

    def log_prob(self, theta: Tensor) -> Tensor:
        """Posterior log density at ``theta`` ``(P,)`` / ``(..., P)``, differentiable (:func:`.continual.log_prob`)."""
        return _continual.log_prob(self._require_fit("log_prob()"), theta)

    def jacobians(self, x: object) -> tuple[Tensor, Tensor]:
        """``(J, f)`` at θ*, shapes ``(B, C, P)`` and ``(B, C)`` (with T for sequence outputs)."""
        return self._require_fit("jacobians()").jacobians(x)

    def functional_covariance(
        self, x: object, *, joint: bool = False, differentiable: bool = False
    ) -> Tensor:
        r""":math:`J\Sigma J^\top` ``(B, C, C)``; ``joint=True``: ``(B, C, B, C)`` (``docs/function-space.md``)."""
        fitted = self._require_fit("functional_covariance()")
        return fitted.functional_covariance(x, joint=joint, differentiable=differentiable)

    def functional_samples(self, x: object, n: int, *, generator: torch.Generator | None = None):
        """``(n, B, C)`` draws of the linearised outputs, joint over the inputs (``docs/function-space.md``)."""
        fitted = self._require_fit("functional_samples()")
        return _function_space.functional_samples(fitted, x, n, generator=generator)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``(n, P)`` draws of the subset's parameters from the posterior."""
        return self._require_fit("sample()").sample(n, generator=generator)

    def sample_projected(
        self,
        n: int,
        train_loader: Iterable,
        *,
        n_iterations: int = 50,
        tol: float = 1e-6,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Tensor:
        """``(n, P)`` draws of a projected posterior over the data (:func:`.fitted.sample_projected`)."""
        fitted = self._require_fit("sample_projected()")
        return sample_projected(
            fitted, n, train_loader, n_iterations=n_iterations, tol=tol,
            generator=generator, progress=progress,
        )  # fmt: skip

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
        """Predictive distribution at test inputs (``docs/predictive.md``).

        Args:
            x: Model input of batch size B.
            method: ``"glm"`` (linearised) or ``"nn"`` (sampled networks).
            link: ``"probit"`` (glm default), ``"bridge"``, ``"bridge_norm"`` or ``"mc"`` (nn: mc).
            n_samples: S for ``link="mc"`` and ``method="nn"``.
            generator: Random generator (on the model's device).
            joint: Regression: a ``JointPrediction`` with ``covariance`` ``(B·C, B·C)``.
            differentiable: Gradients flow to ``x`` (glm; ``docs/function-space.md``).

        Returns:
            :class:`~laplace_ggn.predictive.Prediction`, ``mean`` and ``variance`` ``(B, C)``.

        Raises:
            ValueError: If the method/link pair, ``n_samples`` or the input is invalid.
        """
        resolve_options(self.likelihood, method, link)
        return self._require_fit("predict()").predict(
            x, method, link=link, n_samples=n_samples, generator=generator, joint=joint,
            differentiable=differentiable,
        )  # fmt: skip

    def optimize_prior_precision(
        self, method: object = None, *, progress: bool = False, **options: object
    ) -> LaplaceWrapper:
        """Tune the prior precision (and σ or T) without a refit (``docs/api.md``).

        Args:
            method: :class:`~laplace_ggn.Marglik`, :class:`~laplace_ggn.GridSearch`,
                :class:`~laplace_ggn.MarglikTemperature`, :class:`~laplace_ggn.Temperature`,
                or ``"marglik"``, ``"gridsearch"``, ``"marglik_temperature"``,
                ``"temperature"`` with that object's options as ``**options``.
                ``None``: ``"marglik"``, or ``"marglik_temperature"`` when ``val_loader`` is given.
            progress: Show a progress bar.
            **options: The options of a method given by name.

        Returns:
            ``self``; curves in ``marglik_result_``, ``gridsearch_result_``, ``temperature_result_``.

        Raises:
            ValueError: If an option is invalid or belongs to another method.
        """
        tuner = _marglik.tuning_method(method, self.likelihood, **options)
        tuned = tuner.tune(self._require_fit("optimize_prior_precision()"), progress=progress)
        self.fitted = self.fitted.with_hyperparameters(tuned.hyperparameters)
        vars(self).update(tuned.results())
        if tuned.warning:
            warnings.warn(tuned.warning, UserWarning, stacklevel=2)
        return self

    def kernel_decomposition(
        self, x: object, *, y: Tensor | None = None, tol: float = 1e-9, rank: int | None = None,
        n_samples: int = 32, generator: torch.Generator | None = None,
    ) -> KernelDecomposition:  # fmt: skip
        """Kernel / non-kernel report (:func:`~laplace_ggn.diagnostics.decompose_fitted`)."""
        return decompose_fitted(
            self._require_fit("kernel_decomposition()"), x, kept_eigenpairs=self.rank, y=y,
            tol=tol, rank=rank, n_samples=n_samples, generator=generator,
        )  # fmt: skip

    def state_dict(self) -> dict:
        """Everything :meth:`from_state_dict` needs (:mod:`laplace_ggn.persistence`)."""
        return save_state(self._require_fit("state_dict()"), self._options)

    @classmethod
    def from_state_dict(
        cls,
        model: nn.Module,
        state: dict,
        *,
        output_fn: Callable | None = None,
        likelihood: LikelihoodModel | None = None,
    ) -> LaplaceWrapper:
        """Rebuild a fitted wrapper from :meth:`state_dict` and a model of its architecture.

        ``likelihood``: the user likelihood the state was saved with (its code is not saved).

        Returns:
            A fitted wrapper equal to the one saved.

        Raises:
            ValueError: If a key is missing or invalid (named), or the model does not match.
            TypeError: If the state or one of its entries has the wrong type.
        """
        state = check_state(state, model, STRUCTURES)
        la = cls(model, **saved_options(state, likelihood), output_fn=output_fn)
        la._initial = _continual.restore_prior_base(la._initial, state, la._layout)
        hp = la._initial.replace(predictive_temperature=state.get("predictive_temperature", 1.0))
        la.fitted = restore_fitted(la._options, hp, la._layout, state)
        return la

    def __repr__(self) -> str:
        fitted = f"fitted, P={self.n_params}" if self.is_fitted else "not fitted"
        subset = self.subset if isinstance(self.subset, str) else "list"
        return (
            f"LaplaceWrapper(likelihood={self._options.likelihood_model.name!r}, "
            f"structure={self.structure!r}, subset={subset!r}, {fitted})"
        )
