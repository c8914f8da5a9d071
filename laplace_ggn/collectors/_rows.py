r"""Exact GGN collection over a data stream: dense blocks, the exact diagonal, square-root rows.

All collectors see the data once, batch by batch (``update(x, where) -> f``), and return the
unit-noise GGN (σ = 1; the posterior applies :math:`1/(\tau\sigma^2)`):

.. math::
    G = \sum_n J_n^\top \Lambda_n J_n = \sum_n (J_n^\top L_n)(J_n^\top L_n)^\top.

The exact diagonal avoids per-sample ``(B, C, P)`` Jacobians for ``nn.Linear`` layers: forward
hooks record each layer's input ``a`` and output, one batched backward pass of the ``C``
columns of :math:`L_n` gives the output gradients ``g``, and
:math:`\mathrm{diag}(G)_W = \sum_{n,c} (g_{nc} \otimes a_n)^2 = \sum_c (g_c^2)^\top a^2`.
Other parameters fall back to chunked per-sample Jacobians.

Memory within a batch: the square-root rows of a batch, ``(B, K, P)``, and the per-sample
Jacobians of the parameters outside hooked layers, ``(B, C, P')``, are computed for
consecutive sub-batches sized so that each step's intermediates stay within the model's
``memory_budget`` (:func:`sub_batches`); a batch that fits is processed whole, as it comes.
The number of outputs C that sizes them comes from one forward pass without autograd on the
first batch.

The factor comes from an :class:`~laplace_ggn.likelihoods.OutputCurvature`: the exact
:math:`L_n` (K = C columns, or T·C for outputs ``(B, T, C)``) or K = S Monte-Carlo columns;
every collector here consumes "a factor with K columns" and so supports both.  Positions of
ignored targets (``y`` passed to ``update``) have zero rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..functional import (
    FunctionalModel,
    batch_size_of,
    batched_output_grads,
    capture_layers,
    is_model_output,
)
from ..layers import affine_layers, check_layer_inputs, layer_owners, trace_foreign_uses
from ..likelihoods import OutputCurvature, as_output_curvature
from ._jacobian import (
    ROW_COPIES,
    checked_factor,
    jacobian_sqrt_diag,
    jacobian_sqrt_rows,
    sub_batches,
)

__all__ = ["SqrtGGNRows"]


class SqrtGGNRows:
    r"""Per-batch square-root rows :math:`L_n^\top J_n` of the GGN, by layer hooks where possible.

    For each ``nn.Linear`` layer (or Hugging Face ``Conv1D``, a linear layer with its weight
    transposed) of the subset that runs once per forward pass, forward hooks record its input
    ``a`` ``(B, ..., I)`` and output; one batched backward pass of the ``K`` columns of
    :math:`L_n` gives the output gradients ``g`` ``(K, B, ..., O)``, and the rows of the
    weight are :math:`g_{nk} \otimes a_n` (summed over extra dimensions).  Other parameters
    use chunked per-sample Jacobians, and so do those of a layer whose forward never runs (its
    weights used directly, as ``nn.MultiheadAttention`` does with ``out_proj``), and so does
    a parameter that the first hooked pass sees used outside its layer's forward (a weight
    tied to another module, or reused by a functional call; see
    :func:`~laplace_ggn.layers.trace_foreign_uses`), whose rows the layer's hooks would
    miss.  If a hooked layer turns out to run more than once, every parameter falls back to
    Jacobians from then on.

    Args:
        fmodel: The functional model.
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature` (or a likelihood,
            for its exact factor).
    """

    def __init__(self, fmodel: FunctionalModel, likelihood):
        self.fmodel = fmodel
        self.likelihood: OutputCurvature = as_output_curvature(likelihood)
        layout = fmodel.layout
        in_subset = set(layout.names)
        self.layers = affine_layers(fmodel.module, in_subset, transposed=True)
        self.modules: dict[str, nn.Module] = {m: lay.module for m, lay in self.layers.items()}
        self._set_rest()
        self.hooks_ok = bool(self.modules)
        self.traced = False  # the first hooked pass traces the uses of the hooked parameters
        self.n_outputs: int | None = None  # M, found on the first batch

    def outputs(self, x: object, where: str = "") -> int:
        """M, the outputs of one sample (from a forward pass on the first batch, then cached).

        M = C, or T·C for outputs ``(B, T, C)``, is the row count of the Jacobians.  The pass
        runs without autograd and checks the inputs of the hooked layers.

        Returns:
            M, an int.
        """
        if self.n_outputs is None:
            with torch.no_grad(), capture_layers(self.modules) as records:
                f = self.fmodel(self.fmodel.theta, x)
            check_layer_inputs(records, where)
            self.n_outputs = int(f[0].numel())
        return self.n_outputs

    def columns(self, x: object, where: str = "") -> int:
        """K, the square-root rows per sample: S for the Monte-Carlo factor, else M."""
        return self.likelihood.n_samples if self.likelihood.mc else self.outputs(x, where)

    def row_chunks(
        self, x: object, where: str = "", y: Tensor | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Rows ``(b, K, P)`` and outputs of consecutive sub-batches of ``x`` (and targets ``y``).

        Each sub-batch's rows, with their temporaries (:data:`ROW_COPIES` copies of
        ``(b, max(K, M), P)``), fit in the memory budget; a batch that fits is one chunk,
        processed as it comes.
        """
        size = torch.empty((), dtype=self.fmodel.dtype).element_size()
        per_sample = ROW_COPIES * self.outputs(x, where) * self.fmodel.n_params * size
        for start, xc in sub_batches(self.fmodel, x, per_sample):
            yc = None if y is None else y[start : start + batch_size_of(xc)]
            yield self.rows(xc, yc, where)

    def _set_rest(self) -> None:
        """The parameters outside the hooked layers (taken from per-sample Jacobians)."""
        covered = {
            n for m in self.modules for n in (self.layers[m].weight, self.layers[m].bias) if n
        }
        layout = self.fmodel.layout
        self.rest = layout.sub_layout([n for n in layout.names if n not in covered])

    def _disable_hooks(self) -> None:
        self.hooks_ok = False
        self.rest = self.fmodel.layout

    def _drop(self, names: set[str]) -> None:
        """Take the parameters ``names`` from Jacobians instead of their layer's hooks."""
        for m, lay in list(self.layers.items()):
            w = None if lay.weight in names else lay.weight
            b = None if lay.bias in names else lay.bias
            if w or b:
                self.layers[m] = dataclasses.replace(lay, weight=w, bias=b)
            else:
                del self.layers[m], self.modules[m]
        self._set_rest()

    def layer_grads(
        self, x: object, y: Tensor | None = None, where: str = "", *, skip_heads: bool = False
    ) -> tuple[dict | None, Tensor, Tensor | None, Tensor | None]:
        """Hooked pass: ``({module: (a, g)}, f, L, mask)``; ``None`` for the dict if a layer reran.

        ``a`` is the layer input ``(B, ..., I)``, ``g`` the back-propagated columns of L at its
        output ``(K, B, ..., O)``, ``f`` the outputs ``(B, C)`` or ``(B, T, C)``, ``L``
        ``(B, M, K)`` and ``mask`` the kept positions of targets ``y`` (``None``: all).  With
        ``skip_heads`` and the exact factor, a layer whose output is the model output gets
        ``g = None`` (its gradients are the columns of L; see :meth:`diag`), and L is only
        formed when another layer needs it.

        Returns:
            ``(grads, f, L, mask)``: ``{module: (a, g)}`` (or ``None``), the outputs, the factor L
            (or ``None``) and the mask of kept positions (or ``None``).
        """
        fm = self.fmodel
        params = {
            n: t.detach().requires_grad_(True) for n, t in fm.layout.unflatten(fm.theta).items()
        }
        trace = (
            contextlib.nullcontext()
            if self.traced
            else trace_foreign_uses(layer_owners(self.layers, params), fm.module)
        )
        with capture_layers(self.modules) as records, trace as uses:
            f = fm.call_dict(params, x)
        check_layer_inputs(records, where)
        out = self.likelihood
        fd = f.detach()
        mask = out.mask(fd, y, where)
        if any(len(r.outputs) > 1 for r in records.values()):
            return None, fd, None, mask
        if uses is not None:  # the first hooked pass: shared weights go to the Jacobians
            self.traced = True
            foreign = uses.names(f)
            if foreign:
                self._drop(foreign)
                records = {m: r for m, r in records.items() if m in self.modules}
        silent = [m for m, r in records.items() if not r.outputs]
        if silent:  # e.g. nn.MultiheadAttention's out_proj: its weights are used, not its forward
            for m in silent:
                del self.modules[m], self.layers[m], records[m]
            self._set_rest()
        if not self.modules:
            return None, fd, None, mask
        heads = {
            m
            for m in self.modules
            if skip_heads and not out.mc and is_model_output(records[m].outputs[0], f)
        }
        need = [m for m in self.modules if m not in heads]
        grads = {m: (records[m].inputs[0].detach(), None) for m in heads}
        L = None
        if need:
            L = checked_factor(out, fm, fd, mask, y, where)  # (B, M, K)
            cot = L.permute(2, 0, 1).reshape(L.shape[2], *f.shape)  # (K, B, ..., C)
            outs = [records[m].outputs[0] for m in need]
            for m, g in zip(need, batched_output_grads(f, outs, cot)):
                grads[m] = (records[m].inputs[0].detach(), g.detach())
        k = fm.items_per_sample
        if k > 1:  # a layer sees the B·k items of the B samples: group them per sample
            B = fd.shape[0]
            grads = {
                m: (a.reshape(B, k, *a.shape[1:]), g.reshape(g.shape[0], B, k, *g.shape[2:]))
                for m, (a, g) in grads.items()
            }
        return grads, fd, L, mask

    def _rest_rows(
        self, x: object, f: Tensor | None, L: Tensor | None, y: Tensor | None, where: str
    ) -> tuple[Tensor, Tensor]:
        R, f, _ = jacobian_sqrt_rows(
            self.fmodel, x, self.rest, self.likelihood, f, L=L, y=y, where=where
        )
        return R, f

    def rows(self, x: object, y: Tensor | None = None, where: str = "") -> tuple[Tensor, Tensor]:
        r"""Rows ``R`` ``(B, K, P)`` with :math:`G_{batch} = \sum_{b,k} R_{bk} R_{bk}^\top`, and ``f``.

        The whole batch at once; :meth:`row_chunks` splits it to the memory budget.  Targets
        ``y`` (optional) mark ignored positions; one factor serves every parameter (the same
        draws for ``mc``).

        Returns:
            ``(R, f)``: R of shape ``(B, K, P)`` and the outputs ``(B, C)`` or ``(B, T, C)``.
        """
        layout = self.fmodel.layout
        grads, f, L = None, None, None
        if self.hooks_ok:
            grads, f, L, _ = self.layer_grads(x, y, where)
            if grads is None:
                self._disable_hooks()
        if grads is None:
            return self._rest_rows(x, f, L, y, where)
        B, K = L.shape[0], L.shape[2]
        R = torch.zeros(B, K, layout.n_params, dtype=f.dtype, device=f.device)
        for mname, (a, g) in grads.items():
            lay = self.layers[mname]
            gw, gb = _linear_rows(a, g)
            if lay.transposed:
                gw = gw.transpose(-1, -2)
            for pname, val in ((lay.weight, gw), (lay.bias, gb)):
                if val is not None and pname is not None:
                    R[:, :, layout.slice_of(pname)] = val.reshape(B, K, -1)
        if self.rest.n_params:
            Rr, _ = self._rest_rows(x, f, L, y, where)
            for name, part in self.rest.unflatten_batched(Rr).items():
                R[:, :, layout.slice_of(name)] = part.reshape(B, K, -1)
        return R, f

    def diag(self, x: object, y: Tensor | None = None, where: str = "") -> tuple[Tensor, Tensor]:
        r"""Diagonal of the batch GGN ``(P,)`` without forming the rows, and ``f``.

        The per-sample Jacobians of the parameters outside hooked layers are taken in
        sub-batches that fit in the memory budget (:func:`jacobian_sqrt_diag`).  For a layer
        whose output is the model output, the exact factor's column norms are the diagonal of
        :math:`\Lambda`, so its diagonal is :math:`\sum_n \mathrm{diag}(\Lambda_n) \otimes
        a_n^2` in O(B·C·I), without the C columns.

        Returns:
            ``(d, f)``: the diagonal, shape ``(P,)``, and the outputs ``(B, C)`` or ``(B, T, C)``.
        """
        layout = self.fmodel.layout
        d = torch.zeros(layout.n_params, dtype=self.fmodel.dtype, device=self.fmodel.device)
        grads, f, L, mask = None, None, None, None
        if self.hooks_ok:
            grads, f, L, mask = self.layer_grads(x, y, where, skip_heads=True)
            if grads is None:
                self._disable_hooks()
        for mname, (a, g) in (grads or {}).items():
            lay = self.layers[mname]
            has_bias = lay.bias is not None
            if g is None:
                dw, db = _head_diag(a, self.likelihood.hessian_diagonal(f, mask, y), has_bias)
            else:
                dw, db = _linear_diag(a, g, has_bias)
            if lay.transposed:
                dw = dw.T
            for pname, val in ((lay.weight, dw), (lay.bias, db)):
                if val is not None and pname is not None:
                    d[layout.slice_of(pname)] += val.reshape(-1)
        if self.rest.n_params:
            dr, f = jacobian_sqrt_diag(
                self.fmodel, x, self.rest, self.likelihood, f, L=L, y=y, where=where
            )
            for name, part in self.rest.unflatten(dr).items():
                d[layout.slice_of(name)] += part.reshape(-1)
        return d, f


def _linear_rows(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of a Linear layer: weight ``(B, K, O, I)`` and bias ``(B, K, O)``."""
    if a.ndim == 2:
        return torch.einsum("kbo,bi->bkoi", g, a), g.transpose(0, 1)
    K, B = g.shape[:2]
    a3 = a.reshape(B, -1, a.shape[-1])
    g4 = g.reshape(K, B, -1, g.shape[-1])
    return torch.einsum("kbto,bti->bkoi", g4, a3), g4.sum(2).transpose(0, 1)


def _head_diag(a: Tensor, lam: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """Diagonal GGN of a head from inputs ``(B, ..., I)`` and ``diag(Λ)`` per position ``(N, O)``."""
    a2 = a.reshape(-1, a.shape[-1])
    return lam.T @ a2.pow(2), (lam.sum(0) if has_bias else None)


def _linear_diag(a: Tensor, g: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """Diagonal GGN of a Linear layer from inputs ``(B, ..., I)`` and grads ``(K, B, ..., O)``."""
    if a.ndim == 2:
        g2 = g.pow(2).sum(0)  # (B, O): sum over the K columns before the contraction
        dw = g2.T @ a.pow(2)
        db = g2.sum(0) if has_bias else None
        return dw, db
    # extra (e.g. sequence) dimensions: sum the per-sample gradient over them before squaring
    K, B = g.shape[:2]
    a3 = a.reshape(B, -1, a.shape[-1])
    g4 = g.reshape(K, B, -1, g.shape[-1])
    gw = torch.einsum("kbto,bti->kboi", g4, a3)
    dw = gw.pow(2).sum((0, 1))
    db = g4.sum(2).pow(2).sum((0, 1)) if has_bias else None
    return dw, db
