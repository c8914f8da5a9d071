r"""Reward modelling: a Bradley–Terry likelihood on pairs, a Gaussian predictive of one reward.

A reward model r(x) scores one candidate at a time, ``(B·2, ...) -> (B·2, 1)``.  The training
data are preference pairs: each sample holds two candidates, every input tensor of the batch
leading with ``(B, 2)`` (``{"input_ids": (B, 2, L), "attention_mask": (B, 2, L)}`` for a
Hugging Face model fed by a pair collator), and a target :math:`y \in \{0, 1\}`, the index of
the preferred one.  The fit sees the pair's two rewards as two logits,

.. math::
    p(y \mid x) = \mathrm{softmax}(r(x_0), r(x_1))_y
    = \sigma\big((-1)^{1-y}\,(r(x_1) - r(x_0))\big),

so its curvature is the categorical one of the two logits, with the Jacobian of the pair
:math:`J_n = [J(x_{n0}); J(x_{n1})]` (``items_per_sample = 2``).  Predictions take single
items ``(B, ...)``: the reward r(x) with its linearised (or sampled) variance, no
observation noise.  The preference probability of pairs is
:func:`laplace_ggn.predict_preference`, which uses the joint covariance of the two rewards.
This is laplace-torch's ``Likelihood.REWARD_MODELING``: the same curvature, and the same
variance of an item's reward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._checks import DEFAULT_MEMORY_BUDGET, Likelihood, Link, PredictMethod, shape_str
from ._base import BuiltinLikelihood, FitStatistics, Prediction, no_link, sample_moments
from .categorical import Categorical

if TYPE_CHECKING:
    from ..posteriors._output import OutputCovariance

__all__ = ["RewardModeling"]

_PAIR = Categorical()


class RewardModeling(BuiltinLikelihood):
    """Bradley–Terry on pairs of rewards for the fit; the reward of one item for predictions.

    See the module docstring.  Fit outputs are the pairs' rewards ``(B, 2)``; targets the
    index of the preferred candidate ``(B,)`` in {0, 1}.
    """

    kind = Likelihood.REWARD_MODELING
    items_per_sample = 2
    has_noise = False
    predicts_probabilities = False
    metric_name = "accuracy"

    # -- targets (pairs) ---------------------------------------------------------------------

    def check_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """The preferred indices as ``torch.long``, shape ``(B,)``.

        Returns:
            The targets.

        Raises:
            ValueError: If the pair outputs are not ``(B, 2)`` or a target is not 0 or 1.
        """
        loc = f" ({where})" if where else ""
        B = f.shape[0]
        if f.shape[1] != 2:
            raise ValueError(
                f"reward_modeling needs a model with 1 output (a reward) per candidate; got "
                f"{f.shape[1] // 2 if f.shape[1] % 2 == 0 else f.shape[1] / 2} per candidate "
                f"(pair outputs {shape_str(f.shape)})."
            )
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.shape != (B,):
            raise ValueError(
                f"reward_modeling targets{loc} must be the index of the preferred candidate, "
                f"shape ({B},); got {shape_str(y.shape)}."
            )
        if y.numel() and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(
                f"reward_modeling targets{loc} must be 0 or 1 (the preferred candidate of each "
                "pair); got other values."
            )
        return y.long()

    def position_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Outputs ``(B, T, C)`` have no pairs.

        Raises:
            ValueError: Always.
        """
        raise ValueError(
            f"reward_modeling needs a reward model with outputs (B, 1) per candidate; got "
            f"pair outputs of shape {shape_str(f.shape)} (a position dimension)."
        )

    def ignored(self, y: Tensor, n: int, ignore_index: int | None) -> None:
        """No pair is skipped.

        Returns:
            ``None``.
        """
        return None

    def targets_from_outputs(self, f: Tensor) -> Tensor:
        """The candidate with the higher reward, shape ``(B,)``."""
        return f.argmax(-1)

    # -- loss and curvature (pairs: two logits) ----------------------------------------------

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed Bradley–Terry NLL, shape ``()``."""
        return _PAIR.loss_statistic(f, y)

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed Bradley–Terry NLL of pair rewards ``(B, 2)``, shape ``()``."""
        return _PAIR.nll(f, y)

    @staticmethod
    def nll_from_statistics(stats: FitStatistics, sigma: Tensor) -> Tensor:
        """Summed NLL of the fit, shape ``()``."""
        return torch.as_tensor(stats.loss_sum, dtype=sigma.dtype, device=sigma.device)

    def sigma2(self, sigma: Tensor | float) -> float:
        """1: no noise scale."""
        return 1.0

    def curvature_scale(self, sigma: Tensor, temperature: Tensor | float) -> Tensor:
        r"""Factor :math:`1/\tau` of the GGN in the posterior precision."""
        return torch.as_tensor(1.0 / temperature, dtype=sigma.dtype, device=sigma.device)

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """softmax(r) - onehot(y), shape ``(B, 2)``."""
        return _PAIR.grad_f(f, y)

    def hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """``diag(p) - p pᵀ`` of the pair, shape ``(B, 2, 2)``."""
        return _PAIR.hessian(f)

    def sqrt_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """``diag(√p) - p √pᵀ``, shape ``(B, 2, 2)``."""
        return _PAIR.sqrt_hessian(f)

    def hessian_matvec(self, f: Tensor, u: Tensor, y: Tensor | None = None) -> Tensor:
        """``Λ_n u_n``, shapes ``(..., B, 2)``."""
        return _PAIR.hessian_matvec(f, u)

    def hessian_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """``p(1 - p)`` per candidate, shape ``(B, 2)``."""
        return _PAIR.hessian_diagonal(f)

    def hessian_sum(self, f: Tensor, w: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\sum_n w_n \Lambda_n`, shape ``(2, 2)``."""
        return _PAIR.hessian_sum(f, w)

    def neg_scores(self, f: Tensor, S: int, generator: torch.Generator | None) -> Tensor:
        """``p - onehot(ŷ)`` for S preferences drawn per pair, shape ``(S, B, 2)``."""
        return _PAIR.neg_scores(f, S, generator)

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Preferences drawn from the Bradley–Terry model, shape ``(B,)``."""
        return _PAIR.sample(f, generator=generator)

    # -- predictive (single items) -----------------------------------------------------------

    def check_link(self, method: PredictMethod, link: Link | None) -> tuple[PredictMethod, None]:
        """No link: the reward of an item is Gaussian (pairs: ``predict_preference``).

        Returns:
            ``(method, None)``.

        Raises:
            ValueError: If a link other than the default ``probit`` is given.
        """
        return no_link(self.name, method, link)

    def response(self, f: Tensor) -> Tensor:
        """The reward itself."""
        return f

    def glm_predictive(
        self,
        mean: Tensor,
        cov: OutputCovariance,
        *,
        link: Link | None = None,
        sigma: Tensor | float = 1.0,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> Prediction:
        r"""Reward r(x) and its variance :math:`J\Sigma J^\top` (no noise), shapes ``(N, 1)``.

        Args:
            mean: Rewards at θ*, shape ``(N, 1)``.
            cov: Their variances, a factored output covariance over the N rows.
            link: Ignored.
            sigma: Ignored.
            n_samples: Ignored.
            generator: Ignored.
            memory_budget: Ignored.

        Returns:
            The :class:`Prediction`.
        """
        return Prediction(mean, cov.diagonal())

    def sample_predictive(self, out: Tensor, sigma: Tensor | float = 1.0) -> Prediction:
        """Mean and sample variance of rewards of sampled networks ``(S, B, 1)``.

        Returns:
            The :class:`Prediction`, shapes ``(B, 1)``.
        """
        return sample_moments(out)

    def predictive_nll(self, pred: Prediction, y: Tensor) -> Tensor:
        """Item rewards have no targets.

        Raises:
            ValueError: Always; score pairs with ``predict_preference`` instead.
        """
        raise ValueError(
            "likelihood 'reward_modeling' predicts the rewards of single items, which have no "
            "targets to score; got a request for a predictive NLL (e.g. a grid search on a "
            "validation loader). Tune with method='marglik', or score pairs with "
            "laplace_ggn.predict_preference."
        )

    def temper(self, pred: Prediction, temperature: Tensor | float) -> Prediction:
        """Rewards are not tempered: ``pred`` unchanged."""
        return pred

    # -- fit ---------------------------------------------------------------------------------

    def fit_metric_sum(self, F: Tensor, y: Tensor) -> Tensor:
        """Correctly ordered pairs of rewards ``(S, B, 2)`` for preferences ``(B,)``, ``(S,)``."""
        return (F.argmax(-1) == y).sum(-1).to(F.dtype)

    def fit_metric(self, total: Tensor, n_data: int, n_outputs: int) -> Tensor:
        """Pair accuracy."""
        return total / n_data
