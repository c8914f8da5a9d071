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

The log determinant of the precision uses, for a scalar prior α,
:math:`\log|\Lambda| = (P - R)\log\alpha + \sum\log(s\lambda + \alpha)`, and for a
layerwise or per-parameter prior :math:`D` the determinant lemma with
:math:`W = U\mathrm{diag}(\sqrt{s\lambda})` and the capacitance :math:`K = I + W^\top D^{-1} W`:
:math:`\log|\Lambda| = \log|D| + \log|K|`.  Covariance products, ``functional_covariance``,
``to_dense`` and ``sample`` use the eigenpairs of the *whitened* curvature: with
:math:`d = \mathrm{diag}(D)^{-1/2}` and the thin QR + SVD
:math:`\mathrm{diag}(d)\,W = Q\,\mathrm{diag}(\sigma)Z^\top` (for a scalar prior simply
:math:`Q = U`, :math:`\sigma^2 = s\lambda/\alpha`),

.. math::
    \Sigma = \mathrm{diag}(d)\big[(I - QQ^\top) + Q\,\mathrm{diag}(e)\,Q^\top\big]
    \mathrm{diag}(d), \qquad e = 1/(1 + \sigma^2) \in (0, 1],

which is :math:`\alpha^{-1}(I - UU^\top) + U\mathrm{diag}(1/(s\lambda + \alpha))U^\top` for a
scalar prior and the Woodbury form :math:`D^{-1} - D^{-1}WK^{-1}W^\top D^{-1}` otherwise.
Quadratic forms are evaluated as squared norms, e.g.
:math:`J\Sigma J^\top = RR^\top + (\tilde J Q e^{1/2})(\tilde J Q e^{1/2})^\top` with
:math:`\tilde J = J\,\mathrm{diag}(d)` and the residual :math:`R = \tilde J - (\tilde J Q)Q^\top`,
never as a difference such as :math:`\alpha^{-1}(JJ^\top - JUU^\top J^\top)`.  That
difference cancels catastrophically when the prior precision is small (in float32 with
α = 1e-6 it gave negative predictive variances on training inputs); the squared forms are
positive semi-definite by construction, whatever the prior.  Samples are
:math:`\theta = \theta_* + \mathrm{diag}(d)[(z - QQ^\top z) + Q\,\mathrm{diag}(e^{1/2})
Q^\top z]`.  All operations cost O(P·R) memory (``to_dense`` O(P²)); ``with_prior`` reuses
the eigenpairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from .._checks import check_finite
from ..functional import FunctionalModel, batch_size_of
from ..ggn import SqrtGGNRows
from ..likelihoods import as_output_curvature
from ._common import Prior, check_J, check_V, robust_cholesky, standard_normal
from ._output import LowRankOutputCovariance, check_head_features

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
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature` (or a likelihood).
        memory_budget: Bytes allowed for the stored rows.

    Distributed use: :meth:`distributed_state` returns the rows to *gather* (concatenate
    along dim 0 across ranks); the SVD of the gathered rows is that of the single-process fit.
    """

    def __init__(self, fmodel: FunctionalModel, likelihood, *, memory_budget: int):
        self.fmodel, self.likelihood = fmodel, likelihood
        self.memory_budget = int(memory_budget)
        self.rows: list[Tensor] = []
        self.n_rows = 0
        self.n_cols: int | None = None  # K, rows per sample, known after the first batch
        self._sqrt_rows = SqrtGGNRows(fmodel, likelihood)

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Store one batch's rows (targets ``y`` mark ignored positions); returns the outputs.

        The budget is checked before any row of the batch is computed, with K rows per sample
        (C, T·C for outputs ``(B, T, C)``, or S Monte-Carlo columns), and again with
        the exact count as each sub-batch's rows arrive; the rows are computed in sub-batches
        whose intermediates fit in the budget (see :meth:`SqrtGGNRows.row_chunks`).

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
        """All rows as one ``(M, P)`` tensor, kept as the only chunk.

        The chunks are moved into it one by one, so the peak is the rows plus one chunk,
        not twice the rows as with ``torch.cat``.
        """
        P, dt, dev = self.fmodel.n_params, self.fmodel.dtype, self.fmodel.device
        if not self.rows:
            return torch.zeros(0, P, dtype=dt, device=dev)
        if len(self.rows) > 1:
            Vt = torch.empty(self.n_rows, P, dtype=dt, device=dev)
            pos = 0
            while self.rows:
                R = self.rows.pop(0)
                Vt[pos : pos + R.shape[0]] = R
                pos += R.shape[0]
                del R
            self.rows = [Vt]
        return self.rows[0]

    def distributed_state(self) -> dict[str, tuple[Tensor, str]]:
        """``{"rows": (V^T (M, P), "gather")}``."""
        return {"rows": (self._stacked_rows(), "gather")}

    def load_distributed_state(self, state: dict[str, Tensor]) -> None:
        """Replace the rows with the rows gathered from all ranks."""
        self.rows = [state["rows"]]
        self.n_rows = state["rows"].shape[0]


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
            hess = curv.hessian_matvec_fn(f, curv.mask(f, y, where))
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
    except Exception:
        # the model cannot run under vmap, or has an operation without a forward-mode
        # derivative: one forward-mode pass per column (reverse mode where even that fails);
        # an error of the input or the targets surfaces again here
        f = fmodel.forward(x)
        hess = curv.hessian_matvec_fn(f, curv.mask(f, y, where))
        GO, f = fmodel.jvp_vjp(x, Omega, lambda f_, u: hess(u))
        return out.add_(GO), f


class NystromCollector:
    r"""Randomized Nyström sketch :math:`Y = G\Omega` in one pass; top-k eigenpairs at the end.

    Args:
        fmodel: The functional model.
        likelihood: An :class:`~laplace_ggn.likelihoods.OutputCurvature` (or a likelihood).
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

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Add one batch's GGN product to the sketch (``y`` marks ignored positions); returns f.

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

    @cached_property
    def _whitened(self) -> tuple[Tensor, Tensor, Tensor]:
        r"""``(r, Q, e)`` with :math:`\Sigma = \mathrm{diag}(d)[(I - QQ^\top) + Q\mathrm{diag}(e)Q^\top]\mathrm{diag}(d)`.

        r is :math:`\Lambda_0^{1/2} = 1/d`, shape ``()`` for a scalar prior and ``(P,)``
        otherwise (divided by, never inverted: d² = 1/α overflows before 1/α does); Q
        ``(P, R)`` has orthonormal columns; e ``(R,)`` lies in (0, 1].
        """
        U, lam = self.eigenvectors, self.eigenvalues
        if self.prior.is_scalar:
            a = self.prior.precision
            return a.sqrt(), U, a / self._eig_precision
        r = self.prior.diag().sqrt()
        if self.rank == 0:
            return r, U, lam
        Wt = (U / r.unsqueeze(1)) * (self.scale * lam).sqrt()  # whitened W, (P, R)
        Q1, Rm = torch.linalg.qr(Wt)
        Z, sig, _ = torch.linalg.svd(Rm)
        return r, Q1 @ Z, 1.0 / (1.0 + sig**2)

    def _sigma_rows(self, X: Tensor) -> Tensor:
        """Σ applied to the rows of ``X`` ``(M, P)`` (Σ is symmetric); shape ``(M, P)``."""
        r, Q, e = self._whitened
        Xd = X / r
        XQ = Xd @ Q
        return ((Xd - XQ @ Q.T) + (XQ * e) @ Q.T) / r

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

    def covariance_sqrt_rows(self, X: Tensor) -> Tensor:
        r"""Rows of :math:`XS` for the symmetric square root S of Σ (:math:`SS^\top = \Sigma`).

        :math:`S = \mathrm{diag}(d)[(I - QQ^\top) + Q\mathrm{diag}(e^{1/2})Q^\top]`, so quadratic
        forms :math:`x\Sigma x^\top = \|xS\|^2` computed from it are >= 0 by construction.

        Args:
            X: Rows, shape ``(M, P)``.

        Returns:
            Shape ``(M, P)``.
        """
        r, Q, e = self._whitened
        Xd = X / r
        XQ = Xd @ Q
        return (Xd - XQ @ Q.T) + (XQ * e.sqrt()) @ Q.T

    def variance(self) -> Tensor:
        r"""Diagonal of Σ, shape ``(P,)``, >= 0, in O(P·R).

        :math:`\Sigma_{pp} = d_p^2\big[(1 - \|Q_{p\cdot}\|^2) + \sum_r e_r Q_{pr}^2\big]`, with
        the projector's diagonal :math:`1 - \|Q_{p\cdot}\|^2` (in [0, 1] in exact arithmetic)
        clamped at 0 against rounding; its absolute error is about :math:`\epsilon d_p^2`.
        :meth:`to_dense` has the more accurate diagonal (squared row norms, O(P²·R)).
        """
        r, Q, e = self._whitened
        Q2 = Q**2
        return ((1.0 - Q2.sum(1)).clamp_min(0) + Q2 @ e) / r / r

    def to_dense(self) -> Tensor:
        r"""Σ = Λ⁻¹, shape ``(P, P)`` (O(P²) memory: for tests and small models).

        The diagonal of the projector :math:`I - QQ^\top` is taken as its squared row norms
        (equal in exact arithmetic, as the projector is idempotent), so that every variance
        :math:`\Sigma_{pp}` is >= 0 and accurate even when :math:`1/\alpha` is huge.
        """
        r, Q, e = self._whitened
        Ker = -(Q @ Q.T)
        Ker.diagonal().add_(1.0)
        Ker = 0.5 * (Ker + Ker.T)
        Ker.diagonal().copy_(torch.linalg.vector_norm(Ker, dim=1) ** 2)
        S = Ker + (Q * e) @ Q.T
        S = 0.5 * (S + S.T)
        if r.ndim == 0:
            return S / r / r
        return S / r.unsqueeze(1) / r.unsqueeze(0)

    def functional_covariance(self, J: Tensor) -> Tensor:
        r"""J Σ Jᵀ for Jacobians ``(B, C, P)``; returns ``(B, C, C)``.

        Computed as :math:`RR^\top + (\tilde JQe^{1/2})(\cdot)^\top` with the residual
        :math:`R = \tilde J - \tilde JQQ^\top` (see the module docstring): positive
        semi-definite by construction, with no cancellation for small prior precisions.
        """
        check_J(J, self.n_params)
        r, Q, e = self._whitened
        Jd = J / r
        JQ = Jd @ Q
        Res = Jd - JQ @ Q.T
        JQe = JQ * e.sqrt()
        return Res @ Res.transpose(1, 2) + JQe @ JQe.transpose(1, 2)

    def linear_head_covariance(self, phi: Tensor, index: Tensor) -> LowRankOutputCovariance:
        r"""J Σ Jᵀ for a Linear head, :math:`J_n = I_C \otimes \tilde\phi_n^\top`, without Jacobians.

        :math:`J_n U` is the contraction of φ̃ with U reshaped to ``(C, D, R)``; with a scalar
        prior :math:`M_n = \alpha^{-1}\|\tilde\phi_n\|^2 I + (J_nU)\,\mathrm{diag}(
        1/(s\lambda+\alpha) - 1/\alpha)\,(J_nU)^\top`, otherwise
        :math:`M_n = J_n D^{-1} J_n^\top - Y_n Y_n^\top` with
        :math:`Y_n = J_n D^{-1} W L_K^{-\top}`.  Cost O(N·C·D·R), memory O(N·C·R).

        Args:
            phi: Features entering the layer with the bias column, shape ``(N, D)``.
            index: Flat positions of ``[W b]`` in Kronecker order, shape ``(C, D)``.

        Returns:
            The factored covariances.

        Raises:
            ValueError: If the shapes do not fit.
        """
        check_head_features(phi, index, self.n_params)
        index = index.to(self.mean.device)
        C, D = index.shape
        if self.prior.is_scalar:
            a = self.prior.precision
            JU = torch.einsum("nd,cdr->ncr", phi, self.eigenvectors[index])
            d = (phi.pow(2).sum(-1, keepdim=True) / a).expand(-1, C)
            return LowRankOutputCovariance(d, JU, 1.0 / self._eig_precision - 1.0 / a)
        dinv = self._dinv[index]  # (C, D)
        JDW = torch.einsum("nd,cdr->ncr", phi, dinv.unsqueeze(-1) * self._W[index])
        Y = torch.linalg.solve_triangular(
            self._cap_chol, JDW.reshape(-1, self.rank).T, upper=False
        ).T.reshape(JDW.shape)
        w = -torch.ones(self.rank, dtype=phi.dtype, device=phi.device)
        return LowRankOutputCovariance(phi.pow(2) @ dinv.T, Y, w)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` parameter vectors θ ~ N(θ*, Σ), shape ``(n, P)``.

        Raises:
            ValueError: If ``n`` is not a positive integer.
        """
        z = standard_normal(
            n, self.n_params, dtype=self.mean.dtype, device=self.mean.device, generator=generator
        )
        r, Q, e = self._whitened
        zQ = z @ Q
        return self.mean + ((z - zQ @ Q.T) + (zQ * e.sqrt()) @ Q.T) / r

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
