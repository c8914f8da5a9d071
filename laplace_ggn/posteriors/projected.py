r"""Projected (null-space) posterior: the prior restricted to the kernel of the GGN.

Miani, Roy & Hauberg, "Bayes without Underfitting: Fully Correlated Deep Learning Posteriors
via Alternating Projections" (AISTATS 2025).  With :math:`U` ``(P, R)`` an orthonormal basis
of the range of the stacked Jacobian :math:`J^\top` (the range of the GGN, up to the softmax's
logit shifts, see below) and :math:`P_{ker} = I - UU^\top`, the posterior of a scalar prior α
is

.. math::
    \theta \sim N(\theta_*, \alpha^{-1} P_{ker}),

so every sample leaves the linearised outputs on the training inputs unchanged: the
linearised predictive on the training data is the MAP's.  It is the limit of
:math:`(sJ^\top J + \alpha I)^{-1}` as :math:`s \to \infty` (for regression
:math:`J^\top J = \sigma^2 G`: the Laplace posterior with an infinite curvature scale).  A
layerwise or per-parameter prior :math:`D` gives the same limit,

.. math::
    \Sigma = D^{-1} - D^{-1}U (U^\top D^{-1} U)^{-1} U^\top D^{-1},

the prior :math:`N(0, D^{-1})` conditioned on :math:`U^\top(\theta - \theta_*) = 0`.

**The kernel.**  :math:`\ker G = \bigcap_n \ker(L_n^\top J_n)`.  For a Gaussian or Bernoulli
likelihood :math:`\Lambda_n` is invertible and this is the kernel of the stacked Jacobian J.
For the softmax, :math:`\Lambda_n = \mathrm{diag}(p) - pp^\top` also has the kernel
:math:`\mathbf 1`, so :math:`\ker G` further holds the directions that shift every logit of a
training input by a common amount.  They include the exact symmetries of the softmax (the
output bias and the last layer's rows along :math:`\mathbf 1`), which change no prediction
anywhere; a posterior along them adds nothing to the predictive but a variance along
:math:`\mathbf 1` to every logit, which the probit link, not shift-invariant, reads as
uncertainty (on the digits benchmark it made the in-distribution NLL about 5% worse than the
MAP's).  The
projected posterior therefore uses :math:`\ker J \subseteq \ker G` for every likelihood, as
Miani et al.'s implementation does: every logit on the training inputs stays fixed.  The
rows are :math:`J_n` itself, not :math:`L_n^\top J_n`, so they do not fade as the softmax
saturates: a network that interpolates its training set (where :math:`\Lambda_n \approx 0`
and G, in floating point, constrains almost nothing) keeps its training logits, which is
what keeps the MAP's accuracy and confidence in distribution.

**Which directions count as kernel.**  ``rank=None`` takes every row (``N·C`` rows): it keeps
them while ``N·C <= P`` and takes their SVD, or accumulates the Gram matrix
:math:`J^\top J = \sum_n J_n^\top J_n` ``(P, P)`` once there are more rows than parameters and
takes its ``eigh``; either way the range is spanned by the eigenvectors whose eigenvalue
exceeds ``max(P, N·C)·eps·λ_max`` (the numerical rank).  ``rank=k`` keeps the top-k
eigenvectors of that Gram matrix from a randomised Nyström sketch (one pass, ``2·P·(k+10)``
memory), so that the kernel is the complement of the k most constrained directions.

**Evidence.**  The Laplace evidence diverges in that limit, but only through a term that does
not depend on the prior: with :math:`\log|\Lambda| = \sum_{i \le R}\log(s\lambda_i + \alpha)
+ (P - R)\log\alpha`, the first sum tends to :math:`\sum\log s\lambda_i`.  :meth:`log_det`
returns the rest, the log pseudo-determinant of :math:`\Sigma^+` (``(P - R) log α`` for a
scalar prior, :math:`\log|D| + \log|U^\top D^{-1} U|` otherwise), so the evidence is
:math:`-\ell - \tfrac\alpha2\lVert\theta_*\rVert^2 + \tfrac R2\log\alpha` + const, maximised
at :math:`\alpha = R / \lVert\theta_*\rVert^2` (MacKay's :math:`\gamma/\lVert\theta\rVert^2`
with :math:`\gamma = R` well-determined directions).  Compare evidences of this structure
across α, not with other structures.  For regression the projected posterior does not depend
on σ, and the evidence then gives the maximum-likelihood :math:`\sigma^2 = SSE/(NC)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .._checks import check_finite
from ..functional import FunctionalModel
from ..ggn import SqrtGGNRows, _symmetric_update
from ..likelihoods import OutputCurvature, as_output_curvature
from ._common import Prior, check_J, check_V, robust_cholesky, standard_normal
from .lowrank import DEFAULT_OVERSAMPLING, NystromCollector

__all__ = [
    "KernelMetric",
    "ProjectedCurvature",
    "ProjectedExactCollector",
    "ProjectedPosterior",
    "make_projected_collector",
    "projected_memory_bytes",
]


class KernelMetric:
    r"""Identity output metric: makes the GGN collectors return Jacobian rows :math:`J_n`.

    Stands in for a likelihood in the collectors (``sqrt_hessian``, ``hessian_matvec``), whose
    rows :math:`L_n^\top J_n` become :math:`J_n`, the rows whose kernel the projected
    posterior keeps (see the module docstring).
    """

    def sqrt_hessian(self, f: Tensor) -> Tensor:
        """Identity factor, shape ``(B, C, C)``."""
        B, C = f.shape
        return torch.eye(C, dtype=f.dtype, device=f.device).expand(B, C, C)

    def hessian_matvec(self, f: Tensor, u: Tensor) -> Tensor:
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
    """
    size = torch.empty((), dtype=dtype).element_size()
    if rank is None:
        return P * size
    return 2 * P * min(P, rank + DEFAULT_OVERSAMPLING) * size


