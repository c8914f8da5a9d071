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
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ._checks import check_finite
from .functional import FunctionalModel, capture_layers

__all__ = [
    "sqrt_ggn_rows",
    "FullGGNCollector",
    "DiagGGNCollector",
    "dense_bytes",
]


def dense_bytes(P: int, dtype: torch.dtype) -> int:
    """Bytes of a dense ``(P, P)`` matrix of ``dtype``."""
    return P * P * torch.empty((), dtype=dtype).element_size()


def sqrt_ggn_rows(fmodel: FunctionalModel, x: object, likelihood) -> tuple[Tensor, Tensor]:
    r"""Rows of :math:`V^\top` with :math:`G_{\text{batch}} = V V^\top`, i.e. :math:`L_n^\top J_n`.

    Args:
        fmodel: The functional model.
        x: Model input of batch size B.
        likelihood: Provides ``sqrt_hessian(f) -> (B, C, K)``.

    Returns:
        ``(R, f)``: rows of shape ``(B, K, P)`` and outputs ``(B, C)``.
    """
    J, f = fmodel.jacobians(x)
    L = likelihood.sqrt_hessian(f)
    return torch.einsum("bcp,bck->bkp", J, L), f


class FullGGNCollector:
    """Accumulate the dense GGN ``(P, P)`` of the subset."""

    def __init__(self, fmodel: FunctionalModel, likelihood):
        self.fmodel, self.likelihood = fmodel, likelihood
        P = fmodel.n_params
        self.G = torch.zeros(P, P, dtype=fmodel.dtype, device=fmodel.device)

    def update(self, x: object, where: str = "") -> Tensor:
        """Add one batch; returns the outputs ``(B, C)``."""
        R, f = sqrt_ggn_rows(self.fmodel, x, self.likelihood)
        check_finite(R, "GGN square-root rows (curvature)", where)
        R = R.reshape(-1, R.shape[-1])
        self.G.addmm_(R.T, R)
        return f

    def finalize(self) -> Tensor:
        """The GGN ``(P, P)``."""
        return self.G

    def distributed_state(self) -> dict[str, tuple[Tensor, str]]:
        """State to all-reduce across ranks: the partial GGN ``(P, P)``, summed."""
        return {"G": (self.G, "sum")}

    def load_distributed_state(self, state: dict[str, Tensor]) -> None:
        """Replace the partial GGN by the sum over ranks, shape ``(P, P)``."""
        self.G = state["G"]


class DiagGGNCollector:
    """Accumulate the exact GGN diagonal ``(P,)`` with layer hooks where possible."""

    def __init__(self, fmodel: FunctionalModel, likelihood, *, use_hooks: bool = True):
        self.fmodel, self.likelihood = fmodel, likelihood
        self.diag = torch.zeros(fmodel.n_params, dtype=fmodel.dtype, device=fmodel.device)
        layout = fmodel.layout
        in_subset = set(layout.names)
        self.modules: dict[str, nn.Module] = {}
        covered: list[str] = []
        if use_hooks:
            for mname, module in fmodel.module.named_modules():
                if not isinstance(module, nn.Linear):
                    continue
                pnames = [f"{mname}.{n}" if mname else n for n, _ in module.named_parameters()]
                if any(p in in_subset for p in pnames):
                    self.modules[mname] = module
                    covered += [p for p in pnames if p in in_subset]
        self.rest = layout.sub_layout([n for n in layout.names if n not in set(covered)])
        self.hooks_ok = bool(self.modules)

    def update(self, x: object, where: str = "") -> Tensor:
        """Add one batch; returns the outputs ``(B, C)``."""
        if self.hooks_ok:
            inc, f = self._hooked(x)
            if inc is None:  # a layer ran more than once: fall back for good
                self.hooks_ok = False
                self.rest = self.fmodel.layout
        if not self.hooks_ok:
            inc = torch.zeros_like(self.diag)
            f = None
        if self.rest.n_params:
            J, f_rest = self.fmodel.jacobians_wrt(x, self.rest)
            f = f_rest if f is None else f
            L = self.likelihood.sqrt_hessian(f)
            d = torch.einsum("bcp,bck->bkp", J, L).pow(2).sum((0, 1))
            layout = self.fmodel.layout
            for name, part in self.rest.unflatten(d).items():
                inc[layout.slice_of(name)] += part.reshape(-1)
        check_finite(inc, "GGN diagonal (curvature)", where)
        self.diag += inc
        return f

    def _hooked(self, x: object) -> tuple[Tensor | None, Tensor]:
        fm = self.fmodel
        layout = fm.layout
        params = {
            n: t.detach().requires_grad_(True) for n, t in layout.unflatten(fm.theta).items()
        }
        with capture_layers(self.modules) as records:
            f = fm.call_dict(params, x)
        if any(len(r.outputs) != 1 for r in records.values()):
            return None, f.detach()
        L = self.likelihood.sqrt_hessian(f.detach())  # (B, C, K)
        cot = L.permute(2, 0, 1).contiguous()  # (K, B, C)
        outs = [records[m].outputs[0] for m in self.modules]
        try:
            grads = torch.autograd.grad(f, outs, cot, is_grads_batched=True)
        except RuntimeError:
            grads = self._grads_loop(f, outs, cot)
        inc = torch.zeros_like(self.diag)
        for (mname, module), g in zip(self.modules.items(), grads):
            a = records[mname].inputs[0].detach()
            dw, db = _linear_diag(a, g.detach(), module.bias is not None)
            prefix = f"{mname}." if mname else ""
            for pname, val in (("weight", dw), ("bias", db)):
                full = prefix + pname
                if val is not None and full in layout.names:
                    inc[layout.slice_of(full)] += val.reshape(-1)
        return inc, f.detach()

    @staticmethod
    def _grads_loop(f: Tensor, outs: list[Tensor], cot: Tensor) -> list[Tensor]:
        warnings.warn(
            "batched backward failed; computing the GGN diagonal column by column.",
            RuntimeWarning,
            stacklevel=4,
        )
        cols = [
            torch.autograd.grad(f, outs, cot[k], retain_graph=True) for k in range(cot.shape[0])
        ]
        return [torch.stack([c[i] for c in cols]) for i in range(len(outs))]

    def finalize(self) -> Tensor:
        """The exact diagonal of the GGN, shape ``(P,)``."""
        return self.diag

    def distributed_state(self) -> dict[str, tuple[Tensor, str]]:
        """State to all-reduce across ranks: the partial diagonal ``(P,)``, summed."""
        return {"diag": (self.diag, "sum")}

    def load_distributed_state(self, state: dict[str, Tensor]) -> None:
        """Replace the partial diagonal by the sum over ranks, shape ``(P,)``."""
        self.diag = state["diag"]


def _linear_diag(a: Tensor, g: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """Diagonal GGN of a Linear layer from inputs ``(B, ..., I)`` and grads ``(K, B, ..., O)``."""
    if a.ndim == 2:
        g2 = g.pow(2)
        dw = torch.einsum("kbo,bi->oi", g2, a.pow(2))
        db = g2.sum((0, 1)) if has_bias else None
        return dw, db
    # extra (e.g. sequence) dimensions: sum the per-sample gradient over them before squaring
    K, B = g.shape[:2]
    a3 = a.reshape(B, -1, a.shape[-1])
    g4 = g.reshape(K, B, -1, g.shape[-1])
    gw = torch.einsum("kbto,bti->kboi", g4, a3)
    dw = gw.pow(2).sum((0, 1))
    db = g4.sum(2).pow(2).sum((0, 1)) if has_bias else None
    return dw, db

