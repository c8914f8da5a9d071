r"""`LaplaceWrapper`: the user-facing composition of likelihood, subset, curvature and posterior.

It holds no mathematics and no state beyond its options and the fitted result: options are
validated by :class:`~laplace_ggn.fit_options.FitOptions` and
:class:`~laplace_ggn.hyperparameters.Hyperparameters`, the data pass is
:func:`~laplace_ggn.fitting.fit_laplace`, its result a :class:`~laplace_ggn.FittedLaplace`
(:attr:`LaplaceWrapper.fitted`) that predicts, is tuned (:mod:`laplace_ggn.marglik`) and is
saved (:mod:`laplace_ggn.persistence`); structures come from :mod:`laplace_ggn.structures`.

Curvature is computed on a private copy of the model in eval mode (BatchNorm statistics
frozen, dropout off); the user's model is never modified.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from . import marglik as _marglik
from ._checks import DEFAULT_MEMORY_BUDGET, Curvature, Likelihood, Link, PredictMethod, Structure
from .fit_options import FitOptions
from .fitted import FittedLaplace, sample_projected
from .fitting import fit_laplace, restore_fitted
from .hyperparameters import Hyperparameters
from .layout import ParamLayout, resolve_subset
from .likelihoods import DEFAULT_IGNORE_INDEX
from .persistence import check_state, save_state, saved_options
from .predictive import Prediction, resolve_options
from .structures import STRUCTURES

__all__ = ["LaplaceWrapper"]


class LaplaceWrapper:
    r"""Laplace posterior of a trained network from its generalised Gauss-Newton matrix.

    .. math::
        p(\theta \mid \mathcal D) \approx N(\theta_*, \Sigma), \qquad
        \Sigma^{-1} = \Lambda = G / \tau + \Lambda_0 .

    Every option is described in ``docs/api.md``.

    Args:
        model: Trained network with outputs ``(B, C)`` or ``(B, T, C)`` (or a mapping /
            object with ``logits``, or a tuple whose first element is the output); never
            modified.
        likelihood: ``"regression"``, ``"classification"`` or ``"binary"``.
        structure: ``"full"``, ``"diag"``, ``"kfac"``, ``"lowrank"``, ``"projected"`` (see
            ``docs/structures.md``) or another name of :data:`~laplace_ggn.structures.STRUCTURES`.
        subset: ``"all"`` / ``"trainable"`` (parameters with ``requires_grad``),
            ``"last_layer"`` or a list of parameter names.
        prior_precision: Float, or tensor of shape ``(T,)`` (per parameter tensor) or ``(P,)``.
        sigma_noise: Observation noise σ (regression only).
        temperature: τ; the curvature is divided by it.
        rank: ``lowrank`` / ``projected``: ``None`` for the exact structure, k for top-k.
        curvature: ``"ggn"`` (exact) or ``"mc"`` (Monte-Carlo Fisher, cost independent of C).
        n_mc_samples: S, the label draws per sample of ``curvature="mc"`` (default 1).
        ignore_index: Classification / binary targets equal to it are skipped.
        input_key: Key of the inputs in mapping batches (``None``: every other key).
        target_key: Key of the targets in mapping batches (``None``: ``"target"``,
            ``"labels"`` or ``"label"``).
        memory_budget: Bytes for chunked intermediates and for the largest dense structure.
        output_fn: Map from the model's output to the ``(B, C)`` tensor (not saved).

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or an option has the wrong type.
        ValueError: If an option has an invalid value; the message lists the valid ones.

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
        likelihood: str | Likelihood = "classification",
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
    ):
        o = self._options = FitOptions.create(
            model,
            likelihood,
            structure=structure,
            subset=subset,
            rank=rank,
            curvature=curvature,
            n_mc_samples=n_mc_samples,
            ignore_index=ignore_index,
            input_key=input_key,
            target_key=target_key,
            memory_budget=memory_budget,
            output_fn=output_fn,
        )
        # resolve the subset now where no data is needed, to fail early on bad names
        self._layout: ParamLayout | None = (
            None if subset == "last_layer" else resolve_subset(model, subset)
        )
        self._initial = Hyperparameters.create(
            o.likelihood,
            prior_precision=prior_precision,
            sigma_noise=sigma_noise,
            temperature=temperature,
            dtype=o.reader.dtype,
            device=o.reader.device,
        )
        if self._layout is not None:
            o.spec.check_prior(self._initial.prior(self._layout))
        # the options as public attributes (la.structure, la.rank, la.input_key, ...)
        for name in ("model", "likelihood", "structure", "subset", "rank", "curvature"):
            setattr(self, name, getattr(o, name))
        for name in ("n_mc_samples", "memory_budget", "output_fn"):
            setattr(self, name, getattr(o, name))
        for name in ("ignore_index", "input_key", "target_key"):
            setattr(self, name, getattr(o.reader, name))
        self.temperature = self._initial.temperature
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
        """The fitted posterior (see :mod:`laplace_ggn.posteriors`); RuntimeError if unfitted."""
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
        r"""Predictive temperature T of classification predictions, :math:`p_T \propto \bar p^{1/T}`."""
        return self.hyperparameters.predictive_temperature.detach()

    def fit(
        self,
        train_loader: Iterable,
        *,
        progress: bool | None = None,
        distributed: bool | None = None,
        process_group: object = None,
        generator: torch.Generator | None = None,
    ) -> LaplaceWrapper:
        """Collect the curvature in one pass over the data and build the posterior.

        Under ``torch.distributed`` every rank passes its shard and ends with the posterior
        of all shards together (``docs/distributed.md``).  On error the wrapper keeps its
        previous state; distributed, an error on one rank is raised on every rank.

        Args:
            train_loader: Iterable of ``(x, y)`` batches or mappings (``x``: tensor, tuple or
                dict of tensors of the model's dtype).
            progress: Show a tqdm bar (``None``: for loaders of 20 batches or more).
            distributed: ``None``: reduce over ranks when ``torch.distributed`` is
                initialised; ``True``: require it; ``False``: this process's data only.
            process_group: Group to reduce over (default: the default group).
            generator: Random generator of the label draws of ``curvature="mc"``.

        Returns:
            ``self``, fitted.

        Raises:
            ValueError: If the loader yields no data, a batch is malformed or not finite,
                targets do not fit the likelihood, the structure exceeds the memory budget,
                the models differ across ranks, or ``generator`` is on another device.
            TypeError: If ``train_loader`` is not iterable, targets are not tensors, or
                ``generator`` is not a ``torch.Generator``.
            RuntimeError: If the curvature cannot be factorised (torch.linalg failed).
        """
        self.fitted = fit_laplace(
            self._options,
            self.hyperparameters,
            self._layout,
            train_loader,
            progress=progress,
            distributed=distributed,
            process_group=process_group,
            generator=generator,
        )
        self._layout = self.fitted.layout
        return self

    def posterior_covariance(self) -> Tensor:
        """Dense posterior covariance Σ, shape ``(P, P)`` (see :class:`FittedLaplace`).

        Raises:
            RuntimeError: If not fitted, or Σ is not finite.
            ValueError: If P×P exceeds the memory budget (the message gives the GB needed).
        """
        return self._require_fit("posterior_covariance()").posterior_covariance(self.memory_budget)

    def log_marginal_likelihood(
        self,
        prior_precision: float | Tensor | None = None,
        sigma_noise: float | Tensor | None = None,
    ) -> Tensor:
        r"""Laplace evidence :math:`\log p(\mathcal D)`, shape ``()``, differentiable in both.

        Args:
            prior_precision: Evaluate at this prior precision (default: the current one).
            sigma_noise: Evaluate at this σ (regression; default: the current one).

        Returns:
            The log marginal likelihood.

        Raises:
            RuntimeError: If not fitted, or the evidence is not finite (naming the term).
            ValueError: If a hyperparameter is not positive or has the wrong shape.
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
        """Replace the prior precision, σ and/or T (no refit); all validated first.

        Returns:
            ``self``.

        Raises:
            RuntimeError: If not fitted.
            ValueError: If a value is invalid.
            TypeError: If a value is not a number.
        """
        fitted = self._require_fit("set_hyperparameters()")
        hp = fitted.hyperparameters.replace(
            prior_precision=prior_precision,
            sigma_noise=sigma_noise,
            predictive_temperature=predictive_temperature,
        )
        self.fitted = fitted.with_hyperparameters(hp)
        return self

    def jacobians(self, x: object) -> tuple[Tensor, Tensor]:
        """``(J, f)`` at inputs ``x``: shapes ``(B, C, P)`` and ``(B, C)`` (with T for sequences).

        Raises:
            RuntimeError: If not fitted, or the Jacobians are not finite.
            ValueError: If the input differs from the training inputs or is not finite.
        """
        return self._require_fit("jacobians()").jacobians(x)

    def functional_covariance(self, x: object) -> Tensor:
        r""":math:`J(x)\Sigma J(x)^\top`, shape ``(B, C, C)``, never forming Σ (diag/kfac/lowrank).

        Raises:
            RuntimeError: If not fitted, or the result is not finite.
            ValueError: If the input differs from the training inputs or is not finite.
        """
        return self._require_fit("functional_covariance()").functional_covariance(x)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``(n, P)`` draws of the subset's parameters from the posterior.

        Raises:
            RuntimeError: If not fitted, or the samples are not finite.
            ValueError: If ``n`` is not a positive integer.
            TypeError: If ``generator`` is not a ``torch.Generator``.
        """
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
        """``(n, P)`` draws of the projected posterior by alternating projections over the data.

        See :func:`~laplace_ggn.fitted.sample_projected` (the arguments are its own).

        Raises:
            RuntimeError: If not fitted.
            ValueError: If the structure is not ``"projected"`` or an option is invalid.
            TypeError: If ``generator`` is not a ``torch.Generator``.
        """
        return sample_projected(
            self._require_fit("sample_projected()"),
            n,
            train_loader,
            n_iterations=n_iterations,
            tol=tol,
            generator=generator,
            progress=progress,
        )

    def predict(
        self,
        x: object,
        method: str | PredictMethod = "glm",
        *,
        link: str | Link | None = None,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        r"""Predictive distribution at test inputs (see :mod:`laplace_ggn.predictive`).

        ``"glm"``: :math:`f \sim N(f(x,\theta_*), J\Sigma J^\top)`; ``"nn"``: θ sampled from
        the posterior.  Regression variance includes σ²; classification applies T.

        Args:
            x: Model input of batch size B.
            method: ``"glm"`` or ``"nn"``.
            link: ``"probit"`` (glm default), ``"bridge"`` or ``"mc"`` (nn: the only one).
            n_samples: S for ``link="mc"`` and ``method="nn"``.
            generator: Random generator (on the model's device).

        Returns:
            :class:`~laplace_ggn.predictive.Prediction`, ``mean`` and ``variance`` ``(B, C)``.

        Raises:
            RuntimeError: If not fitted, or the predictive is not finite.
            ValueError: If the method/link pair or ``n_samples`` is invalid, or the input
                differs from the training inputs or is not finite.
            TypeError: If ``generator`` is not a ``torch.Generator``.
        """
        resolve_options(self.likelihood, method, link)
        fitted = self._require_fit("predict()")
        return fitted.predict(x, method, link=link, n_samples=n_samples, generator=generator)

    def optimize_prior_precision(
        self, method: object = "marglik", *, progress: bool = False, **options: object
    ) -> LaplaceWrapper:
        """Tune the prior precision (and σ, or T) by evidence and/or validation NLL; no refit.

        ``method``: a :class:`~laplace_ggn.Marglik`, :class:`~laplace_ggn.GridSearch` or
        :class:`~laplace_ggn.MarglikTemperature`, or its name ``"marglik"``, ``"gridsearch"``,
        ``"marglik_temperature"`` with the options of that object as keywords (e.g.
        ``val_loader=``, ``grid=``, ``n_steps=``, ``tune_sigma_noise=``; see ``docs/api.md``).
        Curves are kept in ``marglik_result_``, ``gridsearch_result_`` and
        ``temperature_result_``; ``"marglik"`` and ``"gridsearch"`` reset T to 1.  On failure
        the hyperparameters stay as they were.

        Args:
            method: The tuning object or its name.
            progress: Show a progress bar.
            **options: The options of a method given by name.

        Returns:
            ``self``.

        Raises:
            RuntimeError: If not fitted, or the tuning fails numerically.
            ValueError: If an option is invalid or belongs to another method (the message
                names the options of this one).
            TypeError: If ``generator`` is not a ``torch.Generator`` or ``val_loader`` is not
                iterable.
        """
        tuner = _marglik.tuning_method(method, self.likelihood, **options)
        tuned = tuner.tune(self._require_fit("optimize_prior_precision()"), progress=progress)
        self.fitted = self.fitted.with_hyperparameters(tuned.hyperparameters)
        for name in ("marglik", "gridsearch", "temperature"):
            if getattr(tuned, name) is not None:
                setattr(self, f"{name}_result_", getattr(tuned, name))
        if tuned.warning:
            warnings.warn(tuned.warning, UserWarning, stacklevel=2)
        return self

    def kernel_decomposition(
        self,
        x: object,
        *,
        y: Tensor | None = None,
        tol: float = 1e-9,
        rank: int | None = None,
        n_samples: int = 32,
        generator: torch.Generator | None = None,
    ):
        r"""Kernel / non-kernel decomposition of the posterior (Roy et al., NeurIPS 2024).

        See :func:`laplace_ggn.diagnostics.kernel_decomposition` (the arguments are its own).

        Returns:
            :class:`~laplace_ggn.diagnostics.KernelDecomposition`; ``print`` it or ``.plot()``.

        Raises:
            RuntimeError: If not fitted.
            ValueError: If the structure is not 'full' or 'lowrank', the model's outputs are
                ``(B, T, C)``, or an argument is invalid.
            TypeError: If ``x`` is neither a model input nor a loader.
        """
        from . import diagnostics as _diagnostics

        fitted = self._require_fit("kernel_decomposition()")
        if fitted.statistics.output_ndim != 2:
            raise ValueError(
                "kernel_decomposition() needs a model with outputs (B, C); got a model fitted "
                "on outputs (B, T, C). Decompose a model that returns one position, e.g. the "
                "last token's outputs."
            )
        return _diagnostics.kernel_decomposition(
            fitted.posterior,
            fitted.fmodel,
            x,
            likelihood=self.likelihood,
            lik=fitted.likelihood,
            structure=self.structure,
            y=y,
            sigma_noise=fitted.hyperparameters.sigma_noise,
            tol=tol,
            rank=rank,
            n_samples=n_samples,
            kept_eigenpairs=self.rank,
            generator=generator,
            input_key=self.input_key,
            target_key=self.target_key,
            check_input=fitted.model_input,
        )

    def state_dict(self) -> dict:
        """Everything :meth:`from_state_dict` needs (see :mod:`laplace_ggn.persistence`).

        Raises:
            RuntimeError: If not fitted.
        """
        return save_state(self._require_fit("state_dict()"), self._options)

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, state: dict, *, output_fn: Callable | None = None
    ) -> LaplaceWrapper:
        """Rebuild a fitted wrapper from :meth:`state_dict` and a model of its architecture.

        Every key is validated first (``docs/errors.md``); θ* of the subset comes from the
        state, the other parameters from ``model``; tensors take the model's dtype/device.
        ``output_fn`` is that of the saved wrapper (a callable is not saved).

        Returns:
            A fitted wrapper equal to the one saved.

        Raises:
            TypeError: If the state or one of its entries has the wrong type.
            ValueError: If a key is missing or invalid (named), the state is from a newer
                format, or the model's parameters do not match the saved ones.
        """
        state = check_state(state, model, STRUCTURES)
        la = cls(model, **saved_options(state), output_fn=output_fn)
        hp = la._initial.replace(predictive_temperature=state.get("predictive_temperature", 1.0))
        la.fitted = restore_fitted(la._options, hp, la._layout, state)
        return la

    def __repr__(self) -> str:
        fitted = f"fitted, P={self.n_params}" if self.is_fitted else "not fitted"
        subset = self.subset if isinstance(self.subset, str) else "list"
        return (
            f"LaplaceWrapper(likelihood={self.likelihood.value!r}, "
            f"structure={self.structure!r}, subset={subset!r}, {fitted})"
        )
