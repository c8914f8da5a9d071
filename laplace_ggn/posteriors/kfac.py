r"""KFAC posterior: Kronecker-factored blocks handled exactly through their eigenbases.

For a block :math:`B \otimes A` (see :mod:`laplace_ggn.kfac`) with eigendecompositions
:math:`A = Q_A \mathrm{diag}(\lambda_A) Q_A^\top`, :math:`B = Q_B \mathrm{diag}(\lambda_B) Q_B^\top`
and :math:`Q = Q_B \otimes Q_A`, the precision of the block with a prior α on the weight is

.. math::
    \Lambda_l = Q\,\mathrm{diag}(d)\,Q^\top + \delta\,U U^\top, \qquad
    d = s\,\lambda_B \otimes \lambda_A + \alpha,

where :math:`U U^\top` selects the bias entries and :math:`\delta = \alpha_b - \alpha` is the
difference between the bias and weight precisions of a layerwise prior (0 for a scalar
prior).  :math:`U^\top Q = Q_B \otimes r^\top` with :math:`r` the bias row of :math:`Q_A`, so the
Woodbury correction is diagonal in the basis :math:`Q_B`:
:math:`w_o = \sum_j r_j^2 / d_{oj}`, :math:`\kappa_o = 1 + \delta w_o`,
:math:`c_o = \delta / \kappa_o`, and in rotated coordinates :math:`Z = Q_B^\top V Q_A` (V the
block reshaped to ``(O, D)``)

.. math::
    \tilde\Sigma Z = Z / d - \big(c \odot ((Z/d)\,r)\big)\, r^\top / d, \qquad
    \log|\Lambda_l| = \textstyle\sum \log d + \sum_o \log \kappa_o.

Because :math:`\|r\| = 1`, :math:`\kappa_o = \sum_j r_j^2 (s\lambda_{B,o}\lambda_{A,j} + \alpha_b)
/ d_{oj}` is computed as that sum of positive terms: the form :math:`1 + \delta w_o` cancels
catastrophically when the bias precision is much smaller than the weight precision (it gave
NaN evidence in float32 with α = 1e12, α_b = 1e-12).  Each output row of :math:`\tilde\Sigma`
is :math:`D_o^{-1/2}(I - c_o v v^\top)D_o^{-1/2}` with :math:`v = r/\sqrt{d_o}`, whose square root
:math:`D_o^{-1/2}(I - \gamma_o v v^\top)`, :math:`\gamma_o = (1 - \kappa_o^{-1/2})/w_o`, is
explicit; sampling and ``functional_covariance`` use it, so :math:`J\Sigma J^\top` is a sum of
squares (never negative, however small a prior precision), and so does :meth:`variance`, the
diagonal of ``to_dense``.  Sampling, ``covariance_matvec``, ``log_det`` and
``functional_covariance`` cost O(O²D + OD²) per layer and never form a P×P matrix.  Parameters
outside Kronecker blocks carry an exact diagonal block.  A per-parameter ("diagonal") prior is
refused: it is not diagonal in the Kronecker eigenbasis.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .._checks import shape_str
from ..functional import ParamLayout
from ..kfac import KFACCurvature, KroneckerBlock
from . import _output
from ._common import Prior, PriorKind, check_J, check_V, standard_normal
from ._output import EigenOutputCovariance, check_head_features

__all__ = ["KFACPosterior", "check_kfac_prior"]

_ACCEPT_DIAGONAL = "'full', 'diag' and 'lowrank'"


def check_kfac_prior(prior: Prior) -> None:
    """Refuse a per-parameter prior for KFAC.

    Raises:
        ValueError: If ``prior`` is of the diagonal (per-parameter) kind.
    """
    if prior.kind is PriorKind.DIAGONAL:
        T, P = len(prior.layout.names), prior.layout.n_params
        raise ValueError(
            f"prior_precision must be a scalar or have shape ({T},) (one per parameter tensor) "
            f"with structure='kfac'; got shape {shape_str(prior.precision.shape)} (one per "
            f"parameter, P={P}). A per-parameter prior is accepted by structure={_ACCEPT_DIAGONAL}."
        )


@dataclass(frozen=True)
class _BlockPrecision:
    r"""The precision of one block in its Kronecker eigenbasis (see the module docstring).

    Attributes:
        d: :math:`s\lambda_B \otimes \lambda_A + \alpha`, shape ``(O, D)``.
        r: Bias row of :math:`Q_A`, shape ``(D,)``; ``None`` without a weight-and-bias pair.
        w: :math:`\sum_j r_j^2/d_{oj}`, shape ``(O,)``.
        kappa: :math:`1 + \delta w_o`, computed as a sum of positive terms, shape ``(O,)``.
        c: :math:`\delta/\kappa_o`, shape ``(O,)``.
        gamma: :math:`(1 - \kappa_o^{-1/2})/w_o`, shape ``(O,)``.
    """

    d: Tensor
    r: Tensor | None = None
    w: Tensor | None = None
    kappa: Tensor | None = None
    c: Tensor | None = None
    gamma: Tensor | None = None

    @classmethod
    def of(
        cls, blk: KroneckerBlock, scale: Tensor, alpha: Tensor, alpha_b: Tensor | None
    ) -> _BlockPrecision:
        """Precision of ``blk`` with weight prior α and bias prior α_b (``None``: no pair)."""
        g = scale * blk.eigenvalues()
        d = g + alpha
        if alpha_b is None:
            return cls(d)
        r = blk.Q_A[-1]
        r2 = r**2
        w = (r2 / d).sum(-1)
        kappa = (r2 * (g + alpha_b) / d).sum(-1)  # 1 + δw without cancellation
        return cls(d, r, w, kappa, (alpha_b - alpha) / kappa, (1 - kappa.rsqrt()) / w)

    def log_det(self) -> Tensor:
        """log|Λ_l| of the block, shape ``()``."""
        out = torch.log(self.d).sum()
        return out if self.r is None else out + torch.log(self.kappa).sum()

    def sqrt_rot(self, Z: Tensor) -> Tensor:
        r"""Rows :math:`Z\tilde S` for rotated ``Z`` ``(..., O, D)``, :math:`\tilde S\tilde S^\top = \tilde\Sigma`.

        Per output row o, :math:`\tilde S_o = D_o^{-1/2}(I - \gamma_o v_o v_o^\top)`, symmetric
        up to the diagonal scaling, so :math:`Z\tilde S` is :math:`(Z/\sqrt d)(I - \gamma v v^\top)`.

        Returns:
            The rows, shape ``(..., O, D)``.
        """
        Zs = Z / self.d.sqrt()
        if self.r is None:
            return Zs
        v = self.r / self.d.sqrt()  # (O, D)
        return Zs - (self.gamma * (Zs * v).sum(-1)).unsqueeze(-1) * v

    def sigma_rot(self, Z: Tensor) -> Tensor:
        """Σ̃ Z for rotated ``Z`` of shape ``(..., O, D)``."""
        Zd = Z / self.d
        if self.r is None:
            return Zd
        y = (Zd @ self.r) * self.c  # (..., O)
        return Zd - y.unsqueeze(-1) * self.r / self.d


class KFACPosterior:
    r"""Gaussian posterior with block-diagonal KFAC precision :math:`\Lambda = sG_{KFAC} + \Lambda_0`.

    Args:
        mean: θ*, shape ``(P,)``.
        curvature: Kronecker factors and the diagonal part, from
            :class:`~laplace_ggn.collectors.KFACCollector`.
        prior: Scalar or layerwise prior.
        scale: Curvature scale s = 1/(τσ²), shape ``()``.

    Raises:
        ValueError: If the prior is per parameter.
    """

    def __init__(
        self,
        mean: Tensor,
        curvature: KFACCurvature,
        prior: Prior,
        scale: Tensor | float = 1.0,
    ):
        check_kfac_prior(prior)
        self.mean = mean
        self.curvature = curvature
        self.prior = prior
        self.scale = torch.as_tensor(scale, dtype=mean.dtype, device=mean.device)
        # the factors' eigendecompositions live on the KroneckerBlocks, shared by with_prior
        self._diag_index = curvature.diag_index().to(mean.device)

    @cached_property
    def _index(self) -> tuple[Tensor, ...]:
        """Flat positions of each block's entries in Kronecker order, shapes ``(O·D,)``."""
        layout, device = self.curvature.layout, self.mean.device
        return tuple(blk.index(layout).to(device) for blk in self.curvature.blocks)

    @property
    def n_params(self) -> int:
        """P."""
        return self.mean.shape[0]

    # -- prior per block -------------------------------------------------------------------------

    def _alpha(self, name: str) -> Tensor:
        if self.prior.kind is PriorKind.SCALAR:
            return self.prior.precision
        return self.prior.precision[self.prior.layout.names.index(name)]

    @cached_property
    def _blocks(self) -> list[_BlockPrecision]:
        """Precision of every block in its eigenbasis (prior of its weight and bias)."""
        return [
            _BlockPrecision.of(
                blk,
                self.scale,
                self._alpha(blk.weight or blk.bias),
                self._alpha(blk.bias) if blk.weight is not None and blk.bias is not None else None,
            )
            for blk in self.curvature.blocks
        ]

    @cached_property
    def _diag_precision(self) -> Tensor:
        return self.scale * self.curvature.diag + self.prior.diag()[self._diag_index]

    def _apply(self, W: Tensor, fn_block, fn_diag) -> Tensor:
        """Apply a block-diagonal map to rows ``W`` of shape ``(M, P)``."""
        out = torch.empty_like(W)
        for blk, idx, b in zip(self.curvature.blocks, self._index, self._blocks):
            Z = W[:, idx].reshape(W.shape[0], blk.n_out, blk.n_in)
            out[:, idx] = fn_block(blk, b, Z).reshape(W.shape[0], -1)
        if self._diag_index.numel():
            out[:, self._diag_index] = fn_diag(W[:, self._diag_index])
        return out

    # -- Posterior protocol ----------------------------------------------------------------------

    def log_det(self) -> Tensor:
        r"""log|Λ| of the precision Λ = s G_KFAC + Λ₀ (not of Σ), shape ``()``."""
        total = torch.log(self._diag_precision).sum()
        for b in self._blocks:
            total = total + b.log_det()
        return total

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """Σ V for ``V`` of shape ``(P,)`` or ``(P, K)``; same shape back."""
        check_V(V, self.n_params)
        W = V.unsqueeze(1) if V.ndim == 1 else V
        out = self._apply(
            W.T,
            lambda blk, b, Z: blk.unrotate(b.sigma_rot(blk.rotate(Z))),
            lambda D: D / self._diag_precision,
        ).T
        return out.squeeze(1) if V.ndim == 1 else out

    def variance(self) -> Tensor:
        r"""Diagonal of Σ, shape ``(P,)``, as squared norms (>= 0 whatever the prior).

        Entry (i, j) of a block is :math:`\sum_o Q_{B,io}^2 \|(Q_{A,j\cdot}/\sqrt{d_o})
        (I - \gamma_o v_o v_o^\top)\|^2`; memory O(O·D²) per block.

        Returns:
            The variances, shape ``(P,)``.
        """
        out = torch.empty_like(self.mean)
        for blk, idx, b in zip(self.curvature.blocks, self._index, self._blocks):
            rows = b.sqrt_rot(blk.Q_A.unsqueeze(1).expand(-1, blk.n_out, -1))  # (D, O, D)
            out[idx] = ((blk.Q_B**2) @ (rows**2).sum(-1).T).reshape(-1)
        if self._diag_index.numel():
            out[self._diag_index] = 1.0 / self._diag_precision
        return out

    def to_dense(self) -> Tensor:
        r"""Σ = Λ⁻¹, shape ``(P, P)`` (for tests and small models); its diagonal is :meth:`variance`."""
        eye = torch.eye(self.n_params, dtype=self.mean.dtype, device=self.mean.device)
        S = self.covariance_matvec(eye)
        S.diagonal().copy_(self.variance())
        return S

    def functional_covariance(self, J: Tensor) -> Tensor:
        """J Σ Jᵀ for Jacobians ``(B, C, P)``; returns ``(B, C, C)``."""
        check_J(J, self.n_params)
        Bsz, C, P = J.shape
        Jf = J.reshape(Bsz * C, P)
        out = torch.zeros(Bsz, C, C, dtype=J.dtype, device=J.device)
        for blk, idx, b in zip(self.curvature.blocks, self._index, self._blocks):
            Z = blk.rotate(Jf[:, idx].reshape(Bsz * C, blk.n_out, blk.n_in))
            Zs = b.sqrt_rot(Z).reshape(Bsz, C, -1)  # rows of J Q S̃, S̃ S̃ᵀ = Σ̃
            out = out + Zs @ Zs.transpose(1, 2)
        if self._diag_index.numel():
            Jd = J[:, :, self._diag_index]
            out = out + (Jd / self._diag_precision) @ Jd.transpose(1, 2)
        return out

    def linear_head_covariance(self, phi: Tensor, index: Tensor) -> _output.OutputCovariance:
        r"""J Σ Jᵀ for a Linear head, :math:`J_n = I_C \otimes \tilde\phi_n^\top`, without Jacobians.

        With :math:`\psi_n = Q_A^\top \tilde\phi_n`, :math:`M_n = Q_B \mathrm{diag}(e_n) Q_B^\top`,
        :math:`e_{no} = \sum_j \psi_{nj}^2/d_{oj} - c_o (\sum_j \psi_{nj} r_j/d_{oj})^2`, c ≠ 0 only
        for a layerwise prior differing between weight and bias.  With c = 0, diagonals and row
        sums cost O(N·D·C) (:class:`~laplace_ggn.posteriors._output.KronHeadFactors`), products O(N·C²).

        Args:
            phi: Features entering the layer with the bias column, shape ``(N, D)``.
            index: Flat positions of ``[W b]`` in Kronecker order, shape ``(C, D)``.

        Returns:
            The factored covariances.

        Raises:
            ValueError: If the shapes do not fit, or the posterior holds more than the head.
        """
        check_head_features(phi, index, self.n_params)
        index = index.to(self.mean.device)
        blocks = self.curvature.blocks
        if not blocks:
            var = torch.empty_like(self.mean)
            var[self._diag_index] = 1.0 / self._diag_precision
            return EigenOutputCovariance(None, phi.pow(2) @ var[index].T)
        blk, b = blocks[0], self._blocks[0]
        if len(blocks) != 1 or not torch.equal(self._index[0].reshape(index.shape), index):
            raise ValueError(
                "index must be the Kronecker index of the posterior's only block; the "
                f"posterior has {len(blocks)} blocks over P={self.n_params} parameters."
            )
        psi = phi @ blk.Q_A  # (N, D)
        if self._head_factors is not None:
            return _output.KronHeadOutputCovariance(self._head_factors, psi.pow(2))
        E = 1.0 / b.d.T  # (D, O)
        return EigenOutputCovariance(blk.Q_B, psi.pow(2) @ E - b.c * ((psi * b.r) @ E).pow(2))

    @cached_property
    def _head_factors(self) -> _output.KronHeadFactors | None:
        """K, K₁ of the one block if it has no bias correction (c = 0), else ``None``."""
        b = self._blocks[0]
        fast = b.r is None or not bool(b.c.any())
        return _output.KronHeadFactors.of(self.curvature.blocks[0].Q_B, b.d) if fast else None

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draw ``n`` parameter vectors θ ~ N(θ*, Σ), shape ``(n, P)``.

        Per output row o of a block, :math:`\tilde\Sigma_o = D_o^{-1/2}(I - c_o v v^\top)
        D_o^{-1/2}` with :math:`v = r/\sqrt{d_o}`, :math:`\|v\|^2 = w_o`; its square root is
        :math:`D_o^{-1/2}(I - \gamma_o v v^\top)`, :math:`\gamma_o = (1 - \kappa_o^{-1/2})/w_o`.

        Returns:
            The samples, shape ``(n, P)``.

        Raises:
            ValueError: If ``n`` is not a positive integer.
        """
        z = standard_normal(
            n, self.n_params, dtype=self.mean.dtype, device=self.mean.device, generator=generator
        )

        def block(blk: KroneckerBlock, b: _BlockPrecision, Z: Tensor) -> Tensor:
            if b.r is not None:  # S̃ Z: the correction before the scaling (rows use Z S̃)
                v = b.r / b.d.sqrt()  # (O, D)
                Z = Z - (b.gamma * (Z * v).sum(-1)).unsqueeze(-1) * v
            return blk.unrotate(Z / b.d.sqrt())

        return self.mean + self._apply(z, block, lambda D: D / self._diag_precision.sqrt())

    def with_prior(self, prior: Prior, scale: Tensor | float | None = None) -> KFACPosterior:
        """A new posterior with another prior (and curvature scale); reuses the eigenbases.

        Returns:
            The :class:`KFACPosterior`.

        Raises:
            ValueError: If ``prior`` is per parameter.
        """
        scale = self.scale if scale is None else scale
        return KFACPosterior(self.mean, self.curvature, prior, scale)

    # -- serialisation ---------------------------------------------------------------------------

    def spectrum(self, kind: PriorKind) -> Tensor | None:
        r"""For a scalar prior, :math:`\lambda_B \otimes \lambda_A` per block and the diagonal rest.

        Args:
            kind: The prior structure; only a scalar prior shares the Kronecker eigenbasis.

        Returns:
            λ (blocks in order, then the exactly diagonal parameters), shape ``(P,)``, or
            ``None``.
        """
        if kind is not PriorKind.SCALAR:
            return None
        parts = [blk.eigenvalues().reshape(-1) for blk in self.curvature.blocks]
        parts.append(self.curvature.diag.reshape(-1))
        return torch.cat(parts)

    def state_dict(self) -> dict[str, object]:
        """Factors, parameter names of each block, and the diagonal part."""
        state: dict[str, object] = {
            "n_blocks": len(self.curvature.blocks),
            "diag_names": list(self.curvature.diag_names),
            "diag": self.curvature.diag,
        }
        for i, blk in enumerate(self.curvature.blocks):
            state[f"block.{i}.weight"] = blk.weight
            state[f"block.{i}.bias"] = blk.bias
            state[f"block.{i}.A"] = blk.A
            state[f"block.{i}.B"] = blk.B
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict[str, object], mean: Tensor, prior: Prior, scale: Tensor
    ) -> KFACPosterior:
        """Rebuild from :meth:`state_dict`."""
        layout: ParamLayout = prior.layout
        blocks = tuple(
            KroneckerBlock(
                state[f"block.{i}.weight"],
                state[f"block.{i}.bias"],
                state[f"block.{i}.A"].to(mean.device, mean.dtype),
                state[f"block.{i}.B"].to(mean.device, mean.dtype),
            )
            for i in range(int(state["n_blocks"]))
        )
        curv = KFACCurvature(
            layout, blocks, tuple(state["diag_names"]), state["diag"].to(mean.device, mean.dtype)
        )
        return cls(mean, curv, prior, scale)
