r"""Batch KFAC for the natural gradient: Kronecker factors of one batch from a closure's graph.

:class:`~laplace_ggn.optim.NaturalGradient` with ``curvature="kfac"`` hooks the ``nn.Linear``
layers of the optimised parameters while its closure runs and back-propagates the columns of
the output Hessian's square root through the recorded layer outputs (conventions of
:mod:`laplace_ggn.kfac`).  A parameter also used outside its layer's forward (a tied weight, or
one reused by a functional call) is refused on the first step: the factors would miss that use.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .._checks import shape_str
from ..functional import ParamLayout
from ..kfac import KFACCurvature, KroneckerBlock
from ..layers import (
    ForeignUses,
    affine_layers,
    layer_owners,
    trace_foreign_uses,
    with_bias_column,
)

__all__ = ["BatchKFAC"]


class BatchKFAC:
    """KFAC of one batch for :class:`~laplace_ggn.optim.NaturalGradient`, from a closure's graph.

    The ``nn.Linear`` layers of the optimised parameters are hooked while the closure runs
    (:meth:`recording`); :meth:`curvature` back-propagates the columns of the output Hessian's
    square root through the recorded outputs.  The first closure also traces the uses of the
    parameters (:func:`~laplace_ggn.layers.trace_foreign_uses`): a weight used outside its
    layer (tied, or reused by a functional call) is refused by the first :meth:`curvature`.

    Args:
        model: The module the closure runs.
        params: The optimised parameters, in order.

    Raises:
        ValueError: If a parameter lies outside the ``nn.Linear`` layers of ``model``.
    """

    def __init__(self, model: nn.Module, params: list[Tensor]):
        names = {id(p): n for n, p in model.named_parameters()}
        owned = {
            id(p)
            for layer in affine_layers(model).values()
            for p in (layer.module.weight, layer.module.bias)
            if p is not None
        }
        bad = [
            names.get(id(p), f"<tensor {shape_str(p.shape)} not in model>")
            for p in params
            if id(p) not in owned
        ]
        if bad:
            raise ValueError(
                f"every optimised parameter must belong to an nn.Linear layer of model for "
                f"curvature='kfac'; got {bad} outside. Use curvature='ggn' for other layers."
            )
        self.names = [names[id(p)] for p in params]
        self.layout = ParamLayout(tuple(self.names), tuple(p.shape for p in params))
        self.layers = affine_layers(model, self.names)
        self.params = dict(zip(self.names, params))
        self.checked = False  # set once a closure's uses of the parameters were traced
        self.uses: ForeignUses | None = None

    @staticmethod
    @contextmanager
    def recording(kfac: BatchKFAC | None, records: dict[str, list[tuple[Tensor, Tensor]]]):
        """Record ``(input, output)`` of every factored layer while the closure runs."""
        layers = {} if kfac is None else kfac.layers
        records.update({m: [] for m in layers})
        hooks = [
            lay.module.register_forward_hook(
                lambda _m, inp, out, name=mname: records[name].append((inp[0], out))
            )
            for mname, lay in layers.items()
        ]
        trace = kfac is not None and not kfac.checked
        tracing = trace_foreign_uses(layer_owners(layers, kfac.params)) if trace else None
        try:
            with tracing or contextlib.nullcontext() as uses:
                yield records
            if trace:
                kfac.uses = uses
        finally:
            for h in hooks:
                h.remove()

    def curvature(
        self,
        f: Tensor,
        records: dict[str, list[tuple[Tensor, Tensor]]],
        lik: object,
        sigma2: float,
    ) -> KFACCurvature:
        """Kronecker factors of the batch GGN from the recorded layer inputs and outputs.

        Returns:
            The KFAC curvature of the optimised parameters (no diagonal part).

        Raises:
            ValueError: If a factored layer did not run exactly once, or (first batch) a
                parameter is used outside its layer's forward.
        """
        if self.uses is not None:
            foreign, self.uses = self.uses.names(f), None
            if foreign:
                raise ValueError(
                    f"optimised parameters {sorted(foreign)} must be used only inside the "
                    "forward of their nn.Linear layer for curvature='kfac'; got uses outside it "
                    "(a tied weight or one reused by a functional call), which its Kronecker "
                    "factors would miss. Use curvature='ggn', whose products see every use."
                )
            self.checked = True
        again = [m for m, r in records.items() if len(r) != 1]
        if again:
            raise ValueError(
                f"layers {again} must run exactly once per forward pass for curvature='kfac'; "
                f"got {[len(records[m]) for m in again]} calls. Use curvature='ggn'."
            )
        fd = f.detach()
        L = lik.sqrt_hessian(fd) / sigma2**0.5  # (B, C, K)
        outs = [records[m][0][1] for m in self.layers]
        gsum = [None] * len(outs)
        for k in range(L.shape[2]):
            gk = torch.autograd.grad(
                f, outs, grad_outputs=L[:, :, k], retain_graph=True, materialize_grads=True
            )
            for i, g in enumerate(gk):
                g2 = g.detach().reshape(-1, g.shape[-1])
                gsum[i] = g2.T @ g2 if gsum[i] is None else gsum[i] + g2.T @ g2
        blocks = []
        for i, (mname, lay) in enumerate(self.layers.items()):
            a = records[mname][0][0].detach()
            a2 = a.reshape(-1, a.shape[-1])
            a_t = with_bias_column(a2, bool(lay.weight), bool(lay.bias))
            blocks.append(KroneckerBlock(lay.weight, lay.bias, a_t.T @ a_t, gsum[i] / a2.shape[0]))
        empty = torch.zeros(0, dtype=fd.dtype, device=fd.device)
        return KFACCurvature(self.layout, tuple(blocks), (), empty)
