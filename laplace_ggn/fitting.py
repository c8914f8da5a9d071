r"""The options of a fit and the one pass over the data that turns them into a posterior.

:class:`FitOptions` validates the options of ``LaplaceWrapper(...)`` once;
:func:`fit_laplace` resolves the parameter subset (tracing ``"last_layer"`` on a private
eval-mode copy of the model), checks the memory the structure needs, streams the loader once
through the structure's collector (batch checks, a progress bar, errors passed between
ranks under ``torch.distributed``) and returns a :class:`~laplace_ggn.fitted.FittedLaplace`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed as _distributed
from ._checks import (
    DEFAULT_MEMORY_BUDGET,
    Curvature,
    Likelihood,
    as_enum,
    check_finite,
    check_generator,
    is_integer,
)
from .fitted import FittedLaplace
from .functional import FunctionalModel
from .head import LinearHead
from .hyperparameters import Hyperparameters
from .layout import ParamLayout, resolve_subset
from .likelihoods import (
    DEFAULT_IGNORE_INDEX,
    FitStatistics,
    OutputCurvature,
    get_likelihood,
    observations,
)
from .model_io import input_spec
from .reader import BatchReader
from .structures import STRUCTURES, StructureOptions, StructureSpec, resolve_structure

__all__ = ["FitOptions", "fit_laplace", "gigabytes", "memory_message"]

_PROGRESS_MIN_BATCHES = 20


def gigabytes(n_bytes: float) -> str:
    """``n_bytes`` as a short string in GB (for memory messages).

    Returns:
        E.g. ``"1.5 GB"``.
    """
    return f"{n_bytes / 2**30:.3g} GB"


@dataclass(frozen=True)
class FitOptions:
    """The validated options of a fit (see :class:`~laplace_ggn.LaplaceWrapper`).

    Attributes:
        model: The user's network (never modified).
        likelihood: The likelihood kind.
        structure: The structure's name in :data:`~laplace_ggn.structures.STRUCTURES`.
        subset: ``"all"``, ``"trainable"``, ``"last_layer"`` or a list of names.
        rank: ``rank=`` of a structure that takes one, else ``None``.
        curvature: Exact GGN or Monte-Carlo Fisher.
        n_mc_samples: S of ``curvature="mc"`` (``None``: 1).
        memory_budget: Bytes for chunked intermediates and the largest dense structure.
        output_fn: Map from the model's output to the ``(B, C)`` tensor, or ``None``.
        reader: How batches are read.
    """

    model: nn.Module
    likelihood: Likelihood
    structure: str
    subset: object
    rank: int | None
    curvature: Curvature
    n_mc_samples: int | None
    memory_budget: int
    output_fn: Callable[[object], Tensor] | None
    reader: BatchReader

    @classmethod
    def create(
        cls,
        model: nn.Module,
        likelihood: object = "classification",
        *,
        structure: object = "kfac",
        subset: object = "all",
        rank: object = None,
        curvature: object = "ggn",
        n_mc_samples: object = None,
        ignore_index: object = DEFAULT_IGNORE_INDEX,
        input_key: object = None,
        target_key: object = None,
        memory_budget: object = DEFAULT_MEMORY_BUDGET,
        output_fn: object = None,
    ) -> FitOptions:
        """Validate the options of ``LaplaceWrapper(...)`` (arguments as there).

        Returns:
            The options.

        Raises:
            TypeError: If ``model`` is not an ``nn.Module`` or an option has the wrong type.
            ValueError: If an option has an invalid value; the message lists the valid ones.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        kind = as_enum(Likelihood, likelihood, "likelihood")
        structure = resolve_structure(structure)
        param = next(iter(model.parameters()), None)
        if param is None:
            raise ValueError("model must have parameters; got a module with none.")
        if rank is not None:
            if not STRUCTURES[structure].takes_rank:
                ranked = " or ".join(repr(n) for n, s in STRUCTURES.items() if s.takes_rank)
                raise ValueError(
                    f"rank applies to structure={ranked} only; got rank={rank} "
                    f"with structure={structure!r}."
                )
            if not is_integer(rank) or rank < 1:
                raise ValueError(f"rank must be None or a positive integer; got {rank!r}.")
            rank = int(rank)
        curvature = as_enum(Curvature, curvature, "curvature")
        if curvature is Curvature.MC and not STRUCTURES[structure].samples_curvature:
            sampled = [repr(n) for n, s in STRUCTURES.items() if s.samples_curvature]
            raise ValueError(
                f"curvature='mc' applies to structures {', '.join(sampled[:-1])} and "
                f"{sampled[-1]}; got structure={structure!r}, whose curvature is not "
                "built from output Hessians (none to sample)."
            )
        n_mc = n_mc_samples
        if n_mc is not None:
            if curvature is not Curvature.MC:
                raise ValueError(
                    f"n_mc_samples applies to curvature='mc' only; got n_mc_samples="
                    f"{n_mc!r} with curvature={curvature.value!r}."
                )
            if not is_integer(n_mc) or n_mc < 1:
                raise ValueError(f"n_mc_samples must be a positive integer; got {n_mc!r}.")
            n_mc = int(n_mc)
        if not is_integer(ignore_index):
            raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}.")
        for key_name, key in (("input_key", input_key), ("target_key", target_key)):
            if key is not None and not isinstance(key, str):
                raise TypeError(f"{key_name} must be a str or None; got {type(key).__name__}.")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable or None; got {type(output_fn).__name__}.")
        if not is_integer(memory_budget) or memory_budget <= 0:
            raise ValueError(
                f"memory_budget must be a positive int (bytes); got {memory_budget!r}."
            )
        reader = BatchReader(
            model,
            param.dtype,
            param.device,
            input_key,
            target_key,
            int(ignore_index),
        )
        return cls(
            model,
            kind,
            structure,
            subset,
            rank,
            curvature,
            n_mc,
            int(memory_budget),
            output_fn,
            reader,
        )

    @property
    def spec(self) -> StructureSpec:
        """The structure's spec.

        Raises:
            NotImplementedError: If the structure is no longer registered.
        """
        spec = STRUCTURES.get(self.structure)
        if spec is None:
            raise NotImplementedError(f"structure={self.structure!r} is not available.")
        return spec

    def structure_options(self, prior_precision: Tensor) -> StructureOptions:
        """The options the structure's functions read.

        Returns:
            The :class:`~laplace_ggn.structures.StructureOptions`.
        """
        return StructureOptions(self.model, prior_precision, self.rank, self.memory_budget)

    def check_generator(self, generator: object) -> None:
        """Refuse a generator that is not a ``torch.Generator`` on the model's device.

        Raises:
            TypeError: If it is not a generator.
            ValueError: If it is on another device type than the model.
        """
        check_generator(generator)
        device = self.reader.device
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"generator must be on the model's device {device}; got a generator on "
                f"{generator.device}. Create it with torch.Generator(device=...)."
            )


