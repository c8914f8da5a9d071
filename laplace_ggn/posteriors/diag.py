r"""Diagonal posterior: :math:`\Lambda = s\,\mathrm{diag}(G) + \Lambda_0`, with the exact GGN diagonal."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import Prior, PriorKind, check_J, check_V, standard_normal
from ._output import EigenOutputCovariance, check_head_features

__all__ = ["DiagPosterior"]


class DiagPosterior:
    r"""Gaussian posterior :math:`N(\theta_*, \mathrm{diag}(s\,g + \lambda_0)^{-1})`.

    Args:
        mean: θ*, shape ``(P,)``.
        ggn_diag: Exact diagonal g of the unit-noise GGN, shape ``(P,)``.
        prior: The prior.
        scale: Curvature scale s = 1/(τσ²), shape ``()``.
    """

    def __init__(self, mean: Tensor, ggn_diag: Tensor, prior: Prior, scale: Tensor | float = 1.0):
        self.mean = mean
        self.ggn_diag = ggn_diag
        self.prior = prior
        self.scale = torch.as_tensor(scale, dtype=mean.dtype, device=mean.device)

    @property
    def n_params(self) -> int:
        """P."""
        return self.mean.shape[0]

    def precision_diag(self) -> Tensor:
        """Diagonal of Λ, shape ``(P,)``."""
        return self.scale * self.ggn_diag + self.prior.diag()

    def log_det(self) -> Tensor:
        r"""log|Λ| of the precision Λ (not of Σ), shape ``()``."""
        return torch.log(self.precision_diag()).sum()

    def spectrum(self, kind: PriorKind) -> Tensor:
        """The diagonal g of G ``(P,)``: the standard basis diagonalises every prior.

        Args:
            kind: The prior structure (any).

        Returns:
            g with log|s diag(g) + Λ₀| = Σ log(s g_i + a_i), in parameter order, ``(P,)``.
        """
        return self.ggn_diag

    def variance(self) -> Tensor:
        """Diagonal of Σ, shape ``(P,)``."""
        return 1.0 / self.precision_diag()

    def to_dense(self) -> Tensor:
        """Σ, shape ``(P, P)``."""
        return torch.diag(self.variance())

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """Σ V for ``V`` of shape ``(P,)`` or ``(P, K)``; same shape back."""
        check_V(V, self.n_params)
        var = self.variance()
        return var * V if V.ndim == 1 else var.unsqueeze(1) * V

    def functional_covariance(self, J: Tensor) -> Tensor:
        """J Σ Jᵀ for Jacobians ``(B, C, P)``; returns ``(B, C, C)``."""
        check_J(J, self.n_params)
        return (J * self.variance()) @ J.transpose(1, 2)

    def linear_head_covariance(self, phi: Tensor, index: Tensor) -> EigenOutputCovariance:
        r"""J Σ Jᵀ for a Linear head, :math:`J_n = I_C \otimes \tilde\phi_n^\top`: diagonal matrices.

        :math:`(M_n)_{cc} = \sum_i \tilde\phi_{ni}^2 \Sigma_{(c,i)}`, O(N·C·D).

        Args:
            phi: Features entering the layer with the bias column, shape ``(N, D)``.
            index: Flat positions of ``[W b]`` in Kronecker order, shape ``(C, D)``.

        Returns:
            The factored covariances (diagonals ``(N, C)``).

        Raises:
            ValueError: If the shapes do not fit.
        """
        check_head_features(phi, index, self.n_params)
        v = self.variance()[index.to(self.mean.device)]  # (C, D)
        return EigenOutputCovariance(None, phi.pow(2) @ v.T)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` parameter vectors, shape ``(n, P)``."""
        z = standard_normal(
            n, self.n_params, dtype=self.mean.dtype, device=self.mean.device, generator=generator
        )
        return self.mean + z * self.variance().sqrt()

    def with_prior(self, prior: Prior, scale: Tensor | float | None = None) -> DiagPosterior:
        """A new posterior with another prior (and curvature scale)."""
        return DiagPosterior(
            self.mean, self.ggn_diag, prior, self.scale if scale is None else scale
        )

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that define the curvature part."""
        return {"ggn_diag": self.ggn_diag}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], mean: Tensor, prior: Prior, scale: Tensor
    ) -> DiagPosterior:
        """Rebuild from :meth:`state_dict`."""
        return cls(mean, state["ggn_diag"], prior, scale)
