r"""Observation models: negative log likelihood, output Hessian and its square root.

Each likelihood works on network outputs ``f`` of shape ``(B, C)``.  The output Hessian
:math:`\Lambda_n = \nabla^2_f(-\log p(y_n \mid f_n))` does not depend on ``y`` for these models,
and each has a factor :math:`L_n` with :math:`L_n L_n^\top = \Lambda_n`:

- Gaussian with noise σ: :math:`\Lambda = I/\sigma^2`, :math:`L = I/\sigma`.
- Softmax categorical: :math:`\Lambda = \mathrm{diag}(p) - p p^\top`,
  :math:`L = \mathrm{diag}(\sqrt p) - p \sqrt p^\top`.
- Bernoulli with one logit: :math:`\Lambda = p(1-p)`, :math:`L = \sqrt{p(1-p)}`.

Curvature is always collected at σ = 1 ("unit" Hessian); the posterior rescales it by
:math:`1/(\tau\sigma^2)` so that σ and the temperature τ can be tuned without a new pass.

Outputs with a position dimension, ``(B, T, C)`` (token classification, language models),
are B·T observations of C outputs each (:func:`observations`); classification targets equal
to ``ignore_index`` are skipped.  :class:`OutputCurvature` turns the outputs of a batch into
the square-root factor that every curvature collector back-propagates: the exact
:math:`L_n` (one column per output) or Monte-Carlo columns from labels sampled from the
model (one column per draw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import Curvature, Likelihood, shape_str

__all__ = [
    "Gaussian",
    "Categorical",
    "Bernoulli",
    "FitStatistics",
    "OutputCurvature",
    "get_likelihood",
    "observations",
]

DEFAULT_IGNORE_INDEX = -100


@dataclass(frozen=True)
class FitStatistics:
    """Sufficient statistics of the training loss at θ*, enough to recompute ℓ(θ*) for any σ.

    Attributes:
        n_data: Number of training points N (kept positions for outputs ``(B, T, C)``).
        n_outputs: Number of outputs C.
        loss_sum: Summed NLL (classification) or summed squared error Σ‖y - f‖² (regression).
        output_ndim: 2 for outputs ``(B, C)``, 3 for ``(B, T, C)``.
    """

    n_data: int
    n_outputs: int
    loss_sum: float
    output_ndim: int = 2


class Gaussian:
    r"""Gaussian likelihood :math:`y \sim N(f, \sigma^2 I)`; targets of the output's shape."""

    kind = Likelihood.REGRESSION

    def check_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Return ``y`` reshaped to ``f``'s shape ``(B, C)``.

        Raises:
            ValueError: If ``y`` does not have the shape of ``f`` (or ``(B,)`` when C = 1).
        """
        loc = f" ({where})" if where else ""
        if not y.is_floating_point():
            y = y.to(f.dtype)
        if y.shape == f.shape:
            return y
        if f.shape[1] == 1 and y.shape == f.shape[:1]:
            return y.unsqueeze(1)
        raise ValueError(
            f"regression targets{loc} must have the output's shape {shape_str(f.shape)}"
            + (f" or ({f.shape[0]},)" if f.shape[1] == 1 else "")
            + f"; got {shape_str(y.shape)}."
        )

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed squared error Σ‖y - f‖², shape ``()``."""
        return ((y - f) ** 2).sum()

    @staticmethod
    def nll_from_statistics(stats: FitStatistics, sigma: Tensor) -> Tensor:
        r"""Summed NLL :math:`\frac{SSE}{2\sigma^2} + \frac{NC}{2}\log(2\pi\sigma^2)`, differentiable in σ."""
        nc = stats.n_data * stats.n_outputs
        return 0.5 * stats.loss_sum / sigma**2 + 0.5 * nc * torch.log(2 * math.pi * sigma**2)

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed negative log likelihood, shape ``()``."""
        sigma = torch.as_tensor(sigma, dtype=f.dtype, device=f.device)
        n = f.numel()
        return 0.5 * ((y - f) ** 2).sum() / sigma**2 + 0.5 * n * torch.log(2 * math.pi * sigma**2)

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∂ℓ/∂f at σ = 1, shape ``(B, C)``."""
        return f - y

    def hessian(self, f: Tensor) -> Tensor:
        """Unit output Hessian ``I``, shape ``(B, C, C)``."""
        B, C = f.shape
        return torch.eye(C, dtype=f.dtype, device=f.device).expand(B, C, C)

    def sqrt_hessian(self, f: Tensor) -> Tensor:
        """Factor ``L`` with ``L Lᵀ = Λ`` (σ = 1), shape ``(B, C, C)``."""
        return self.hessian(f)

    def hessian_matvec(self, f: Tensor, u: Tensor) -> Tensor:
        """``Λ_n u_n`` for each n, shapes ``(B, C)``."""
        return u

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Draw ``y ~ N(f, σ² I)``, shape ``(B, C)``."""
        eps = torch.randn(f.shape, dtype=f.dtype, device=f.device, generator=generator)
        return f + sigma * eps


class Categorical:
    """Softmax categorical likelihood; targets are class indices ``(B,)`` in ``[0, C)``."""

    kind = Likelihood.CLASSIFICATION

    def check_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Return integer labels of shape ``(B,)`` and dtype ``torch.long``.

        Labels of any integer dtype (and ``bool``, as classes 0 and 1) are accepted, as are
        floating labels holding whole numbers.

        Raises:
            ValueError: If labels are not finite, not integral, of the wrong shape, or out of
                range.
        """
        loc = f" ({where})" if where else ""
        B, C = f.shape
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.shape != (B,):
            raise ValueError(
                f"classification targets{loc} must be class indices of shape ({B},); "
                f"got {shape_str(y.shape)}. One-hot targets are not accepted: use y.argmax(-1)."
            )
        if y.is_floating_point():
            finite = torch.isfinite(y)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(y).sum())
                raise ValueError(
                    f"classification targets{loc} must be finite class indices; got {n_nan} NaN "
                    f"and {int((~finite).sum()) - n_nan} Inf values."
                )
            if not bool((y == y.round()).all()):
                raise ValueError(
                    f"classification targets{loc} must be integer class indices; got "
                    f"non-integral values of dtype {y.dtype}."
                )
            y = y.long()
        elif y.dtype != torch.long:
            y = y.long()  # int8/16/32, uint8, bool: the losses need int64 indices
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
            raise ValueError(
                f"classification targets{loc} must lie in [0, {C - 1}] for a model with {C} "
                f"outputs; got values in [{int(y.min())}, {int(y.max())}]."
            )
        return y

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed cross-entropy, shape ``()``."""
        return F.cross_entropy(f, y, reduction="sum")

    @staticmethod
    def nll_from_statistics(stats: FitStatistics, sigma: Tensor) -> Tensor:
        """Summed NLL (σ plays no role)."""
        return torch.as_tensor(stats.loss_sum, dtype=sigma.dtype, device=sigma.device)

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed cross-entropy, shape ``()``."""
        return F.cross_entropy(f, y, reduction="sum")

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∂ℓ/∂f = softmax(f) - onehot(y), shape ``(B, C)``."""
        return torch.softmax(f, -1) - F.one_hot(y, f.shape[1]).to(f.dtype)

    def hessian(self, f: Tensor) -> Tensor:
        """``diag(p) - p pᵀ``, shape ``(B, C, C)``."""
        p = torch.softmax(f, -1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)

    def sqrt_hessian(self, f: Tensor) -> Tensor:
        """``diag(√p) - p √pᵀ``, shape ``(B, C, C)``; ``L Lᵀ = Λ``."""
        p = torch.softmax(f, -1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1)

    def hessian_matvec(self, f: Tensor, u: Tensor) -> Tensor:
        """``Λ_n u_n = p ⊙ u - p (pᵀu)``, shapes ``(B, C)``."""
        p = torch.softmax(f, -1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Draw labels from softmax(f), shape ``(B,)``."""
        p = torch.softmax(f, -1)
        return torch.multinomial(p, 1, generator=generator)[:, 0]


