r"""Projected-structure collectors: an orthonormal basis of the range of the stacked Jacobian.

The rows are :math:`J_n` itself (:class:`KernelMetric` stands in for the likelihood), not
:math:`L_n^\top J_n`; see :mod:`laplace_ggn.posteriors.projected` for why.  ``rank=None``
takes every row: it keeps them while ``N·C <= P`` and takes their SVD, or accumulates the Gram
matrix :math:`J^\top J = \sum_n J_n^\top J_n` ``(P, P)`` once there are more rows than
parameters and takes its ``eigh``; either way the range is spanned by the eigenvectors whose
eigenvalue exceeds ``max(P, N·C)·eps·λ_max`` (the numerical rank).  ``rank=k`` keeps the top-k
eigenvectors of that Gram matrix from a randomised Nyström sketch (one pass, ``2·P·(k+10)``
memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_finite
from ..functional import FunctionalModel
from ..likelihoods import OutputCurvature, as_output_curvature
from ._rows import SqrtGGNRows
from .base import Collector, Reduction
from .full import symmetric_update
from .lowrank import lowrank_memory_bytes
from .nystrom import NystromCollector

__all__ = [
    "KernelMetric",
    "ProjectedCurvature",
    "ProjectedExactCollector",
    "make_projected_collector",
    "projected_memory_bytes",
]


class KernelMetric:
    r"""Identity output metric: makes the GGN collectors return Jacobian rows :math:`J_n`.

    Stands in for a likelihood in the collectors (``sqrt_hessian``, ``hessian_matvec``), whose
    rows :math:`L_n^\top J_n` become :math:`J_n`, the rows whose kernel the projected
    posterior keeps (see the module docstring).
    """

    def sqrt_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """Identity factor, shape ``(B, C, C)``."""
        B, C = f.shape
        return torch.eye(C, dtype=f.dtype, device=f.device).expand(B, C, C)

    def hessian_matvec(self, f: Tensor, u: Tensor, y: Tensor | None = None) -> Tensor:
        """``u`` unchanged, shape ``(..., B, C)``."""
        return u


@dataclass(frozen=True)
class ProjectedCurvature:
    r"""Range of the stacked Jacobian, from its Gram matrix :math:`J^\top J`.

    ``eigenvalues`` ``(R,)`` (descending, > 0) and ``eigenvectors`` U ``(P, R)`` (orthonormal
    columns).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor


def projected_memory_bytes(P: int, dtype: torch.dtype, rank: int | None) -> int:
    """Bytes the projected collector needs before the data is seen.

    ``rank=None``: one row (the collector checks the budget as rows arrive, P·min(P, N·C')
    in the end); ``rank=k``: the Nyström test matrix and sketch, 2·P·(k+p).

    Returns:
        The bytes, an int: the same as the low-rank collector's.
    """
    return lowrank_memory_bytes(P, dtype, rank)


def make_projected_collector(
    fmodel: FunctionalModel, likelihood, *, rank: int | None, memory_budget: int
):
    r"""Exact collector for ``rank=None``, a Nyström sketch of :math:`J^\top J` for ``rank=k``.

    ``likelihood`` (or the targets' likelihood of an
    :class:`~laplace_ggn.likelihoods.OutputCurvature`) checks the targets passed to
    ``update`` and marks ignored positions, whose Jacobian rows are left out.

    Returns:
        The collector.
    """
    curv = as_output_curvature(likelihood)
    metric = OutputCurvature(KernelMetric(), ignore_index=curv.ignore_index, targets=curv.targets)
    if rank is None:
        return ProjectedExactCollector(fmodel, metric, memory_budget=memory_budget)
    return _TopKRange(NystromCollector(fmodel, metric, rank=rank))


def _numerical_range(lam: Tensor, U: Tensor, n_rows: int) -> ProjectedCurvature:
    """Keep the eigenpairs above ``max(P, n_rows)·eps·λ_max``, in descending order."""
    order = torch.argsort(lam, descending=True)
    lam, U = lam[order], U[:, order]
    if lam.numel() == 0 or float(lam[0]) <= 0:
        return ProjectedCurvature(lam[:0], U[:, :0].contiguous())
    tol = float(lam[0]) * max(U.shape[0], n_rows) * torch.finfo(lam.dtype).eps
    keep = lam > tol
    return ProjectedCurvature(lam[keep].contiguous(), U[:, keep].contiguous())


