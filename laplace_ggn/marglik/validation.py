"""Tuning a scalar prior precision by grid search on validation data."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import Likelihood, Link, PredictMethod, is_integer, shape_str
from ..likelihoods import DEFAULT_IGNORE_INDEX, observations
from ..predictive import (
    Prediction,
    glm_from_moments,
    nn_predictive,
    output_covariance,
    predictive_nll,
    resolve_options,
)

__all__ = ["GridsearchResult", "check_grid", "default_grid", "grid_edge_warning", "gridsearch"]


@dataclass(frozen=True)
class GridsearchResult:
    """Validation curve of :func:`gridsearch`.

    Attributes:
        grid: Prior precisions tried, shape ``(K,)``, increasing.
        scores: Mean validation negative log predictive density, shape ``(K,)`` (``inf``
            where the evaluation failed numerically; a ``RuntimeWarning`` names each).
        best_index: Index of the chosen precision (ties go to the larger precision).
    """

    grid: Tensor
    scores: Tensor
    best_index: int

    @property
    def best(self) -> Tensor:
        """The chosen prior precision, shape ``()``."""
        return self.grid[self.best_index]


def default_grid(
    log_range: tuple[float, float] = (-4.0, 4.0), n_points: int = 41, *, dtype=torch.float64
) -> Tensor:
    """Log-spaced grid ``10**lo .. 10**hi`` of ``n_points``, shape ``(n_points,)``.

    Returns:
        The grid, shape ``(n_points,)``, of ``dtype``.

    Raises:
        ValueError: If the range is not two finite numbers ``lo <= hi`` or ``n_points < 1``.
    """
    if (
        not isinstance(log_range, Sequence)
        or len(log_range) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in log_range)
        or log_range[0] > log_range[1]
    ):
        raise ValueError(
            f"log_range must be two finite numbers (lo, hi) with lo <= hi (powers of 10); "
            f"got {log_range!r}."
        )
    if not is_integer(n_points) or n_points < 1:
        raise ValueError(f"n_points must be a positive integer; got {n_points!r}.")
    return torch.logspace(float(log_range[0]), float(log_range[1]), int(n_points), dtype=dtype)


def check_grid(grid: object, *, dtype=torch.float64) -> Tensor:
    """Validate a user grid: a non-empty 1-D sequence of finite positive precisions, sorted.

    Returns:
        The grid sorted increasingly, shape ``(K,)``.

    Raises:
        ValueError: If it is empty, not 1-D, or holds a value that is not finite and > 0.
    """
    g = torch.as_tensor(grid, dtype=dtype).detach()
    if g.ndim != 1 or g.numel() == 0:
        raise ValueError(
            f"grid must be a non-empty 1-D sequence of precisions; got shape "
            f"{shape_str(g.shape) if g.ndim else '()'}."
        )
    if not bool(torch.isfinite(g).all()) or not bool((g > 0).all()):
        raise ValueError(
            f"grid values must be finite and > 0; got {g[:5].tolist()}"
            + ("..." if g.numel() > 5 else "")
            + "."
        )
    return torch.sort(g).values


def gridsearch(
    fmodel,
    *,
    posterior_at: Callable[[Tensor], object],
    batches: list[tuple[object, Tensor]],
    likelihood: Likelihood,
    lik,
    grid: Tensor,
    method: str | PredictMethod = "glm",
    link: str | Link | None = None,
    sigma_noise: Tensor | float = 1.0,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    n_outputs: int,
    progress: bool = False,
    ignore_index: int | None = DEFAULT_IGNORE_INDEX,
    head=None,
) -> GridsearchResult:
    r"""Score each prior precision by the mean validation NLL of the predictive.

    Every grid point is evaluated on its own (a new posterior and a new sum); GLM Jacobians
    of the validation inputs are computed once and shared when they fit the memory budget.
    The chosen point minimises the score; among equal scores (within 1e-12 relative) the
    largest precision wins.  Outputs ``(B, T, C)`` are scored per position, without the
    positions whose target is ``ignore_index``.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        posterior_at: ``prior_precision -> posterior``.
        batches: Validation ``(x, y)`` pairs (inputs on the model's device).
        likelihood: The likelihood kind.
        lik: The likelihood object (checks the targets).
        grid: Prior precisions, shape ``(K,)``, increasing.
        method: ``"glm"`` or ``"nn"``.
        link: Link of the predictive.
        sigma_noise: σ (regression).
        n_samples: S for ``mc`` / ``nn``.
        generator: Random generator for ``mc`` / ``nn``.
        n_outputs: C.
        progress: Show a progress bar.
        ignore_index: Classification / binary target value to leave out.
        head: The subset's :class:`~laplace_ggn.head.LinearHead`: covariances from its
            features, no Jacobians cached.

    Returns:
        The :class:`GridsearchResult`.

    Raises:
        ValueError: If the options are invalid or there is no validation data (or every
            target is ``ignore_index``).
        RuntimeError: If no grid point gives a finite score.
    """
    m, lk = resolve_options(likelihood, method, link)
    if not batches:
        raise ValueError("val_loader must yield at least one batch; got an empty loader.")
    P, elt = fmodel.n_params, fmodel.theta.element_size()
    prepared = []
    n_val = sum(_batch_len(y) for _, y in batches)
    cache = (
        m is PredictMethod.GLM
        and head is None
        and n_val * n_outputs * P * elt <= fmodel.memory_budget
    )
    cached_bytes = 0
    with torch.no_grad():
        for x, y in batches:
            J = None
            if cache:
                J, f = fmodel.jacobians(x, n_outputs=n_outputs)
                cached_bytes += J.numel() * elt
                J = J.reshape(-1, f.shape[-1], P)
                if cached_bytes > fmodel.memory_budget:  # positions made them larger
                    cache, J = False, None
            else:
                f = fmodel.forward(x)
            _, y_obs, keep = observations(
                lik, f, y.to(fmodel.device), ignore_index=ignore_index, where="val_loader"
            )
            prepared.append((x, J, f, y_obs, keep))
    n_val = sum(p[3].shape[0] for p in prepared)
    if n_val == 0:
        raise ValueError(
            f"val_loader must hold a target that is not ignore_index={ignore_index}; got none."
        )
    scores, failures = [], []
    for alpha in tqdm(grid.tolist(), disable=not progress, desc="gridsearch"):
        total, failure = 0.0, None
        try:
            post = posterior_at(torch.tensor(alpha, dtype=fmodel.dtype, device=fmodel.device))
            with torch.no_grad():
                for x, J, f, y, keep in prepared:
                    if m is PredictMethod.NN:
                        pred = nn_predictive(
                            fmodel,
                            post,
                            x,
                            likelihood=likelihood,
                            sigma_noise=sigma_noise,
                            n_samples=n_samples,
                            generator=generator,
                            n_outputs=n_outputs,
                        )
                    else:
                        if J is None:
                            f, cov = output_covariance(
                                fmodel, post, x, n_outputs=n_outputs, head=head
                            )
                        else:
                            cov = post.functional_covariance(J)
                        pred = glm_from_moments(
                            f,
                            cov,
                            likelihood=likelihood,
                            link=lk,
                            sigma_noise=sigma_noise,
                            n_samples=n_samples,
                            generator=generator,
                            memory_budget=fmodel.memory_budget,
                        )
                    C = pred.mean.shape[-1]
                    mean, var = pred.mean.reshape(-1, C), pred.variance.reshape(-1, C)
                    if keep is not None:
                        keep_rows = keep.reshape(-1)
                        mean, var = mean[keep_rows], var[keep_rows]
                    total += float(predictive_nll(Prediction(mean, var), y, likelihood).sum())
            score = total / n_val
        except RuntimeError as err:  # numerical failure: a factorisation or an overflow
            failure, score = f"its predictive failed numerically ({err})", math.inf
        if failure is None and not math.isfinite(score):
            failure = f"its validation NLL is {score}"
        if failure is not None:
            failures.append((alpha, failure))
            score = math.inf
        scores.append(score)
    s = torch.tensor(scores, dtype=torch.float64)
    if failures:
        alpha, failure = failures[0]
        message = f"gridsearch scored prior_precision={alpha:.3g} as inf: {failure}."
        if len(failures) > 1:
            rest = ", ".join(f"{a:.3g}" for a, _ in failures[1:])
            message += f" {len(failures) - 1} more grid points scored inf likewise: {rest}."
        if not bool(torch.isfinite(s).any()):
            raise RuntimeError(
                "gridsearch must find a grid point with a finite validation NLL; every point "
                f"failed over the grid {grid.min().item():.3g}..{grid.max().item():.3g}. The "
                f"hyperparameters were left unchanged. First failure: {message}"
            )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    best = s.min()
    tol = 1e-12 * max(1.0, abs(float(best)))
    idx = int((s <= best + tol).nonzero().max())
    return GridsearchResult(grid.detach().clone(), s, idx)


def grid_edge_warning(result: GridsearchResult, *, explicit_grid: bool) -> str | None:
    """The warning to give when the chosen precision is the first or last point of the grid.

    The optimum may then lie outside the grid; the message names the argument to change and a
    range shifted past that edge.

    Args:
        result: The grid search's result.
        explicit_grid: Whether the grid came from ``grid=`` (else from ``log_range``).

    Returns:
        The message, or ``None`` when the choice is inside the grid (or the grid has one point).
    """
    K = result.grid.shape[0]
    if K < 2 or 0 < result.best_index < K - 1:
        return None
    lo = math.log10(float(result.grid[0]))
    hi = math.log10(float(result.grid[-1]))
    width = max(hi - lo, 2.0)
    top = result.best_index == K - 1
    new = (hi - 2.0, hi + width) if top else (lo - width, lo + 2.0)
    new = (math.floor(new[0]), math.ceil(new[1]))
    side = "largest" if top else "smallest"
    n = max(K, 4 * (new[1] - new[0]) + 1)
    suggestion = (
        f"pass grid= reaching further, e.g. grid=torch.logspace({new[0]}, {new[1]}, {n})"
        if explicit_grid
        else f"widen the grid with log_range=({new[0]:g}, {new[1]:g}) (powers of 10)"
    )
    return (
        f"gridsearch chose prior_precision={float(result.best):.3g}, the {side} value of its grid "
        f"{float(result.grid[0]):.3g}..{float(result.grid[-1]):.3g}; the best precision may lie "
        f"beyond it. To search further, {suggestion}."
    )


def _batch_len(y: Tensor) -> int:
    return int(y.shape[0]) if y.ndim else 1
