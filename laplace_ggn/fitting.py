r"""The one pass over the data that turns the options of a fit into a posterior.

:func:`fit_laplace` takes the :class:`~laplace_ggn.fit_options.FitOptions`, resolves the
parameter subset (tracing ``"last_layer"`` on a private eval-mode copy of the model), checks
the memory the structure needs, streams the loader once through the structure's collector
(batch checks, a progress bar, errors passed between ranks under ``torch.distributed``) and
returns a :class:`~laplace_ggn.fitted.FittedLaplace`; :func:`restore_fitted` rebuilds one from
a saved state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import fields, is_dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed as _distributed
from ._checks import (
    Curvature,
    check_finite,
)
from .batches import flatten_items
from .fit_options import FitOptions, gigabytes, memory_message
from .fitted import FittedLaplace
from .functional import FunctionalModel
from .head import LinearHead
from .hyperparameters import Hyperparameters
from .layout import ParamLayout, resolve_subset
from .likelihoods import FitStatistics, OutputCurvature, observations
from .model_io import input_spec
from .per_output import (
    build_posterior,
    check_per_output,
    make_collector,
    output_loss_sums,
    restore_posterior,
)
from .private_model import check_finite_parameters, private_copy, with_nonfinite_hint

__all__ = ["fit_laplace", "initial_state", "restore_fitted"]

_PROGRESS_MIN_BATCHES = 20


def _check_exact_memory(options: FitOptions, fmodel: FunctionalModel, x0: object) -> None:
    """Refuse ``curvature="ggn"`` when one sample's M·P square-root rows exceed the budget.

    Raises:
        ValueError: Naming ``curvature="mc"`` as the way out.
    """
    M = fmodel.forward(options.reader.to_device(x0))[0].numel()  # C, or T·C
    P = fmodel.n_params
    need = M * P * torch.empty((), dtype=options.reader.work_dtype).element_size()
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

    Returns:
        The statistic summed over the batch, a Python float.

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
        self.k = lik.items_per_sample  # outputs per item: C // k
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
        if self.n_out is not None and f.shape[-1] != self.n_out * self.k:
            raise ValueError(
                f"model output in {where} must have {self.n_out} columns like batch 0; "
                f"got {f.shape[-1] // self.k}."
            )
        self.n_out, self.out_ndim = f.shape[-1] // self.k, f.ndim
        self.loss_sum += _loss_statistic(self.lik, f_obs, y_obs, where)
        self.n_data += f_obs.shape[0]


def initial_state(
    options: FitOptions,
    *,
    prior_precision: float | Tensor,
    sigma_noise: float | Tensor,
    temperature: float,
) -> tuple[ParamLayout | None, Hyperparameters]:
    """The layout (where known before the data) and hyperparameters of a fit, checked.

    Args:
        options: The validated options.
        prior_precision: Float, or tensor of shape ``(T,)`` or ``(P,)``.
        sigma_noise: σ (regression only).
        temperature: τ.

    Returns:
        ``(layout, hyperparameters)``; the layout is ``None`` for ``subset="last_layer"``
        (traced on the first batch).

    Raises:
        ValueError: If a parameter name or hyperparameter is invalid, or the prior does not
            fit the subset or the structure.
        TypeError: If a hyperparameter is not a number.
    """
    o = options
    layout = None if o.subset == "last_layer" else resolve_subset(o.model, o.subset)
    hp = Hyperparameters.create(
        o.likelihood_model,
        prior_precision=prior_precision,
        sigma_noise=sigma_noise,
        temperature=temperature,
        dtype=o.reader.work_dtype,
        device=o.reader.device,
    )
    if layout is not None:
        o.spec.check_prior(hp.prior(layout))
    check_per_output(o.structure, o.curvature, hp.sigma_noise)
    return layout, hp


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
    spec, reader, lik = options.spec, options.reader, options.likelihood_model
    k = lik.items_per_sample
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
                items0 = flatten_items(x0, k, f"batch {first_i}") if k > 1 else x0
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
            private = private_copy(options.model).eval().to(reader.work_dtype)
            layout = resolve_subset(
                private, options.subset, reader.to_device(items0), options.output_fn
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
    check_finite_parameters(options.model, layout.names)  # models agree across ranks
    sopts = options.structure_options(hyperparameters.prior_precision)
    need = spec.memory_bytes(layout.n_params, reader.work_dtype, sopts)
    if need > options.memory_budget:
        raise ValueError(
            memory_message(options, need, layout.n_params, hyperparameters.prior_precision)
        )
    if private is not None:
        for p in private.parameters():
            p.requires_grad_(False)
    in_spec = input_spec(items0) if first is not None else None
    fmodel = FunctionalModel(
        options.model if private is None else private,
        layout,
        memory_budget=options.memory_budget,
        output_fn=options.output_fn,
        input_spec=in_spec,
        dtype=reader.work_dtype,
        input_dtype=reader.dtype,
        **({} if private is None else {"copy_model": False}),
    )
    fit_model = fmodel.with_items(k)  # k > 1: samples of k items (e.g. preference pairs)
    if options.curvature is Curvature.GGN and spec.exact_rows and first is not None:
        # lowrank / projected refuse their rows themselves; their top-k needs none
        try:
            _check_exact_memory(options, fit_model, x0)
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
    # one σ per output: one curvature per output (laplace_ggn.per_output)
    sigma = hyperparameters.sigma_noise
    collector = make_collector(spec, fit_model, out_curv, sopts, lik, sigma, reader.ignore_index)
    acc = _Accumulator(lik, reader.ignore_index)
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
                x, y = reader.to_device(x), reader.to_device(y)
                acc.add(collector.update(x, where, y=y), y, where)
    except Exception as exc:
        exc = with_nonfinite_hint(exc, options.model, layout.names)
        if dctx is None:
            raise exc
        local_error = exc
    if dctx is not None:
        acc.n_data, acc.n_out, acc.loss_sum = dctx.finish(
            collector,
            n_data=acc.n_data,
            n_outputs=acc.n_out,
            loss_sum=acc.loss_sum,
            error=local_error,
        )
    if acc.n_data == 0:  # every target equals ignore_index (the same total on every rank)
        ranks = "" if dctx is None else f" on any of the {dctx.world_size} ranks"
        raise ValueError(
            f"train_loader must hold a target that is not ignore_index={reader.ignore_index}"
            f"{ranks}; got none (N = 0). Check the labels, or set ignore_index= to the value "
            "that marks the positions to skip."
        )
    try:
        curvature = collector.finalize()
        for name, t in _curvature_tensors(curvature, "curvature"):
            check_finite(t, name)
        scale = hyperparameters.scale()
        posterior = build_posterior(spec, curvature, fmodel.theta, prior, scale, sopts)
    except torch.linalg.LinAlgError as err:
        raise RuntimeError(
            f"curvature of structure={spec.name!r} must be factorisable; "
            f"torch.linalg failed ({err}). Check the model for saturated or overflowing "
            "outputs, or fit a float64 copy of the model (model.double())."
        ) from err
    stats = FitStatistics(
        acc.n_data,
        int(acc.n_out),
        acc.loss_sum,
        int(acc.out_ndim or 2),
        output_loss_sums(curvature),
    )
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
        options.model,
        layout,
        memory_budget=options.memory_budget,
        output_fn=options.output_fn,
        dtype=reader.work_dtype,
        input_dtype=reader.dtype,
    )
    mean = state["mean"].to(dtype=reader.work_dtype, device=reader.device)
    with torch.no_grad():
        own = dict(fmodel.module.named_parameters())
        for name, value in layout.unflatten(mean).items():
            own[name].copy_(value)
    fmodel.theta = mean.clone()
    prior = hyperparameters.prior(layout)
    spec.check_prior(prior)
    sopts = options.structure_options(hyperparameters.prior_precision)
    posterior = restore_posterior(
        spec, state["posterior"], fmodel.theta, prior, hyperparameters.scale(), sopts
    )
    stats = FitStatistics(**state["fit_statistics"])
    lik = options.likelihood_model
    head = LinearHead.find(fmodel)
    return FittedLaplace(
        fmodel, layout, posterior, stats, lik, hyperparameters, spec, reader, None, head
    )