def memory_message(options: FitOptions, need: int, P: int, prior_precision: Tensor) -> str:
    """The error for a structure over the memory budget, naming the structures that fit.

    Returns:
        The message.
    """
    dtype, budget = options.reader.dtype, options.memory_budget
    opts = options.structure_options(prior_precision)
    sizes = {name: spec.memory_bytes(P, dtype, opts) for name, spec in STRUCTURES.items()}
    fits = [f"{name!r} ({gigabytes(n)})" for name, n in sizes.items() if n <= budget]
    return (
        f"structure={options.structure!r} needs {gigabytes(need)} for P={P} parameters in "
        f"{dtype}, over the memory budget of {gigabytes(budget)}. Structures that "
        f"fit: {', '.join(fits) or 'none'}; or pass memory_budget= (bytes) to allow more, "
        "or subset='last_layer'."
    )


def _check_exact_memory(options: FitOptions, fmodel: FunctionalModel, x0: object) -> None:
    """Refuse ``curvature="ggn"`` when one sample's M·P square-root rows exceed the budget.

    Raises:
        ValueError: Naming ``curvature="mc"`` as the way out.
    """
    M = fmodel.forward(options.reader.to_device(x0))[0].numel()  # C, or T·C
    P = fmodel.n_params
    need = M * P * torch.empty((), dtype=options.reader.dtype).element_size()
    if need > options.memory_budget:
        raise ValueError(
            f"curvature='ggn' must fit one sample's exact square-root rows (M={M} outputs "
            f"x P={P} parameters, {gigabytes(need)}) in the memory budget of "
            f"{gigabytes(options.memory_budget)}; its cost grows with the number of outputs. "
            "Pass curvature='mc' (n_mc_samples=S draws per sample: an unbiased estimate at a "
            "cost that does not grow with C), or raise memory_budget=."
        )


