r"""KFAC collector: Kronecker factors :math:`A_l, B_l` of Linear and Conv2d layers in one pass.

The factors and their conventions are those of :mod:`laplace_ggn.kfac`.  Weight sharing follows
the "expand" convention: a Linear layer applied to inputs ``(B, T, I)`` and a Conv2d layer
(inputs unfolded into patches, T output locations) treat each of the N·T locations as a
sample: A sums over them, B is divided by N·T.

The ``C`` back-propagated columns come from one batched vector-Jacobian product per batch
(``torch.autograd.grad(..., is_grads_batched=True)`` w.r.t. the layer outputs, recorded with
temporary forward hooks).  The columns come from an
:class:`~laplace_ggn.likelihoods.OutputCurvature`: the C exact columns of :math:`L_n`, or S
sampled columns :math:`\nabla_f \log p(\hat y \mid f)/\sqrt S`, :math:`\hat y \sim p(y \mid f)`,
whose outer products have expectation :math:`\Lambda_n` (``mc=True`` is one such column).

Outputs ``(B, T, C)`` with ignored targets: a location of a layer whose leading dimensions
are those of the outputs ``(B, T)`` is left out of A, B and the count when its target is
ignored *and* its back-propagated gradient is zero in every column (a position-wise head, or
padding that attention masks out); ignored positions that still influence kept ones (e.g.
the prompt of a language model) stay.

Parameters outside Kronecker-factored layers (other module types, Linear layers run more than
once per forward pass, tied weights, grouped or non-zero-padded convolutions) get the exact
diagonal of their GGN block instead; the collector warns once, naming them.  So do the layers
whose weight or bias the first batch sees used outside the layer's forward (a weight reused by
a functional call, e.g. ``F.linear(h, self.enc.weight.t())``; see
:func:`~laplace_ggn.layers.trace_foreign_uses`): the Kronecker factors of the layer would
miss that use.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_finite
from ..functional import (
    FunctionalModel,
    batched_output_grads,
    capture_layers,
    is_model_output,
)
from ..kfac import KFACCurvature, KroneckerBlock
from ..layers import (
    AffineLayer,
    ForeignUses,
    affine_layers,
    check_layer_inputs,
    layer_owners,
    trace_foreign_uses,
    with_bias_column,
)
from ..likelihoods import as_output_curvature
from ..posteriors._common import make_prior
from ..posteriors.kfac import check_kfac_prior
from ._jacobian import checked_factor, jacobian_sqrt_diag
from .base import Collector, Reduction

__all__ = ["KFACCollector", "make_kfac_collector"]

SUM = Reduction.SUM
_FACTOR_STATES = ("A", "B", "count")


def make_kfac_collector(
    fmodel: FunctionalModel, likelihood, *, prior_precision: Tensor | float, mc: bool = False
) -> KFACCollector:
    """Validate the prior for KFAC, then create a :class:`KFACCollector`.

    Returns:
        The :class:`KFACCollector`.

    Raises:
        ValueError: If ``prior_precision`` is per parameter (see
            :func:`~laplace_ggn.posteriors.kfac.check_kfac_prior`).
    """
    check_kfac_prior(
        make_prior(prior_precision, fmodel.layout, dtype=fmodel.dtype, device=fmodel.device)
    )
    return KFACCollector(fmodel, likelihood, mc=mc)


class KFACCollector(Collector):
    r"""Accumulate Kronecker factors :math:`A_l, B_l` in one pass (``update`` per batch).

    Args:
        fmodel: The functional model (its private module receives the temporary hooks).
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature` (exact or MC
            columns), or a likelihood (its exact factor, or one sampled column with ``mc``).
        mc: With a plain likelihood: back-propagate one sampled column instead of the C
            exact columns of :math:`L_n`.
        generator: Random generator for ``mc``.

    Distributed use: the states are sums only (``diag``, the diagonal part, and per layer m
    ``A.m``, the un-normalised ``B.m`` and the row count ``count.m``), so an all-reduce of
    each followed by :meth:`finalize` divides B by the *global* count and gives the
    single-process factors.  With ``mc`` every rank should use its own seed.  A collector that
    has seen no data reports zeros of the same names and shapes, except when a layer runs more
    than once per forward pass or has a weight used outside it: the first batch moves such
    layers to the diagonal part, which a rank without data cannot know (the entries then
    differ between ranks and the reduction refuses them).
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        likelihood,
        *,
        mc: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.fmodel = fmodel
        self.likelihood = as_output_curvature(likelihood, mc=mc, generator=generator)
        self.mc = self.likelihood.mc
        layout = fmodel.layout
        # tied weights are left out: the block of one module would miss the other's use
        self.layers = affine_layers(fmodel.module, layout.names, conv=True, untied=True)
        self._set_rest()
        dt, dev = fmodel.dtype, fmodel.device
        self.add_state("diag", torch.zeros(self.rest.n_params, dtype=dt, device=dev), reduce=SUM)
        for mname, lay in self.layers.items():
            D, O = lay.n_in, lay.n_out
            self.add_state(f"A.{mname}", torch.zeros(D, D, dtype=dt, device=dev), reduce=SUM)
            self.add_state(f"B.{mname}", torch.zeros(O, O, dtype=dt, device=dev), reduce=SUM)
            self.add_state(f"count.{mname}", torch.zeros((), dtype=dt, device=dev), reduce=SUM)
        self._checked = False

    def _factors(self, mname: str) -> tuple[Tensor, Tensor, Tensor]:
        """The states ``(A, B, count)`` of layer ``mname``."""
        return tuple(getattr(self, f"{kind}.{mname}") for kind in _FACTOR_STATES)

    def _set_rest(self) -> None:
        covered = {n for lay in self.layers.values() for n in (lay.weight, lay.bias) if n}
        layout = self.fmodel.layout
        self.rest = layout.sub_layout([n for n in layout.names if n not in covered])

    # -- data pass -----------------------------------------------------------------------------

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Add one batch to the factors (targets ``y`` mark ignored positions); returns f.

        Returns:
            The outputs f of the batch, shape ``(B, C)`` or ``(B, T, C)``.

        Raises:
            RuntimeError: If a factored layer runs a different number of times than on the
                first batch.
            ValueError: If the curvature holds NaN/Inf, or a factored layer received an input
                without a batch dimension (a loader of single samples).
        """
        fm = self.fmodel
        params = {
            n: t.detach().requires_grad_(True) for n, t in fm.layout.unflatten(fm.theta).items()
        }
        trace = (
            contextlib.nullcontext()
            if self._checked
            else trace_foreign_uses(layer_owners(self.layers, params), fm.module)
        )
        with capture_layers({m: lay.module for m, lay in self.layers.items()}) as records:
            with trace as uses:
                f = fm.call_dict(params, x)
        check_layer_inputs(records, where)
        if not self._checked:
            self._first_batch_checks(records, uses, f)
        elif any(len(records[m].outputs) != 1 for m in self.layers):
            bad = [m for m in self.layers if len(records[m].outputs) != 1]
            raise RuntimeError(
                f"layers {bad} must run once per forward pass as on the first batch; they ran "
                f"another number of times in {where or 'a later batch'}."
            )
        fd = f.detach()
        out = self.likelihood
        mask = out.mask(fd, y, where)
        # exact factor: a Linear layer whose output is the model output gets B = Σ Λ in
        # closed form (O(C²) per position, no back-propagated columns)
        heads = {
            m
            for m, lay in self.layers.items()
            if not out.mc
            and isinstance(lay.module, nn.Linear)
            and is_model_output(records[m].outputs[0], f)
        }
        need = [m for m in self.layers if m not in heads]
        # (B, M, K): one draw for every layer
        L = checked_factor(out, fm, fd, mask, y, where) if need else None
        grads = {}
        if need:
            cot = L.permute(2, 0, 1).reshape(L.shape[2], *fd.shape)  # (K, B, ..., C)
            outs = [records[m].outputs[0] for m in need]
            grads = dict(zip(need, batched_output_grads(f, outs, cot)))
        for mname, lay in self.layers.items():
            a = records[mname].inputs[0].detach()
            A, B, count = self._factors(mname)
            # rank-k updates straight into the sums (one GEMM each, no temporaries); B was
            # finite before this batch, so a non-finite B names the batch that made it so
            if mname in heads:
                a_t = self._input_rows(lay, a, mask)
                B.add_(out.gram(fd, mask, y=y))
            else:
                a_t, g2 = self._factor_rows(lay, a, grads[mname].detach(), mask)
                B.addmm_(g2.T, g2)
            A.addmm_(a_t.T, a_t)
            count.add_(a_t.shape[0])
            check_finite(B, f"KFAC output factor of layer {mname!r}", where)
        if self.rest.n_params:
            d, _ = jacobian_sqrt_diag(fm, x, self.rest, self.likelihood, fd, L=L, y=y, where=where)
            check_finite(d, "GGN diagonal (curvature)", where)
            self.diag += d
        return fd

    def _first_batch_checks(self, records, uses: ForeignUses, f: Tensor) -> None:
        self._checked = True
        foreign = uses.names(f)
        again = [
            m
            for m, lay in self.layers.items()
            if len(records[m].outputs) != 1 or {lay.weight, lay.bias} & foreign
        ]
        for m in again:
            del self.layers[m]
            for kind in _FACTOR_STATES:
                self.remove_state(f"{kind}.{m}")
        if again:
            self._set_rest()
            diag = torch.zeros(
                self.rest.n_params, dtype=self.fmodel.dtype, device=self.fmodel.device
            )
            self.add_state("diag", diag, reduce=SUM)
        if self.rest.n_params:
            warnings.warn(
                f"kfac: parameters {list(self.rest.names)} are not in a Kronecker-factored "
                "nn.Linear / nn.Conv2d layer (other module type, a layer run more than once, "
                "tied weights, a weight also used outside its layer, or a grouped/padded-mode "
                "convolution); they get exact diagonal GGN blocks.",
                UserWarning,
                stacklevel=3,
            )

    @staticmethod
    def _input_rows(lay: AffineLayer, a: Tensor, mask: Tensor | None) -> Tensor:
        """Rows ``(R, D)`` of a head's A increment: its inputs ``(B, ..., I)`` at kept positions."""
        a2 = a.reshape(-1, a.shape[-1])
        if mask is not None:
            a2 = a2[mask.reshape(-1)]
        return with_bias_column(a2, bool(lay.weight), bool(lay.bias))

    def _factor_rows(
        self, lay: AffineLayer, a: Tensor, g: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Rows ``(R, D)`` and ``(K·R, O)`` whose Gram matrices are the A and B increments.

        Returns:
            ``(ã, g)``: input rows with the bias column and back-propagated columns.
        """
        m = lay.module
        K = g.shape[0]
        if isinstance(m, nn.Linear):
            a2 = a.reshape(-1, a.shape[-1])
            g2 = g.reshape(K, -1, g.shape[-1])
            if mask is not None and tuple(a.shape[:-1]) == tuple(mask.shape):
                # ignored positions without influence on the kept ones carry no curvature
                drop = ~mask.reshape(-1) & (g2 == 0).all(dim=2).all(dim=0)
                a2, g2 = a2[~drop], g2[:, ~drop]
        else:
            patches = F.unfold(
                a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
            )
            a2 = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B·T, Cin·kh·kw)
            g2 = g.flatten(3).transpose(2, 3).reshape(K, -1, g.shape[2])  # (K, B·T, O)
        a_t = with_bias_column(a2, bool(lay.weight), bool(lay.bias))
        return a_t, g2.reshape(-1, g2.shape[-1])

    # -- results -------------------------------------------------------------------------------

    def finalize(self) -> KFACCurvature:
        """The factors with B divided by the number of rows; see :class:`KFACCurvature`.

        Returns:
            The :class:`KFACCurvature`.

        Raises:
            RuntimeError: If no batch was seen.
        """
        if not self._checked:
            raise RuntimeError("KFACCollector.finalize() needs at least one update(x).")
        blocks = []
        for m, lay in self.layers.items():
            A, B, count = self._factors(m)
            blocks.append(KroneckerBlock(lay.weight, lay.bias, A, B / count.clamp_min(1)))
        return KFACCurvature(self.fmodel.layout, tuple(blocks), tuple(self.rest.names), self.diag)

    def _after_load(self) -> None:
        """A rank that saw no data can :meth:`finalize` after loading the reduced sums."""
        self._checked = True
