r"""Adding a new fit's curvature to a stored one, and the posterior log density.

:func:`accumulate` joins the fit of new data at the current weights θ* to an earlier fit:
the curvatures are added (:func:`~laplace_ggn.continual.curvature.add_curvature`), the posterior
is centred at the new θ*, and the loss statistics are summed (N₁ + N₂ observations and
:math:`\ell_1(\theta_1) + \ell_2(\theta_2)`, each loss at the weights of its own fit, as
laplace-torch's ``fit(loader, override=False)`` does).  At the same weights the result equals
one fit on the union of the data: exactly for ``full``, ``diag`` and exact ``lowrank``; as
the KFAC of the union for ``kfac``.

:func:`log_prob` is the log density of the posterior :math:`N(\theta_*, \Lambda^{-1})`,

.. math::
    \log q(\theta) = -\tfrac12(\theta-\theta_*)^\top\Lambda(\theta-\theta_*)
    + \tfrac12\log|\Lambda| - \tfrac P2\log 2\pi, \qquad
    (\theta-\theta_*)^\top\Lambda(\theta-\theta_*) = s\,\delta^\top G\delta + \delta^\top D\delta,

differentiable in θ: minus it is the penalty of the next task's loss (Ritter et al., 2018).
"""

from __future__ import annotations

import math
from dataclasses import replace

from torch import Tensor

from .._checks import shape_str
from ..fitted import FittedLaplace
from ..likelihoods import FitStatistics
from .curvature import add_curvature, check_continual, curvature_quadratic

__all__ = ["accumulate", "combine", "log_prob", "stored_fit"]


def accumulate(
    old: FittedLaplace, new: FittedLaplace, *, rank: int | None, add_loss: bool = True
) -> FittedLaplace:
    """The fit ``new`` with the curvature of ``old`` added (see the module docstring).

    Args:
        old: The stored fit.
        new: The fit of the new data (at the current weights, with the hyperparameters to keep).
        rank: ``rank=`` of a top-k ``lowrank`` structure (``None``: every eigenpair).
        add_loss: Add ``old``'s observations and loss to the statistics (``False`` for a
            posterior carried into the prior, whose data enter the evidence through it).

    Returns:
        The combined :class:`~laplace_ggn.FittedLaplace`.

    Raises:
        ValueError: If the structure cannot be accumulated.
    """
    name = new.structure.name
    check_continual(name, "fit(accumulate=True)", new.hyperparameters.sigma_noise)
    s_old, s_new = old.statistics, new.statistics
    state = add_curvature(
        name,
        old.posterior.state_dict(),
        new.posterior.state_dict(),
        s_old.n_data,
        s_new.n_data,
        rank,
    )
    post = new.posterior
    posterior = new.structure.posterior_cls.from_state_dict(
        state, post.mean, post.prior, post.scale
    )
    stats = s_new
    if add_loss:
        stats = FitStatistics(
            s_old.n_data + s_new.n_data,
            s_new.n_outputs,
            s_old.loss_sum + s_new.loss_sum,
            s_new.output_ndim,
        )
    return replace(new, posterior=posterior, statistics=stats)


def combine(new: FittedLaplace, stored: FittedLaplace | None, *, rank: int | None) -> FittedLaplace:
    """A fresh fit with the curvature it must hold added: the stored fit's, or the prior's.

    Args:
        new: The fit of the new data.
        stored: The fit to accumulate onto (``fit(accumulate=True)``), or ``None``.
        rank: ``rank=`` of a top-k ``lowrank`` structure.

    Returns:
        ``accumulate(stored, new)``; without a stored fit, ``new`` with the curvature its
        prior carries (a fitted wrapper as ``prior_mean``) added; else ``new``.

    Raises:
        RuntimeError: If ``accumulate`` is asked for before a first fit.
    """
    if stored is not None:
        return accumulate(stored, new, rank=rank)
    base = new.hyperparameters.prior_base
    if base is None:
        return new
    post = new.posterior
    state = add_curvature(base.structure, base.state, post.state_dict(), 0, 1, rank)
    cls = new.structure.posterior_cls
    return replace(new, posterior=cls.from_state_dict(state, post.mean, post.prior, post.scale))


def stored_fit(fitted: FittedLaplace | None) -> FittedLaplace:
    """The stored fit that ``fit(accumulate=True)`` adds to.

    Returns:
        ``fitted``.

    Raises:
        RuntimeError: If there is none.
    """
    if fitted is None:
        raise RuntimeError(
            "fit(accumulate=True) needs a stored fit to add to; call fit(train_loader) first."
        )
    return fitted


def log_prob(fitted: FittedLaplace, theta: Tensor) -> Tensor:
    """Log density of the posterior at ``theta`` (see the module docstring).

    Args:
        fitted: The fit.
        theta: Parameter vectors of the subset, shape ``(P,)`` or ``(..., P)``.

    Returns:
        The log densities, shape ``theta.shape[:-1]``, differentiable in ``theta``.

    Raises:
        TypeError: If ``theta`` is not a tensor.
        ValueError: If it is not floating with last dimension P, or the structure has no
            density here (``projected``: supported on the kernel only).
    """
    name = fitted.structure.name
    check_continual(name, "log_prob()", fitted.hyperparameters.sigma_noise)
    if not isinstance(theta, Tensor):
        raise TypeError(
            f"theta must be a tensor of shape (P,) or (..., P); got {type(theta).__name__}."
        )
    P = fitted.n_params
    if not theta.is_floating_point() or theta.ndim == 0 or theta.shape[-1] != P:
        raise ValueError(
            f"theta must be a floating tensor of shape ({P},) or (..., {P}); got a {theta.dtype} "
            f"tensor of shape {shape_str(theta.shape)}."
        )
    post = fitted.posterior
    delta = theta.to(dtype=post.mean.dtype, device=post.mean.device) - post.mean
    state = post.state_dict()
    quad = post.scale * curvature_quadratic(name, state, fitted.layout, delta)
    quad = quad + (post.prior.diag() * delta**2).sum(-1)
    return -0.5 * quad + 0.5 * post.log_det() - 0.5 * P * math.log(2 * math.pi)
