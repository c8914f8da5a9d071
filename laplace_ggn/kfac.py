r"""Kronecker factors of the GGN for ``nn.Linear`` and ``nn.Conv2d`` layers ("type-2", exact B).

For a layer with input features :math:`\tilde a = [a; 1]` (the 1 only when the bias is in the
subset) and output :math:`z = W \tilde a`, the per-sample gradient of the GGN square root
column :math:`c` is :math:`g_{nc} \otimes \tilde a_n` with :math:`g_{nc} = \partial z/\partial f
\cdot (L_n)_{:c}`.  KFAC approximates the layer's GGN block

.. math::
    G_l = \sum_n \Big(\sum_c g_{nc} g_{nc}^\top\Big) \otimes \tilde a_n \tilde a_n^\top
        \approx B_l \otimes A_l, \qquad
    A_l = \sum_n \tilde a_n \tilde a_n^\top, \quad
    B_l = \frac1N \sum_n \sum_c g_{nc} g_{nc}^\top,

written in the order of the row-major flattening of :math:`[W\ b]` (output index slow, input
index fast), which is why ``B`` comes first in the Kronecker product.  The normalisation (A a
sum, B a mean) makes KFAC exact whenever :math:`\sum_c g_{nc} g_{nc}^\top` does not depend on n,
e.g. for the last layer of a regression net, or every layer of a deep linear net with MSE.

The factors are collected by :class:`~laplace_ggn.collectors.KFACCollector`; one
:class:`KroneckerBlock` holds a layer's pair with its eigendecomposition, which the KFAC
posterior, :func:`~laplace_ggn.linalg.inverse_matvec` and
:class:`~laplace_ggn.optim.NaturalGradient` use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from .functional import ParamLayout

__all__ = ["KFACCurvature", "KroneckerBlock", "kfac_factor_bytes", "kron_index"]


@dataclass(frozen=True)
class KroneckerBlock:
    r"""One Kronecker block :math:`B \otimes A` of the GGN, with its eigendecomposition.

    The eigendecompositions :math:`A = Q_A \mathrm{diag}(\lambda_A) Q_A^\top` and
    :math:`B = Q_B \mathrm{diag}(\lambda_B) Q_B^\top` (eigenvalues clamped at 0: the factors
    are PSD, negative values are rounding) are computed on first use and kept, so every
    posterior that shares the block shares them.  With :math:`Q = Q_B \otimes Q_A` the block is
    :math:`Q\,\mathrm{diag}(\lambda_B \otimes \lambda_A)\,Q^\top`; vectors of the block are
    handled as ``(..., O, D)`` matrices ``V`` (row-major ``vec``), on which
    :math:`Q^\top \mathrm{vec}(V) = \mathrm{vec}(Q_B^\top V Q_A)`.

    Attributes:
        weight: Name of the weight in the subset, or ``None`` (bias-only block).
        bias: Name of the bias in the subset, or ``None``.
        A: Input factor, shape ``(D, D)`` with D = I (+1 with a bias; D = 1 bias-only).
        B: Output factor, shape ``(O, O)``.

    Example:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> blk = KroneckerBlock("w", None, A, 3 * torch.eye(1, dtype=torch.float64))
        >>> blk.inverse_matvec(torch.ones(1, 2, dtype=torch.float64), damping=1.0)
        tensor([[0.1429, 0.2500]], dtype=torch.float64)
    """

    weight: str | None
    bias: str | None
    A: Tensor
    B: Tensor

    @property
    def n_out(self) -> int:
        """O."""
        return self.B.shape[0]

    @property
    def n_in(self) -> int:
        """D, the input side including the bias column."""
        return self.A.shape[0]

    def index(self, layout: ParamLayout) -> Tensor:
        """Flat positions of the block's entries in Kronecker order, shape ``(O·D,)``.

        Entry ``o·D + j`` of the Kronecker-ordered block is ``W[o, j]`` for ``j < I`` and
        ``b[o]`` for ``j = I``; the result maps it to its place in the flat parameter vector.

        Returns:
            The positions, shape ``(O·D,)``.
        """
        return kron_index(layout, self.weight, self.bias, self.n_out, self.n_in).reshape(-1)

    def to(self, dtype: torch.dtype) -> KroneckerBlock:
        """The block with factors of ``dtype`` (itself if they already are)."""
        if self.A.dtype == dtype and self.B.dtype == dtype:
            return self
        return KroneckerBlock(self.weight, self.bias, self.A.to(dtype), self.B.to(dtype))

    # -- eigendecomposition ------------------------------------------------------------------

    @cached_property
    def _eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lam_A, Q_A = torch.linalg.eigh(self.A)
        lam_B, Q_B = torch.linalg.eigh(self.B)
        return lam_A.clamp_min(0), Q_A, lam_B.clamp_min(0), Q_B

    @property
    def lam_A(self) -> Tensor:
        """Eigenvalues of A, shape ``(D,)``, ascending, >= 0."""
        return self._eigh[0]

    @property
    def Q_A(self) -> Tensor:
        """Eigenvectors of A (columns), shape ``(D, D)``."""
        return self._eigh[1]

    @property
    def lam_B(self) -> Tensor:
        """Eigenvalues of B, shape ``(O,)``, ascending, >= 0."""
        return self._eigh[2]

    @property
    def Q_B(self) -> Tensor:
        """Eigenvectors of B (columns), shape ``(O, O)``."""
        return self._eigh[3]

    def eigenvalues(self) -> Tensor:
        r""":math:`\lambda_B \otimes \lambda_A` as a matrix, shape ``(O, D)``."""
        return torch.outer(self.lam_B, self.lam_A)

    def rotate(self, V: Tensor) -> Tensor:
        r""":math:`Q_B^\top V Q_A` for ``V`` ``(..., O, D)``: coordinates in the eigenbasis."""
        return self.Q_B.T @ V @ self.Q_A

    def unrotate(self, Z: Tensor) -> Tensor:
        r""":math:`Q_B Z Q_A^\top` for ``Z`` of shape ``(..., O, D)``: back from the eigenbasis."""
        return self.Q_B @ Z @ self.Q_A.T

    # -- damped algebra ----------------------------------------------------------------------

    def inverse_matvec(
        self, V: Tensor, damping: float | Tensor = 0.0, scale: float | Tensor = 1.0
    ) -> Tensor:
        r"""Solve :math:`(s\,B \otimes A + \delta I)\,\mathrm{vec}(X) = \mathrm{vec}(V)`.

        .. math::
            X = Q_B \big[(Q_B^\top V Q_A) \oslash (s\,\lambda_B \lambda_A^\top + \delta)\big]
                Q_A^\top.

        Args:
            V: Block vectors, shape ``(..., O, D)``.
            damping: δ >= 0 (use δ > 0 when a factor is singular).
            scale: s, the curvature scale.

        Returns:
            X, shape ``(..., O, D)``.
        """
        return self.unrotate(self.rotate(V) / (scale * self.eigenvalues() + damping))

    def log_det(self, damping: float | Tensor = 0.0, scale: float | Tensor = 1.0) -> Tensor:
        r"""Log-determinant of the damped block, shape ``()``.

        .. math::
            \log|s\,B \otimes A + \delta I| = \textstyle\sum \log(s\,\lambda_B \lambda_A^\top + \delta).

        Returns:
            The log-determinant, shape ``()``.
        """
        return torch.log(scale * self.eigenvalues() + damping).sum()

    def to_dense(self) -> Tensor:
        r""":math:`B \otimes A`, shape ``(O·D, O·D)`` (for tests and small layers)."""
        return torch.kron(self.B, self.A)


def kron_index(
    layout: ParamLayout, weight: str | None, bias: str | None, n_out: int, n_in: int
) -> Tensor:
    """Flat positions of a Linear layer's ``[W b]`` in Kronecker order, shape ``(O, D)``.

    Entry ``(o, j)`` is ``W[o, j]`` for ``j < I`` and ``b[o]`` for ``j = I`` (D = I + 1 with a
    bias in ``layout``, D = I without, D = 1 for a bias alone).

    Returns:
        The positions, shape ``(O, D)``.
    """
    O, D = n_out, n_in
    idx = torch.empty(O, D, dtype=torch.long)
    I = D - (bias is not None)
    if weight is not None:
        start = layout.slice_of(weight).start
        idx[:, :I] = start + torch.arange(O * I).reshape(O, I)
    if bias is not None:
        idx[:, I] = layout.slice_of(bias).start + torch.arange(O)
    return idx


@dataclass(frozen=True)
class KFACCurvature:
    """The KFAC approximation of the unit-noise GGN of a subset.

    Attributes:
        layout: The subset's layout.
        blocks: Kronecker blocks, one per covered layer.
        diag_names: Parameters not covered by a block (exact diagonal blocks).
        diag: Exact GGN diagonal of ``diag_names``, in their layout order, shape ``(P_d,)``.
    """

    layout: ParamLayout
    blocks: tuple[KroneckerBlock, ...]
    diag_names: tuple[str, ...]
    diag: Tensor

    def diag_index(self) -> Tensor:
        """Flat positions of the diagonal part, shape ``(P_d,)``."""
        parts = [
            torch.arange(self.layout.slice_of(n).start, self.layout.slice_of(n).stop)
            for n in self.diag_names
        ]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def to_dense(self) -> Tensor:
        """The approximate GGN in flat parameter order, shape ``(P, P)`` (for tests only)."""
        P = self.layout.n_params
        ref = self.diag if not self.blocks else self.blocks[0].A
        G = torch.zeros(P, P, dtype=ref.dtype, device=ref.device)
        for blk in self.blocks:
            idx = blk.index(self.layout).to(G.device)
            G[idx.unsqueeze(1), idx.unsqueeze(0)] = blk.to_dense()
        di = self.diag_index().to(G.device)
        G[di, di] = self.diag
        return G


def kfac_factor_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Upper bound of the bytes of the Kronecker factors and their eigenvectors of ``model``."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += (m.in_features + 1) ** 2 + m.out_features**2
        elif isinstance(m, nn.Conv2d):
            d = m.in_channels // m.groups * math.prod(m.kernel_size) + 1
            total += d**2 + m.out_channels**2
    return 2 * total * size
