r"""Per-sample Jacobians and Jacobian products of a :class:`~laplace_ggn.functional.FunctionalModel`.

Per-sample Jacobians ``(B, C, P)`` come from :func:`torch.func.vmap` over samples of
:func:`torch.func.jacrev` where the model allows, else from one forward pass of a chunk and a
batched backward pass of its B·C one-hot cotangents (one backward per row if batching fails).
:math:`\sum_n J_n^\top M_n J_n V` is formed with forward-mode dual numbers (one forward per
column) or from these Jacobians.  The layer capture records the inputs and outputs of
``nn.Linear`` / ``nn.Conv2d`` layers for the exact diagonal and KFAC, and back-propagates
curvature columns to them.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import jacrev, vmap
from torch.utils._pytree import tree_map

from ._autodiff import cannot_transform
from ._checks import check_memory
from .layout import ParamLayout

__all__ = [
    "LayerRecord",
    "batched_output_grads",
    "capture_layers",
    "forward_mode_matmat",
    "is_model_output",
    "matmat_from_jacobians",
    "per_sample_jacobians",
]


class _JacobianMode(enum.Enum):
    """How per-sample Jacobians are computed on one call (decided per call, never cached)."""

    VMAP = "vmap"  # vmap over samples of jacrev: one forward and C cotangents per sample
    BATCH = "batch"  # one forward of a chunk, B·C one-hot cotangents in one batched backward
    ROWS = "rows"  # as BATCH with one backward per row (the batched backward failed)


#: Samples per forward in the batched reverse mode: each of the B·C backward passes runs
#: over the whole chunk, so the work grows with the chunk; small chunks keep it near the
#: per-sample cost while still batching.
_REVERSE_CHUNK = 8


def per_sample_jacobians(
    fmodel, x: object, layout: ParamLayout, *, n_outputs: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-sample Jacobians w.r.t. the parameters of ``layout`` (a sub-layout), ``(B, C, P')``.

    Autograd is switched on inside (callers may hold ``torch.no_grad()``); the way of
    differentiating is chosen afresh on every call (see the module docstring).

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        x: Model input of batch size B (on the model's device).
        layout: The parameters to differentiate, a sub-layout of ``fmodel.layout``.
        n_outputs: C if known (improves chunking).

    Returns:
        ``(J, f)``: shapes ``(B, C, P')`` (``(B, T·C, P')`` for outputs ``(B, T, C)``) and the
        outputs.

    Raises:
        ValueError: If one sample's Jacobian exceeds ``fmodel.memory_budget`` (checked before
            it is formed; chunks hold at least one sample).
    """
    named = dict(fmodel.module.named_parameters())
    theta = layout.flatten({n: named[n].detach() for n in layout.names})
    first = next(iter(fmodel.chunks(x, 1)), None)
    if first is not None:
        M = n_outputs if n_outputs is not None else fmodel.forward(first)[0].numel()
        check_memory(
            M * layout.n_params * theta.element_size(),
            fmodel.memory_budget,
            f"one sample's Jacobian (M={M} outputs x P={layout.n_params} parameters)",
            "Use a smaller parameter subset (e.g. subset='last_layer'), or raise memory_budget=.",
        )
    C = n_outputs or 16
    per_sample = 4 * C * layout.n_params * theta.element_size()
    call = {"mode": _JacobianMode.BATCH if fmodel.has_rnn else _JacobianMode.VMAP}
    Js, fs = [], []
    with torch.enable_grad():
        for xc in fmodel.chunks(x, fmodel.chunk_size(per_sample)):
            J, f = _jacobian_chunk(fmodel, theta, xc, layout, call)
            Js.append(J)
            fs.append(f)
    if not Js:  # an input of 0 rows: empty results of the right shapes
        C = n_outputs if n_outputs is not None else fmodel.forward(x).shape[1]
        return theta.new_zeros(0, C, layout.n_params), theta.new_zeros(0, C)
    return torch.cat(Js), torch.cat(fs)


