r"""Low-rank (Woodbury) posterior :math:`\Lambda = s\,U \mathrm{diag}(\lambda) U^\top + \Lambda_0`.

Two collectors produce the eigenpairs :math:`(\lambda, U)`, ``(R,)`` and ``(P, R)``, of the
unit-noise GGN; both see the data once.

- ``rank=None`` (:class:`ExactLowRankCollector`): exact.  It stores every row of
  :math:`V^\top = (J_n^\top L_n)^\top` (N·C rows of length P, so O(P·N·C) memory, refused
  beyond the memory budget with the figure) and takes the thin SVD
  :math:`V = U S W^\top`, so that :math:`G = V V^\top = U \mathrm{diag}(S^2) U^\top` is
  the eigendecomposition of G restricted to its range (singular values below
  ``max(S)·max(P, NC)·eps`` are dropped).  This is the Woodbury form
  :math:`\Sigma = \alpha^{-1}(I - V(\alpha I/s + V^\top V)^{-1} V^\top)` written in the
  eigenbasis.
- ``rank=k`` (:class:`NystromCollector`): the top-k eigenpairs by a **randomized Nyström
  approximation** from the sketch :math:`Y = G\Omega`, with a fixed orthonormal test matrix Ω
  of k + p columns (p oversampling columns, default 10).  Y is a sum over batches of
  :math:`J_n^\top \Lambda_n J_n \Omega`, computed with forward-mode JVPs and a batched VJP, so
  the whole estimate needs one pass over the data and O(P·(k+p)) memory.  This was chosen
  over Lanczos because Lanczos needs a GGN product per iteration, i.e. k or more passes over
  the loader, which a one-pass ``fit`` cannot give.  The reconstruction
  :math:`G\Omega(\Omega^\top G \Omega)^+\Omega^\top G` is exact when rank(G) ≤ k + p; otherwise
  its error is that of the tail of the spectrum (Tropp et al., 2017, "Fixed-rank approximation
  of a positive-semidefinite matrix from streaming data"), best for fast-decaying spectra.
  The stable variant with a shift ν = √P·eps·‖Y‖ is used.

The posterior with a scalar prior α uses

.. math::
    \Sigma = \alpha^{-1}(I - UU^\top) + U\mathrm{diag}\big(1/(s\lambda + \alpha)\big)U^\top,
    \qquad \log|\Lambda| = (P - R)\log\alpha + \textstyle\sum\log(s\lambda + \alpha);

with a layerwise or per-parameter prior :math:`D` it uses the Woodbury identity with
:math:`W = U\mathrm{diag}(\sqrt{s\lambda})` and the capacitance :math:`K = I + W^\top D^{-1} W`:

.. math::
    \Sigma = D^{-1} - D^{-1} W K^{-1} W^\top D^{-1}, \qquad
    \log|\Lambda| = \log|D| + \log|K|,

and samples by perturbation, :math:`\theta = \theta_* + \Sigma(W z_1 + D^{1/2} z_2)`, whose
covariance is :math:`\Sigma(WW^\top + D)\Sigma = \Sigma`.  All operations cost O(P·R) memory;
``with_prior`` reuses the eigenpairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from .._checks import check_finite
from ..functional import FunctionalModel
from ..ggn import SqrtGGNRows
from ._common import Prior, check_J, check_V, robust_cholesky, standard_normal

__all__ = [
    "DEFAULT_OVERSAMPLING",
    "ExactLowRankCollector",
    "LowRankCurvature",
    "LowRankPosterior",
    "NystromCollector",
    "lowrank_memory_bytes",
    "make_lowrank_collector",
]

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


def _gb(n: float) -> str:
    return f"{n / 2**30:.3g} GB"


def lowrank_memory_bytes(P: int, dtype: torch.dtype, rank: int | None) -> int:
    """Bytes the lowrank collector needs before the data is seen.

    For ``rank=None`` this is one row (N·C is not known yet; the collector checks the budget
    again as the rows arrive); for ``rank=k`` the test matrix and the sketch, 2·P·(k+p).
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


