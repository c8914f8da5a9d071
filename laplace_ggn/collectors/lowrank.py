r"""Exact low-rank collector (``rank=None``): every square-root row, then their thin SVD.

It stores every row of :math:`V^\top = (J_n^\top L_n)^\top` (N·C rows of length P, so
O(P·N·C) memory, refused beyond the memory budget with the figure) and takes the thin SVD
:math:`V = U S W^\top`, so that :math:`G = V V^\top = U \mathrm{diag}(S^2) U^\top` is the
eigendecomposition of G restricted to its range (singular values below
``max(S)·max(P, NC)·eps`` are dropped).  ``rank=k`` uses the Nyström sketch of
:mod:`laplace_ggn.collectors.nystrom` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_finite
from ..functional import FunctionalModel, batch_size_of
from ._rows import SqrtGGNRows
from .base import Collector, Reduction
from .nystrom import DEFAULT_OVERSAMPLING, LowRankCurvature, NystromCollector

__all__ = [
    "ExactLowRankCollector",
    "LowRankCurvature",
    "lowrank_memory_bytes",
    "make_lowrank_collector",
]


def _gb(n: float) -> str:
    return f"{n / 2**30:.3g} GB"


def lowrank_memory_bytes(P: int, dtype: torch.dtype, rank: int | None) -> int:
    """Bytes the lowrank collector needs before the data is seen.

    For ``rank=None`` this is one row (N·C is not known yet; the collector checks the budget
    again as the rows arrive); for ``rank=k`` the test matrix and the sketch, 2·P·(k+p).

    Returns:
        The bytes, an int.
    """
    size = torch.empty((), dtype=dtype).element_size()
    if rank is None:
        return P * size
    return 2 * P * min(P, rank + DEFAULT_OVERSAMPLING) * size


def make_lowrank_collector(
    fmodel: FunctionalModel, likelihood, *, rank: int | None, memory_budget: int
):
    """The exact collector for ``rank=None``, the Nyström collector for ``rank=k``."""
    if rank is None:
        return ExactLowRankCollector(fmodel, likelihood, memory_budget=memory_budget)
    return NystromCollector(fmodel, likelihood, rank=rank)


class ExactLowRankCollector(Collector):
    r"""Store all rows of :math:`V^\top` (:math:`G = VV^\top`) and take their thin SVD.

    Args:
        fmodel: The functional model.
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature` (or a likelihood).
        memory_budget: Bytes allowed for the stored rows.

    Distributed use: the state ``rows`` is gathered (concatenated along dim 0 across ranks);
    the SVD of the gathered rows is that of the single-process fit.
    """

    def __init__(self, fmodel: FunctionalModel, likelihood, *, memory_budget: int):
        super().__init__()
        self.fmodel, self.likelihood = fmodel, likelihood
        self.memory_budget = int(memory_budget)
        P, dt, dev = fmodel.n_params, fmodel.dtype, fmodel.device
        self.add_state("rows", torch.zeros(0, P, dtype=dt, device=dev), reduce=Reduction.GATHER)
        self.n_rows = 0
        self.n_cols: int | None = None  # K, rows per sample, known after the first batch
        self._sqrt_rows = SqrtGGNRows(fmodel, likelihood)

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Store one batch's rows (targets ``y`` mark ignored positions); returns the outputs.

        The budget is checked before any row of the batch is computed, with K rows per sample
        (C, T·C for outputs ``(B, T, C)``, or S Monte-Carlo columns), and again with
        the exact count as each sub-batch's rows arrive; the rows are computed in sub-batches
        whose intermediates fit in the budget (see :meth:`SqrtGGNRows.row_chunks`).

        Returns:
            The outputs f of the batch, shape ``(B, C)`` or ``(B, T, C)``.

        Raises:
            ValueError: If the rows exceed the memory budget (the message gives the bytes and
                suggests ``rank=k``), or hold NaN/Inf.
        """
        P = self.fmodel.n_params
        size = torch.empty((), dtype=self.fmodel.dtype).element_size()
        per_sample = self.n_cols or self._sqrt_rows.columns(x, where)
        self._check_budget(self.n_rows + batch_size_of(x) * per_sample, P, size, where)
        fs = []
        for R, f in self._sqrt_rows.row_chunks(x, where, y):
            self.n_cols = R.shape[1]
            self._check_budget(self.n_rows + R.shape[0] * R.shape[1], P, size, where)
            check_finite(R, "GGN square-root rows (curvature)", where)
            self.rows.append(R.reshape(-1, P))
            self.n_rows += R.shape[0] * R.shape[1]
            fs.append(f)
            del R
        return fs[0] if len(fs) == 1 else torch.cat(fs)

    def _check_budget(self, n_rows: int, P: int, size: int, where: str) -> None:
        need = n_rows * P * size
        if need > self.memory_budget:
            raise ValueError(
                f"structure='lowrank' with rank=None must keep all N·C rows of length P={P} within "
                f"the memory budget of {_gb(self.memory_budget)}; got {n_rows} rows by "
                f"{where or 'this batch'} ({_gb(need)} and growing). Pass rank=k (e.g. rank=50) "
                "for the top-k eigenpairs at O(P·k) memory, or raise memory_budget=. With many "
                "outputs, curvature='mc' keeps n_mc_samples rows per sample instead of C."
            )

    def finalize(self) -> LowRankCurvature:
        """Eigenpairs of G restricted to its range, from the thin SVD of the rows.

        Returns:
            The :class:`LowRankCurvature` (eigenvalues ``(R,)``, eigenvectors ``(P, R)``).

        Raises:
            RuntimeError: If no batch was seen.
        """
        if not self.rows:
            raise RuntimeError("ExactLowRankCollector.finalize() needs at least one update(x).")
        Vt = self._stacked_rows()
        _, S, Wh = torch.linalg.svd(Vt, full_matrices=False)
        tol = S.max() * max(Vt.shape) * torch.finfo(Vt.dtype).eps if S.numel() else 0.0
        keep = S > tol
        return LowRankCurvature(S[keep] ** 2, Wh[keep].T.contiguous())

    def _stacked_rows(self) -> Tensor:
        """All rows as one ``(M, P)`` tensor, kept as the only chunk (see :meth:`state_tensor`)."""
        return self.state_tensor("rows")

    def _after_load(self) -> None:
        self.n_rows = self.rows[0].shape[0]
