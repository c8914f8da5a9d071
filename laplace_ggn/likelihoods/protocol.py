r"""What a likelihood provides: the protocol every observation model of a fit satisfies.

``LaplaceWrapper(model, likelihood=obj)`` accepts any object with the members below (the
built-in ones, an instance of :class:`~laplace_ggn.likelihoods.BaseLikelihood`, or one made
by :func:`~laplace_ggn.likelihoods.from_nll`).  Outputs ``f`` have shape ``(n, C)``; targets
are whatever :meth:`LikelihoodModel.check_targets` returns for them.

- **Loss**: the per-sample negative log likelihood, summed (:meth:`~LikelihoodModel.nll`),
  and the statistic of the training loss that the evidence needs.
- **Output curvature**: :math:`\Lambda_n`, the Hessian (or Fisher) of the NLL in the outputs,
  positive semi-definite, with a factor :math:`L_n L_n^\top = \Lambda_n`
  (:meth:`~LikelihoodModel.sqrt_hessian`); ``needs_targets`` says whether it depends on
  :math:`y_n` (then every curvature method receives the targets of the rows).
- **Sampling** (``curvature="mc"``): targets drawn from the model and the negative scores
  :math:`-\nabla_f \log p(\hat y \mid f)` whose outer products estimate the Fisher.
- **Predictive**: a Gaussian over the outputs (GLM) or sampled outputs (NN) mapped to a
  :class:`~laplace_ggn.likelihoods.Prediction`.
- **Targets**: checks with clear errors, and the rows of outputs ``(B, T, C)``.
- **Parameters**: :meth:`~LikelihoodModel.state_dict` / :meth:`~LikelihoodModel.with_state`
  for what ``LaplaceWrapper.state_dict()`` saves of the likelihood itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from .._checks import Likelihood, Link, PredictMethod
from ._base import FitStatistics, Prediction

if TYPE_CHECKING:
    from ..posteriors._output import OutputCovariance

__all__ = ["REQUIRED_MEMBERS", "LikelihoodModel"]


@runtime_checkable
class LikelihoodModel(Protocol):
    r"""The observation model :math:`p(y \mid f)` of a fit (see the module docstring).

    Attributes:
        name: Its name in messages and saved states (a built-in's ``likelihood=`` option).
        kind: The :class:`~laplace_ggn.Likelihood` member of a built-in, ``None`` otherwise.
        has_noise: Whether the observation noise σ applies (the Gaussian only).
        predicts_probabilities: Whether the predictive temperature T applies.
        metric_name: Name of :meth:`fit_metric` (``"RMSE"``, ``"accuracy"``, ``"NLL"``).
        items_per_sample: Model inputs per sample of the fit (2 for preference pairs, each
            input tensor of the batch then leads with ``(B, 2)``); 1 otherwise.
        needs_targets: Whether the output curvature depends on the targets.
        samples_targets: Whether :meth:`sample` and :meth:`neg_scores` exist
            (``curvature="mc"``).
    """

    name: str
    kind: Likelihood | None
    has_noise: bool
    predicts_probabilities: bool
    metric_name: str
    items_per_sample: int
    needs_targets: bool
    samples_targets: bool

    # -- targets ---------------------------------------------------------------------------
    def check_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Checked targets of outputs ``(n, C)`` (ValueError naming what is wrong)."""

    def position_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Targets of outputs ``(B, T, C)`` as one row per position."""

    def ignored(self, y: Tensor, n: int, ignore_index: int | None) -> Tensor | None:
        """Rows to skip, a boolean mask ``(n,)``, or ``None``."""

    def targets_from_outputs(self, f: Tensor) -> Tensor:
        """Targets made from outputs (for reports without targets)."""

    # -- loss ------------------------------------------------------------------------------
    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """The statistic of the training loss summed over the rows, shape ``()``."""

    def nll_from_statistics(self, stats: FitStatistics, sigma: Tensor) -> Tensor:
        """ℓ(θ*) from the statistics (differentiable in σ where it applies), shape ``()``."""

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed negative log likelihood, shape ``()``."""

    def curvature_scale(self, sigma: Tensor, temperature: Tensor | float) -> Tensor:
        r"""Factor s of :math:`\Lambda = sG + \Lambda_0`."""

    def sigma2(self, sigma: Tensor | float) -> Tensor | float:
        """The factor the output curvature is divided by (σ² or 1)."""

    # -- output curvature ------------------------------------------------------------------
    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∂ℓ_n/∂f_n, shape ``(n, C)``."""

    def hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\Lambda_n`, PSD, shape ``(n, C, C)``."""

    def sqrt_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`L_n` with :math:`L_n L_n^\top = \Lambda_n`, shape ``(n, C, K)``."""

    def hessian_matvec(self, f: Tensor, u: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\Lambda_n u_n` for ``u`` of shape ``(..., n, C)``."""

    def hessian_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        r"""Diagonal of every :math:`\Lambda_n`, shape ``(n, C)``."""

    def hessian_sum(self, f: Tensor, w: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\sum_n w_n \Lambda_n` for weights ``(n, 1)``, shape ``(C, C)``."""

    def neg_scores(self, f: Tensor, S: int, generator: torch.Generator | None) -> Tensor:
        r""":math:`-\nabla_f \log p(\hat y \mid f)` for S draws per row, shape ``(S, n, C)``."""

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Targets drawn from the model at outputs ``f``."""

    # -- predictive ------------------------------------------------------------------------
    def check_link(self, method: PredictMethod, link: Link | None) -> tuple[PredictMethod, object]:
        """The ``(method, link)`` pair of a predictive, or ValueError naming the valid ones."""

    def response(self, f: Tensor) -> Tensor:
        """The predictive mean as a function of the outputs (probabilities, rates, ...)."""

    def glm_predictive(
        self,
        mean: Tensor,
        cov: OutputCovariance,
        *,
        link: Link | None,
        sigma: Tensor | float = 1.0,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        memory_budget: int = ...,
    ) -> Prediction:
        r"""The predictive under :math:`f \sim N(\mu, \Sigma_f)`, shapes ``(n, C')``."""

    def sample_predictive(self, out: Tensor, sigma: Tensor | float = 1.0) -> Prediction:
        """The predictive of sampled outputs ``(S, B, C)``."""

    def predictive_nll(self, pred: Prediction, y: Tensor) -> Tensor:
        """Negative log predictive density of each point, shape ``(B,)``."""

    def temper(self, pred: Prediction, temperature: Tensor | float) -> Prediction:
        """The predictive under a predictive temperature T."""

    # -- fit metric and parameters ---------------------------------------------------------
    def fit_metric_sum(self, F: Tensor, y: Tensor) -> Tensor:
        """The fit metric's sum over the rows of outputs ``(S, n, C)``, shape ``(S,)``."""

    def fit_metric(self, total: Tensor, n_data: int, n_outputs: int) -> Tensor:
        """The fit metric from its sum."""

    def state_dict(self) -> dict[str, object]:
        """The likelihood's own parameters (tensors and numbers), saved with the wrapper."""

    def with_state(self, state: dict[str, object]) -> LikelihoodModel:
        """A likelihood with the parameters of :meth:`state_dict` (the object is unchanged)."""


#: The members :func:`~laplace_ggn.likelihoods.get_likelihood` checks on a likelihood object.
REQUIRED_MEMBERS = (
    "name",
    "has_noise",
    "predicts_probabilities",
    "metric_name",
    "items_per_sample",
    "needs_targets",
    "samples_targets",
    "check_targets",
    "position_targets",
    "ignored",
    "loss_statistic",
    "nll_from_statistics",
    "nll",
    "curvature_scale",
    "sqrt_hessian",
    "hessian_matvec",
    "hessian_diagonal",
    "hessian_sum",
    "check_link",
    "glm_predictive",
    "sample_predictive",
    "predictive_nll",
    "temper",
    "state_dict",
    "with_state",
)
