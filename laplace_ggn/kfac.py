r"""Kronecker factors of the GGN for ``nn.Linear`` and ``nn.Conv2d`` layers ("type-2", exact B).

For a layer with input features :math:`\tilde a = [a; 1]` (the 1 only when the bias is in the
subset) and output :math:`z = W \tilde a`, the per-sample gradient of the GGN square root
column :math:`c` is :math:`g_{nc} \otimes \tilde a_n` with :math:`g_{nc} = \partial z/\partial f
\cdot (L_n)_{:c}`.  KFAC approximates the layer's GGN block

.. math::
    G_l = \sum_n \Big(\sum_c g_{nc} g_{nc}^\top\Big) \otimes \tilde a_n \tilde a_n^\top
        \approx B_l \otimes A_l, \qquad
    A_l = \sum_n \tilde a_n \tilde a_n^\top, \quad
    B_l = \frac1N \sum_n \sum_c g_{nc} g_{nc}^\top,

written in the order of the row-major flattening of :math:`[W\ b]` (output index slow, input
index fast), which is why ``B`` comes first in the Kronecker product.  The normalisation (A a
sum, B a mean) makes KFAC exact whenever :math:`\sum_c g_{nc} g_{nc}^\top` does not depend on n,
e.g. for the last layer of a regression net, or every layer of a deep linear net with MSE.

The factors are collected by :class:`~laplace_ggn.collectors.KFACCollector`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .functional import ParamLayout

__all__ = ["KFACCurvature", "KronFactors", "kfac_factor_bytes", "kron_index"]


@dataclass(frozen=True)
class KronFactors:
    r"""One Kronecker block :math:`B \otimes A` of the GGN.

    Attributes:
        weight: Name of the weight in the subset, or ``None`` (bias-only block).
        bias: Name of the bias in the subset, or ``None``.
        A: Input factor, shape ``(D, D)`` with D = I (+1 with a bias; D = 1 bias-only).
        B: Output factor, shape ``(O, O)``.
    """

    weight: str | None
    bias: str | None
    A: Tensor
    B: Tensor

    @property
    def n_out(self) -> int:
        """O."""
        return self.B.shape[0]

    @property
    def n_in(self) -> int:
        """D, the input side including the bias column."""
        return self.A.shape[0]

    def index(self, layout: ParamLayout) -> Tensor:
        """Flat positions of the block's entries in Kronecker order, shape ``(O·D,)``.

        Entry ``o·D + j`` of the Kronecker-ordered block is ``W[o, j]`` for ``j < I`` and
        ``b[o]`` for ``j = I``; the result maps it to its place in the flat parameter vector.
        """
        return kron_index(layout, self.weight, self.bias, self.n_out, self.n_in).reshape(-1)


def kron_index(
    layout: ParamLayout, weight: str | None, bias: str | None, n_out: int, n_in: int
) -> Tensor:
    """Flat positions of a Linear layer's ``[W b]`` in Kronecker order, shape ``(O, D)``.

    Entry ``(o, j)`` is ``W[o, j]`` for ``j < I`` and ``b[o]`` for ``j = I`` (D = I + 1 with a
    bias in ``layout``, D = I without, D = 1 for a bias alone).
    """
    O, D = n_out, n_in
    idx = torch.empty(O, D, dtype=torch.long)
    I = D - (bias is not None)
    if weight is not None:
        start = layout.slice_of(weight).start
        idx[:, :I] = start + torch.arange(O * I).reshape(O, I)
    if bias is not None:
        idx[:, I] = layout.slice_of(bias).start + torch.arange(O)
    return idx


@dataclass(frozen=True)
class KFACCurvature:
    """The KFAC approximation of the unit-noise GGN of a subset.

    Attributes:
        layout: The subset's layout.
        blocks: Kronecker blocks, one per covered layer.
        diag_names: Parameters not covered by a block (exact diagonal blocks).
        diag: Exact GGN diagonal of ``diag_names``, in their layout order, shape ``(P_d,)``.
    """

    layout: ParamLayout
    blocks: tuple[KronFactors, ...]
    diag_names: tuple[str, ...]
    diag: Tensor

    def diag_index(self) -> Tensor:
        """Flat positions of the diagonal part, shape ``(P_d,)``."""
        parts = [
            torch.arange(self.layout.slice_of(n).start, self.layout.slice_of(n).stop)
            for n in self.diag_names
        ]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def to_dense(self) -> Tensor:
        """The approximate GGN in flat parameter order, shape ``(P, P)`` (for tests only)."""
        P = self.layout.n_params
        ref = self.diag if not self.blocks else self.blocks[0].A
        G = torch.zeros(P, P, dtype=ref.dtype, device=ref.device)
        for blk in self.blocks:
            idx = blk.index(self.layout).to(G.device)
            G[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.kron(blk.B, blk.A)
        di = self.diag_index().to(G.device)
        G[di, di] = self.diag
        return G


def kfac_factor_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Upper bound of the bytes of the Kronecker factors and their eigenvectors of ``model``."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += (m.in_features + 1) ** 2 + m.out_features**2
        elif isinstance(m, nn.Conv2d):
            d = m.in_channels // m.groups * math.prod(m.kernel_size) + 1
            total += d**2 + m.out_channels**2
    return 2 * total * size