class ExactLowRankCollector:
    r"""Store all rows of :math:`V^\top` (:math:`G = VV^\top`) and take their thin SVD.

    Args:
        fmodel: The functional model.
        likelihood: Provides ``sqrt_hessian``.
        memory_budget: Bytes allowed for the stored rows.

    Distributed use: :meth:`distributed_state` returns the rows to *gather* (concatenate
    along dim 0 across ranks); the SVD of the gathered rows is that of the single-process fit.
    """

    def __init__(self, fmodel: FunctionalModel, likelihood, *, memory_budget: int):
        self.fmodel, self.likelihood = fmodel, likelihood
        self.memory_budget = int(memory_budget)
        self.rows: list[Tensor] = []
        self.n_rows = 0
        self._sqrt_rows = SqrtGGNRows(fmodel, likelihood)

    def update(self, x: object, where: str = "") -> Tensor:
        """Store one batch's rows; returns the outputs ``(B, C)``.

        Raises:
            ValueError: If the rows exceed the memory budget (the message gives the bytes and
                suggests ``rank=k``), or hold NaN/Inf.
        """
        R, f = self._sqrt_rows.rows(x)
        check_finite(R, "GGN square-root rows (curvature)", where)
        R = R.reshape(-1, R.shape[-1])
        P = R.shape[1]
        need = (self.n_rows + R.shape[0]) * P * R.element_size()
        if need > self.memory_budget:
            raise ValueError(
                f"structure='lowrank' with rank=None must keep all N·C rows of length P={P} within "
                f"the memory budget of {_gb(self.memory_budget)}; got {self.n_rows + R.shape[0]} "
                f"rows by {where or 'this batch'} ({_gb(need)} and growing). Pass rank=k (e.g. "
                "rank=50) for the top-k eigenpairs at O(P·k) memory, or raise memory_budget=."
            )
        self.rows.append(R)
        self.n_rows += R.shape[0]
        return f

    def finalize(self) -> LowRankCurvature:
        """Eigenpairs of G restricted to its range, from the thin SVD of the rows.

        Raises:
            RuntimeError: If no batch was seen.
        """
        if not self.rows:
            raise RuntimeError("ExactLowRankCollector.finalize() needs at least one update(x).")
        Vt = torch.cat(self.rows)
        _, S, Wh = torch.linalg.svd(Vt, full_matrices=False)
        tol = S.max() * max(Vt.shape) * torch.finfo(Vt.dtype).eps if S.numel() else 0.0
        keep = S > tol
        return LowRankCurvature(S[keep] ** 2, Wh[keep].T.contiguous())

    def distributed_state(self) -> dict[str, tuple[Tensor, str]]:
        """``{"rows": (V^T (M, P), "gather")}``."""
        Vt = (
            torch.cat(self.rows)
            if self.rows
            else torch.zeros(
                0, self.fmodel.n_params, dtype=self.fmodel.dtype, device=self.fmodel.device
            )
        )
        return {"rows": (Vt, "gather")}

    def load_distributed_state(self, state: dict[str, Tensor]) -> None:
        """Replace the rows with the rows gathered from all ranks."""
        self.rows = [state["rows"]]
        self.n_rows = state["rows"].shape[0]