class Bernoulli:
    """Bernoulli likelihood on a single logit ``(B, 1)``; targets 0/1 of shape ``(B,)``."""

    kind = Likelihood.BINARY

    def check_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Return float targets of shape ``(B, 1)``.

        Raises:
            ValueError: If the model has more than one output, or targets are not 0/1.
        """
        loc = f" ({where})" if where else ""
        B, C = f.shape
        if C != 1:
            raise ValueError(
                f"binary likelihood needs a model with 1 output (a logit); got {C} outputs. "
                "Use likelihood='classification' for several classes."
            )
        if y.shape not in ((B,), (B, 1)):
            raise ValueError(
                f"binary targets{loc} must have shape ({B},) or ({B}, 1); got {shape_str(y.shape)}."
            )
        y = y.reshape(B, 1).to(f.dtype)
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(f"binary targets{loc} must be 0 or 1; got other values.")
        return y

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed binary cross-entropy, shape ``()``."""
        return F.binary_cross_entropy_with_logits(f, y, reduction="sum")

    @staticmethod
    def nll_from_statistics(stats: FitStatistics, sigma: Tensor) -> Tensor:
        """Summed NLL (σ plays no role)."""
        return Categorical.nll_from_statistics(stats, sigma)

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed binary cross-entropy, shape ``()``."""
        return F.binary_cross_entropy_with_logits(f, y, reduction="sum")

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∂ℓ/∂f = σ(f) - y, shape ``(B, 1)``."""
        return torch.sigmoid(f) - y

    def hessian(self, f: Tensor) -> Tensor:
        """``p(1-p)``, shape ``(B, 1, 1)``."""
        p = torch.sigmoid(f)
        return (p * (1 - p)).unsqueeze(-1)

    def sqrt_hessian(self, f: Tensor) -> Tensor:
        """``√(p(1-p))``, shape ``(B, 1, 1)``."""
        return self.hessian(f).sqrt()

    def hessian_matvec(self, f: Tensor, u: Tensor) -> Tensor:
        """``p(1-p) u``, shapes ``(B, 1)``."""
        p = torch.sigmoid(f)
        return p * (1 - p) * u

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Draw 0/1 targets, shape ``(B, 1)``."""
        return torch.bernoulli(torch.sigmoid(f), generator=generator)


def get_likelihood(kind: Likelihood) -> Gaussian | Categorical | Bernoulli:
    """Return the likelihood object for a :class:`~laplace_ggn._checks.Likelihood` member."""
    return {
        Likelihood.REGRESSION: Gaussian,
        Likelihood.CLASSIFICATION: Categorical,
        Likelihood.BINARY: Bernoulli,
    }[kind]()


# ---------------------------------------------------------------------------------------------
# Observations of a batch, and the square-root factor the collectors back-propagate
# ---------------------------------------------------------------------------------------------


def observations(
    lik: Gaussian | Categorical | Bernoulli,
    f: Tensor,
    y: Tensor,
    *,
    ignore_index: int | None = DEFAULT_IGNORE_INDEX,
    where: str = "",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Flatten a batch to one row per observation and drop ignored targets.

    Outputs ``(B, C)`` are B observations; outputs ``(B, T, C)`` are B·T, one per position,
    with targets ``(B, T)`` (class indices, or 0/1 for a binary model) or ``(B, T, C)``
    (regression; ``(B, T)`` when C = 1). Classification and binary targets equal to
    ``ignore_index`` are skipped (in the loss, N and the curvature).

    Args:
        lik: The likelihood (checks the kept targets).
        f: Outputs, shape ``(B, C)`` or ``(B, T, C)``.
        y: Targets of the batch.
        ignore_index: Target value to skip (``None``: skip nothing; regression never skips).
        where: Location for error messages, e.g. ``"batch 3"``.

    Returns:
        ``(f_obs, y_obs, mask)``: kept outputs ``(n, C)``, their targets as
        ``lik.check_targets`` returns them, and the kept positions ``f.shape[:-1]`` as a
        boolean mask (``None`` when every position is kept).

    Raises:
        ValueError: If the targets do not fit the outputs or the likelihood.
    """
    C = f.shape[-1]
    lead = f.shape[:-1]
    y2 = y
    if f.ndim > 2:
        regression = lik.kind is Likelihood.REGRESSION
        shapes = [tuple(f.shape)] if regression else [tuple(lead), (*lead, 1)]
        if regression and C == 1:
            shapes.append(tuple(lead))
        if tuple(y.shape) not in shapes:
            loc = f" ({where})" if where else ""
            want = " or ".join(shape_str(s) for s in shapes)
            raise ValueError(
                f"{lik.kind.value} targets{loc} must have shape {want} for outputs of shape "
                f"{shape_str(f.shape)} (one target per position); got {shape_str(y.shape)}."
            )
        y2 = y.reshape(-1, C) if regression and y.shape == f.shape else y.reshape(-1)
    f2 = f.reshape(-1, C)
    mask = None
    n = f2.shape[0]
    if lik.kind is not Likelihood.REGRESSION and ignore_index is not None and y2.numel() == n:
        ignored = (y2 == ignore_index).reshape(n)
        if bool(ignored.any()):
            keep = ~ignored
            f2, y2, mask = f2[keep], y2.reshape(n)[keep], keep.reshape(lead)
    return f2, lik.check_targets(f2, y2, where), mask


