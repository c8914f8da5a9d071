r"""Square-root GGN rows from per-sample Jacobians, in sub-batches sized to the memory budget.

Memory within a batch: the per-sample Jacobians ``(B, C, P')`` of the parameters outside hooked
layers are computed for consecutive sub-batches sized so that each step's intermediates stay
within the model's ``memory_budget`` (:func:`sub_batches`); a batch that fits is processed
whole, as it comes.  A sub-batch holds at least one sample: when one sample's Jacobian, or its
output-Hessian factor, exceeds the budget, the fit is refused before it is allocated
(:func:`check_jacobian_memory`, :func:`checked_factor`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .._checks import check_memory
from ..functional import FunctionalModel, ParamLayout, batch_size_of
from ..likelihoods import OutputCurvature, as_output_curvature

__all__ = [
    "ROW_COPIES",
    "check_jacobian_memory",
    "checked_factor",
    "jacobian_sqrt_diag",
    "jacobian_sqrt_rows",
    "output_count",
    "sub_batches",
]

#: Copies of the rows ``(b, K, P)`` alive at once while one sub-batch's rows are built (the
#: rows, one layer's or the Jacobians' temporaries, the concatenated Jacobian chunks).
ROW_COPIES = 3


def sub_batches(
    fmodel: FunctionalModel, x: object, per_sample_bytes: int
) -> Iterator[tuple[int, object]]:
    """Consecutive ``(start, x[start:stop])`` whose intermediates fit in the memory budget.

    ``per_sample_bytes`` is what one sample's intermediates take; a batch that fits is
    yielded whole and unsliced, a larger one in chunks of ``fmodel.chunk_size(...)`` (>= 1)
    samples.
    """
    B = batch_size_of(x)
    step = fmodel.chunk_size(per_sample_bytes)
    if step >= B:
        yield 0, x
        return
    yield from zip(range(0, B, step), fmodel.chunks(x, step))


def output_count(fmodel: FunctionalModel, x: object) -> int:
    """M, the outputs of one sample (C, or T·C for ``(B, T, C)``), from a forward pass on it."""
    return int(fmodel.forward(next(fmodel.chunks(x, 1)))[0].numel())


def _at(where: str) -> str:
    return f" in {where}" if where else ""


def check_jacobian_memory(
    fmodel: FunctionalModel, M: int, layout: ParamLayout, where: str = ""
) -> None:
    """Refuse per-sample Jacobians ``(b, M, P')`` of ``layout`` when one sample's exceeds the budget.

    Raises:
        ValueError: Naming the parameters, the size and the way out.
    """
    size = torch.empty((), dtype=fmodel.dtype).element_size()
    names = list(layout.names)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    check_memory(
        M * layout.n_params * size,
        fmodel.memory_budget,
        f"one sample's Jacobian of the parameters [{shown}] (M={M} outputs x "
        f"P={layout.n_params}){_at(where)}",
        "These parameters are outside the layers whose curvature comes from layer hooks (or "
        "are also used outside them), so their curvature needs per-sample Jacobians. Fit a "
        "subset without them (subset='last_layer' or a list of names), or raise memory_budget=.",
    )


def checked_factor(
    out: OutputCurvature,
    fmodel: FunctionalModel,
    f: Tensor,
    mask: Tensor | None,
    y: Tensor | None = None,
    where: str = "",
) -> Tensor:
    """The factor ``L`` ``(B, M, K)`` of a batch (see ``OutputCurvature.factor``), if it fits.

    Returns:
        The factor.

    Raises:
        ValueError: If one sample's ``M·K`` entries exceed the memory budget (before the
            batch's are allocated; like the model's activations, the batch is the user's).
    """
    M = f[0].numel()
    K = out.n_samples if out.mc else M
    check_memory(
        M * K * f.element_size(),
        fmodel.memory_budget,
        f"one sample's output-Hessian factor L (M={M} outputs x K={K} columns){_at(where)}",
        "With many outputs or positions pass curvature='mc' (n_mc_samples columns instead of "
        "M), or raise memory_budget=.",
    )
    return out.factor(f, mask, y)


def jacobian_sqrt_rows(
    fmodel: FunctionalModel,
    x: object,
    layout: ParamLayout,
    likelihood,
    f: Tensor | None = None,
    *,
    L: Tensor | None = None,
    y: Tensor | None = None,
    where: str = "",
    n_outputs: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Rows :math:`L_n^\top J_n` for the parameters of ``layout`` from per-sample Jacobians.

    Args:
        fmodel: The functional model.
        x: Model input of batch size B.
        layout: Sub-layout of the parameters to differentiate (P' of them).
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature` (or a likelihood).
        f: Outputs ``(B, C)`` or ``(B, T, C)`` if already known.
        L: The factor ``(B, M, K)`` if already drawn (M = T·C; the same draws for every
            parameter of a batch).
        y: Targets marking ignored positions (used when ``L`` is drawn here).
        where: Location for error messages.
        n_outputs: M, if known without ``f`` or ``L`` (else one sample is run to find it).

    Returns:
        ``(R, f, L)``: rows ``(B, K, P')``, outputs and the factor.

    Raises:
        ValueError: If one sample's Jacobian or the factor exceeds the memory budget.
    """
    M = f[0].numel() if f is not None else L.shape[1] if L is not None else n_outputs
    M = M or output_count(fmodel, x)
    check_jacobian_memory(fmodel, M, layout, where)
    J, f_jac = fmodel.jacobians_wrt(x, layout, n_outputs=M)  # (B, M, P')
    f = f_jac if f is None else f
    if L is None:
        out = as_output_curvature(likelihood)
        L = checked_factor(out, fmodel, f, out.mask(f, y, where), y, where)
    return torch.einsum("bmp,bmk->bkp", J, L), f, L


def jacobian_sqrt_diag(
    fmodel: FunctionalModel,
    x: object,
    layout: ParamLayout,
    likelihood,
    f: Tensor | None = None,
    *,
    L: Tensor | None = None,
    y: Tensor | None = None,
    where: str = "",
) -> tuple[Tensor, Tensor]:
    r""":math:`\sum_{n,k} (L_n^\top J_n)_{k\cdot}^2` for the parameters of ``layout``, by sub-batches.

    The per-sample Jacobians ``(b, M, P')`` of each sub-batch fit in the memory budget, so the
    batch's ``(B, M, P')`` is never formed.

    Args:
        fmodel: The functional model.
        x: Model input of batch size B.
        layout: Sub-layout of the parameters (P' of them).
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature` (or a likelihood).
        f: Outputs ``(B, C)`` or ``(B, T, C)`` if already known.
        L: The factor ``(B, M, K)`` if already drawn (sliced with the sub-batches).
        y: Targets marking ignored positions (sliced with the sub-batches).
        where: Location for error messages.

    Returns:
        ``(d, f)``: the diagonal contribution ``(P',)`` and the outputs.
    """
    size = torch.empty((), dtype=fmodel.dtype).element_size()
    M = f[0].numel() if f is not None else output_count(fmodel, x)
    d = torch.zeros(layout.n_params, dtype=fmodel.dtype, device=fmodel.device)
    fs = []
    for start, xc in sub_batches(fmodel, x, ROW_COPIES * M * layout.n_params * size):
        b = batch_size_of(xc)
        fc = None if f is None else f[start : start + b]
        Lc = None if L is None else L[start : start + b]
        yc = None if y is None else y[start : start + b]
        R, fc, _ = jacobian_sqrt_rows(
            fmodel, xc, layout, likelihood, fc, L=Lc, y=yc, where=where, n_outputs=M
        )
        d += R.pow(2).sum((0, 1))
        fs.append(fc)
        del R
    return d, (f if f is not None else fs[0] if len(fs) == 1 else torch.cat(fs))