def _loss_statistic(lik, f: Tensor, y: Tensor, where: str) -> float:
    """The batch's loss statistic, accumulated in float64 (no float32 overflow of Σ(y−f)²).

    Raises:
        ValueError: If it is not finite even in float64.
    """
    f64 = f.to(torch.float64)
    stat = float(lik.loss_statistic(f64, y.to(f64) if y.is_floating_point() else y))
    if not math.isfinite(stat):
        raise ValueError(
            f"training loss in {where} must be finite; got {stat}. The model's outputs are too "
            "large for the loss (saturated or overflowing outputs): check the model for "
            "numerical overflow."
        )
    return stat


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


class _Accumulator:
    """N, C, the output rank and the loss sum of the batches seen, with their checks."""

    def __init__(self, lik, ignore_index: int):
        self.lik, self.ignore_index = lik, ignore_index
        self.n_data, self.loss_sum, self.n_out, self.out_ndim = 0, 0.0, None, None

    def add(self, f: Tensor, y: Tensor, where: str) -> None:
        check_finite(f, "model output", where)
        if self.out_ndim is not None and f.ndim != self.out_ndim:
            raise ValueError(
                f"model output in {where} must have {self.out_ndim} dimensions like "
                f"batch 0; got shape {tuple(f.shape)}."
            )
        f_obs, y_obs, _ = observations(self.lik, f, y, ignore_index=self.ignore_index, where=where)
        check_finite(y_obs, "targets", where)
        if self.n_out is not None and f.shape[-1] != self.n_out:
            raise ValueError(
                f"model output in {where} must have {self.n_out} columns like batch 0; "
                f"got {f.shape[-1]}."
            )
        self.n_out, self.out_ndim = f.shape[-1], f.ndim
        self.loss_sum += _loss_statistic(self.lik, f_obs, y_obs, where)
        self.n_data += f_obs.shape[0]


