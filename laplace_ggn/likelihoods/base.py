r"""A likelihood from its per-sample negative log likelihood alone, by automatic differentiation.

:class:`BaseLikelihood` implements the whole :class:`~laplace_ggn.likelihoods.LikelihoodModel`
protocol from one method, :meth:`BaseLikelihood.per_sample_nll`: the output curvature is the
Hessian of the NLL in the outputs,

.. math::
    \Lambda_n = \big[\nabla^2_f\, \ell(f, y_n)\big]_+ ,

computed with :func:`torch.func` (a reverse-mode product of its gradient, one per output,
vectorised with ``vmap``) and clamped to its positive semi-definite part :math:`[\cdot]_+`
(negative eigenvalues set to 0; the Hessian of a non-log-concave likelihood, e.g. Student-t
at an outlier, has some).  Subclasses override what they know in closed form (a Fisher
instead of the Hessian, a predictive, a target check); :func:`from_nll` makes one from a
function.  The NLL must treat the rows of ``f`` independently.

The GLM predictive is the exact Gaussian of the outputs when the response (the predictive
mean as a function of the outputs) is the identity, else a Monte-Carlo average of the
response over draws of the outputs; the NN predictive averages it over sampled networks.
Its variance is that of the response under the posterior, the epistemic part (a subclass
adds the observation noise by overriding ``glm_predictive``); ``predictive_nll`` scores a
target by the Gaussian density with the predictive's mean and variance.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import grad

from .._checks import DEFAULT_MEMORY_BUDGET, Link, PredictMethod, shape_str
from ._base import (
    FitStatistics,
    Prediction,
    gaussian_predictive_nll,
    mc_only_link,
    sample_moments,
)
from .autodiff import draw_outputs, nll_hessians, psd_part

if TYPE_CHECKING:
    from ..posteriors._output import OutputCovariance

__all__ = ["BaseLikelihood"]


class BaseLikelihood:
    r"""Base class of a likelihood defined by its per-sample NLL (see the module docstring).

    Subclasses implement :meth:`per_sample_nll`; they may override :meth:`response` (the
    predictive mean of the outputs; default the outputs, ``identity_response``),
    :meth:`sample_targets` (with ``samples_targets = True``, for ``curvature="mc"``), closed
    forms of the curvature (with ``needs_targets = False`` if they do not depend on the
    targets), the predictive and the target checks.  Attributes named in ``parameters`` are
    saved by :meth:`state_dict` and restored into a copy by :meth:`with_state`.
    """

    name = "custom"
    kind = None
    has_noise = False
    predicts_probabilities = False
    metric_name = "NLL"
    items_per_sample = 1
    needs_targets = True
    samples_targets = False
    identity_response = True
    parameters: tuple[str, ...] = ()

    def per_sample_nll(self, f: Tensor, y: Tensor) -> Tensor:
        """Negative log likelihood of each row, shape ``(n,)``, for outputs ``(n, C)``.

        Raises:
            NotImplementedError: Unless a subclass implements it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement per_sample_nll(f, y).")

    def sample_targets(self, f: Tensor, generator: torch.Generator | None) -> Tensor:
        r"""Targets drawn from :math:`p(y \mid f)`, one per row of ``f`` ``(n, C)``.

        Raises:
            NotImplementedError: Unless a subclass implements it.
        """
        raise NotImplementedError(
            f"likelihood {self.name!r} must implement sample_targets(f, generator) for "
            "curvature='mc'."
        )

    def response(self, f: Tensor) -> Tensor:
        """The predictive mean as a function of outputs ``(..., C)`` (default: the outputs)."""
        return f

    def check_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Targets with one row per row of ``f`` (floating ones in ``f``'s dtype).

        Returns:
            The targets.

        Raises:
            ValueError: If ``y`` has another number of rows than ``f``.
        """
        if y.ndim == 0 or y.shape[0] != f.shape[0]:
            loc = f" ({where})" if where else ""
            raise ValueError(
                f"{self.name} targets{loc} must have {f.shape[0]} rows, one per output row; got "
                f"shape {shape_str(y.shape)}."
            )
        return y.to(f.dtype) if y.is_floating_point() else y

    def position_targets(self, f: Tensor, y: Tensor, where: str = "") -> Tensor:
        """Targets ``(B, T, ...)`` of outputs ``(B, T, C)`` as rows ``(B·T, ...)``.

        Returns:
            The targets, shape ``(B·T, ...)``.

        Raises:
            ValueError: If ``y`` does not lead with ``(B, T)``.
        """
        if tuple(y.shape[:2]) != tuple(f.shape[:2]):
            loc = f" ({where})" if where else ""
            raise ValueError(
                f"{self.name} targets{loc} must lead with {shape_str(f.shape[:2])} for outputs of "
                f"shape {shape_str(f.shape)}; got {shape_str(y.shape)}."
            )
        return y.reshape(-1, *y.shape[2:])

    def ignored(self, y: Tensor, n: int, ignore_index: int | None) -> None:
        """No target is skipped: ``None``."""
        return None

    def targets_from_outputs(self, f: Tensor) -> Tensor:
        """Targets drawn from the model at ``f`` (reports without targets)."""
        return self.sample_targets(f, None)

    def loss_statistic(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed NLL, shape ``()``."""
        return self.per_sample_nll(f, y).sum()

    def nll(self, f: Tensor, y: Tensor, sigma: Tensor | float = 1.0) -> Tensor:
        """Summed NLL, shape ``()`` (σ plays no role)."""
        return self.per_sample_nll(f, y).sum()

    @staticmethod
    def nll_from_statistics(stats: FitStatistics, sigma: Tensor) -> Tensor:
        """Summed NLL of the fit, shape ``()``."""
        return torch.as_tensor(stats.loss_sum, dtype=sigma.dtype, device=sigma.device)

    def sigma2(self, sigma: Tensor | float) -> float:
        """1: no noise scale."""
        return 1.0

    def curvature_scale(self, sigma: Tensor, temperature: Tensor | float) -> Tensor:
        r"""Factor :math:`1/\tau` of the curvature in the posterior precision."""
        return torch.as_tensor(1.0 / temperature, dtype=sigma.dtype, device=sigma.device)

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∂ℓ_n/∂f_n by :func:`torch.func.grad` of the summed NLL, shape ``(n, C)``."""
        return grad(lambda z: self.per_sample_nll(z, y).sum())(f.detach())

    def raw_hessian(self, f: Tensor, y: Tensor) -> Tensor:
        r"""Hessians :math:`\nabla^2_f \ell(f_n, y_n)` (not clamped), shape ``(n, C, C)``."""
        return nll_hessians(self.per_sample_nll, f, y)

    def _psd(self, f: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        if y is None:
            raise ValueError(
                f"y must be given for likelihood {self.name!r}; got None. Its output curvature "
                "(the Hessian of the NLL in the outputs) depends on the targets."
            )
        return psd_part(self.raw_hessian(f, y))

    def hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        r"""The clamped Hessian :math:`[\nabla^2_f \ell]_+`, shape ``(n, C, C)``."""
        U, lam = self._psd(f, y)
        return (U * lam.unsqueeze(-2)) @ U.transpose(-1, -2)

    def sqrt_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`L_n = U_n \mathrm{diag}(\sqrt{\lambda_n})`, shape ``(n, C, C)``."""
        U, lam = self._psd(f, y)
        return U * lam.sqrt().unsqueeze(-2)

    def hessian_matvec(self, f: Tensor, u: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\Lambda_n u_n` for ``u`` of shape ``(..., n, C)``; same shape back."""
        H = self.hessian(f.reshape(-1, f.shape[-1]), y)
        uf = u.reshape(*u.shape[: u.ndim - 2], -1, f.shape[-1]) if f.ndim > 2 else u
        return torch.einsum("ncd,...nd->...nc", H, uf).reshape(u.shape)

    def hessian_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """Diagonal of every clamped Hessian, shape ``(n, C)``."""
        return torch.diagonal(self.hessian(f, y), dim1=-2, dim2=-1)

    def hessian_sum(self, f: Tensor, w: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\sum_n w_n \Lambda_n` for weights ``(n, 1)``, shape ``(C, C)``."""
        return torch.einsum("n,ncd->cd", w.reshape(-1), self.hessian(f, y))

    def neg_scores(self, f: Tensor, S: int, generator: torch.Generator | None) -> Tensor:
        r""":math:`-\nabla_f \log p(\hat y \mid f) = \nabla_f \ell(f, \hat y)`, S draws per row.

        The S draws of every row are one batch of S·n rows (one call of the sampler and one
        gradient).

        Returns:
            Shape ``(S, n, C)``.
        """
        F = f.detach().repeat(S, 1)
        return self.grad_f(F, self.sample_targets(F, generator)).reshape(S, *f.shape)

    def sample(self, f: Tensor, *, sigma: float | Tensor = 1.0, generator=None) -> Tensor:
        """Targets drawn from the model (:meth:`sample_targets`)."""
        return self.sample_targets(f, generator)

    def check_link(self, method: PredictMethod, link: Link | None) -> tuple[PredictMethod, Link]:
        """Monte Carlo is the only link (``None`` or ``"mc"``); ValueError for another.

        Returns:
            ``(method, Link.MC)``.
        """
        return mc_only_link(self.name, method, link)

    def glm_predictive(
        self,
        mean: Tensor,
        cov: OutputCovariance,
        *,
        link: Link | None = Link.MC,
        sigma: Tensor | float = 1.0,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> Prediction:
        r"""Mean and variance of :meth:`response` under :math:`f \sim N(\mu, \Sigma_f)`, ``(N, C')``.

        Exact (μ, diag Σ_f) for an identity response, else S draws
        :math:`f_s = \mu + L z_s` per row (``n_samples``, ``generator``, chunked to
        ``memory_budget``); ``link`` and ``sigma`` are ignored.

        Returns:
            The :class:`Prediction`.
        """
        if self.identity_response:
            return Prediction(mean, cov.diagonal())
        draws = draw_outputs(mean, cov, n_samples, generator, memory_budget)
        return sample_moments(self.response(draws))

    def sample_predictive(self, out: Tensor, sigma: Tensor | float = 1.0) -> Prediction:
        """Mean and sample variance of :meth:`response` over outputs ``(S, B, C)``.

        Returns:
            The :class:`Prediction`, shapes ``(B, C')``.
        """
        return sample_moments(self.response(out))

    def predictive_nll(self, pred: Prediction, y: Tensor) -> Tensor:
        """Gaussian NLL with the predictive's mean and variance, summed over columns, ``(B,)``.

        Returns:
            The NLL of each point, shape ``(B,)``; ValueError if ``y`` has another batch size.
        """
        return gaussian_predictive_nll(pred, y)

    def temper(self, pred: Prediction, temperature: Tensor | float) -> Prediction:
        """No predictive temperature: ``pred`` unchanged."""
        return pred

    def fit_metric_sum(self, F: Tensor, y: Tensor) -> Tensor:
        """Summed NLL of outputs ``(S, n, C)`` against targets, shape ``(S,)``."""
        return torch.stack([self.per_sample_nll(f, y).sum() for f in F])

    def fit_metric(self, total: Tensor, n_data: int, n_outputs: int) -> Tensor:
        """Mean NLL per point."""
        return total / n_data

    def state_dict(self) -> dict[str, object]:
        """The attributes named in ``parameters`` (tensors cloned)."""
        return {
            k: (v.detach().clone() if isinstance(v, Tensor) else v)
            for k in self.parameters
            for v in (getattr(self, k),)
        }

    def with_state(self, state: dict[str, object]) -> BaseLikelihood:
        """A copy with the parameters of ``state``.

        Returns:
            The copy (this object is unchanged).

        Raises:
            ValueError: If ``state`` names other parameters than ``parameters``.
        """
        if set(state) != set(self.parameters):
            raise ValueError(
                f"state of likelihood {self.name!r} must hold the parameters "
                f"{sorted(self.parameters)}; got {sorted(state)}."
            )
        out = copy.copy(self)
        for k, v in state.items():
            setattr(out, k, v)
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}; output curvature: the Hessian of the "
            "NLL in the outputs, clamped to its positive semi-definite part)"
        )
