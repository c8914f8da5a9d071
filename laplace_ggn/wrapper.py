r"""`LaplaceWrapper`: the user-facing composition of likelihood, subset, curvature and posterior.

It holds no mathematics of its own: curvature comes from :mod:`laplace_ggn.collectors`, the
Gaussian from :mod:`laplace_ggn.posteriors`, the evidence from :mod:`laplace_ggn.marglik`,
predictions from :mod:`laplace_ggn.predictive`.

Curvature is computed on a private copy of the model in eval mode (BatchNorm statistics
frozen, dropout off); the user's model is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, fields, is_dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed as _distributed
from . import marglik as _marglik
from . import predictive as _predictive
from ._checks import (
    DEFAULT_MEMORY_BUDGET,
    Curvature,
    Likelihood,
    Link,
    PredictMethod,
    Structure,
    as_enum,
    check_computed_finite,
    check_finite,
    check_generator,
    check_positive,
    check_target_tensor,
    is_integer,
)
from .collectors import dense_bytes
from .functional import (
    FunctionalModel,
    ParamLayout,
    batch_size_of,
    check_batch_dims,
    input_tensors,
    resolve_subset,
    split_batch,
    to_device,
)
from .head import LinearHead
from .likelihoods import (
    DEFAULT_IGNORE_INDEX,
    FitStatistics,
    OutputCurvature,
    get_likelihood,
    observations,
)
from .model_io import (
    DEFAULT_TARGET_KEYS,
    InputSpec,
    check_keyword_inputs,
    check_model_input,
    input_spec,
)
from .persistence import STATE_FORMAT_VERSION, check_state, model_parameters
from .posteriors import Prior, make_prior
from .posteriors._common import standard_normal
from .posteriors.alternating import alternating_projection
from .predictive import Prediction
from .structures import STRUCTURES, StructureOptions, resolve_structure

__all__ = ["LaplaceWrapper"]

_PROGRESS_MIN_BATCHES = 20


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GB"


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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self.model = model
        self.likelihood = as_enum(Likelihood, likelihood, "likelihood")
        self.structure = resolve_structure(structure)
        self._lik = get_likelihood(self.likelihood)
        param = next(iter(model.parameters()), None)
        if param is None:
            raise ValueError("model must have parameters; got a module with none.")
        self._dtype, self._device = param.dtype, param.device
        # resolve the subset now where no data is needed, to fail early on bad names
        self.subset = subset
        self._layout: ParamLayout | None = (
            None if subset == "last_layer" else resolve_subset(model, subset)
        )
        self._prior_precision = self._check_prior_input(prior_precision)
        if self._layout is not None:
            self._prior(self._prior_precision)
        self._sigma_noise = self._check_sigma_applies(self._as_sigma(sigma_noise))
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float; got {type(temperature).__name__}.")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0; got {temperature}.")
        self.temperature = float(temperature)
        if rank is not None:
            if not STRUCTURES[self.structure].takes_rank:
                ranked = " or ".join(repr(n) for n, s in STRUCTURES.items() if s.takes_rank)
                raise ValueError(
                    f"rank applies to structure={ranked} only; got rank={rank} "
                    f"with structure={self.structure!r}."
                )
            if not is_integer(rank) or rank < 1:
                raise ValueError(f"rank must be None or a positive integer; got {rank!r}.")
            rank = int(rank)
        self.rank = rank
        self.curvature = as_enum(Curvature, curvature, "curvature")
        if self.curvature is Curvature.MC and not STRUCTURES[self.structure].samples_curvature:
            sampled = [repr(n) for n, s in STRUCTURES.items() if s.samples_curvature]
            raise ValueError(
                f"curvature='mc' applies to structures {', '.join(sampled[:-1])} and "
                f"{sampled[-1]}; got structure={self.structure!r}, whose curvature is not "
                "built from output Hessians (none to sample)."
            )
        if n_mc_samples is not None:
            if self.curvature is not Curvature.MC:
                raise ValueError(
                    f"n_mc_samples applies to curvature='mc' only; got n_mc_samples="
                    f"{n_mc_samples!r} with curvature={self.curvature.value!r}."
                )
            if not is_integer(n_mc_samples) or n_mc_samples < 1:
                raise ValueError(f"n_mc_samples must be a positive integer; got {n_mc_samples!r}.")
            n_mc_samples = int(n_mc_samples)
        self.n_mc_samples = n_mc_samples
        if not is_integer(ignore_index):
            raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}.")
        self.ignore_index = int(ignore_index)
        for key_name, key in (("input_key", input_key), ("target_key", target_key)):
            if key is not None and not isinstance(key, str):
                raise TypeError(f"{key_name} must be a str or None; got {type(key).__name__}.")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable or None; got {type(output_fn).__name__}.")
        self.input_key, self.target_key = input_key, target_key
        self.output_fn = output_fn
        self._input_spec: InputSpec | None = None
        if not is_integer(memory_budget) or memory_budget <= 0:
            raise ValueError(
                f"memory_budget must be a positive int (bytes); got {memory_budget!r}."
            )
        self.memory_budget = int(memory_budget)
        self._predictive_temperature = torch.ones((), dtype=self._dtype, device=self._device)
        self._posterior = None
        self._fmodel: FunctionalModel | None = None
        self._stats: FitStatistics | None = None
        self._head: LinearHead | None = None

    # -- validation helpers ------------------------------------------------------------------

    def _check_prior_input(self, prior_precision: float | Tensor) -> Tensor:
        if isinstance(prior_precision, bool) or not isinstance(
            prior_precision, (int, float, Tensor)
        ):
            raise TypeError(
                f"prior_precision must be a float or a tensor; got {type(prior_precision).__name__}."
            )
        t = torch.as_tensor(prior_precision, dtype=self._dtype, device=self._device)
        check_positive(t.detach(), "prior_precision")
        return t

    def _require_fit(self, what: str) -> None:
        if self._posterior is None:
            raise RuntimeError(f"{what} needs a fitted posterior; call fit(train_loader) first.")

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`from_state_dict`) has produced a posterior."""
        return self._posterior is not None

    @property
    def posterior(self):
        """The fitted posterior object (see :mod:`laplace_ggn.posteriors`).

        Raises:
            RuntimeError: If the wrapper is not fitted.
        """
        self._require_fit("posterior")
        return self._posterior

    @property
    def n_params(self) -> int:
        """P, the number of parameters in the subset.

        Raises:
            RuntimeError: If the subset is 'last_layer' and the wrapper is not fitted yet.
        """
        if self._layout is None:
            raise RuntimeError("n_params of subset='last_layer' is known after fit(train_loader).")
        return self._layout.n_params

    @property
    def prior_precision(self) -> Tensor:
        """Current prior precision, shape ``()``, ``(T,)`` or ``(P,)``."""
        return self._prior_precision.detach()

    @property
    def sigma_noise(self) -> Tensor:
        """Current observation noise σ, shape ``()``."""
        return self._sigma_noise.detach()

    @property
    def predictive_temperature(self) -> Tensor:
        r"""Predictive temperature T of classification predictions, shape ``()`` (1: none).

        :meth:`predict` returns :math:`p_T \propto \bar p^{1/T}`
        (:func:`~laplace_ggn.predictive.temper`); set by
        ``optimize_prior_precision(method="marglik_temperature")`` or
        :meth:`set_hyperparameters`.
        """
        return self._predictive_temperature.detach()

    def _check_predictive_temperature(self, value: float | Tensor) -> Tensor:
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
            raise TypeError(f"predictive_temperature must be a float; got {type(value).__name__}.")
        t = torch.as_tensor(value, dtype=self._dtype, device=self._device).detach()
        if t.ndim != 0:
            raise ValueError(
                f"predictive_temperature must be a scalar; got shape {tuple(t.shape)}."
            )
        check_positive(t, "predictive_temperature")
        if self.likelihood is Likelihood.REGRESSION and float(t) != 1.0:
            raise ValueError(
                f"predictive_temperature applies to likelihood 'classification' or 'binary'; got "
                f"predictive_temperature={float(t)} with likelihood='regression' (whose "
                "predictive is calibrated through sigma_noise)."
            )
        return t

    def _scale(self, sigma: Tensor) -> Tensor:
        if self.likelihood is Likelihood.REGRESSION:
            return 1.0 / (self.temperature * sigma**2)
        return torch.as_tensor(1.0 / self.temperature, dtype=self._dtype, device=self._device)

    def _prior(self, precision: Tensor, layout: ParamLayout | None = None) -> Prior:
        """Validated prior of the structure (shape, positivity, kind the structure accepts)."""
        layout = layout or self._layout
        prior = make_prior(precision, layout, dtype=self._dtype, device=self._device)
        spec = STRUCTURES.get(self.structure)
        if spec is not None:
            spec.check_prior(prior)
        return prior

    def _structure_options(self) -> StructureOptions:
        return StructureOptions(
            model=self.model,
            prior_precision=self._prior_precision,
            rank=self.rank,
            memory_budget=self.memory_budget,
        )

    # -- fitting ---------------------------------------------------------------------------

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
        if not isinstance(train_loader, Iterable):
            raise TypeError(
                f"train_loader must be an iterable of batches (e.g. a DataLoader); "
                f"got {type(train_loader).__name__}."
            )
        self._check_generator(generator)
        spec = STRUCTURES.get(self.structure)
        if spec is None:
            raise NotImplementedError(f"structure={self.structure!r} is not available.")
        dctx = _distributed.resolve_distributed(distributed, process_group)
        first, iterator, layout, private, local_error = None, iter(()), self._layout, None, None
        first_i, n_empty = 0, 0
        try:
            iterator = iter(train_loader)
            # batches with 0 rows are skipped; the first batch with data starts the pass
            for first_i, batch in enumerate(iterator):
                x0, _, empty = self._split(batch, f"batch {first_i}")
                if not empty:
                    first = batch
                    break
                n_empty += 1
            if first is None:
                if dctx is None:
                    raise ValueError(
                        "train_loader must yield at least one batch; got an empty loader."
                        if not n_empty
                        else "train_loader must yield at least one non-empty batch; got "
                        f"{n_empty} batch(es), all with 0 rows."
                    )
            elif layout is None:
                # 'last_layer' is traced on a private eval-mode copy, never on the user's model
                private = copy.deepcopy(self.model).eval()
                layout = resolve_subset(private, self.subset, self._to_device(x0), self.output_fn)
        except Exception as exc:
            if dctx is None:
                raise
            local_error = exc
        if dctx is not None:
            layout = dctx.agree(
                self.model, self.subset, layout, has_data=first is not None, error=local_error
            )
        prior = self._prior(self._prior_precision, layout)
        need = spec.memory_bytes(layout.n_params, self._dtype, self._structure_options())
        if need > self.memory_budget:
            raise ValueError(self._memory_message(need, layout.n_params))
        if private is not None:
            for p in private.parameters():
                p.requires_grad_(False)
            fmodel = FunctionalModel(
                private,
                layout,
                memory_budget=self.memory_budget,
                copy_model=False,
                output_fn=self.output_fn,
            )
        else:
            fmodel = FunctionalModel(
                self.model, layout, memory_budget=self.memory_budget, output_fn=self.output_fn
            )
        if (
            self.curvature is Curvature.GGN
            # lowrank / projected refuse their rows themselves; their top-k needs none
            and spec.exact_rows
            and first is not None
        ):
            try:
                self._check_exact_memory(fmodel, first, f"batch {first_i}")
            except Exception as exc:
                if dctx is None:
                    raise
                local_error = exc  # raised on every rank by dctx.finish, after the collective
        out_curv = OutputCurvature(
            self._lik,
            curvature=self.curvature,
            n_samples=self.n_mc_samples or 1,
            generator=generator,
            ignore_index=self.ignore_index,
        )
        collector = spec.make_collector(fmodel, out_curv, self._structure_options())
        n_data, loss_sum, n_out, out_ndim = 0, 0.0, None, None
        in_spec = input_spec(x0) if first is not None else None
        try:
            total = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        show = (
            progress
            if progress is not None
            else (total is not None and total >= _PROGRESS_MIN_BATCHES)
        )
        show = show and (dctx is None or dctx.rank == 0)
        batches = _chain_first(first, iterator) if first is not None and local_error is None else ()
        try:
            with tqdm(
                batches,
                total=total,
                initial=first_i,
                disable=not show,
                desc=f"fit {self.structure}",
            ) as bar:
                for i, batch in enumerate(bar, start=first_i):
                    where = f"batch {i}"
                    x, y, empty = self._split(batch, where)
                    if empty:
                        continue
                    x, y = self._to_device(x), y.to(self._device)
                    f = collector.update(x, where, y=y)
                    check_finite(f, "model output", where)
                    if out_ndim is not None and f.ndim != out_ndim:
                        raise ValueError(
                            f"model output in {where} must have {out_ndim} dimensions like "
                            f"batch 0; got shape {tuple(f.shape)}."
                        )
                    f_obs, y_obs, _ = observations(
                        self._lik, f, y, ignore_index=self.ignore_index, where=where
                    )
                    check_finite(y_obs, "targets", where)
                    if n_out is not None and f.shape[-1] != n_out:
                        raise ValueError(
                            f"model output in {where} must have {n_out} columns like batch 0; "
                            f"got {f.shape[-1]}."
                        )
                    n_out, out_ndim = f.shape[-1], f.ndim
                    loss_sum += self._loss_statistic(f_obs, y_obs, where)
                    n_data += f_obs.shape[0]
        except Exception as exc:
            if dctx is None:
                raise
            local_error = exc
        if dctx is not None:
            n_data, n_out, loss_sum = dctx.finish(
                collector, n_data=n_data, n_outputs=n_out, loss_sum=loss_sum, error=local_error
            )
        try:
            curvature = collector.finalize()
            for name, t in _curvature_tensors(curvature, "curvature"):
                check_finite(t, name)
            posterior = spec.build(
                curvature,
                fmodel.theta,
                prior,
                self._scale(self._sigma_noise),
                self._structure_options(),
            )
        except torch.linalg.LinAlgError as err:
            raise RuntimeError(
                f"curvature of structure={self.structure!r} must be factorisable; "
                f"torch.linalg failed ({err}). Check the model for saturated or overflowing "
                "outputs, or fit a float64 copy of the model (model.double())."
            ) from err
        head = LinearHead.find(fmodel)
        # commit: all or nothing
        self._layout, self._fmodel, self._head = layout, fmodel, head
        self._input_spec = in_spec
        self._stats = FitStatistics(n_data, int(n_out), loss_sum, int(out_ndim or 2))
        self._posterior = posterior
        return self

    def _check_generator(self, generator: object) -> None:
        check_generator(generator)
        if generator is not None and generator.device.type != self._device.type:
            raise ValueError(
                f"generator must be on the model's device {self._device}; got a generator on "
                f"{generator.device}. Create it with torch.Generator(device=...)."
            )

    def _check_exact_memory(self, fmodel: FunctionalModel, first: object, where: str) -> None:
        """Refuse ``curvature="ggn"`` when one sample's M·P square-root rows exceed the budget.

        For full, diag and kfac; exact lowrank refuses its N·M rows as they would arrive, and
        top-k lowrank takes matrix-free products whose cost does not depend on M.

        Raises:
            ValueError: Naming ``curvature="mc"`` as the way out (or a malformed first batch).
        """
        x0, _, _ = self._split(first, where)
        M = fmodel.forward(self._to_device(x0))[0].numel()  # C, or T·C
        P = fmodel.n_params
        need = M * P * torch.empty((), dtype=self._dtype).element_size()
        if need > self.memory_budget:
            raise ValueError(
                f"curvature='ggn' must fit one sample's exact square-root rows (M={M} outputs "
                f"x P={P} parameters, {_gb(need)}) in the memory budget of "
                f"{_gb(self.memory_budget)}; its cost grows with the number of outputs. Pass "
                "curvature='mc' (n_mc_samples=S draws per sample: an unbiased estimate at a cost "
                "that does not grow with C), or raise memory_budget=."
            )

    def _to_device(self, x: object) -> object:
        return to_device(x, self._device)

    def _split(self, batch: object, where: str) -> tuple[object, Tensor, bool]:
        """``(x, y, empty)`` of a checked loader batch; ``empty`` when it holds 0 rows (skipped).

        Raises:
            ValueError: If the batch is malformed, a floating input has another dtype than the
                model or holds NaN/Inf, the input has no batch dimension, its tensors differ in
                batch size, a key is not an argument of the model, or an empty input comes with
                targets, or the targets have no batch dimension or another batch size than the
                input (a loader of single samples).
            TypeError: If the targets are not a tensor.
        """
        x, y = split_batch(batch, input_key=self.input_key, target_key=self.target_key, where=where)
        check_model_input(x, dtype=self._dtype, name="input", where=where)
        check_keyword_inputs(self.model, x, where)
        for t in input_tensors(x):
            check_finite(t, "input", where)
        y = check_target_tensor(y, where)
        empty = batch_size_of(x, where=where) == 0
        if empty and (y.ndim == 0 or y.shape[0] != 0):
            raise ValueError(
                f"targets in {where} must have as many rows as the input (0); got shape "
                f"{tuple(y.shape)}."
            )
        check_batch_dims(x, y, where)
        return x, y, empty

    def _loss_statistic(self, f: Tensor, y: Tensor, where: str) -> float:
        """The batch's loss statistic, accumulated in float64 (no float32 overflow of Σ(y−f)²).

        Raises:
            ValueError: If it is not finite even in float64.
        """
        f64 = f.to(torch.float64)
        stat = float(self._lik.loss_statistic(f64, y.to(f64) if y.is_floating_point() else y))
        if not math.isfinite(stat):
            raise ValueError(
                f"training loss in {where} must be finite; got {stat}. The model's outputs are too "
                "large for the loss (saturated or overflowing outputs): check the model for "
                "numerical overflow."
            )
        return stat

    def _model_input(self, x: object, name: str = "x") -> object:
        """Validate a model input of a read path (as fit does) and move it to the device."""
        if isinstance(x, Mapping):
            keys = [self.target_key] if self.target_key is not None else DEFAULT_TARGET_KEYS
            given = [k for k in keys if k in x]
            if given:
                raise ValueError(
                    f"{name} must hold the model's inputs only; got the target key {given[0]!r}. "
                    f"Drop it: {{k: v for k, v in batch.items() if k != {given[0]!r}}}."
                )
            check_keyword_inputs(self.model, x)
        check_model_input(x, dtype=self._dtype, spec=self._input_spec, name=name)
        x = self._to_device(x)
        for t in input_tensors(x):
            check_finite(t, "input")
        return x

    def _memory_message(self, need: int, P: int) -> str:
        opts = self._structure_options()
        sizes = {name: spec.memory_bytes(P, self._dtype, opts) for name, spec in STRUCTURES.items()}
        fits = [f"{name!r} ({_gb(n)})" for name, n in sizes.items() if n <= self.memory_budget]
        return (
            f"structure={self.structure!r} needs {_gb(need)} for P={P} parameters in "
            f"{self._dtype}, over the memory budget of {_gb(self.memory_budget)}. Structures that "
            f"fit: {', '.join(fits) or 'none'}; or pass memory_budget= (bytes) to allow more, "
            "or subset='last_layer'."
        )

    # -- posterior quantities ------------------------------------------------------------------

    def posterior_covariance(self) -> Tensor:
        """Dense posterior covariance Σ, shape ``(P, P)``.

        Raises:
            RuntimeError: If not fitted, or Σ is not finite.
            ValueError: If P×P exceeds the memory budget (the message gives the GB needed).
        """
        self._require_fit("posterior_covariance()")
        P = self.n_params
        need = dense_bytes(P, self._dtype)
        if need > self.memory_budget:
            raise ValueError(
                f"posterior_covariance() needs a dense ({P}, {P}) matrix of {_gb(need)}, over "
                f"the memory budget of {_gb(self.memory_budget)}. Use functional_covariance(x), "
                "sample(n) or posterior.covariance_matvec(V) instead, or raise memory_budget=."
            )
        Sigma = self._posterior.to_dense()
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
        self._require_fit("log_marginal_likelihood()")
        post = self._posterior_at(prior_precision, sigma_noise)
        sigma = self._sigma_noise if sigma_noise is None else self._as_sigma(sigma_noise)
        value = _marglik.log_marginal_likelihood(post, self._stats, self._lik, sigma)
        _marglik.check_evidence(value, post, self._stats, self._lik, sigma)
        return value

    def _as_sigma(self, sigma_noise: float | Tensor) -> Tensor:
        if isinstance(sigma_noise, bool) or not isinstance(sigma_noise, (numbers.Real, Tensor)):
            raise TypeError(
                f"sigma_noise must be a float or a 0-dim tensor; got {type(sigma_noise).__name__}."
            )
        s = torch.as_tensor(sigma_noise, dtype=self._dtype, device=self._device)
        if s.ndim != 0:
            raise ValueError(f"sigma_noise must be a scalar; got shape {tuple(s.shape)}.")
        check_positive(s.detach(), "sigma_noise")
        return s

    def _check_sigma_applies(self, sigma: Tensor) -> Tensor:
        """Refuse σ ≠ 1 for likelihoods without observation noise; returns ``sigma``."""
        if self.likelihood is not Likelihood.REGRESSION and float(sigma) != 1.0:
            raise ValueError(
                f"sigma_noise applies to likelihood='regression' only; got sigma_noise="
                f"{float(sigma)} with likelihood={self.likelihood.value!r}."
            )
        return sigma

    def _posterior_at(self, prior_precision=None, sigma_noise=None):
        """The fitted posterior with other hyperparameters (no refit)."""
        if prior_precision is None and sigma_noise is None:
            return self._posterior
        prec = self._prior_precision if prior_precision is None else prior_precision
        if isinstance(prec, Tensor):
            prec = prec.to(dtype=self._dtype, device=self._device)
        sigma = self._sigma_noise if sigma_noise is None else self._as_sigma(sigma_noise)
        return self._posterior.with_prior(self._prior(prec), self._scale(sigma))

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
        self._require_fit("set_hyperparameters()")
        prec = (
            self._prior_precision
            if prior_precision is None
            else self._check_prior_input(prior_precision)
        )
        sigma = self._sigma_noise if sigma_noise is None else self._as_sigma(sigma_noise)
        self._check_sigma_applies(sigma)
        temp = (
            self._predictive_temperature
            if predictive_temperature is None
            else self._check_predictive_temperature(predictive_temperature)
        )
        post = self._posterior.with_prior(self._prior(prec.detach()), self._scale(sigma.detach()))
        self._prior_precision, self._sigma_noise, self._posterior = (
            prec.detach(),
            sigma.detach(),
            post,
        )
        self._predictive_temperature = temp
        return self

    def jacobians(self, x: object) -> tuple[Tensor, Tensor]:
        """Jacobians of the outputs at test inputs.

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
        self._require_fit("jacobians()")
        x = self._model_input(x)
        seq = self._stats.output_ndim != 2
        J, f = self._fmodel.jacobians(x, n_outputs=None if seq else self._stats.n_outputs)
        check_computed_finite(f, "model output at the inputs")
        check_computed_finite(J, "Jacobians J(x)")
        return J.reshape(*f.shape, J.shape[-1]), f

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
        self._require_fit("functional_covariance()")
        x = self._model_input(x)
        with torch.no_grad():
            _, cov = _predictive.functional_moments(
                self._fmodel,
                self._posterior,
                x,
                n_outputs=self._stats.n_outputs,
                head=self._head,
            )
        check_computed_finite(cov, "functional covariance J Σ Jᵀ")
        return cov

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
        self._require_fit("sample()")
        if not is_integer(n) or n < 1:
            raise ValueError(f"n must be a positive integer; got {n!r}.")
        check_generator(generator)
        draws = self._posterior.sample(int(n), generator=generator)
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

        .. math::
            \theta = \theta_* + D^{-1/2}\,\Pi\, z, \qquad z \sim N(0, I),

        with Π the projection onto the kernel of the GGN (whitened by the prior D; for a scalar
        prior :math:`P_{ker} z/\sqrt\alpha`), applied matrix-free by cycling over the batches
        of ``train_loader`` (:func:`~laplace_ggn.posteriors.alternating.alternating_projection`):
        memory O(P·n) plus one batch's kernel rows, work linear in P, one pass over the data
        per cycle.  It needs no stored basis of the range, so it applies to models whose exact
        basis does not fit in memory; the training data must be passed again, as the wrapper
        keeps no reference to it.  With the same ``generator`` state it converges to
        :meth:`sample` of an exact (``rank=None``) fit.

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
        self._require_fit("sample_projected()")
        if self.structure != Structure.PROJECTED.value:
            raise ValueError(
                f"sample_projected() needs structure='projected'; got structure="
                f"{self.structure!r}. Fit LaplaceWrapper(..., structure='projected'), "
                "or use sample(n)."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None; got {type(generator).__name__}."
            )
        post = self._posterior
        z = standard_normal(
            n, self.n_params, dtype=self._dtype, device=self._device, generator=generator
        )
        w = post.prior.diag().rsqrt()
        result = alternating_projection(
            self._fmodel,
            self._lik,
            train_loader,
            z.T.contiguous(),
            n_iterations=n_iterations,
            tol=tol,
            weights=None if post.prior.is_scalar else w,
            input_key=self.input_key,
            target_key=self.target_key,
            progress=progress,
        )
        return post.mean + result.projected.T * w

    # -- predictions and hyperparameter tuning ------------------------------------------------

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
        _predictive.resolve_options(self.likelihood, method, link)
        self._require_fit("predict()")
        x = self._model_input(x)
        pred = _predictive.predict(
            self._fmodel,
            self._posterior,
            x,
            likelihood=self.likelihood,
            method=method,
            link=link,
            sigma_noise=self._sigma_noise,
            n_samples=n_samples,
            generator=generator,
            n_outputs=self._stats.n_outputs,
            head=self._head,
        )
        T = self._predictive_temperature
        if self.likelihood is Likelihood.REGRESSION or bool(T == 1):
            return pred
        return _predictive.temper(pred, T, binary=self.likelihood is Likelihood.BINARY)

    def optimize_prior_precision(
        self,
        method: str = "marglik",
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

        ``"marglik"``: Adam on the log hyperparameters of the Laplace evidence (see
        :mod:`laplace_ggn.marglik`), reusing one factorisation of the curvature; the curve is
        kept in ``self.marglik_result_``.  ``"gridsearch"``: a scalar precision chosen on a
        log-spaced grid by the mean validation NLL of the chosen predictive; the curve is kept
        in ``self.gridsearch_result_``.  ``"marglik_temperature"`` (classification and
        binary): the prior precision by the evidence, then the :attr:`predictive_temperature`
        T by the mean validation NLL of the chosen predictive (curves in
        ``self.marglik_result_`` and ``self.temperature_result_``); the evidence keeps the
        posterior's larger uncertainty away from the data, T corrects the confidence in
        distribution (see ``docs/calibration.md``).  ``"marglik"`` and ``"gridsearch"`` reset
        T to 1.  On failure the hyperparameters stay as they were.

        Args:
            method: ``"marglik"``, ``"gridsearch"`` or ``"marglik_temperature"``.
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
        opts = _marglik.check_tuning_options(
            self.likelihood,
            method,
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
        self._require_fit("optimize_prior_precision()")
        batches = None if val_loader is None else self._validation_batches(val_loader)
        if opts.method is _marglik.TuneMethod.GRIDSEARCH:
            result = _marglik.gridsearch(
                self._fmodel,
                posterior_at=lambda a: self._posterior_at(a, None),
                batches=batches,
                likelihood=self.likelihood,
                lik=self._lik,
                grid=opts.grid.to(self._dtype),
                method=opts.predict_method,
                link=opts.link,
                sigma_noise=self._sigma_noise,
                n_samples=opts.n_samples,
                generator=generator,
                n_outputs=self._stats.n_outputs,
                progress=progress,
                ignore_index=self.ignore_index,
            )
            self.set_hyperparameters(prior_precision=result.best, predictive_temperature=1.0)
            self.gridsearch_result_ = result
            edge = _marglik.grid_edge_warning(result, explicit_grid=grid is not None)
            if edge:
                warnings.warn(edge, UserWarning, stacklevel=2)
            return self
        if opts.method is _marglik.TuneMethod.MARGLIK_TEMPERATURE and not batches:
            raise ValueError("val_loader must yield at least one batch; got an empty loader.")
        kind = opts.kind or self._posterior.prior.kind
        init = _marglik.convert_prior(self._prior_precision, kind, self._layout)
        self._posterior_at(init, None)  # validates the prior structure for this posterior
        try:
            result = _marglik.optimize_marglik(
                self._posterior,
                self._stats,
                self._lik,
                posterior_at=self._posterior_at,
                prior_precision=init,
                kind=kind,
                sigma_noise=self._sigma_noise,
                temperature=self.temperature,
                tune_sigma_noise=tune_sigma_noise,
                n_steps=opts.n_steps,
                lr=opts.lr,
                progress=progress,
            )
        except RuntimeError as err:
            # name the overflowing term when the evidence is not finite at the start already
            start, value = self._posterior_at(init, None), None
            with contextlib.suppress(RuntimeError, ValueError):
                value = _marglik.log_marginal_likelihood(
                    start, self._stats, self._lik, self._sigma_noise
                )
            if value is not None:
                _marglik.check_evidence(
                    value, start, self._stats, self._lik, self._sigma_noise, err
                )
            raise
        temp = None
        if opts.method is _marglik.TuneMethod.MARGLIK_TEMPERATURE:
            temp = self._tune_temperature(result.prior_precision, batches, opts, generator)
        self.set_hyperparameters(
            prior_precision=result.prior_precision,
            sigma_noise=result.sigma_noise if tune_sigma_noise else None,
            predictive_temperature=1.0 if temp is None else temp.temperature,
        )
        self.marglik_result_ = result
        if temp is not None:
            self.temperature_result_ = temp
        return self

    def _validation_batches(self, val_loader: Iterable) -> list[tuple[object, Tensor]]:
        """Checked, non-empty ``(x, y)`` batches of a validation loader.

        Raises:
            TypeError: If ``val_loader`` is not iterable.
        """
        if not isinstance(val_loader, Iterable):
            raise TypeError(
                f"val_loader must be an iterable of batches (e.g. a DataLoader); "
                f"got {type(val_loader).__name__}."
            )
        batches = []
        for i, batch in enumerate(val_loader):
            x, y, empty = self._split(batch, f"val_loader batch {i}")
            check_model_input(
                x,
                dtype=self._dtype,
                spec=self._input_spec,
                name="val_loader input",
                where=f"batch {i}",
            )
            if not empty:
                batches.append((self._to_device(x), y))
        return batches

    def _tune_temperature(self, prior_precision: Tensor, batches: list, opts, generator):
        """Predictive temperature on validation data at the tuned prior (no state change)."""
        post = self._posterior_at(prior_precision, None)
        probs, labels = [], []
        for x, y in batches:
            pred = _predictive.predict(
                self._fmodel,
                post,
                x,
                likelihood=self.likelihood,
                method=opts.predict_method,
                link=opts.link,
                n_samples=opts.n_samples,
                generator=generator,
                n_outputs=self._stats.n_outputs,
            )
            probs.append(pred.mean)
            labels.append(self._lik.check_targets(pred.mean, y.to(self._device), "val_loader"))
        return _marglik.tune_predictive_temperature(
            torch.cat(probs), torch.cat(labels), binary=self.likelihood is Likelihood.BINARY
        )

    # -- diagnostics -----------------------------------------------------------------------

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

        self._require_fit("kernel_decomposition()")
        if self._stats.output_ndim != 2:
            raise ValueError(
                "kernel_decomposition() needs a model with outputs (B, C); got a model fitted "
                "on outputs (B, T, C). Decompose a model that returns one position, e.g. the "
                "last token's outputs."
            )
        return _diagnostics.kernel_decomposition(
            self._posterior,
            self._fmodel,
            x,
            likelihood=self.likelihood,
            lik=self._lik,
            structure=self.structure,
            y=y,
            sigma_noise=self._sigma_noise,
            tol=tol,
            rank=rank,
            n_samples=n_samples,
            kept_eigenpairs=self.rank,
            generator=generator,
            input_key=self.input_key,
            target_key=self.target_key,
            check_input=self._model_input,
        )

    # -- serialisation ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to rebuild the fitted wrapper with :meth:`from_state_dict`.

        Raises:
            RuntimeError: If not fitted.
        """
        self._require_fit("state_dict()")
        layout = self._layout
        return {
            "format_version": STATE_FORMAT_VERSION,
            "model_parameters": model_parameters(self.model),
            "likelihood": self.likelihood.value,
            "structure": self.structure,
            "subset": list(layout.names),
            "shapes": [tuple(s) for s in layout.shapes],
            "prior_precision": self._prior_precision.detach().clone(),
            "sigma_noise": self._sigma_noise.detach().clone(),
            "temperature": self.temperature,
            "predictive_temperature": float(self._predictive_temperature),
            "rank": self.rank,
            "curvature": self.curvature.value,
            "n_mc_samples": self.n_mc_samples,
            "ignore_index": self.ignore_index,
            "input_key": self.input_key,
            "target_key": self.target_key,
            "memory_budget": self.memory_budget,
            "mean": self._posterior.mean.detach().clone(),
            "fit_statistics": asdict(self._stats),
            "posterior": {
                k: v.detach().clone() if isinstance(v, Tensor) else v
                for k, v in self._posterior.state_dict().items()
            },
        }

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
        la = cls(
            model,
            state["likelihood"],
            structure=state["structure"],
            subset=list(state["subset"]),
            prior_precision=state["prior_precision"],
            sigma_noise=state["sigma_noise"],
            temperature=state["temperature"],
            rank=state["rank"],
            curvature=state.get("curvature", Curvature.GGN.value),
            n_mc_samples=state.get("n_mc_samples"),
            ignore_index=state.get("ignore_index", DEFAULT_IGNORE_INDEX),
            input_key=state["input_key"],
            target_key=state["target_key"],
            memory_budget=state["memory_budget"],
            output_fn=output_fn,
        )
        layout = la._layout
        fmodel = FunctionalModel(model, layout, memory_budget=la.memory_budget, output_fn=output_fn)
        mean = state["mean"].to(dtype=la._dtype, device=la._device)
        with torch.no_grad():
            own = dict(fmodel.module.named_parameters())
            for name, value in layout.unflatten(mean).items():
                own[name].copy_(value)
        fmodel.theta = mean.clone()
        spec = STRUCTURES[la.structure]
        prior = la._prior(la._prior_precision)
        la._posterior = spec.posterior_cls.from_state_dict(
            state["posterior"], fmodel.theta, prior, la._scale(la._sigma_noise)
        )
        la._fmodel = fmodel
        la._head = LinearHead.find(fmodel)
        la._stats = FitStatistics(**state["fit_statistics"])
        la._predictive_temperature = la._check_predictive_temperature(
            state.get("predictive_temperature", 1.0)
        )
        return la

    def __repr__(self) -> str:
        fitted = f"fitted, P={self.n_params}" if self.is_fitted else "not fitted"
        return (
            f"LaplaceWrapper(likelihood={self.likelihood.value!r}, structure={self.structure!r}, "
            f"subset={self.subset if isinstance(self.subset, str) else 'list'!r}, {fitted})"
        )


def _curvature_tensors(obj: object, name: str) -> list[tuple[str, Tensor]]:
    """Every tensor of a curvature (a tensor or a dataclass of tensors), with its name."""
    if isinstance(obj, Tensor):
        return [(name, obj)]
    if is_dataclass(obj):
        return [
            item
            for f in fields(obj)
            for item in _curvature_tensors(getattr(obj, f.name), f"{name} {f.name}")
        ]
    if isinstance(obj, (tuple, list)):
        return [item for i, v in enumerate(obj) for item in _curvature_tensors(v, f"{name}[{i}]")]
    return []


def _chain_first(first: object, rest: Iterable) -> Iterable:
    yield first
    yield from rest