class OutputCurvature:
    r"""The square-root factor of the output Hessians that curvature collectors back-propagate.

    For outputs ``f`` of shape ``(B, C)`` or ``(B, T, C)`` (M = T·C outputs per sample; T = 1
    for ``(B, C)``), :meth:`factor` returns ``L`` of shape ``(B, M, K)`` with

    .. math::
        \mathbb E\big[L_n L_n^\top\big] = \mathrm{blockdiag}_t(\Lambda_{nt}),

    so that :math:`\sum_n J_n^\top L_n L_n^\top J_n` is the GGN (exact) or an unbiased
    estimate of it (Monte Carlo):

    - ``Curvature.GGN``: K = M, :math:`L_n = \mathrm{blockdiag}_t(L_{nt})` with the
      likelihood's exact factor (:math:`L_{nt}L_{nt}^\top = \Lambda_{nt}`).
    - ``Curvature.MC``: K = S, column s is :math:`[\nabla_f \log p(\hat y_{nts} \mid
      f_{nt})]_t / \sqrt S` with labels :math:`\hat y_{nts}` drawn from the model's predictive,
      independently for every position and draw.  The score has mean zero and covariance
      :math:`\Lambda_{nt}` (the Fisher equals the GGN for these likelihoods), so cross terms
      between positions vanish in expectation; cost and memory scale with S instead of C.

    Positions whose target is ignored (``mask`` False) get zero rows.

    Args:
        likelihood: The likelihood object.
        curvature: ``Curvature.GGN`` or ``Curvature.MC``.
        n_samples: S, the Monte-Carlo columns per sample (``mc`` only).
        generator: Random generator of the label draws (``mc`` only), on the outputs' device.
        ignore_index: Target value to skip (classification and binary).
        targets: The likelihood that checks targets and marks ignored positions, when the
            factor comes from another output metric (default: ``likelihood``).

    Raises:
        ValueError: If ``n_samples`` is not a positive integer.
        TypeError: If ``generator`` is not a ``torch.Generator``.
    """

    def __init__(
        self,
        likelihood: Gaussian | Categorical | Bernoulli,
        *,
        curvature: Curvature = Curvature.GGN,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        ignore_index: int | None = DEFAULT_IGNORE_INDEX,
        targets: Gaussian | Categorical | Bernoulli | None = None,
    ):
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_mc_samples must be a positive integer; got {n_samples!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None; got {type(generator).__name__}."
            )
        self.likelihood = likelihood
        self.curvature = Curvature(curvature)
        self.n_samples = n_samples
        self.generator = generator
        self.ignore_index = ignore_index
        self.targets = likelihood if targets is None else targets

    @property
    def mc(self) -> bool:
        """Whether the factor is a Monte-Carlo estimate."""
        return self.curvature is Curvature.MC

    def mask(self, f: Tensor, y: Tensor | None, where: str = "") -> Tensor | None:
        """Kept positions ``f.shape[:-1]`` for targets ``y`` (``None``: all kept).

        Raises:
            ValueError: If the targets do not fit the outputs (see :func:`observations`).
        """
        if y is None:
            return None
        y = y.to(f.device)
        return observations(self.targets, f, y, ignore_index=self.ignore_index, where=where)[2]

    def n_columns(self, f: Tensor) -> int:
        """K, the columns of :meth:`factor` for outputs ``f``."""
        return self.n_samples if self.mc else f[0].numel()

    def factor(self, f: Tensor, mask: Tensor | None = None) -> Tensor:
        """The factor ``L`` of the batch, shape ``(B, M, K)`` (see the class docstring).

        Args:
            f: Outputs, shape ``(B, C)`` or ``(B, T, C)`` (detached).
            mask: Kept positions, shape ``f.shape[:-1]``, or ``None``.

        Returns:
            Shape ``(B, M, K)``, M = T·C.
        """
        f = f.detach()
        B, C = f.shape[0], f.shape[-1]
        M = f[0].numel()
        T = M // C
        f2 = f.reshape(-1, C)
        keep = None if mask is None else mask.reshape(-1, 1).to(f.dtype)
        if self.mc:
            S = self.n_samples
            g = self._neg_scores(f2, S)  # (S, B·T, C)
            if keep is not None:
                g = g * keep
            return g.reshape(S, B, M).permute(1, 2, 0) / math.sqrt(S)
        L = self.likelihood.sqrt_hessian(f2)  # (B·T, C, C)
        if keep is not None:
            L = L * keep.unsqueeze(-1)
        if T == 1:
            return L.reshape(B, C, C)
        eye = torch.eye(T, dtype=f.dtype, device=f.device)
        return torch.einsum("btcd,ts->btcsd", L.reshape(B, T, C, C), eye).reshape(B, M, M)

    def _neg_scores(self, f2: Tensor, S: int) -> Tensor:
        r""":math:`-\nabla_f \log p(\hat y \mid f)` for S labels drawn per row of ``f2`` ``(n, C)``.

        Returns:
            Shape ``(S, n, C)``.
        """
        n, C = f2.shape
        kw = {"dtype": f2.dtype, "device": f2.device, "generator": self.generator}
        kind = self.likelihood.kind
        if kind is Likelihood.REGRESSION:  # y = f + ε at unit noise: f - y = -ε
            return -torch.randn(S, n, C, **kw)
        if kind is Likelihood.BINARY:
            p = torch.sigmoid(f2)
            u = torch.rand(S, n, C, **kw)
            return p - (u < p).to(f2.dtype)
        # softmax: labels by inverse CDF, then p - onehot(y)
        p = torch.softmax(f2, -1)
        u = torch.rand(n, S, **kw)
        y = torch.searchsorted(p.cumsum(-1), u).clamp_max(C - 1)  # (n, S)
        g = p.unsqueeze(0).repeat(S, 1, 1)
        g.scatter_add_(
            -1, y.T.unsqueeze(-1), torch.full((S, n, 1), -1.0, dtype=f2.dtype, device=f2.device)
        )
        return g

    def hessian_diagonal(self, f: Tensor, mask: Tensor | None = None) -> Tensor:
        r"""Per position the diagonal of :math:`L_{nt} L_{nt}^\top`, shape ``(B·T, C)``.

        Exact: :math:`\mathrm{diag}(\Lambda_{nt})` in closed form, O(C) per position (no factor
        is formed); MC: the squared draws summed over the S columns.  Ignored positions give
        zero rows.
        """
        f = f.detach()
        C = f.shape[-1]
        keep = None if mask is None else mask.reshape(-1, 1).to(f.dtype)
        if self.mc:
            L = self.factor(f, mask).reshape(-1, C, self.n_samples)
            return L.pow(2).sum(-1)
        f2 = f.reshape(-1, C)
        kind = self.likelihood.kind
        if kind is Likelihood.REGRESSION:
            d = torch.ones_like(f2)
        elif kind is Likelihood.CLASSIFICATION:
            p = torch.softmax(f2, -1)
            d = p - p * p
        else:
            p = torch.sigmoid(f2)
            d = p * (1 - p)
        return d if keep is None else d * keep

    def gram(self, f: Tensor, mask: Tensor | None = None, L: Tensor | None = None) -> Tensor:
        r""":math:`\sum_{n,t} L_{nt} L_{nt}^\top` over kept positions, shape ``(C, C)``.

        Exact: :math:`\sum \Lambda_{nt}` in closed form, O(C²) per position instead of the
        O(C³) of the factor's product; MC: from the draws ``L`` ``(B, T·C, S)`` (drawn here
        if ``None``).
        """
        f = f.detach()
        C = f.shape[-1]
        if self.mc:
            L = self.factor(f, mask) if L is None else L
            L = L.reshape(-1, C, L.shape[-1])
            return torch.einsum("ncs,nds->cd", L, L)
        f2 = f.reshape(-1, C)
        w = (
            torch.ones(f2.shape[0], 1, dtype=f.dtype, device=f.device)
            if mask is None
            else mask.reshape(-1, 1).to(f.dtype)
        )
        kind = self.likelihood.kind
        if kind is Likelihood.REGRESSION:
            return w.sum() * torch.eye(C, dtype=f.dtype, device=f.device)
        p = torch.softmax(f2, -1) if kind is Likelihood.CLASSIFICATION else torch.sigmoid(f2)
        if kind is Likelihood.BINARY:
            return (w * p * (1 - p)).sum(0, keepdim=True)
        return torch.diag((w * p).sum(0)) - (w * p).T @ p

    def hessian_matvec_fn(self, f: Tensor, mask: Tensor | None = None):
        r"""The product :math:`U \mapsto \Lambda U` of the batch (the MC estimate for ``mc``).

        Args:
            f: Outputs, shape ``(B, C)`` or ``(B, T, C)`` (detached).
            mask: Kept positions, shape ``f.shape[:-1]``, or ``None``.

        Returns:
            A function of ``U`` of shape ``(..., *f.shape)`` returning the same shape.  For
            ``mc`` every call uses the same draws (taken here, once).
        """
        f = f.detach()
        if not self.mc:
            keep = None if mask is None else mask.unsqueeze(-1).to(f.dtype)

            def exact(U: Tensor) -> Tensor:
                out = self.likelihood.hessian_matvec(f, U)
                return out if keep is None else out * keep

            return exact
        L = self.factor(f, mask)  # (B, M, S)
        B, M = L.shape[:2]

        def sampled(U: Tensor) -> Tensor:
            Uf = U.reshape(*U.shape[: U.ndim - f.ndim], B, M)
            t = torch.einsum("bms,...bm->...bs", L, Uf)
            return torch.einsum("bms,...bs->...bm", L, t).reshape(U.shape)

        return sampled


def as_output_curvature(
    likelihood: OutputCurvature | Gaussian | Categorical | Bernoulli,
    *,
    mc: bool = False,
    generator: torch.Generator | None = None,
) -> OutputCurvature:
    """``likelihood`` if it is an :class:`OutputCurvature`, else its exact (or one-draw MC) factor."""
    if isinstance(likelihood, OutputCurvature):
        return likelihood
    kind = Curvature.MC if mc else Curvature.GGN
    return OutputCurvature(likelihood, curvature=kind, generator=generator)
