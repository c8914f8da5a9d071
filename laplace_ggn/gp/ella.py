r"""ELLA: the GP of the linearised network on K Nyström features of the NTK (Deng et al., 2022).

ELLA ("Accelerated linearized Laplace approximation for Bayesian deep learning", NeurIPS
2022) approximates the kernel on M context samples by its top K eigenpairs (Nyström).  With
the context rows :math:`V_M` (one Jacobian row per context sample: of its C outputs one drawn
at random, as ELLA does) and the thin SVD
:math:`V_M^\top = \Psi S Z^\top`, the first K columns of Ψ (P × K, orthonormal) are the
directions :math:`\psi_k = V_M^\top z_k / s_k` of the Nyström feature map
:math:`\phi(x) = J(x)\Psi` (ELLA's :math:`J(x)\,V_M^\top Z S^{-1}`), and
:math:`\phi(x)\phi(x')^\top` is the rank-K Nyström kernel.  The curvature of every sample
in feature space, :math:`\Psi^\top G\Psi = \sum_n (L_n^\top J_n\Psi)^\top(L_n^\top J_n\Psi)`
(K × K), is summed over the whole data, and the posterior is the Gaussian of the linearised
network on the span of the features (:class:`~laplace_ggn.gp.posterior.EllaPosterior`):

.. math::
    J(x)\Sigma J(x)^\top = \phi(x)(s\Psi^\top G\Psi + \alpha I)^{-1}\phi(x)^\top
    \quad\text{(scalar prior)},

ELLA's predictive, with no variance outside the features.  It is stored as the eigenpairs
:math:`\Psi^\top G\Psi = Y\mathrm{diag}(\lambda)Y^\top`, :math:`U = \Psi Y`: O(K·P)
memory.  When the features span the range of the Jacobians (K ≥ the rank of the Gram of
every sample) ELLA is the exact GP on every input whose Jacobian lies in that range (the
training inputs, and every input when the range is all of :math:`\mathbb{R}^P`); elsewhere it
lacks the prior's variance outside the range, :math:`\alpha^{-1}J(x)(I - UU^\top)J(x)^\top`.

One pass over the loader: the context is the first M samples the loader yields (a random
subset when it shuffles; pass ``n_context=None`` for all).  Their batches are held until
the M-th sample has been seen, the features are then built, and the held batches are
replayed into :math:`\Psi^\top G\Psi` (their rows computed a second time); every later batch
is added directly.  Peak memory: M context rows of length P and the held inputs, then
O(K·P).  ELLA is not available under ``torch.distributed`` (each rank would build other
features).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_finite
from ..collectors._rows import SqrtGGNRows
from ..collectors.base import Collector
from ..collectors.nystrom import LowRankCurvature
from ..functional import FunctionalModel, batch_size_of
from .context import context_generator, rows_budget_error, select

__all__ = ["EllaCollector", "check_ella_options", "ella_memory_bytes"]


def ella_memory_bytes(P: int, dtype: torch.dtype, n_context: int | None, rank: int | None) -> int:
    """Bytes before the data: M context rows and their SVD, the K features and eigenvectors.

    Unknown counts (``None``) are taken as one; the collector checks the budget again as
    the context rows arrive.

    Returns:
        The bytes, an int.
    """
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * ((n_context or 1) + (rank or 1)) * P * size


def check_ella_options(rank: int | None, n_context: int | None) -> None:
    """Refuse more features than context samples.

    Raises:
        ValueError: If ``rank > n_context``.
    """
    if rank is not None and n_context is not None and rank > n_context:
        raise ValueError(
            f"rank (K Nyström features of structure='ella') must be at most n_context (M "
            f"context samples); got rank={rank} with n_context={n_context}. The Gram of M "
            "samples has at most M eigenpairs."
        )


class EllaCollector(Collector):
    r"""Nyström features from the first M samples, then :math:`\Psi^\top G\Psi` over all of them.

    The features are those of the kernel :math:`J J^\top` (the NTK of a unit prior), so that
    directions the data leaves unconstrained keep the prior's variance; the curvature comes
    from the GGN square-root rows of every sample.

    Args:
        fmodel: The functional model.
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature`.
        n_context: M (``None``: every sample).
        rank: K features (``None``: every direction of the context Gram above rounding).
        memory_budget: Bytes allowed for the context rows.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        likelihood,
        *,
        n_context: int | None,
        rank: int | None,
        memory_budget: int,
    ):
        super().__init__()
        self.fmodel, self.likelihood = fmodel, likelihood
        self.n_context, self.rank, self.memory_budget = n_context, rank, memory_budget
        self._sqrt_rows = SqrtGGNRows(fmodel, likelihood)
        self._gen = context_generator(likelihood, fmodel.device)
        self.context: list[Tensor] = []  # one row per context sample, (m, P) blocks
        self.n_context_seen = 0
        self.held: list[tuple[object, Tensor | None, str]] = []
        self.Psi: Tensor | None = None  # (P, K)
        self.F: Tensor | None = None  # Ψᵀ G Ψ, (K, K)

    def _rows(self, x: object, where: str, y: Tensor | None):
        for R, f in self._sqrt_rows.row_chunks(x, where, y):
            check_finite(R, "GGN square-root rows (curvature)", where)
            yield R, f

    def _add(self, R: Tensor) -> None:
        RP = R.reshape(-1, R.shape[-1]) @ self.Psi
        self.F = RP.T @ RP if self.F is None else self.F + RP.T @ RP

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Add one batch: context rows (and the batch held) until M samples, then Ψᵀ G Ψ.

        Returns:
            The outputs f of the batch.

        Raises:
            ValueError: If the context rows exceed the memory budget, or hold NaN/Inf.
        """
        fs = []
        if self.Psi is not None:
            for R, f in self._rows(x, where, y):
                self._add(R)
                fs.append(f)
            return fs[0] if len(fs) == 1 else torch.cat(fs)
        M, P = self.n_context, self.fmodel.n_params
        take = batch_size_of(x) if M is None else min(batch_size_of(x), M - self.n_context_seen)
        size = torch.empty((), dtype=self.fmodel.dtype).element_size()
        need = 2 * (self.n_context_seen + take) * P * size  # the rows and their SVD
        if need > self.memory_budget:
            raise ValueError(
                rows_budget_error(
                    "ella", self.n_context_seen + take, need, self.memory_budget, where
                )
            )
        self._sqrt_rows.outputs(x, where)  # checks the inputs of the hooked layers (first batch)
        if take > 0:
            xs = x if take == batch_size_of(x) else select(x, torch.arange(take))
            J = self.fmodel.jacobians(xs)[0].reshape(take, -1, P)
            check_finite(J, "Jacobian rows of the context samples (curvature)", where)
            col = torch.randint(J.shape[1], (take,), generator=self._gen, device=self._gen.device)
            self.context.append(J[torch.arange(take, device=J.device), col.to(J.device)].clone())
            self.n_context_seen += take
            del J
        with torch.no_grad():
            fs.append(self.fmodel(self.fmodel.theta, x))
        self.held.append((x, y, where))
        if M is not None and self.n_context_seen >= M:
            self._build()
        return fs[0] if len(fs) == 1 else torch.cat(fs)

    def _build(self) -> None:
        """The features Ψ from the context rows, then the held batches replayed."""
        Vc = torch.cat(self.context)
        self.context = []
        _, S, Wh = torch.linalg.svd(Vc, full_matrices=False)
        tol = S.max() * max(Vc.shape) * torch.finfo(Vc.dtype).eps if S.numel() else 0.0
        k = int((S > tol).sum())
        if self.rank is not None:
            k = min(k, self.rank)
        self.Psi = Wh[:k].T.contiguous()
        del Vc, Wh
        held, self.held = self.held, []
        for x, y, where in held:
            for R, _ in self._rows(x, where, y):
                self._add(R)

    def finalize(self) -> LowRankCurvature:
        r"""Eigenpairs of :math:`\hat G = \Psi\Psi^\top G\Psi\Psi^\top`: λ and :math:`U = \Psi Y`.

        Returns:
            The :class:`~laplace_ggn.collectors.LowRankCurvature` (K eigenpairs).

        Raises:
            RuntimeError: If no batch was seen.
        """
        if self.Psi is None:
            if not self.context:
                raise RuntimeError("EllaCollector.finalize() needs at least one update(x).")
            self._build()
        K = self.Psi.shape[1]
        F = self.F if self.F is not None else self.Psi.new_zeros(K, K)
        lam, Y = torch.linalg.eigh(0.5 * (F + F.T))
        lam, Y = lam.flip(0).clamp_min(0), Y.flip(1)
        return LowRankCurvature(lam, (self.Psi @ Y).contiguous())

    def distributed_state(self) -> dict:
        """Refused: each rank would build its own features.

        Raises:
            ValueError: Always.
        """
        raise ValueError(
            "structure='ella' must be fit in one process; got a torch.distributed fit, where "
            "each rank would build other Nyström features. Fit with distributed=False, or use "
            "structure='gp' (its context is gathered across ranks)."
        )
