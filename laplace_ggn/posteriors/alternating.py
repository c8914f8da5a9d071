r"""Matrix-free projection onto the kernel of the GGN by alternating projections over batches.

The kernel of the GGN is :math:`\bigcap_b \ker R_b`, with :math:`R_b` ``(m_b, P)`` the kernel
rows :math:`Q^\top J_n` of the samples of batch b (see :mod:`.projected`).  Von Neumann's
alternating projections

.. math::
    v \leftarrow v - R_b^\top (R_b R_b^\top)^+ R_b v, \qquad b = 1, 2, \dots, B, 1, 2, \dots

converge to the orthogonal projection of v onto that intersection, at a linear rate set by
the angles between the batches' row spaces (Miani, Roy & Hauberg, AISTATS 2025).  Each step
forms one batch's rows explicitly, so memory is that of ``m_b·P`` numbers (batches are split
into sub-batches to stay under the memory budget; any partition of the rows has the same
intersection) and the work of a cycle is linear in P: one pass over the data computing rows,
plus :math:`O(m_b P K + m_b^2 P)` per batch for K vectors.  Nothing is stored between cycles:
the loader is iterated once per cycle, so it may shuffle, but it must be re-iterable.

With a layerwise or per-parameter prior D the projection is made in the whitened coordinates
:math:`w = D^{1/2}\theta` (rows :math:`R_b D^{-1/2}`), which gives the D-orthogonal projection
of :mod:`.projected`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_finite, shape_str
from ..collectors._rows import SqrtGGNRows
from ..collectors.projected import KernelMetric
from ..functional import FunctionalModel, input_tensors, split_batch

__all__ = ["ProjectionResult", "alternating_projection"]


@dataclass(frozen=True)
class ProjectionResult:
    r"""Outcome of :func:`alternating_projection`.

    Attributes:
        projected: The projected vectors, shape ``(P, K)``.
        changes: Relative change of the iterate in each cycle,
            :math:`\lVert V_k - V_{k-1}\rVert_F / \lVert V_0\rVert_F`, shape ``(cycles,)``.
        converged: Whether the last change fell below the tolerance.
    """

    projected: Tensor
    changes: Tensor
    converged: bool


def _project_rows(V: Tensor, R: Tensor) -> Tensor:
    """``V - Rᵀ (R Rᵀ)⁺ R V`` for rows ``R`` ``(m, P)`` and ``V`` ``(P, K)``."""
    if R.shape[0] == 0:
        return V
    mu, W = torch.linalg.eigh(R @ R.T)
    top = float(mu.max())
    if top <= 0:
        return V
    keep = mu > top * max(R.shape) * torch.finfo(R.dtype).eps
    W = W[:, keep]
    coef = W @ ((W.T @ (R @ V)) / mu[keep].unsqueeze(1))
    return V - R.T @ coef


def alternating_projection(
    fmodel: FunctionalModel,
    likelihood,
    loader: Iterable,
    V: Tensor,
    *,
    n_iterations: int = 50,
    tol: float = 1e-6,
    weights: Tensor | None = None,
    input_key: str = "input",
    target_key: str = "target",
    progress: bool = False,
) -> ProjectionResult:
    r"""Project the columns of V onto the kernel of the GGN by cycling over the batches.

    .. math::
        V \leftarrow (I - \tilde R_b^\top(\tilde R_b\tilde R_b^\top)^+\tilde R_b)V, \qquad
        \tilde R_b = R_b\,\mathrm{diag}(w),

    for every batch b of every cycle, until a cycle changes V by less than ``tol`` (relative
    to the input) or ``n_iterations`` cycles have run.

    Args:
        fmodel: The functional model (θ* and the parameter subset).
        likelihood: The likelihood object (its ``kind`` selects the kernel rows).
        loader: Re-iterable training batches ``(x, y)`` or mappings (targets are not used).
        V: Vectors to project, shape ``(P, K)``.
        n_iterations: Maximal number of cycles over the loader.
        tol: Stop when a cycle changes V by less than ``tol·‖V₀‖``.
        weights: w ``(P,)``, the whitening :math:`D^{-1/2}` of a non-scalar prior (``None``:
            the Euclidean projection).
        input_key: Key of the inputs in mapping batches.
        target_key: Key of the targets in mapping batches.
        progress: Show a progress bar over the cycles.

    Returns:
        The :class:`ProjectionResult`.

    Raises:
        ValueError: If ``V`` does not have shape ``(P, K)``, ``n_iterations`` is not a
            positive integer, ``tol`` is not >= 0, the loader yields no batch, or an input has
            another dtype than the model or is not finite.
        TypeError: If the loader is not re-iterable (an iterator can be consumed only once).
    """
    P = fmodel.n_params
    if V.ndim != 2 or V.shape[0] != P:
        raise ValueError(f"V must have shape ({P}, K); got {shape_str(V.shape)}.")
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be a positive integer; got {n_iterations!r}.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a float >= 0; got {tol!r}.")
    if not isinstance(loader, Iterable) or iter(loader) is loader:
        raise TypeError(
            f"train_loader must be re-iterable (e.g. a DataLoader or a list of batches), as it "
            f"is read once per cycle; got {type(loader).__name__}."
        )
    rows_of = SqrtGGNRows(fmodel, KernelMetric())  # sub-batches keep the rows within budget
    scale0 = float(torch.linalg.norm(V)) or 1.0
    changes: list[float] = []
    converged = False
    for _ in tqdm(range(n_iterations), disable=not progress, desc="alternating projections"):
        start = V
        seen = False
        for i, batch in enumerate(loader):
            where = f"batch {i}"
            x, _ = split_batch(batch, input_key=input_key, target_key=target_key, where=where)
            x = fmodel.prepare(x)
            for t in input_tensors(x):
                if t.is_floating_point() and t.dtype != fmodel.dtype:
                    raise ValueError(
                        f"input in {where} must have the model's dtype {fmodel.dtype}; got "
                        f"{t.dtype}."
                    )
                check_finite(t, "input", where)
            for R, _ in rows_of.row_chunks(x, where):
                R = R.reshape(-1, P)
                if weights is not None:
                    R = R * weights
                V = _project_rows(V, R)
                seen = True
        if not seen:
            raise ValueError("train_loader must yield at least one batch; got an empty loader.")
        change = float(torch.linalg.norm(V - start)) / scale0
        changes.append(change)
        if change <= tol:
            converged = True
            break
    if not converged:
        warnings.warn(
            f"alternating projections stopped after {n_iterations} cycles with a relative change "
            f"of {changes[-1]:.3g} > tol={tol:g} in the last cycle; the samples still have a "
            "component outside the kernel. Pass a larger n_iterations=.",
            RuntimeWarning,
            stacklevel=2,
        )
    return ProjectionResult(V, torch.tensor(changes, dtype=torch.float64), converged)
