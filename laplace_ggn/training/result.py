"""What :func:`~laplace_ggn.marglik_training` returns: the network, its posterior, the curves."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["MarglikHistory", "MarglikTrainingResult"]


@dataclass(frozen=True)
class MarglikHistory:
    """Per-epoch curves of a :func:`~laplace_ggn.marglik_training` run (E epochs).

    Attributes:
        loss: Training loss per observation, the mean over the epoch's batches of
            mean NLL + ½ (θ−θ₀)ᵀ diag(δ) (θ−θ₀) / N, shape ``(E,)``.
        log_evidence: Laplace log evidence after the epoch's hyperparameter steps, shape
            ``(E,)`` (NaN for epochs without them: burn-in and between refits).
        prior_precision: δ at the end of each epoch, shape ``(E,)`` (scalar), ``(E, T)``
            (layerwise) or ``(E, P)`` (diagonal).
        sigma_noise: σ at the end of each epoch, shape ``(E,)`` (1 outside regression).
        temperature: T of the likelihood ``softmax(f / T)`` at the end of each epoch, shape
            ``(E,)`` (1 for regression).
        marglik_epochs: The 1-based epochs with a refit and hyperparameter steps.
    """

    loss: Tensor
    log_evidence: Tensor
    prior_precision: Tensor
    sigma_noise: Tensor
    temperature: Tensor
    marglik_epochs: tuple[int, ...] = field(default=())

    @classmethod
    def from_rows(cls, rows: list[dict], marglik_epochs: list[int]) -> MarglikHistory:
        """Stack per-epoch rows ``{"loss", "log_evidence", "prior_precision", ...}``.

        Returns:
            The history (float64 tensors on the CPU).
        """
        f64 = torch.float64

        def col(key: str) -> Tensor:
            if not rows:
                return torch.zeros(0, dtype=f64)
            return torch.stack([torch.as_tensor(r[key], dtype=f64).detach().cpu() for r in rows])

        return cls(
            col("loss"),
            col("log_evidence"),
            col("prior_precision"),
            col("sigma_noise"),
            col("temperature"),
            tuple(marglik_epochs),
        )


@dataclass(frozen=True)
class MarglikTrainingResult:
    """The outcome of :func:`~laplace_ggn.marglik_training`.

    Attributes:
        model: The trained network (the ``model`` passed in, trained in place).
        laplace: A fitted :class:`~laplace_ggn.LaplaceWrapper` at the final weights with the
            learned prior precision, σ and logit temperature T.
        history: The per-epoch :class:`MarglikHistory`.
    """

    model: nn.Module
    laplace: object
    history: MarglikHistory

    @property
    def prior_precision(self) -> Tensor:
        """The learned prior precision δ, shape ``()``, ``(T,)`` or ``(P,)``."""
        return self.laplace.prior_precision

    @property
    def sigma_noise(self) -> Tensor:
        """The learned σ (regression), shape ``()``."""
        return self.laplace.sigma_noise

    @property
    def temperature(self) -> float:
        """The learned T of the likelihood ``softmax(f / T)`` (classification, binary)."""
        return self.laplace.logit_temperature