def make_projected_collector(
    fmodel: FunctionalModel, likelihood, *, rank: int | None, memory_budget: int
):
    r"""Exact collector for ``rank=None``, a Nyström sketch of :math:`J^\top J` for ``rank=k``.

    ``likelihood`` (or the targets' likelihood of an
    :class:`~laplace_ggn.likelihoods.OutputCurvature`) checks the targets passed to
    ``update`` and marks ignored positions, whose Jacobian rows are left out.
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


class ProjectedExactCollector:
    r"""Every Jacobian row :math:`J_n`; SVD of the rows, or ``eigh`` of their Gram matrix.

    Rows are kept while there are at most P of them (memory P·N·C); beyond that they are
    folded into the Gram matrix :math:`J^\top J = \sum_n J_n^\top J_n` ``(P, P)``, which is
    smaller.  Both are checked against the memory budget as the data arrive.

    Args:
        fmodel: The functional model.
        metric: The :class:`KernelMetric`.
        memory_budget: Bytes allowed for the rows or the Gram matrix.

    Distributed use: :meth:`distributed_state` gathers the kept rows and sums the Gram matrix
    (present only when P×P fits the budget) and the row counts; the result equals the
    single-process fit.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        metric: KernelMetric | OutputCurvature,
        *,
        memory_budget: int,
    ):
        self.fmodel, self.metric = fmodel, metric
        self.memory_budget = int(memory_budget)
        self.rows: list[Tensor] = []
        self.gram: Tensor | None = None
        self.n_rows = 0
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
                _symmetric_update(gram, part)
            self.gram, self.rows = gram, []
        elif self.gram is not None:
            _symmetric_update(self.gram, R)
        else:
            if total * P * elt > self.memory_budget:
                raise self._too_big(f"all {total} rows of length P={P}", total * P * elt, where)
            self.rows.append(R)
        self.n_rows = total

    def finalize(self) -> ProjectedCurvature:
        r"""Eigenpairs of :math:`J^\top J` above the numerical rank threshold.

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
                _symmetric_update(gram, rows)
            lam, U = torch.linalg.eigh(gram)
            return _numerical_range(lam, U, self.n_rows)
        _, S, Wh = torch.linalg.svd(rows, full_matrices=False)
        return _numerical_range(S**2, Wh.T, self.n_rows)

    def distributed_state(self) -> dict[str, tuple[Tensor, str]]:
        """Rows to gather, the Gram matrix to sum (when P×P fits the budget), the row count."""
        P, dt, dev = self.fmodel.n_params, self.fmodel.dtype, self.fmodel.device
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, P, dtype=dt, device=dev)
        state = {
            "rows": (rows, "gather"),
            "n_rows": (torch.tensor([float(self.n_rows)], dtype=dt, device=dev), "sum"),
        }
        if P * P * rows.element_size() <= self.memory_budget:  # always so once rows were folded
            gram = self.gram if self.gram is not None else torch.zeros(P, P, dtype=dt, device=dev)
            state["gram"] = (gram, "sum")
        return state

    def load_distributed_state(self, state: dict[str, Tensor]) -> None:
        """Replace the local rows and Gram matrix with those of all ranks."""
        self.rows = [state["rows"]]
        self.gram = state.get("gram")
        self.n_rows = int(round(float(state["n_rows"].sum())))


class _TopKRange:
    r"""Top-k eigenpairs of :math:`J^\top J` from a Nyström sketch (``rank=k``)."""

    def __init__(self, nystrom: NystromCollector):
        self.nystrom = nystrom

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Add one batch to the sketch (``y`` marks ignored positions); returns the outputs."""
        return self.nystrom.update(x, where, y=y)

    def finalize(self) -> ProjectedCurvature:
        """The top-k eigenpairs, without the numerically zero ones."""
        E = self.nystrom.finalize()
        return _numerical_range(E.eigenvalues, E.eigenvectors, E.eigenvectors.shape[0])

    def distributed_state(self) -> dict[str, tuple[Tensor, str]]:
        """The partial sketch, summed."""
        return self.nystrom.distributed_state()

    def load_distributed_state(self, state: dict[str, Tensor]) -> None:
        """Replace the partial sketch with the sum over ranks."""
        self.nystrom.load_distributed_state(state)