class ProjectedExactCollector(Collector):
    r"""Every Jacobian row :math:`J_n`; SVD of the rows, or ``eigh`` of their Gram matrix.

    Rows are kept while there are at most P of them (memory P·N·C); beyond that they are
    folded into the Gram matrix :math:`J^\top J = \sum_n J_n^\top J_n` ``(P, P)``, which is
    smaller.  Both are checked against the memory budget as the data arrive.

    Args:
        fmodel: The functional model.
        metric: The :class:`KernelMetric`.
        memory_budget: Bytes allowed for the rows or the Gram matrix.

    Distributed use: the states are the kept ``rows`` (gathered), the row count ``n_rows`` and
    the Gram matrix ``gram`` (summed; declared only when P×P fits the budget); the result
    equals the single-process fit.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        metric: KernelMetric | OutputCurvature,
        *,
        memory_budget: int,
    ):
        super().__init__()
        self.fmodel, self.metric = fmodel, metric
        self.memory_budget = int(memory_budget)
        P, dt, dev = fmodel.n_params, fmodel.dtype, fmodel.device
        zero = torch.zeros((), dtype=dt, device=dev)
        self.add_state("rows", torch.zeros(0, P, dtype=dt, device=dev), reduce=Reduction.GATHER)
        self.add_state("n_rows", zero.expand(1), reduce=Reduction.SUM)
        self.n_rows = 0  # held as an int
        if P * P * zero.element_size() <= self.memory_budget:  # always so once rows are folded
            self.add_state("gram", zero.expand(P, P), reduce=Reduction.SUM)
        self.gram: Tensor | None = None  # None until the rows are folded
        self._sqrt_rows = SqrtGGNRows(fmodel, metric)

    def _too_big(self, what: str, need: int, where: str) -> ValueError:
        return ValueError(
            f"structure='projected' with rank=None must keep {what} within the memory budget "
            f"of {self.memory_budget / 2**30:.3g} GB; got {need / 2**30:.3g} GB by "
            f"{where or 'this batch'}. Pass rank=k (e.g. rank=200) for the k most constrained "
            "directions at O(P·k) memory, or raise memory_budget=."
        )

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Add one batch's Jacobian rows (in sub-batches within the budget); returns ``f``.

        Targets ``y`` (optional) mark ignored positions, whose rows are zero.

        Returns:
            The outputs f of the batch, shape ``(B, C)`` or ``(B, T, C)``.

        Raises:
            ValueError: If the rows or the Gram matrix exceed the memory budget, or the rows
                hold NaN/Inf.
        """
        fs = []
        for R, f in self._sqrt_rows.row_chunks(x, where, y):
            check_finite(R, "Jacobian rows (curvature)", where)
            self._add(R.reshape(-1, R.shape[-1]), where)
            fs.append(f)
            del R  # before the next sub-batch's rows are built
        return fs[0] if len(fs) == 1 else torch.cat(fs)

    def _add(self, R: Tensor, where: str) -> None:
        P, elt = R.shape[1], R.element_size()
        total = self.n_rows + R.shape[0]
        if self.gram is None and total > P:
            if P * P * elt > self.memory_budget:
                raise self._too_big(f"its ({P}, {P}) Gram matrix", P * P * elt, where)
            gram = torch.zeros(P, P, dtype=R.dtype, device=R.device)
            for part in [*self.rows, R]:
                symmetric_update(gram, part)
            self.gram, self.rows = gram, []
        elif self.gram is not None:
            symmetric_update(self.gram, R)
        else:
            if total * P * elt > self.memory_budget:
                raise self._too_big(f"all {total} rows of length P={P}", total * P * elt, where)
            self.rows.append(R)
        self.n_rows = total

    def finalize(self) -> ProjectedCurvature:
        r"""Eigenpairs of :math:`J^\top J` above the numerical rank threshold.

        Returns:
            The :class:`ProjectedCurvature`.

        Raises:
            RuntimeError: If no batch was seen.
            ValueError: If the rows gathered from several ranks need a Gram matrix beyond the
                memory budget.
        """
        if self.n_rows == 0 and self.gram is None and not self.rows:
            raise RuntimeError("ProjectedExactCollector.finalize() needs at least one update(x).")
        P = self.fmodel.n_params
        rows = torch.cat(self.rows) if self.rows else None
        if self.n_rows > P:
            elt = self.fmodel.theta.element_size()
            if self.gram is None and P * P * elt > self.memory_budget:  # ranks' rows together
                raise self._too_big(f"its ({P}, {P}) Gram matrix", P * P * elt, "the ranks")
            gram = self.gram if self.gram is not None else rows.new_zeros(P, P)
            if rows is not None and rows.shape[0]:
                gram = gram.clone()
                symmetric_update(gram, rows)
            lam, U = torch.linalg.eigh(gram)
            return _numerical_range(lam, U, self.n_rows)
        _, S, Wh = torch.linalg.svd(rows, full_matrices=False)
        return _numerical_range(S**2, Wh.T, self.n_rows)


class _TopKRange(Collector):
    r"""Top-k eigenpairs of :math:`J^\top J` from a Nyström sketch (``rank=k``).

    Its distributed state is the sketch's.
    """

    def __init__(self, nystrom: NystromCollector):
        super().__init__()
        self.nystrom = nystrom

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Add one batch to the sketch (``y`` marks ignored positions); returns the outputs."""
        return self.nystrom.update(x, where, y=y)

    def finalize(self) -> ProjectedCurvature:
        """The top-k eigenpairs, without the numerically zero ones."""
        E = self.nystrom.finalize()
        return _numerical_range(E.eigenvalues, E.eigenvectors, E.eigenvectors.shape[0])

    def distributed_state(self) -> dict[str, tuple[Tensor, Reduction]]:
        """The partial sketch, summed."""
        return self.nystrom.distributed_state()

    def load_distributed_state(self, state: dict[str, Tensor]) -> None:
        """Replace the partial sketch with the sum over ranks."""
        self.nystrom.load_distributed_state(state)
