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
the same loader gives the same context.  The inputs of the samples in the reservoir are held
(not their rows), and the rows are computed once, at the end of the pass, for the M samples
that stayed.  A context of M < N samples stands for all N: its rows are scaled by
:math:`\sqrt{N/M}`, so that :math:`VV^\top` is an unbiased estimate of the GGN of the data
(the subset-of-data approximation, rescaled).

:meth:`GPContextCollector.finalize` returns the rows (:class:`GPRows`); the posterior,
:class:`~laplace_ggn.gp.gp_posterior.GPPosterior`, factorises the MK × MK capacitance
:math:`I + sV^\top\Lambda_0^{-1}V` in function space.  Memory: O(M·K·P) for the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._checks import check_finite
from ..collectors._rows import SqrtGGNRows
from ..collectors.base import Collector, Reduction
from ..functional import FunctionalModel, batch_size_of

__all__ = ["CONTEXT_SEED", "GPContextCollector", "GPRows", "gp_memory_bytes", "rows_budget_error"]

#: Seed of the context draw when the fit has no ``generator``.
CONTEXT_SEED = 0


@dataclass(frozen=True)
class GPRows:
    r"""The curvature of ``structure="gp"``: context rows :math:`V^\top`, shape ``(R, P)``."""

    rows: Tensor


def _gb(n: float) -> str:
    return f"{n / 2**30:.3g} GB"


def gp_memory_bytes(P: int, dtype: torch.dtype, n_context: int | None) -> int:
    """Bytes before the data: M rows of length P, a working copy, the Gram and its factor.

    One row per sample is assumed (K is known after the first batch).

    With ``n_context=None`` (every sample) the count is not known yet: one row; the
    collector checks the budget again as the rows arrive.

    Returns:
        The bytes, an int.
    """
    size = torch.empty((), dtype=dtype).element_size()
    R = n_context or 1
    return 2 * (R * P + min(R, P) ** 2) * size


def rows_budget_error(structure: str, n_rows: int, need: int, budget: int, where: str) -> str:
    """The message for ``n_rows`` context rows (``need`` bytes) over the memory budget.

    Returns:
        The message.
    """
    other = " structure='ella' with rank=K (O(K·P) after the fit)," if structure == "gp" else ""
    return (
        f"structure={structure!r} must keep its context rows (and their factors) within the memory "
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


def _concat(parts: list[object]) -> object:
    """Model inputs of several batches as one (tensors concatenated along dim 0).

    Returns:
        The concatenated input (its non-tensor leaves those of the first part).
    """
    if len(parts) == 1:
        return parts[0]
    spec = tree_flatten(parts[0])[1]
    columns = zip(*(tree_flatten(p)[0] for p in parts))
    return tree_unflatten(
        [torch.cat(c) if isinstance(c[0], Tensor) else c[0] for c in columns], spec
    )


class GPContextCollector(Collector):
    r"""Square-root rows of a uniform random context of M samples (reservoir sampling).

    Args:
        fmodel: The functional model.
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature`.
        n_context: M (``None``: every sample).
        memory_budget: Bytes allowed for the rows and their factors.

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
        # inputs of the samples that entered the reservoir: (x, y, where, slots) per batch
        self._parts: list[tuple | None] = []
        self._owner: dict[int, tuple[int, int]] = {}  # slot -> (part, position in it)

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
        need = 2 * (n_rows * P + min(n_rows, P) ** 2) * size
        if need > self.memory_budget:
            raise ValueError(
                rows_budget_error(self.structure, n_rows, need, self.memory_budget, where)
            )

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Keep the inputs of this batch's samples that enter the reservoir; returns the outputs.

        Their rows are computed once, in :meth:`finalize`, for the M samples that stay (a
        sample that enters and is replaced later costs no rows).  The budget is checked here,
        with K rows per sample, before any row is allocated.

        Returns:
            The outputs f of the batch.

        Raises:
            ValueError: If the rows would exceed the memory budget.
        """
        B = batch_size_of(x)
        self.n_cols = self.n_cols or self._sqrt_rows.columns(x, where)
        slots = self._slots(B)
        new = sum(1 for s in slots if s >= self.n_slots)
        self._check_budget((self.n_slots + new) * self.n_cols, where)
        if slots:
            order = sorted(slots)
            index = torch.tensor([slots[s] for s in order], dtype=torch.long)
            ys = None if y is None else y[index.to(y.device)]
            self._parts.append((select(x, index), ys, where, order))
            for pos, slot in enumerate(order):
                self._owner[slot] = (len(self._parts) - 1, pos)
            self.n_slots += new
            self._drop_dead()
        self.n_seen += B
        with torch.no_grad():
            return self.fmodel(self.fmodel.theta, x)

    def _drop_dead(self) -> None:
        """Forget the inputs of batches none of whose samples is still in the reservoir."""
        alive = {i for i, _ in self._owner.values()}
        for i, part in enumerate(self._parts):
            if part is not None and i not in alive:
                self._parts[i] = None

    def _materialise(self) -> None:
        """The rows of the samples in the reservoir, in slot order (the state ``rows``)."""
        if not self._parts:
            return
        xs, ys, slots, wheres = [], [], [], []
        for i, part in enumerate(self._parts):
            if part is None:
                continue
            x, y, where, order = part
            keep = [pos for pos, slot in enumerate(order) if self._owner[slot] == (i, pos)]
            index = torch.tensor(keep, dtype=torch.long)
            xs.append(select(x, index))
            ys.append(None if y is None else y[index.to(y.device)])
            slots += [order[k] for k in keep]
            wheres += [where] * len(keep)
        self._parts, self._owner = [], {}
        x, y = _concat(xs), (None if ys[0] is None else torch.cat(ys))
        K, P, start = self.n_cols, self.fmodel.n_params, 0
        buf = None
        for R, _ in self._sqrt_rows.row_chunks(x, wheres[0], y):
            bad = (~torch.isfinite(R)).flatten(1).any(1).nonzero()
            where = wheres[start + int(bad[0])] if bad.numel() else wheres[start]
            check_finite(R, "GGN square-root rows (curvature)", where)
            if buf is None:
                buf = R.new_empty(self.n_slots * K, P)
            at = torch.tensor(slots[start : start + R.shape[0]], device=buf.device)
            buf.view(self.n_slots, K, P)[at] = R
            start += R.shape[0]
        self.rows = [buf]

    def distributed_state(self) -> dict:
        """The declared states, the rows of the reservoir computed first.

        Returns:
            ``name -> (tensor, reduction)``.
        """
        self._materialise()
        return super().distributed_state()

    def finalize(self) -> GPRows:
        r"""The context rows scaled by :math:`\sqrt{N/M}`: :math:`(N/M)VV^\top` estimates G.

        More rows than parameters (MK > P) are replaced by the P rows of the triangular factor
        of their QR, which have the same :math:`VV^\top`: the factorisations then cost
        O(P³), as in weight space.

        Returns:
            The :class:`GPRows`.

        Raises:
            RuntimeError: If no batch was seen.
        """
        self._materialise()
        if not self.rows:
            raise RuntimeError("GPContextCollector.finalize() needs at least one update(x).")
        Vt = self.state_tensor("rows")
        self.rows = []
        m = self.n_slots
        if m and self.n_seen != m:
            Vt = Vt * (float(self.n_seen) / m) ** 0.5
        if Vt.shape[0] > Vt.shape[1]:  # more rows than parameters: P rows with the same VVᵀ
            Vt = torch.linalg.qr(Vt, mode="r")[1]
        return GPRows(Vt)

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
