r"""Nyström collector (``rank=k``): top-k eigenpairs of the GGN from a one-pass randomized sketch.

The sketch is :math:`Y = G\Omega`, with a fixed orthonormal test matrix Ω of k + p columns
(p oversampling columns, default 10).  Y is a sum over batches of
:math:`J_n^\top \Lambda_n J_n \Omega`, computed with forward-mode JVPs and a batched VJP, so
the whole estimate needs one pass over the data and O(P·(k+p)) memory.  This was chosen
over Lanczos because Lanczos needs a GGN product per iteration, i.e. k or more passes over
the loader, which a one-pass ``fit`` cannot give.  The reconstruction
:math:`G\Omega(\Omega^\top G \Omega)^+\Omega^\top G` is exact when rank(G) ≤ k + p; otherwise
its error is that of the tail of the spectrum (Tropp et al., 2017, "Fixed-rank approximation
of a positive-semidefinite matrix from streaming data"), best for fast-decaying spectra.
The stable variant with a shift ν = √P·eps·‖Y‖ is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from .._checks import check_finite
from ..functional import FunctionalModel
from ..likelihoods import as_output_curvature
from .base import Collector, Reduction

__all__ = ["DEFAULT_OVERSAMPLING", "LowRankCurvature", "NystromCollector", "ggn_matmat"]

DEFAULT_OVERSAMPLING = 10
_SKETCH_SEED = 0


@dataclass(frozen=True)
class LowRankCurvature:
    """Eigenpairs of the unit-noise GGN.

    ``eigenvalues`` ``(R,)`` (descending, >= 0) and ``eigenvectors`` ``(P, R)`` (orthonormal
    columns).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor


def ggn_matmat(
    fmodel: FunctionalModel,
    x: object,
    Omega: Tensor,
    likelihood,
    *,
    out: Tensor | None = None,
    y: Tensor | None = None,
    where: str = "",
) -> tuple[Tensor, Tensor]:
    r"""Add one batch's :math:`\sum_n J_n^\top \Lambda_n J_n \Omega` to ``out``; return it and f.

    The columns of Ω are pushed forward with :func:`torch.func.jvp` and pulled back with one
    batched :func:`torch.func.vjp`, both vectorised over the columns with ``vmap`` and
    chunked to the model's memory budget (a per-column loop of forward-mode passes is the
    fallback for models that ``vmap`` cannot run).

    Args:
        fmodel: The functional model.
        x: Model input of batch size B.
        Omega: Columns, shape ``(P, K)``.
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature` (exact or MC
            output Hessians), or a likelihood (exact).
        out: Accumulator ``(P, K)`` to add into (a new zero tensor if ``None``).
        y: Targets marking ignored positions.
        where: Location for error messages.

    Returns:
        ``(out, f)``: the accumulated ``G Ω`` of shape ``(P, K)`` and the outputs.
    """
    theta = fmodel.theta
    out = torch.zeros_like(Omega) if out is None else out
    curv = as_output_curvature(likelihood)

    def f_of(th: Tensor) -> Tensor:
        return fmodel(th, x)

    try:
        with fmodel.forward_mode(), torch.enable_grad():
            f, vjp_fn = vjp(f_of, theta)
            f = f.detach()
            hess = curv.hessian_matvec_fn(f, curv.mask(f, y, where), y)
            per_col = 4 * (fmodel.n_params + f.numel()) * theta.element_size()
            step = fmodel.chunk_size(per_col)
            products = []
            for start in range(0, Omega.shape[1], step):
                cols = Omega[:, start : start + step].T
                JO = vmap(lambda v: jvp(f_of, (theta,), (v,))[1])(cols)  # (K, B, ..., C)
                (g,) = vmap(vjp_fn)(hess(JO))  # (K, P)
                products.append(g.detach().T)
                del g, JO
        out.add_(torch.cat(products, dim=1))
        return out, f
    except RuntimeError:  # what a transform raises (laplace_ggn._autodiff.cannot_transform)
        # the model cannot run under vmap, or has an operation without a forward-mode
        # derivative: one forward-mode pass per column (reverse mode where even that fails);
        # the model's own errors (not RuntimeError) propagate
        f = fmodel.forward(x)
        hess = curv.hessian_matvec_fn(f, curv.mask(f, y, where), y)
        GO, f = fmodel.jvp_vjp(x, Omega, lambda f_, u: hess(u))
        return out.add_(GO), f


