r"""Dense GGN of the subset, ``(P, P)``, accumulated from square-root rows batch by batch.

.. math::
    G = \sum_n (J_n^\top L_n)(J_n^\top L_n)^\top .
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_finite
from ..functional import FunctionalModel
from ._rows import SqrtGGNRows
from .base import Collector, Reduction

__all__ = ["FullGGNCollector", "dense_bytes", "symmetric_update"]


def dense_bytes(P: int, dtype: torch.dtype) -> int:
    """Bytes of a dense ``(P, P)`` matrix of ``dtype``."""
    return P * P * torch.empty((), dtype=dtype).element_size()


def symmetric_update(G: Tensor, R: Tensor, n_blocks: int = 4) -> None:
    """``G += Rᵀ R`` computing only the upper block triangle (about 5/8 of the flops)."""
    P = G.shape[0]
    if P < 512:
        G.addmm_(R.T, R)
        return
    edges = [P * i // n_blocks for i in range(n_blocks + 1)]
    for i in range(n_blocks):
        Ri = R[:, edges[i] : edges[i + 1]]
        rest = R[:, edges[i] :]
        blk = Ri.T @ rest  # rows of block i, columns i.. end
        G[edges[i] : edges[i + 1], edges[i] :] += blk
        if i + 1 < n_blocks:
            G[edges[i + 1] :, edges[i] : edges[i + 1]] += blk[:, edges[i + 1] - edges[i] :].T


class FullGGNCollector(Collector):
    """Accumulate the dense GGN ``(P, P)`` of the subset (state ``G``, summed over ranks)."""

    def __init__(self, fmodel: FunctionalModel, likelihood):
        super().__init__()
        self.fmodel, self.likelihood = fmodel, likelihood
        self.rows = SqrtGGNRows(fmodel, likelihood)
        P = fmodel.n_params
        G = torch.zeros(P, P, dtype=fmodel.dtype, device=fmodel.device)
        self.add_state("G", G, reduce=Reduction.SUM)

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Add one batch, in sub-batches that fit in the memory budget; returns the outputs.

        Targets ``y`` (optional) mark ignored positions.

        Returns:
            The outputs f of the batch, shape ``(B, C)`` or ``(B, T, C)``.

        Raises:
            ValueError: If the rows hold NaN/Inf.
        """
        fs = []
        for R, f in self.rows.row_chunks(x, where, y):
            check_finite(R, "GGN square-root rows (curvature)", where)
            symmetric_update(self.G, R.reshape(-1, R.shape[-1]))
            fs.append(f)
            del R  # before the next sub-batch's rows are built
        return fs[0] if len(fs) == 1 else torch.cat(fs)

    def finalize(self) -> Tensor:
        """The GGN ``(P, P)``."""
        return self.G
