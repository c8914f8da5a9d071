r"""Exact GGN diagonal, shape ``(P,)``.

.. math::
    \mathrm{diag}(G) = \sum_n \sum_c (J_n^\top L_n)_{\cdot c}^2 .


For ``nn.Linear`` layers it comes from layer hooks without per-sample Jacobians (see
:meth:`~laplace_ggn.collectors._rows.SqrtGGNRows.diag`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_finite
from ..functional import FunctionalModel
from ._rows import SqrtGGNRows
from .base import Collector, Reduction

__all__ = ["DiagGGNCollector"]


class DiagGGNCollector(Collector):
    """Accumulate the exact GGN diagonal ``(P,)`` with layer hooks where possible.

    State: ``diag`` ``(P,)``, summed over ranks.
    """

    def __init__(self, fmodel: FunctionalModel, likelihood):
        super().__init__()
        self.fmodel, self.likelihood = fmodel, likelihood
        self.rows = SqrtGGNRows(fmodel, likelihood)
        diag = torch.zeros(fmodel.n_params, dtype=fmodel.dtype, device=fmodel.device)
        self.add_state("diag", diag, reduce=Reduction.SUM)

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Add one batch (targets ``y`` mark ignored positions); returns the outputs."""
        inc, f = self.rows.diag(x, y, where)
        check_finite(inc, "GGN diagonal (curvature)", where)
        self.diag += inc
        return f

    def finalize(self) -> Tensor:
        """The exact diagonal of the GGN, shape ``(P,)``."""
        return self.diag