class NystromCollector(Collector):
    r"""Randomized Nyström sketch :math:`Y = G\Omega` in one pass; top-k eigenpairs at the end.

    Args:
        fmodel: The functional model.
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature` (or a likelihood).
        rank: k, the number of eigenpairs kept.
        oversampling: p, extra sketch columns (Ω has ``min(P, k + p)`` columns).
        seed: Seed of Ω (a fixed seed makes fits reproducible).

    Distributed use: every rank must use the same Ω (the same ``seed``, drawn on the CPU and
    then moved, so independent of the device); the state ``Y``, the partial sketch, is summed.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        likelihood,
        *,
        rank: int,
        oversampling: int = DEFAULT_OVERSAMPLING,
        seed: int = _SKETCH_SEED,
    ):
        super().__init__()
        self.fmodel, self.likelihood, self.rank = fmodel, likelihood, int(rank)
        P = fmodel.n_params
        ell = min(P, self.rank + int(oversampling))
        gen = torch.Generator().manual_seed(seed)
        Omega = torch.randn(P, ell, generator=gen, dtype=fmodel.dtype).to(fmodel.device)
        self.Omega = torch.linalg.qr(Omega)[0]
        del Omega
        self.add_state("Y", torch.zeros_like(self.Omega), reduce=Reduction.SUM)
        self._seen = False
        self._result: LowRankCurvature | None = None

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Add one batch's GGN product to the sketch (``y`` marks ignored positions); returns f.

        Returns:
            The outputs f of the batch, shape ``(B, C)`` or ``(B, T, C)``.

        Raises:
            ValueError: If the sketch holds NaN/Inf.
        """
        _, f = ggn_matmat(self.fmodel, x, self.Omega, self.likelihood, out=self.Y, y=y, where=where)
        check_finite(self.Y, "GGN sketch (curvature)", where)  # a failed fit discards it
        self._seen = True
        return f

    def finalize(self) -> LowRankCurvature:
        r"""Top-k eigenpairs of the Nyström approximation of G.

        With :math:`Y_\nu = Y + \nu\Omega = Q_Y R_Y` (thin QR) and
        :math:`M = \Omega^\top Y_\nu`, the approximation
        :math:`Y_\nu M^+ Y_\nu^\top = Q_Y F F^\top Q_Y^\top` with the small
        :math:`F = R_Y M^{-1/2}`; an SVD :math:`F = W S Z^\top` gives the eigenpairs
        :math:`(S^2 - \nu, Q_Y W)`.  The sketch is consumed in place (memory: one extra
        ``(P, k+p)`` block beyond the sketch); later calls return the same result.

        Returns:
            The :class:`LowRankCurvature` (eigenvalues ``(k,)``, eigenvectors ``(P, k)``).

        Raises:
            RuntimeError: If no batch was seen.
        """
        if self._result is not None:
            return self._result
        if not self._seen:
            raise RuntimeError("NystromCollector.finalize() needs at least one update(x).")
        Y, Om = self.Y, self.Omega
        P = Y.shape[0]
        eps = torch.finfo(Y.dtype).eps
        nu = float((P**0.5) * eps * torch.linalg.norm(Y))
        Y.add_(Om, alpha=nu)  # Y_ν, in place
        M = Om.T @ Y
        self.Omega = Om = None
        mu, Q = torch.linalg.eigh(0.5 * (M + M.T))
        keep = mu > mu.max() * M.shape[0] * eps
        Qy, Ry = torch.linalg.qr(Y)
        self.Y = Y = None
        F = Ry @ (Q[:, keep] / mu[keep].sqrt())
        W, S, _ = torch.linalg.svd(F, full_matrices=False)
        lam = (S**2 - nu).clamp_min(0)
        k = min(self.rank, lam.shape[0])
        U = Qy @ W[:, :k]
        del Qy
        self._result = LowRankCurvature(lam[:k], U)
        return self._result

    def _after_load(self) -> None:
        self._seen = True
