r"""Observations of a batch and the square-root factor of the output Hessians.

Outputs with a position dimension, ``(B, T, C)`` (token classification, language models),
are B·T observations of C outputs each (:func:`observations`); classification targets equal
to ``ignore_index`` are skipped.  :class:`OutputCurvature` turns the outputs of a batch into
the square-root factor that every curvature collector back-propagates: the exact
:math:`L_n` (one column per output) or Monte-Carlo columns from labels sampled from the
model (one column per draw).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import Curvature
from ._base import DEFAULT_IGNORE_INDEX
from .bernoulli import Bernoulli
from .categorical import Categorical
from .gaussian import Gaussian

__all__ = ["OutputCurvature", "as_output_curvature", "observations"]

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
    y2 = lik.position_targets(f, y, where) if f.ndim > 2 else y
    f2 = f.reshape(-1, C)
    mask = None
    n = f2.shape[0]
    ignored = lik.ignored(y2, n, ignore_index)
    if ignored is not None:
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

        Returns:
            A boolean mask of shape ``f.shape[:-1]``, or ``None``.

        Raises:
            ValueError: If the targets do not fit the outputs (see :func:`observations`).
        """
        if y is None:
            return None
        y = y.to(f.device)
        return observations(self.targets, f, y, ignore_index=self.ignore_index, where=where)[2]

    def row_targets(self, f: Tensor, y: Tensor | None, where: str = "") -> Tensor | None:
        """The checked targets of every row ``(B·T, ...)``, if the curvature depends on them.

        Returns:
            ``None`` when the likelihood's output curvature does not depend on the targets
            (or for Monte-Carlo draws); else the targets, one row per output row.

        Raises:
            ValueError: If ``y`` is ``None`` but needed, or does not fit the outputs.
        """
        lik = self.likelihood
        if self.mc or not getattr(lik, "needs_targets", False):
            return None
        if y is None:
            raise ValueError(
                f"y must be given for likelihood {lik.name!r}; got None. Its output curvature "
                "depends on the targets."
            )
        y = y.to(f.device)
        y2 = lik.position_targets(f, y, where) if f.ndim > 2 else y
        return lik.check_targets(f.reshape(-1, f.shape[-1]), y2, where)

    def factor(self, f: Tensor, mask: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """The factor ``L`` of the batch, shape ``(B, M, K)`` (see the class docstring).

        Args:
            f: Outputs, shape ``(B, C)`` or ``(B, T, C)`` (detached).
            mask: Kept positions, shape ``f.shape[:-1]``, or ``None``.
            y: Targets of the batch (used when the curvature depends on them).

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
        L = self.likelihood.sqrt_hessian(f2, self.row_targets(f, y))  # (B·T, C, K)
        if keep is not None:
            L = L * keep.unsqueeze(-1)
        K = L.shape[-1]
        if T == 1:
            return L.reshape(B, C, K)
        eye = torch.eye(T, dtype=f.dtype, device=f.device)
        return torch.einsum("btck,ts->btcsk", L.reshape(B, T, C, K), eye).reshape(B, M, T * K)

    def _neg_scores(self, f2: Tensor, S: int) -> Tensor:
        r""":math:`-\nabla_f \log p(\hat y \mid f)` for S labels drawn per row of ``f2`` ``(n, C)``.

        Returns:
            Shape ``(S, n, C)``.
        """
        return self.likelihood.neg_scores(f2, S, self.generator)

    def hessian_diagonal(
        self, f: Tensor, mask: Tensor | None = None, y: Tensor | None = None
    ) -> Tensor:
        r"""Per position the diagonal of :math:`L_{nt} L_{nt}^\top`, shape ``(B·T, C)``.

        Exact: :math:`\mathrm{diag}(\Lambda_{nt})` in closed form, O(C) per position (no factor
        is formed); MC: the squared draws summed over the S columns.  Ignored positions give
        zero rows.

        Returns:
            The diagonals, shape ``(B·T, C)``.
        """
        f = f.detach()
        C = f.shape[-1]
        keep = None if mask is None else mask.reshape(-1, 1).to(f.dtype)
        if self.mc:
            L = self.factor(f, mask).reshape(-1, C, self.n_samples)
            return L.pow(2).sum(-1)
        f2 = f.reshape(-1, C)
        d = self.likelihood.hessian_diagonal(f2, self.row_targets(f, y))
        return d if keep is None else d * keep

    def gram(
        self,
        f: Tensor,
        mask: Tensor | None = None,
        L: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        r""":math:`\sum_{n,t} L_{nt} L_{nt}^\top` over kept positions, shape ``(C, C)``.

        Exact: :math:`\sum \Lambda_{nt}` in closed form, O(C²) per position instead of the
        O(C³) of the factor's product; MC: from the draws ``L`` ``(B, T·C, S)`` (drawn here
        if ``None``).

        Returns:
            The summed output Hessian, shape ``(C, C)``.
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
        return self.likelihood.hessian_sum(f2, w, self.row_targets(f, y))

    def hessian_matvec_fn(self, f: Tensor, mask: Tensor | None = None, y: Tensor | None = None):
        r"""The product :math:`U \mapsto \Lambda U` of the batch (the MC estimate for ``mc``).

        Args:
            f: Outputs, shape ``(B, C)`` or ``(B, T, C)`` (detached).
            mask: Kept positions, shape ``f.shape[:-1]``, or ``None``.
            y: Targets of the batch (used when the curvature depends on them).

        Returns:
            A function of ``U`` of shape ``(..., *f.shape)`` returning the same shape.  For
            ``mc`` every call uses the same draws (taken here, once).
        """
        f = f.detach()
        if not self.mc:
            keep = None if mask is None else mask.unsqueeze(-1).to(f.dtype)
            yr = self.row_targets(f, y)

            def exact(U: Tensor) -> Tensor:
                out = self.likelihood.hessian_matvec(f, U, yr)
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