def ggn_matmat(
    fmodel: FunctionalModel, x: object, Omega: Tensor, likelihood, *, out: Tensor | None = None
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
        likelihood: Provides ``hessian_matvec`` (broadcasting over a leading K dimension).
        out: Accumulator ``(P, K)`` to add into (a new zero tensor if ``None``).

    Returns:
        ``(out, f)``: the accumulated ``G Ω`` of shape ``(P, K)`` and the outputs ``(B, C)``.
    """
    theta = fmodel.theta
    out = torch.zeros_like(Omega) if out is None else out

    def f_of(th: Tensor) -> Tensor:
        return fmodel(th, x)

    try:
        f, vjp_fn = vjp(f_of, theta)
        f = f.detach()
        B, C = f.shape
        per_col = 4 * (fmodel.n_params + B * C) * theta.element_size()
        step = fmodel.chunk_size(per_col)
        for start in range(0, Omega.shape[1], step):
            cols = Omega[:, start : start + step].T
            JO = vmap(lambda v: jvp(f_of, (theta,), (v,))[1])(cols)  # (K, B, C)
            (g,) = vmap(vjp_fn)(likelihood.hessian_matvec(f, JO))  # (K, P)
            out[:, start : start + step] += g.detach().T
            del g, JO
        return out, f
    except (RuntimeError, NotImplementedError):
        GO, f = fmodel.jvp_vjp(x, Omega, likelihood.hessian_matvec)
        return out.add_(GO), f


class NystromCollector:
    r"""Randomized Nyström sketch :math:`Y = G\Omega` in one pass; top-k eigenpairs at the end.

    Args:
        fmodel: The functional model.
        likelihood: Provides ``hessian_matvec``.
        rank: k, the number of eigenpairs kept.
        oversampling: p, extra sketch columns (Ω has ``min(P, k + p)`` columns).
        seed: Seed of Ω (a fixed seed makes fits reproducible).

    Distributed use: every rank must use the same Ω (the same ``seed``, drawn on the CPU and
    then moved, so independent of the device); :meth:`distributed_state` returns the partial
    sketch Y to *sum*.
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
        self.fmodel, self.likelihood, self.rank = fmodel, likelihood, int(rank)
        P = fmodel.n_params
        ell = min(P, self.rank + int(oversampling))
        gen = torch.Generator().manual_seed(seed)
        Omega = torch.randn(P, ell, generator=gen, dtype=fmodel.dtype).to(fmodel.device)
        self.Omega = torch.linalg.qr(Omega)[0]
        del Omega
        self.Y = torch.zeros_like(self.Omega)
        self._seen = False
        self._result: LowRankCurvature | None = None

    def update(self, x: object, where: str = "") -> Tensor:
        """Add one batch's GGN product to the sketch; returns the outputs ``(B, C)``.

        Raises:
            ValueError: If the sketch holds NaN/Inf.
        """
        _, f = ggn_matmat(self.fmodel, x, self.Omega, self.likelihood, out=self.Y)
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

    def distributed_state(self) -> dict[str, tuple[Tensor, str]]:
        """``{"Y": (G Ω (P, k+p), "sum")}``."""
        return {"Y": (self.Y, "sum")}

    def load_distributed_state(self, state: dict[str, Tensor]) -> None:
        """Replace the partial sketch with the sum over ranks."""
        self.Y = state["Y"]
        self._seen = True


class LowRankPosterior:
    r"""Gaussian posterior :math:`N(\theta_*, (sU\mathrm{diag}(\lambda)U^\top + \Lambda_0)^{-1})`.

    Args:
        mean: θ*, shape ``(P,)``.
        eigenvalues: λ of the unit-noise GGN, shape ``(R,)``, >= 0.
        eigenvectors: U, shape ``(P, R)``, orthonormal columns.
        prior: Scalar, layerwise or per-parameter prior.
        scale: Curvature scale s = 1/(τσ²), shape ``()``.
    """

    def __init__(
        self,
        mean: Tensor,
        eigenvalues: Tensor,
        eigenvectors: Tensor,
        prior: Prior,
        scale: Tensor | float = 1.0,
    ):
        self.mean = mean
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.prior = prior
        self.scale = torch.as_tensor(scale, dtype=mean.dtype, device=mean.device)

    @property
    def n_params(self) -> int:
        """P."""
        return self.mean.shape[0]

    @property
    def rank(self) -> int:
        """R, the number of eigenpairs."""
        return self.eigenvalues.shape[0]

    # -- factorisations ------------------------------------------------------------------------

    @cached_property
    def _eig_precision(self) -> Tensor:
        """sλ + α (scalar prior), shape ``(R,)``."""
        return self.scale * self.eigenvalues + self.prior.precision

    @cached_property
    def _W(self) -> Tensor:
        """U diag(√(sλ)), shape ``(P, R)``."""
        return self.eigenvectors * (self.scale * self.eigenvalues).sqrt()

    @cached_property
    def _dinv(self) -> Tensor:
        return 1.0 / self.prior.diag()

    @cached_property
    def _cap_chol(self) -> Tensor:
        """Cholesky factor of K = I + Wᵀ D⁻¹ W, shape ``(R, R)``."""
        W = self._W
        K = torch.eye(self.rank, dtype=W.dtype, device=W.device) + W.T @ (
            W * self._dinv.unsqueeze(1)
        )
        return robust_cholesky(K, "low-rank capacitance matrix I + WᵀΛ₀⁻¹W")

    def _sigma_rows(self, X: Tensor) -> Tensor:
        """Σ applied to the rows of ``X`` ``(M, P)`` (Σ is symmetric); shape ``(M, P)``."""
        U = self.eigenvectors
        if self.prior.is_scalar:
            XU = X @ U
            a = self.prior.precision
            return (X - XU @ U.T) / a + (XU / self._eig_precision) @ U.T
        Xd = X * self._dinv
        T = torch.cholesky_solve((Xd @ self._W).T, self._cap_chol)  # (R, M)
        return Xd - (T.T @ self._W.T) * self._dinv

    # -- Posterior protocol ----------------------------------------------------------------

    def log_det(self) -> Tensor:
        r"""log|Λ| of the precision Λ = sUdiag(λ)Uᵀ + Λ₀ (not of Σ), by the determinant lemma; ``()``."""
        if self.prior.is_scalar:
            P, R = self.n_params, self.rank
            return (P - R) * torch.log(self.prior.precision) + torch.log(self._eig_precision).sum()
        return self.prior.log_det() + 2 * torch.log(torch.diagonal(self._cap_chol)).sum()

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """Σ V for ``V`` of shape ``(P,)`` or ``(P, K)``; same shape back."""
        check_V(V, self.n_params)
        W = V.unsqueeze(1) if V.ndim == 1 else V
        out = self._sigma_rows(W.T).T
        return out.squeeze(1) if V.ndim == 1 else out

    def to_dense(self) -> Tensor:
        r"""Σ = Λ⁻¹, shape ``(P, P)`` (O(P²) memory: for tests and small models)."""
        eye = torch.eye(self.n_params, dtype=self.mean.dtype, device=self.mean.device)
        return self._sigma_rows(eye)

    def functional_covariance(self, J: Tensor) -> Tensor:
        """J Σ Jᵀ for Jacobians ``(B, C, P)``; returns ``(B, C, C)``."""
        check_J(J, self.n_params)
        if self.prior.is_scalar:
            JU = J @ self.eigenvectors
            a = self.prior.precision
            return (J @ J.transpose(1, 2) - JU @ JU.transpose(1, 2)) / a + (
                JU / self._eig_precision
            ) @ JU.transpose(1, 2)
        Bsz, C, P = J.shape
        S = self._sigma_rows(J.reshape(Bsz * C, P)).reshape(Bsz, C, P)
        return S @ J.transpose(1, 2)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` parameter vectors θ ~ N(θ*, Σ), shape ``(n, P)``."""
        kw = {"dtype": self.mean.dtype, "device": self.mean.device, "generator": generator}
        z = standard_normal(n, self.n_params, **kw)
        U = self.eigenvectors
        if self.prior.is_scalar:
            zU = z @ U
            a = self.prior.precision
            return self.mean + (z - zU @ U.T) / a.sqrt() + (zU / self._eig_precision.sqrt()) @ U.T
        z1 = torch.randn(n, self.rank, **kw) if self.rank else z[:, :0]
        return self.mean + self._sigma_rows(z1 @ self._W.T + z * self.prior.diag().sqrt())

    def with_prior(self, prior: Prior, scale: Tensor | float | None = None) -> LowRankPosterior:
        """A new posterior with another prior (and curvature scale); reuses the eigenpairs."""
        return LowRankPosterior(
            self.mean,
            self.eigenvalues,
            self.eigenvectors,
            prior,
            self.scale if scale is None else scale,
        )

    def state_dict(self) -> dict[str, Tensor]:
        """The eigenpairs (the prior is stored by the wrapper)."""
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], mean: Tensor, prior: Prior, scale: Tensor
    ) -> LowRankPosterior:
        """Rebuild from :meth:`state_dict`."""
        return cls(mean, state["eigenvalues"], state["eigenvectors"], prior, scale)
