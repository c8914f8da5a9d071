r"""The GP collector: square-root rows of M context samples, drawn uniformly in one pass.

The linearised network with prior :math:`N(\theta_*, \Lambda_0^{-1})` is a Gaussian process
with the empirical NTK kernel :math:`\kappa(x, x') = J(x)\Lambda_0^{-1}J(x')^\top`.  Its
Laplace posterior on M context samples, with :math:`V` the P × MK matrix of their
square-root rows :math:`J_m^\top L_m` (K = C rows per sample, or S for ``curvature="mc"``),

.. math::
    \Sigma = \Lambda_0^{-1} - \Lambda_0^{-1}V\,(I/s + V^\top\Lambda_0^{-1}V)^{-1}\,
    V^\top\Lambda_0^{-1}, \qquad
    J(x)\Sigma J(x)^\top = \kappa(x, x) - \kappa(x, X)L\,(I/s + L^\top\kappa(X, X)L)^{-1}
    L^\top\kappa(X, x),

is the GP predictive on the context X (the matrix inversion lemma turns one into the
other); with every sample as context (M = N) it is the exact ``full`` posterior.

The context is a uniform random subset of M samples, drawn by reservoir sampling in the one
pass over the loader (Vitter's algorithm R: sample t ≥ M replaces a random slot with
probability M/(t+1)), seeded by the fit's ``generator`` or, without one, by a fixed seed, so
the same loader gives the same context.  Rows are computed only for the samples that enter
the reservoir.  A context of M < N samples stands for all N: its rows are scaled by
:math:`\sqrt{N/M}`, so that :math:`VV^\top` is an unbiased estimate of the GGN of the data
(the subset-of-data approximation, rescaled).

:meth:`GPContextCollector.finalize` turns the rows into the eigenpairs of
:math:`VV^\top` by the thin SVD of :math:`V^\top` (the eigendecomposition of the context
Gram :math:`V^\top V` in disguise, without squaring its condition number), which the
low-rank posterior holds: every product with Σ is then a squared norm (PSD by construction,
no cancellation between :math:`\kappa(x,x)` and the correction for small prior precisions),
and ``with_prior`` needs no new factorisation.  Memory: O(M·K·P) for the rows.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from .._checks import check_finite
from ..collectors._rows import SqrtGGNRows
from ..collectors.base import Collector, Reduction
from ..collectors.nystrom import LowRankCurvature
from ..functional import FunctionalModel, batch_size_of

__all__ = ["CONTEXT_SEED", "GPContextCollector", "gp_memory_bytes", "rows_budget_error"]

#: Seed of the context draw when the fit has no ``generator``.
CONTEXT_SEED = 0


def _gb(n: float) -> str:
    return f"{n / 2**30:.3g} GB"


def gp_memory_bytes(P: int, dtype: torch.dtype, n_context: int | None) -> int:
    """Bytes before the data: M rows of length P and the copy of their SVD (one row per sample).

    With ``n_context=None`` (every sample) the count is not known yet: one row; the
    collector checks the budget again as the rows arrive.

    Returns:
        The bytes, an int.
    """
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * (n_context or 1) * P * size


def rows_budget_error(structure: str, n_rows: int, need: int, budget: int, where: str) -> str:
    """The message for ``n_rows`` context rows (``need`` bytes) over the memory budget.

    Returns:
        The message.
    """
    other = " structure='ella' with rank=K (O(K·P) after the fit)," if structure == "gp" else ""
    return (
        f"structure={structure!r} must keep its context rows (and their SVD) within the memory "
        f"budget of {_gb(budget)}; got {n_rows} rows by {where or 'this batch'} "
        f"({_gb(need)}). Pass a smaller n_context=M,{other} or subset='last_layer', or raise "
        "memory_budget=."
    )


def context_generator(likelihood, device: torch.device) -> torch.Generator:
    """The fit's generator, or a CPU generator seeded with :data:`CONTEXT_SEED`.

    Returns:
        A generator (draws are made on its device and moved).
    """
    g = getattr(likelihood, "generator", None)
    if g is not None:
        return g
    return torch.Generator(device="cpu").manual_seed(CONTEXT_SEED)


def select(x: object, index: Tensor) -> object:
    """The samples ``index`` of a model input (every tensor of it indexed on dim 0).

    Returns:
        The input restricted to those samples.
    """
    return tree_map(lambda t: t[index.to(t.device)] if isinstance(t, Tensor) else t, x)


class GPContextCollector(Collector):
    r"""Square-root rows of a uniform random context of M samples (reservoir sampling).

    Args:
        fmodel: The functional model.
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature`.
        n_context: M (``None``: every sample).
        memory_budget: Bytes allowed for the rows and their SVD.

    Distributed use: each rank draws its own reservoir (state ``rows``, gathered) and counts
    its samples (``n_seen``, summed); when the gathered context holds more than M samples, M
    of them are kept at random (uniform over the data when the shards are of equal size).
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        likelihood,
        *,
        n_context: int | None,
        memory_budget: int,
        structure: str = "gp",
    ):
        super().__init__()
        self.fmodel, self.likelihood = fmodel, likelihood
        self.n_context, self.memory_budget, self.structure = n_context, memory_budget, structure
        P, dt, dev = fmodel.n_params, fmodel.dtype, fmodel.device
        self.add_state("rows", torch.zeros(0, P, dtype=dt, device=dev), reduce=Reduction.GATHER)
        self.add_state("n_seen", torch.zeros((), dtype=torch.float64), reduce=Reduction.SUM)
        self.add_state("n_slots", torch.zeros((), dtype=torch.float64), reduce=Reduction.SUM)
        self.n_seen, self.n_slots = 0, 0  # samples seen, samples in the reservoir
        self.n_cols: int | None = None
        self._sqrt_rows = SqrtGGNRows(fmodel, likelihood)
        self._gen = context_generator(likelihood, dev)

    def _slots(self, B: int) -> dict[int, int]:
        """Reservoir slot → sample of this batch that ends up there (algorithm R)."""
        t0, M = self.n_seen, self.n_context
        if M is None:
            return {t0 + b: b for b in range(B)}
        slots: dict[int, int] = {}
        t = torch.arange(t0, t0 + B, dtype=torch.float64)
        u = torch.rand(B, dtype=torch.float64, generator=self._gen, device=self._gen.device)
        j = (u.cpu() * (t + 1)).floor().long().tolist()
        for b in range(B):
            slot = t0 + b if t0 + b < M else j[b]
            if slot < M:
                slots[slot] = b
        return slots

    def _check_budget(self, n_rows: int, where: str) -> None:
        P = self.fmodel.n_params
        size = torch.empty((), dtype=self.fmodel.dtype).element_size()
        need = 2 * n_rows * P * size
        if need > self.memory_budget:
            raise ValueError(
                rows_budget_error(self.structure, n_rows, need, self.memory_budget, where)
            )

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Keep the rows of this batch's samples that enter the reservoir; returns the outputs.

        The budget is checked before any row is computed, with K rows per sample.

        Returns:
            The outputs f of the batch.

        Raises:
            ValueError: If the rows exceed the memory budget, or hold NaN/Inf.
        """
        B = batch_size_of(x)
        K = self.n_cols or self._sqrt_rows.columns(x, where)
        slots = self._slots(B)
        kept = self.n_slots
        new = sum(1 for s in slots if s >= kept)
        self._check_budget((kept + new) * K, where)
        if not slots:
            with torch.no_grad():
                f = self.fmodel(self.fmodel.theta, x)
            self.n_seen += B
            return f
        order = sorted(slots)
        index = torch.tensor([slots[s] for s in order], dtype=torch.long)
        whole = len(order) == B and bool((index == torch.arange(B)).all())
        xs = x if whole else select(x, index)
        ys = y if (whole or y is None) else y[index.to(y.device)]
        parts, fs = [], []
        for R, f in self._sqrt_rows.row_chunks(xs, where, ys):
            check_finite(R, "GGN square-root rows (curvature)", where)
            self.n_cols = R.shape[1]
            parts.append(R)
            fs.append(f)
        R = torch.cat(parts) if len(parts) > 1 else parts[0]
        if whole:
            f = fs[0] if len(fs) == 1 else torch.cat(fs)
        else:
            with torch.no_grad():
                f = self.fmodel(self.fmodel.theta, x)
        self._store(order, R)
        self.n_seen += B
        return f

    def _store(self, order: list[int], R: Tensor) -> None:
        """Append the rows of new slots, overwrite the rows of replaced ones."""
        K, P = R.shape[1], R.shape[2]
        kept = self.n_slots
        fresh = [i for i, s in enumerate(order) if s >= kept]
        if fresh:  # slots are filled in order, so the fresh ones are kept, kept+1, ...
            self.rows.append(R[fresh].reshape(-1, P).clone())
            self.n_slots += len(fresh)
        old = [(s, i) for i, s in enumerate(order) if s < kept]
        if old:
            buf = self.state_tensor("rows")
            for s, i in old:
                buf[s * K : (s + 1) * K] = R[i]

    def finalize(self) -> LowRankCurvature:
        r"""Eigenpairs of :math:`(N/M)\,VV^\top` from the thin SVD of the context rows.

        Singular values below ``max(S)·max(MK, P)·eps`` are dropped (as for the exact
        ``lowrank`` structure).

        Returns:
            The :class:`~laplace_ggn.collectors.LowRankCurvature`.

        Raises:
            RuntimeError: If no batch was seen.
        """
        if not self.rows:
            raise RuntimeError("GPContextCollector.finalize() needs at least one update(x).")
        Vt = self.state_tensor("rows")
        m = self.n_slots
        _, S, Wh = torch.linalg.svd(Vt, full_matrices=False)
        tol = S.max() * max(Vt.shape) * torch.finfo(Vt.dtype).eps if S.numel() else 0.0
        keep = S > tol
        weight = float(self.n_seen) / m if m else 1.0
        return LowRankCurvature(weight * S[keep] ** 2, Wh[keep].T.contiguous())

    def _after_load(self) -> None:
        """After gathering: keep M of the gathered samples at random when there are more."""
        self.n_seen, self.n_slots = int(self.n_seen), int(self.n_slots)
        M = self.n_context
        Vt = self.rows[0] if self.rows else None
        if Vt is None or not self.n_slots:
            return
        K = self.n_cols = Vt.shape[0] // self.n_slots
        if M is None or self.n_slots <= M:
            return
        g = torch.Generator(device="cpu").manual_seed(CONTEXT_SEED)
        pick = torch.randperm(self.n_slots, generator=g)[:M].sort().values
        self.rows = [Vt.reshape(-1, K, Vt.shape[1])[pick.to(Vt.device)].reshape(-1, Vt.shape[1])]
        self.n_slots = M