def fit_laplace(
    options: FitOptions,
    hyperparameters: Hyperparameters,
    layout: ParamLayout | None,
    train_loader: Iterable,
    *,
    progress: bool | None = None,
    distributed: bool | None = None,
    process_group: object = None,
    generator: torch.Generator | None = None,
) -> FittedLaplace:
    """One pass over ``train_loader``: the curvature, the statistics and the posterior.

    Args:
        options: The fit's options.
        hyperparameters: Prior precision, σ and τ of the posterior.
        layout: The subset, or ``None`` for ``"last_layer"`` (traced on the first batch).
        train_loader: Iterable of ``(x, y)`` batches or mappings.
        progress: Show a tqdm bar (``None``: for loaders of 20 batches or more).
        distributed: ``None``: reduce over ranks when ``torch.distributed`` is initialised.
        process_group: Group to reduce over.
        generator: Random generator of ``curvature="mc"``.

    Returns:
        The :class:`~laplace_ggn.fitted.FittedLaplace`.

    Raises:
        ValueError: See :meth:`LaplaceWrapper.fit`.
        TypeError: See :meth:`LaplaceWrapper.fit`.
        RuntimeError: If the curvature cannot be factorised (torch.linalg failed).
    """
    if not isinstance(train_loader, Iterable):
        raise TypeError(
            f"train_loader must be an iterable of batches (e.g. a DataLoader); "
            f"got {type(train_loader).__name__}."
        )
    options.check_generator(generator)
    spec, reader, lik = options.spec, options.reader, get_likelihood(options.likelihood)
    dctx = _distributed.resolve_distributed(distributed, process_group)
    first, iterator, private, local_error = None, iter(()), None, None
    first_i, n_empty = 0, 0
    try:
        iterator = iter(train_loader)
        # batches with 0 rows are skipped; the first batch with data starts the pass
        for first_i, batch in enumerate(iterator):
            x0, _, empty = reader.split(batch, f"batch {first_i}")
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
            private = copy.deepcopy(options.model).eval()
            layout = resolve_subset(
                private, options.subset, reader.to_device(x0), options.output_fn
            )
    except Exception as exc:
        if dctx is None:
            raise
        local_error = exc
    if dctx is not None:
        layout = dctx.agree(
            options.model, options.subset, layout, has_data=first is not None, error=local_error
        )
    prior = hyperparameters.prior(layout)
    spec.check_prior(prior)
    sopts = options.structure_options(hyperparameters.prior_precision)
    need = spec.memory_bytes(layout.n_params, reader.dtype, sopts)
    if need > options.memory_budget:
        raise ValueError(
            memory_message(options, need, layout.n_params, hyperparameters.prior_precision)
        )
    if private is not None:
        for p in private.parameters():
            p.requires_grad_(False)
    fmodel = FunctionalModel(
        options.model if private is None else private,
        layout,
        memory_budget=options.memory_budget,
        output_fn=options.output_fn,
        **({} if private is None else {"copy_model": False}),
    )
    if options.curvature is Curvature.GGN and spec.exact_rows and first is not None:
        # lowrank / projected refuse their rows themselves; their top-k needs none
        try:
            _check_exact_memory(options, fmodel, x0)
        except Exception as exc:
            if dctx is None:
                raise
            local_error = exc  # raised on every rank by dctx.finish, after the collective
    out_curv = OutputCurvature(
        lik,
        curvature=options.curvature,
        n_samples=options.n_mc_samples or 1,
        generator=generator,
        ignore_index=reader.ignore_index,
    )
    collector = spec.make_collector(fmodel, out_curv, sopts)
    acc = _Accumulator(lik, reader.ignore_index)
    in_spec = input_spec(x0) if first is not None else None
    try:
        total = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    show = progress if progress is not None else (total or 0) >= _PROGRESS_MIN_BATCHES
    show = show and (dctx is None or dctx.rank == 0)
    batches = _chain_first(first, iterator) if first is not None and local_error is None else ()
    try:
        with tqdm(
            batches, total=total, initial=first_i, disable=not show, desc=f"fit {spec.name}"
        ) as bar:
            for i, batch in enumerate(bar, start=first_i):
                where = f"batch {i}"
                x, y, empty = reader.split(batch, where)
                if empty:
                    continue
                x, y = reader.to_device(x), y.to(reader.device)
                acc.add(collector.update(x, where, y=y), y, where)
    except Exception as exc:
        if dctx is None:
            raise
        local_error = exc
    if dctx is not None:
        acc.n_data, acc.n_out, acc.loss_sum = dctx.finish(
            collector,
            n_data=acc.n_data,
            n_outputs=acc.n_out,
            loss_sum=acc.loss_sum,
            error=local_error,
        )
    try:
        curvature = collector.finalize()
        for name, t in _curvature_tensors(curvature, "curvature"):
            check_finite(t, name)
        posterior = spec.build(curvature, fmodel.theta, prior, hyperparameters.scale(), sopts)
    except torch.linalg.LinAlgError as err:
        raise RuntimeError(
            f"curvature of structure={spec.name!r} must be factorisable; "
            f"torch.linalg failed ({err}). Check the model for saturated or overflowing "
            "outputs, or fit a float64 copy of the model (model.double())."
        ) from err
    stats = FitStatistics(acc.n_data, int(acc.n_out), acc.loss_sum, int(acc.out_ndim or 2))
    return FittedLaplace(
        fmodel,
        layout,
        posterior,
        stats,
        lik,
        hyperparameters,
        spec,
        reader,
        in_spec,
        LinearHead.find(fmodel),
    )


def restore_fitted(
    options: FitOptions, hyperparameters: Hyperparameters, layout: ParamLayout, state: dict
) -> FittedLaplace:
    """The fit saved in a checked state (see :mod:`laplace_ggn.persistence`), without data.

    θ* of the subset is taken from the state, the other parameters from ``options.model``.

    Returns:
        The :class:`~laplace_ggn.fitted.FittedLaplace`.
    """
    reader, spec = options.reader, options.spec
    fmodel = FunctionalModel(
        options.model, layout, memory_budget=options.memory_budget, output_fn=options.output_fn
    )
    mean = state["mean"].to(dtype=reader.dtype, device=reader.device)
    with torch.no_grad():
        own = dict(fmodel.module.named_parameters())
        for name, value in layout.unflatten(mean).items():
            own[name].copy_(value)
    fmodel.theta = mean.clone()
    prior = hyperparameters.prior(layout)
    spec.check_prior(prior)
    posterior = spec.posterior_cls.from_state_dict(
        state["posterior"], fmodel.theta, prior, hyperparameters.scale()
    )
    stats = FitStatistics(**state["fit_statistics"])
    lik = get_likelihood(options.likelihood)
    head = LinearHead.find(fmodel)
    return FittedLaplace(
        fmodel, layout, posterior, stats, lik, hyperparameters, spec, reader, None, head
    )
