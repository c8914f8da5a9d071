r"""`LaplaceWrapper`: the user-facing composition of likelihood, subset, curvature and posterior.

It holds no mathematics and no state of its own beyond its options and the fitted result:
options are validated by :class:`~laplace_ggn.fitting.FitOptions` and
:class:`~laplace_ggn.hyperparameters.Hyperparameters`, the data pass is
:func:`~laplace_ggn.fitting.fit_laplace`, its result a :class:`~laplace_ggn.FittedLaplace`
(:attr:`LaplaceWrapper.fitted`) that predicts, tunes and is saved
(:mod:`laplace_ggn.persistence`); structures come from :mod:`laplace_ggn.structures`.

Curvature is computed on a private copy of the model in eval mode (BatchNorm statistics
frozen, dropout off); the user's model is never modified.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from . import marglik as _marglik
from ._checks import (
    DEFAULT_MEMORY_BUDGET,
    Curvature,
    Likelihood,
    Link,
    PredictMethod,
    Structure,
    check_computed_finite,
    check_generator,
    is_integer,
)
from .collectors import dense_bytes
from .fitted import FittedLaplace, sample_projected
from .fitting import FitOptions, fit_laplace, gigabytes, restore_fitted
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

    Args:
        model: Trained network returning outputs of shape ``(B, C)``, or ``(B, T, C)`` with
            one observation per position (or a mapping / object with ``logits``, e.g. a
            Hugging Face ``ModelOutput``, or a tuple whose first element is the output);
            never modified.
        likelihood: ``"regression"``, ``"classification"`` or ``"binary"``.
        structure: ``"full"``, ``"diag"``, ``"kfac"``, ``"lowrank"`` or ``"projected"`` (the
            prior restricted to the kernel of the GGN, see ``docs/structures.md``), or another
            name of :data:`laplace_ggn.structures.STRUCTURES`.
        subset: ``"all"`` (every parameter with ``requires_grad``; frozen ones, e.g. a base
            model under LoRA adapters, are left out) or its alias ``"trainable"``,
            ``"last_layer"`` (the last module with trainable parameters of its own whose
            output reaches the model output) or a list of parameter names.
        prior_precision: Float, or tensor of shape ``(T,)`` (one per parameter tensor of the
            subset) or ``(P,)``.
        sigma_noise: Observation noise σ (regression only).
        temperature: τ; the curvature is divided by it.
        rank: ``lowrank``: ``None`` for exact Woodbury, an int for the top-k eigenpairs;
            ``projected``: ``None`` for the exact kernel, k to keep the k most constrained
            directions out of the support.
        curvature: ``"ggn"`` (exact: C back-propagated columns per sample) or ``"mc"`` (the
            Monte-Carlo Fisher: ``n_mc_samples`` columns from labels drawn from the model,
            an unbiased estimate of G whose cost does not grow with C); see
            ``docs/structures.md``.
        n_mc_samples: S, the draws per sample for ``curvature="mc"`` (default 1).
        ignore_index: Classification / binary targets equal to it are skipped in the
            curvature, the loss and N (as in ``torch.nn.CrossEntropyLoss``).
        input_key: Key of the inputs in mapping batches whose input sits under one key
            (``None``: every key but the targets is a keyword input, ``model(**rest)``, as
            in Hugging Face batches; a single other key ``"input"`` is passed positionally).
        target_key: Key of the targets in mapping batches (``None``: whichever of
            ``"target"``, ``"labels"``, ``"label"`` the batch holds).
        memory_budget: Bytes for chunked intermediates and for the largest dense structure.
        output_fn: Callable mapping the model's output to the ``(B, C)`` tensor, for outputs
            other than those accepted by default (not saved by :meth:`state_dict`).

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
        o = FitOptions.create(
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
        self._options, reader = o, o.reader
        # resolve the subset now where no data is needed, to fail early on bad names
        self._layout: ParamLayout | None = (
            None if subset == "last_layer" else resolve_subset(model, subset)
        )
        self._initial = Hyperparameters.create(
            o.likelihood,
            prior_precision=prior_precision,
            sigma_noise=sigma_noise,
            temperature=temperature,
            dtype=reader.dtype,
            device=reader.device,
        )
        if self._layout is not None:
            o.spec.check_prior(self._initial.prior(self._layout))
        self.model, self.likelihood, self.structure, self.subset = (
            model,
            o.likelihood,
            o.structure,
            subset,
        )
        self.rank, self.curvature, self.n_mc_samples = o.rank, o.curvature, o.n_mc_samples
        self.ignore_index, self.input_key, self.target_key = (
            reader.ignore_index,
            reader.input_key,
            reader.target_key,
        )
        self.memory_budget, self.output_fn = o.memory_budget, output_fn
        self.temperature = self._initial.temperature
        self.fitted: FittedLaplace | None = None

    def _require_fit(self, what: str) -> FittedLaplace:
        if self.fitted is None:
            raise RuntimeError(f"{what} needs a fitted posterior; call fit(train_loader) first.")
        return self.fitted

    @property
    def hyperparameters(self) -> Hyperparameters:
        """The current :class:`~laplace_ggn.hyperparameters.Hyperparameters`."""
        return self._initial if self.fitted is None else self.fitted.hyperparameters

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`from_state_dict`) has produced a posterior."""
        return self.fitted is not None

    @property
    def posterior(self):
        """The fitted posterior object (see :mod:`laplace_ggn.posteriors`).

        Raises:
            RuntimeError: If the wrapper is not fitted.
        """
        return self._require_fit("posterior").posterior

    @property
    def n_params(self) -> int:
        """P, the number of parameters in the subset.

        Raises:
            RuntimeError: If the subset is 'last_layer' and the wrapper is not fitted yet.
        """
        if self.fitted is not None:
            return self.fitted.n_params
        if self._layout is None:
            raise RuntimeError("n_params of subset='last_layer' is known after fit(train_loader).")
        return self._layout.n_params

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
        r"""Predictive temperature T of classification predictions, shape ``()`` (1: none).

        :meth:`predict` returns :math:`p_T \propto \bar p^{1/T}`
        (:func:`~laplace_ggn.predictive.temper`); set by
        ``optimize_prior_precision(method="marglik_temperature")`` or
        :meth:`set_hyperparameters`.
        """
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

        Under ``torch.distributed`` every rank passes its own shard; the collectors' states,
        N and the loss sum are reduced over the ranks, and every rank ends with the posterior
        of the fit on all the shards together (see ``docs/distributed.md``).

        Args:
            train_loader: Iterable of ``(x, y)`` batches or mappings; ``x`` may be a tensor,
                a tuple or a dict of tensors. Floating inputs must have the model's dtype;
                tensors on another device are moved to the model's device.
            progress: Show a tqdm bar (``None``: only for loaders of 20 batches or more;
                distributed: on rank 0 only).
            distributed: ``None``: reduce over ranks when ``torch.distributed`` is
                initialised; ``True``: require it; ``False``: fit on this process's data only.
            process_group: Group to reduce over (default: the default group).
            generator: Random generator of the label draws of ``curvature="mc"`` (on the
                model's device; the exact curvature draws nothing and ignores it). The same
                generator state and data give the same curvature; distributed, give every
                rank its own seed.

        Returns:
            ``self``, fitted.

        Raises:
            ValueError: If the loader yields no data (on every rank; batches of 0 rows are
                skipped), a batch is malformed, holds NaN/Inf, has the wrong dtype, targets do
                not fit the likelihood, the structure would exceed the memory budget (for
                ``curvature="ggn"``: one sample's C·P square-root rows), the models differ
                across ranks, or ``generator`` is on another device than the model. The
                wrapper keeps its previous state. Distributed: an error on one rank is raised
                on every rank.
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
        """Dense posterior covariance Σ, shape ``(P, P)``.

        Raises:
            RuntimeError: If not fitted, or Σ is not finite.
            ValueError: If P×P exceeds the memory budget (the message gives the GB needed).
        """
        fitted = self._require_fit("posterior_covariance()")
        P = fitted.n_params
        need = dense_bytes(P, fitted.fmodel.dtype)
        if need > self.memory_budget:
            raise ValueError(
                f"posterior_covariance() needs a dense ({P}, {P}) matrix of {gigabytes(need)}, "
                f"over the memory budget of {gigabytes(self.memory_budget)}. Use "
                "functional_covariance(x), sample(n) or posterior.covariance_matvec(V) instead, "
                "or raise memory_budget=."
            )
        Sigma = fitted.posterior.to_dense()
        check_computed_finite(Sigma, "posterior covariance Σ")
        return Sigma

    def log_marginal_likelihood(
        self,
        prior_precision: float | Tensor | None = None,
        sigma_noise: float | Tensor | None = None,
    ) -> Tensor:
        r"""Laplace evidence :math:`\log p(\mathcal D)`, shape ``()``.

        Differentiable in ``prior_precision`` and ``sigma_noise`` when they are tensors that
        require grad.

        Args:
            prior_precision: Evaluate at this prior precision (default: the current one).
            sigma_noise: Evaluate at this σ (regression; default: the current one).

        Returns:
            The log marginal likelihood.

        Raises:
            RuntimeError: If not fitted, or the evidence is not finite (the message names the
                term that overflowed).
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
        """Replace the prior precision, σ and/or the predictive temperature (no refit).

        Everything is validated before anything changes.

        Returns:
            ``self``.

        Raises:
            RuntimeError: If not fitted.
            ValueError: If a value is invalid.
            TypeError: If ``predictive_temperature`` is not a number.
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
        """Jacobians of the outputs at test inputs (see :meth:`FittedLaplace.jacobians`).

        Args:
            x: Model input (tensor, tuple or dict) of batch size B.

        Returns:
            ``(J, f)``: shape ``(B, C, P)`` and outputs ``(B, C)`` (``(B, T, C, P)`` and
            ``(B, T, C)`` for sequence outputs).

        Raises:
            RuntimeError: If not fitted, or the Jacobians are not finite (numerical overflow).
            ValueError: If the input differs from the training inputs in dtype, structure or
                number of dimensions, holds the target key, or holds NaN/Inf.
        """
        return self._require_fit("jacobians()").jacobians(x)

    def functional_covariance(self, x: object) -> Tensor:
        r"""Covariance of the linearised outputs, :math:`J(x) \Sigma J(x)^\top`.

        Never forms Σ for diag/kfac/lowrank structures; Jacobians are computed in chunks, or
        not at all when the subset is one Linear layer whose output is the model output
        (``posterior.linear_head_covariance`` from the features entering it).

        Args:
            x: Model input of batch size B.

        Returns:
            Shape ``(B, C, C)`` (``(B, T, C, C)`` for sequence outputs), without observation
            noise.

        Raises:
            RuntimeError: If not fitted, or the result is not finite (numerical overflow).
            ValueError: If the input differs from the training inputs in dtype, structure or
                number of dimensions, holds the target key, or holds NaN/Inf.
        """
        return self._require_fit("functional_covariance()").functional_covariance(x)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw parameter vectors of the subset from the posterior.

        Args:
            n: Number of samples.
            generator: Random generator (on the model's device) for reproducibility.

        Returns:
            Shape ``(n, P)``.

        Raises:
            RuntimeError: If not fitted, or the samples are not finite.
            ValueError: If ``n`` is not a positive integer (Python, NumPy or 0-dim torch).
            TypeError: If ``generator`` is not a ``torch.Generator``.
        """
        fitted = self._require_fit("sample()")
        if not is_integer(n) or n < 1:
            raise ValueError(f"n must be a positive integer; got {n!r}.")
        check_generator(generator)
        draws = fitted.posterior.sample(int(n), generator=generator)
        check_computed_finite(draws, "posterior samples")
        return draws

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
        r"""Draw from the projected posterior by alternating projections over the training data.

        See :func:`~laplace_ggn.fitted.sample_projected`: memory O(P·n) plus one batch's
        kernel rows, one pass over the data per cycle; it converges to :meth:`sample` of an
        exact (``rank=None``) fit with the same ``generator`` state.

        Args:
            n: Number of samples.
            train_loader: The training batches of the fit (re-iterable; may shuffle).
            n_iterations: Maximal number of cycles over the loader.
            tol: Stop when a cycle changes the samples by less than ``tol`` (relative); a
                ``RuntimeWarning`` says when ``n_iterations`` ran out first.
            generator: Random generator (on the model's device) for reproducibility.
            progress: Show a progress bar over the cycles.

        Returns:
            Shape ``(n, P)``.

        Raises:
            RuntimeError: If not fitted.
            ValueError: If the structure is not ``"projected"``, ``n`` is not a positive
                integer, or an option or a batch is invalid.
            TypeError: If ``generator`` is not a ``torch.Generator`` or the loader is not
                re-iterable.
        """
        fitted = self._require_fit("sample_projected()")
        return sample_projected(
            fitted,
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

        ``method="glm"`` linearises the network, :math:`f \sim N(f(x,\theta_*), J\Sigma J^\top)`
        (Jacobians in chunks, Σ never formed for diag/kfac/lowrank); ``method="nn"`` samples
        θ from the posterior and runs the network.  Regression variance includes σ².
        Classification applies the :attr:`predictive_temperature` (1 unless tuned or set).

        Args:
            x: Model input of batch size B.
            method: ``"glm"`` or ``"nn"``.
            link: Classification: ``"probit"`` (default for glm), ``"bridge"`` or ``"mc"``
                (the only one, and default, for nn).  Regression: None or ``"probit"`` (ignored).
            n_samples: S for ``link="mc"`` and ``method="nn"``.
            generator: Random generator (on the model's device) for reproducible draws.

        Returns:
            :class:`~laplace_ggn.predictive.Prediction` with ``mean`` and ``variance`` of shape
            ``(B, C)`` (``(B, T, C)`` for a model with outputs ``(B, T, C)``).

        Raises:
            RuntimeError: If not fitted, or the functional covariance or the predictive is not
                finite (numerical overflow, e.g. saturated logits in float32).
            ValueError: If the method/link combination is invalid (the message lists the valid
                ones), ``n_samples`` is not a positive int, or the input differs from the
                training inputs in dtype, structure or number of dimensions, holds the target
                key, or holds NaN/Inf.
            TypeError: If ``generator`` is not a ``torch.Generator``, or ``x`` holds no tensor.
        """
        resolve_options(self.likelihood, method, link)
        fitted = self._require_fit("predict()")
        return fitted.predict(x, method, link=link, n_samples=n_samples, generator=generator)

    def optimize_prior_precision(
        self,
        method: object = "marglik",
        *,
        val_loader: Iterable | None = None,
        tune_sigma_noise: bool = False,
        prior_structure: str | None = None,
        n_steps: int | None = None,
        lr: float | None = None,
        grid: object = None,
        log_range: tuple[float, float] | None = None,
        n_points: int | None = None,
        predict_method: str | PredictMethod | None = None,
        link: str | Link | None = None,
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> LaplaceWrapper:
        """Tune the prior precision (and σ) by evidence and/or validation NLL; no refit.

        ``method`` is a tuning object of :mod:`laplace_ggn.marglik` —
        :class:`~laplace_ggn.marglik.Marglik`, :class:`~laplace_ggn.marglik.GridSearch`,
        :class:`~laplace_ggn.marglik.MarglikTemperature` — or its name with its options as
        keywords.  ``"marglik"``: Adam on the log hyperparameters of the Laplace evidence,
        reusing one factorisation of the curvature (curve in ``self.marglik_result_``).
        ``"gridsearch"``: a scalar precision chosen on a log-spaced grid by the mean
        validation NLL of the chosen predictive (curve in ``self.gridsearch_result_``).
        ``"marglik_temperature"`` (classification and binary): the prior precision by the
        evidence, then the :attr:`predictive_temperature` T by the mean validation NLL
        (curves in ``self.marglik_result_`` and ``self.temperature_result_``; see
        ``docs/calibration.md``).  ``"marglik"`` and ``"gridsearch"`` reset T to 1.  On
        failure the hyperparameters stay as they were.

        Args:
            method: A tuning object, or ``"marglik"``, ``"gridsearch"`` or
                ``"marglik_temperature"``.
            val_loader: Held-out ``(input, target)`` batches (gridsearch, marglik_temperature).
            tune_sigma_noise: Tune σ jointly (marglik, regression).
            prior_structure: ``"scalar"``, ``"layerwise"`` or ``"diagonal"`` (marglik methods;
                default: the structure of the current prior precision).
            n_steps: Adam steps (marglik methods; default 100).
            lr: Adam learning rate on log-parameters (marglik methods; default 0.1).
            grid: Explicit precisions to try (gridsearch).
            log_range: ``(lo, hi)`` powers of 10 of the grid (gridsearch; default (-4, 4)).
            n_points: Grid points (gridsearch; default 41).
            predict_method: Predictive scored on validation data (default ``"glm"``).
            link: Link of that predictive.
            n_samples: S of that predictive (default 100).
            generator: Random generator of that predictive.
            progress: Show a progress bar.

        Returns:
            ``self``.

        Raises:
            RuntimeError: If not fitted, or the tuning fails numerically.
            ValueError: If an option is invalid or belongs to another method.
            TypeError: If ``generator`` is not a ``torch.Generator``, or ``val_loader`` is not
                iterable.
        """
        tuner = _marglik.tuning_method(
            method,
            self.likelihood,
            val_loader=val_loader,
            tune_sigma_noise=tune_sigma_noise,
            prior_structure=prior_structure,
            n_steps=n_steps,
            lr=lr,
            grid=grid,
            log_range=log_range,
            n_points=n_points,
            predict_method=predict_method,
            link=link,
            n_samples=n_samples,
            generator=generator,
        )
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

        See :func:`laplace_ggn.diagnostics.kernel_decomposition`:
        :math:`\Sigma = P_{ker}\Sigma P_{ker} + P_\perp\Sigma P_\perp` with
        :math:`P_\perp = U_r U_r^\top` from the eigenvalues of G above ``tol·λ_max``.

        Args:
            x: Inputs of batch size B (tensor, tuple or dict), or a loader of ``(x, y)``
                batches whose inputs are concatenated and whose targets serve as ``y``.
            y: Targets for the sample table; ``None`` measures fit against MAP predictions.
            tol: Relative eigenvalue threshold of the kernel.
            rank: Fix r instead of thresholding by ``tol``.
            n_samples: Posterior samples per kind for the table (0 skips it).
            generator: Random generator for the samples.

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
        """Everything needed to rebuild the fitted wrapper with :meth:`from_state_dict`.

        Returns:
            The state (see :mod:`laplace_ggn.persistence`).

        Raises:
            RuntimeError: If not fitted.
        """
        return save_state(self._require_fit("state_dict()"), self._options)

    @classmethod
    def from_state_dict(
        cls,
        model: nn.Module,
        state: dict,
        *,
        output_fn: Callable[[object], Tensor] | None = None,
    ) -> LaplaceWrapper:
        """Rebuild a fitted wrapper from :meth:`state_dict` and a model of the same architecture.

        The whole state is validated first (see ``docs/errors.md``): every key present, of the
        right type and shape, finite, consistent with its structure and with the model.  The
        model must have the saved parameters (names and shapes); states of format 2 also
        record every parameter of the saved model, and a model with other or extra parameters
        is refused.  The posterior's tensors are cast to the model's dtype and device.

        Args:
            model: Network with the parameters of the saved model (values may differ; θ* of
                the subset is taken from the state, the other parameters from ``model``).
            state: Output of :meth:`state_dict`.
            output_fn: The ``output_fn`` of the saved wrapper, if it had one (a callable is
                not saved in the state).

        Returns:
            A fitted wrapper equal to the one saved.

        Raises:
            TypeError: If the state or one of its entries has the wrong type.
            ValueError: If a key is missing or invalid (the message names it, with what it
                must be and what it holds), the state is from a newer format, or the model's
                parameters do not match the saved ones.
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