class ProjectedPosterior:
    r"""Gaussian posterior on the kernel of the Jacobian: :math:`N(\theta_*, \alpha^{-1}P_{ker})`.

    Args:
        mean: θ*, shape ``(P,)``.
        eigenvalues: Eigenvalues of :math:`J^\top J` on its range, shape ``(R,)`` (kept for
            reports; the posterior depends on the range only).
        eigenvectors: U, an orthonormal basis of the range of :math:`J^\top`, shape ``(P, R)``.
        prior: Scalar, layerwise or per-parameter prior.
        scale: Curvature scale s = 1/(τσ²), shape ``()``; the projected posterior is its
            s → ∞ limit and does not depend on it (kept for :meth:`with_prior`).

    Example:
        >>> from laplace_ggn.functional import ParamLayout
        >>> from laplace_ggn.posteriors import make_prior
        >>> lay = ParamLayout(("w",), (torch.Size([3]),))
        >>> prior = make_prior(2.0, lay, dtype=torch.float64, device="cpu")
        >>> U = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
        >>> post = ProjectedPosterior(torch.zeros(3, dtype=torch.float64), torch.ones(1), U, prior)
        >>> post.to_dense().diagonal()
        tensor([0.0000, 0.5000, 0.5000], dtype=torch.float64)
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
        """R, the dimension of the range (P - R is the dimension of the support)."""
        return self.eigenvectors.shape[1]

    # -- factorisations ------------------------------------------------------------------------

    @cached_property
    def _dinv(self) -> Tensor:
        return 1.0 / self.prior.diag()

    @cached_property
    def _gram_chol(self) -> Tensor:
        """Cholesky factor of E = Uᵀ D⁻¹ U, shape ``(R, R)`` (non-scalar priors)."""
        U = self.eigenvectors
        E = U.T @ (U * self._dinv.unsqueeze(1))
        return robust_cholesky(E, "projected prior Gram matrix Uᵀ Λ₀⁻¹ U")

    def _sigma_rows(self, X: Tensor) -> Tensor:
        """Σ applied to the rows of ``X`` ``(M, P)`` (Σ is symmetric); shape ``(M, P)``."""
        if self.rank >= self.n_params:  # no kernel: Σ = 0 exactly
            return torch.zeros_like(X)
        U = self.eigenvectors
        if self.prior.is_scalar:
            return (X - (X @ U) @ U.T) / self.prior.precision
        Xd = X * self._dinv
        T = torch.cholesky_solve((Xd @ U).T, self._gram_chol)  # (R, M)
        return Xd - (T.T @ U.T) * self._dinv

    def _root_rows(self, X: Tensor) -> Tensor:
        r"""Rows of :math:`X S` with :math:`SS^\top = \Sigma` (Σ PSD by construction); ``(M, P)``.

        Scalar prior: :math:`S = P_{ker}/\sqrt\alpha`; otherwise :math:`S = \Sigma D^{1/2}`
        (:math:`\Sigma D\Sigma = \Sigma`).
        """
        if self.prior.is_scalar:
            return self._sigma_rows(X) * self.prior.precision.sqrt()
        return self._sigma_rows(X) * self.prior.diag().sqrt()

    # -- Posterior protocol ----------------------------------------------------------------

    def log_det(self) -> Tensor:
        r"""Log pseudo-determinant of :math:`\Sigma^+`, the precision on the support; ``()``.

        ``(P - R) log α`` for a scalar prior, :math:`\log|D| + \log|U^\top D^{-1}U|` otherwise:
        log|Λ| of the Laplace precision without its prior-independent divergent part (see the
        module docstring).
        """
        if self.prior.is_scalar:
            return (self.n_params - self.rank) * torch.log(self.prior.precision)
        return self.prior.log_det() + 2 * torch.log(torch.diagonal(self._gram_chol)).sum()

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """Σ V for ``V`` of shape ``(P,)`` or ``(P, K)``; same shape back."""
        check_V(V, self.n_params)
        W = V.unsqueeze(1) if V.ndim == 1 else V
        out = self._sigma_rows(W.T).T
        return out.squeeze(1) if V.ndim == 1 else out

    def to_dense(self) -> Tensor:
        r"""Σ, shape ``(P, P)`` (O(P²) memory: for tests and small models); singular."""
        eye = torch.eye(self.n_params, dtype=self.mean.dtype, device=self.mean.device)
        S = self._root_rows(eye)
        return S @ S.T

    def functional_covariance(self, J: Tensor) -> Tensor:
        r""":math:`J \Sigma J^\top` for Jacobians ``(B, C, P)``, without forming Σ; ``(B, C, C)``.

        Scalar prior: :math:`J_{ker}J_{ker}^\top/\alpha` with :math:`J_{ker} = J - (JU)U^\top`,
        O(B·C·P·R); a Gram matrix, so PSD in floating point too.
        """
        check_J(J, self.n_params)
        Bsz, C, P = J.shape
        A = self._root_rows(J.reshape(Bsz * C, P)).reshape(Bsz, C, P)
        return A @ A.transpose(1, 2)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draw ``n`` parameter vectors θ ~ N(θ*, Σ), shape ``(n, P)``.

        Scalar prior: :math:`\theta_* + P_{ker} z/\sqrt\alpha`; otherwise
        :math:`\theta_* + \Sigma D^{1/2} z`, whose covariance is :math:`\Sigma D \Sigma = \Sigma`.
        """
        z = standard_normal(
            n, self.n_params, dtype=self.mean.dtype, device=self.mean.device, generator=generator
        )
        if self.prior.is_scalar:
            return self.mean + self._root_rows(z)
        return self.mean + self._sigma_rows(z * self.prior.diag().sqrt())

    def with_prior(self, prior: Prior, scale: Tensor | float | None = None) -> ProjectedPosterior:
        """A new posterior with another prior; reuses the basis of the range."""
        return ProjectedPosterior(
            self.mean,
            self.eigenvalues,
            self.eigenvectors,
            prior,
            self.scale if scale is None else scale,
        )

    def state_dict(self) -> dict[str, Tensor]:
        """The basis of the range and its eigenvalues (the prior is stored by the wrapper)."""
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], mean: Tensor, prior: Prior, scale: Tensor
    ) -> ProjectedPosterior:
        """Rebuild from :meth:`state_dict`."""
        return cls(mean, state["eigenvalues"], state["eigenvectors"], prior, scale)