def _jacobian_chunk(
    fmodel, theta: Tensor, x: object, layout: ParamLayout, call: dict
) -> tuple[Tensor, Tensor]:
    if call["mode"] is _JacobianMode.VMAP:
        entered = [False]

        def f_single(th: Tensor, xs: object) -> tuple[Tensor, Tensor]:
            entered[0] = True
            xb = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, xs)
            out = fmodel.call_dict(layout.unflatten(th), xb)[0]
            return out.reshape(-1), out  # outputs (T, C) of a sequence: T·C rows

        try:
            J, f = vmap(jacrev(f_single, has_aux=True), in_dims=(None, 0))(theta, x)
            return J.detach(), f.detach()
        except Exception as err:  # noqa: BLE001 -- the model's own errors are re-raised
            if not cannot_transform(err, entered=entered[0]):
                raise
            # the model cannot run under vmap: one forward pass and batched backward passes
            call["mode"] = _JacobianMode.BATCH
    Js, fs = [], []
    for xc in fmodel.chunks(x, _REVERSE_CHUNK):
        J, f = _reverse_jacobian(fmodel, theta, xc, layout, call)
        Js.append(J)
        fs.append(f)
    return torch.cat(Js), torch.cat(fs)


def _reverse_jacobian(
    fmodel, theta: Tensor, x: object, layout: ParamLayout, call: dict
) -> tuple[Tensor, Tensor]:
    """Jacobian rows of one forward pass of a chunk, ``(B, C, P')``, and ``f``.

    Outputs ``(B, T, C)`` give ``(B, T·C, P')`` (row ``t·C + c``), as the vmap path does.

    Returns:
        ``(J, f)``: J of shape ``(B, C, P')`` (``(B, T·C, P')`` for outputs ``(B, T, C)``)
        and the outputs f.
    """
    params = {n: t.detach().requires_grad_(True) for n, t in layout.unflatten(theta).items()}
    leaves = list(params.values())
    saved = [0]

    def pack(t: Tensor) -> Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fmodel.call_dict(params, x)
    f = out.detach()
    B, K = f.shape[0], math.prod(f.shape[1:])  # K = C, or T·C for sequence outputs
    n_rows, P = B * K, layout.n_params
    J = torch.zeros(n_rows, P, dtype=theta.dtype, device=theta.device)
    if not out.requires_grad:  # no parameter of the subset reaches the output
        return J.view(B, K, P), f
    # a batched backward holds about one copy of the saved activations per cotangent
    step = max(1, min(n_rows, fmodel.memory_budget // max(1, 2 * (saved[0] + P * 8))))
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        cot = torch.zeros(stop - start, n_rows, dtype=out.dtype, device=out.device)
        cot[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        cot = cot.view(stop - start, *f.shape)
        if call["mode"] is _JacobianMode.BATCH:
            try:
                grads = torch.autograd.grad(
                    out,
                    leaves,
                    cot,
                    retain_graph=True,
                    is_grads_batched=True,
                    allow_unused=True,
                )
            except RuntimeError as err:
                call["mode"] = _JacobianMode.ROWS
                warnings.warn(
                    f"batched backward failed ({type(err).__name__}: {str(err)[:120]}); "
                    "computing the Jacobian rows one backward pass at a time (slower).",
                    RuntimeWarning,
                    stacklevel=5,
                )
        if call["mode"] is _JacobianMode.ROWS:
            rows = [
                torch.autograd.grad(out, leaves, c, retain_graph=True, allow_unused=True)
                for c in cot
            ]
            grads = [
                None if rows[0][i] is None else torch.stack([r[i] for r in rows])
                for i in range(len(leaves))
            ]
        for name, g in zip(params, grads):
            if g is not None:
                J[start:stop, layout.slice_of(name)] = g.reshape(stop - start, -1)
    return J.view(B, K, P), f


def forward_mode_matmat(
    fmodel, x: object, V: Tensor, output_matvec: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    r""":math:`\sum_n J_n^\top M_n J_n V` by forward-mode dual numbers, one forward per column.

    Returns:
        ``(J^T M J V, f)`` of shapes ``(P, K)`` and ``(B, C)``.
    """
    cols, f_out = [], None
    with torch.enable_grad():
        for k in range(V.shape[1]):
            leaf = fmodel.theta.detach().clone().requires_grad_(True)
            with fwAD.dual_level():
                out = fmodel(fwAD.make_dual(leaf, V[:, k].to(fmodel.dtype)), x)
                primal, tangent = fwAD.unpack_dual(out)
            f = primal.detach()
            u = output_matvec(f, tangent)
            (g,) = torch.autograd.grad(primal, leaf, u)
            cols.append(g)
            f_out = f
    if f_out is None:
        f_out = fmodel.forward(x)
    return torch.stack(cols, dim=1), f_out


def matmat_from_jacobians(
    fmodel, x: object, V: Tensor, output_matvec: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    r""":math:`\sum_n J_n^\top M_n J_n V` from reverse-mode Jacobians ``(B, C, P)``.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        x: Model input (batch of size B).
        V: Columns, shape ``(P, K)``.
        output_matvec: ``(f (B, C), u (B, C)) -> M u (B, C)``.

    Returns:
        ``(J^T M J V, f)`` of shapes ``(P, K)`` and ``(B, C)``.
    """
    first = next(iter(fmodel.chunks(x, 1)), None)
    M = 16 if first is None else fmodel.forward(first)[0].numel()
    step = fmodel.chunk_size(4 * M * fmodel.n_params * fmodel.theta.element_size())
    out = torch.zeros(V.shape, dtype=fmodel.dtype, device=fmodel.device)
    fs = []
    for xc in fmodel.chunks(x, step):  # (b, M, P) at a time; M = C, or T·C for (B, T, C)
        J, f = fmodel.jacobians(xc, n_outputs=M)
        Vc = V.to(J.dtype)
        JV = torch.einsum("bmp,pk->kbm", J, Vc)
        for k in range(V.shape[1]):
            u = output_matvec(f, JV[k].reshape(f.shape)).reshape(JV[k].shape)
            out[:, k] += torch.einsum("bmp,bm->p", J, u)
        fs.append(f)
    if not fs:
        return out, fmodel.forward(x)
    return out, torch.cat(fs)


@dataclass
class LayerRecord:
    """Inputs and outputs of one layer in one forward pass."""

    module: nn.Module
    name: str
    inputs: list[Tensor]
    outputs: list[Tensor]


@contextmanager
def capture_layers(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, LayerRecord]]:
    """Record the input and output of each module during forward passes; hooks always removed."""
    records = {n: LayerRecord(m, n, [], []) for n, m in modules.items()}
    handles = []
    try:
        for name, module in modules.items():

            def hook(mod, inp, out, rec=records[name]):
                rec.inputs.append(inp[0])
                rec.outputs.append(out)

            handles.append(module.register_forward_hook(hook))
        yield records
    finally:
        for h in handles:
            h.remove()


def is_model_output(out: object, f: Tensor) -> bool:
    """Whether a layer's recorded output is the model output ``f`` (the same values in place).

    True for the same tensor, or a view of it with the same shape (e.g. squeezed and
    unsqueezed again); the gradient of ``f`` at such a layer output is the identity.

    Returns:
        ``True`` if ``out`` holds the model output ``f`` itself.
    """
    return (
        isinstance(out, Tensor)
        and out.shape == f.shape
        and out.data_ptr() == f.data_ptr()
        and out.is_contiguous()
        and f.is_contiguous()
    )


def batched_output_grads(f: Tensor, outs: list[Tensor], cot: Tensor) -> list[Tensor]:
    """Vector-Jacobian products of K cotangents ``(K, B, C)`` of ``f`` at each tensor of ``outs``.

    One batched backward pass (vmap over the cotangents); if that fails, one backward per
    column with a warning.  Outputs that do not reach ``f`` get zero gradients.

    Returns:
        One tensor ``(K, *out.shape)`` per entry of ``outs``.
    """
    try:
        grads = torch.autograd.grad(f, outs, cot, is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        warnings.warn(
            "batched backward failed; back-propagating the curvature columns one by one.",
            RuntimeWarning,
            stacklevel=3,
        )
        cols = [
            torch.autograd.grad(f, outs, cot[k], retain_graph=True, allow_unused=True)
            for k in range(cot.shape[0])
        ]
        grads = [
            None if cols[0][i] is None else torch.stack([c[i] for c in cols])
            for i in range(len(outs))
        ]
    return [
        torch.zeros(cot.shape[0], *o.shape, dtype=o.dtype, device=o.device) if g is None else g
        for g, o in zip(grads, outs)
    ]
