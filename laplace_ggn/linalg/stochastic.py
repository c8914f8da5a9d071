"""Stochastic trace, diagonal and spectral-density estimators."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import as_enum, is_integer, shape_str
from ..operators import LinearOperator, as_operator
from ._common import ProbeDistribution, SpectralDensity, _check_count, _check_square, _probes
from .eigen import _lanczos_tridiag, _tridiag

__all__ = ["hutchinson_diagonal", "hutchinson_trace", "hutchpp_trace", "spectral_density"]


def hutchinson_trace(
    A: LinearOperator | Tensor,
    n_samples: int,
    *,
    distribution: ProbeDistribution | str = ProbeDistribution.RADEMACHER,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Hutchinson's unbiased trace estimate :math:`\frac1S\sum_s z_s^\top A z_s`.

    With Rademacher probes the variance is :math:`\frac2S(\lVert A\rVert_F^2 - \sum_i A_{ii}^2)`.

    Args:
        A: Square operator or tensor, shape ``(P, P)``.
        n_samples: Number of probes :math:`S` (= products).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: Random generator of the probes.

    Returns:
        The estimate, a 0-dim tensor.

    Raises:
        ValueError: If ``n_samples`` < 1 or ``distribution`` is unknown.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> float(hutchinson_trace(A, 4))  # exact for diagonal A with Rademacher probes
        6.0
    """
    A = as_operator(A)
    P = _check_square(A)
    n_samples = _check_count(n_samples, "n_samples")
    dist = as_enum(ProbeDistribution, distribution, "distribution")
    Z = _probes(P, n_samples, dist, A, generator)
    return (Z * (A @ Z)).sum() / n_samples


def hutchinson_diagonal(
    A: LinearOperator | Tensor,
    n_samples: int,
    *,
    distribution: ProbeDistribution | str = ProbeDistribution.RADEMACHER,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Unbiased estimate of :math:`\operatorname{diag}(A)`: :math:`\frac1S\sum_s z_s \odot A z_s`.

    Args:
        A: Square operator or tensor, shape ``(P, P)``.
        n_samples: Number of probes (= products).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: Random generator of the probes.

    Returns:
        The estimated diagonal, shape ``(P,)``.

    Raises:
        ValueError: If ``n_samples`` < 1 or ``distribution`` is unknown.

    Example:
        >>> hutchinson_diagonal(torch.diag(torch.tensor([1.0, 2.0])), 3)
        tensor([1., 2.])
    """
    A = as_operator(A)
    P = _check_square(A)
    n_samples = _check_count(n_samples, "n_samples")
    dist = as_enum(ProbeDistribution, distribution, "distribution")
    Z = _probes(P, n_samples, dist, A, generator)
    return (Z * (A @ Z)).sum(dim=1) / n_samples


def hutchpp_trace(
    A: LinearOperator | Tensor,
    n_products: int,
    *,
    distribution: ProbeDistribution | str = ProbeDistribution.RADEMACHER,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Hutch++ trace estimate (Meyer et al., 2021) with ``n_products`` products.

    With :math:`m = \lfloor n/3 \rfloor` sketch vectors :math:`S`, :math:`Q = \operatorname{qr}(AS)`
    captures the top of the spectrum exactly and Hutchinson estimates the rest:

    .. math::
        \widehat{\mathrm{tr}}(A) = \mathrm{tr}(Q^\top A Q)
            + \frac{1}{n - 2m} \sum_{s} z_s^\top (I - QQ^\top) A (I - QQ^\top) z_s.

    Unbiased; for matrices with a decaying spectrum its variance is far below Hutchinson's at
    the same number of products.

    Args:
        A: Symmetric operator or tensor, shape ``(P, P)``.
        n_products: Total number of products, >= 3.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: Random generator of the probes.

    Returns:
        The estimate, a 0-dim tensor.

    Raises:
        ValueError: If ``n_products`` < 3 or ``distribution`` is unknown.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 1.0, 0.1], dtype=torch.float64))
        >>> round(float(hutchpp_trace(A, 9)), 6)  # the sketch spans all 3 dimensions
        6.1
    """
    A = as_operator(A)
    P = _check_square(A)
    n_products = _check_count(n_products, "n_products", minimum=3)
    dist = as_enum(ProbeDistribution, distribution, "distribution")
    m = n_products // 3
    n_g = n_products - 2 * m
    S = _probes(P, m, dist, A, generator)
    G = _probes(P, n_g, dist, A, generator)
    Q, _ = torch.linalg.qr(A @ S)
    low = torch.trace(Q.T @ (A @ Q))
    G_perp = G - Q @ (Q.T @ G)
    rest = (G_perp * (A @ G_perp)).sum() / n_g
    return low + rest


def spectral_density(
    A: LinearOperator | Tensor,
    *,
    n_probes: int = 10,
    n_lanczos: int = 30,
    grid: Tensor | None = None,
    n_grid: int = 400,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    r"""Spectral density by stochastic Lanczos quadrature (Ubaru et al. 2017; Ghorbani et al. 2019).

    For each unit Rademacher probe :math:`v_s = z_s/\sqrt P`, ``n_lanczos`` Lanczos steps give
    Ritz values :math:`\theta_{sj}` and weights :math:`\tau_{sj}` (squared first components of
    the eigenvectors of :math:`T_s`), a Gauss quadrature of :math:`v_s^\top f(A) v_s`:

    .. math::
        \phi(t) = \frac1S \sum_{s=1}^S \sum_{j} \tau_{sj}\,
            \mathcal N(t;\, \theta_{sj}, \sigma^2), \qquad
        \frac1S\sum_{s,j} \tau_{sj}\theta_{sj}^k \approx \frac{\mathrm{tr}(A^k)}{P},

    the quadrature being exact in :math:`v_s^\top A^k v_s` for :math:`k < 2\,` ``n_lanczos``.
    :math:`\phi` integrates to one; its mean is :math:`\mathrm{tr}(A)/P` estimated and its
    second moment adds :math:`\sigma^2` to the quadrature's.

    Args:
        A: Symmetric operator or tensor, shape ``(P, P)``.
        n_probes: Number of probes :math:`S`.
        n_lanczos: Lanczos steps per probe (products per probe), ``<= P``.
        grid: Evaluation points, shape ``(T,)``; default ``n_grid`` points spanning the Ritz
            values with a margin of ``6 * sigma``.
        n_grid: Number of default grid points (ignored when ``grid`` is given).
        sigma: Kernel width; default 1/50 of the Ritz-value range.
        generator: Random generator of the probes.

    Returns:
        :class:`SpectralDensity`.

    Raises:
        ValueError: If a count is out of range, ``sigma`` is not positive or ``grid`` is not 1-D.

    Example:
        >>> A = torch.diag(torch.linspace(1.0, 2.0, 20, dtype=torch.float64))
        >>> sd = spectral_density(A, n_probes=3, n_lanczos=10)
        >>> round(float(torch.trapezoid(sd.density, sd.grid)), 3)
        1.0
    """
    A = as_operator(A)
    P = _check_square(A)
    n_probes = _check_count(n_probes, "n_probes")
    n_grid = _check_count(n_grid, "n_grid", minimum=2)
    if not is_integer(n_lanczos) or not 1 <= n_lanczos <= P:
        raise ValueError(f"n_lanczos must be an integer in [1, {P}]; got {n_lanczos!r}.")
    n_lanczos = int(n_lanczos)
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0 or None; got {sigma!r}.")
    if grid is not None and (not isinstance(grid, Tensor) or grid.ndim != 1):
        got = shape_str(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"grid must be a 1-D tensor (T,); got {got}.")

    Z = _probes(P, n_probes, ProbeDistribution.RADEMACHER, A, generator) / math.sqrt(P)
    nodes, weights = [], []
    for s in range(n_probes):
        alpha, beta, _ = _lanczos_tridiag(A, Z[:, s], n_lanczos, generator)
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        nodes.append(theta)
        weights.append(S[0, :] ** 2)
    nodes_t, weights_t = torch.stack(nodes), torch.stack(weights)
    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    if sigma is None:
        sigma = max(hi - lo, abs(hi), 1e-12) / 50.0
    if grid is None:
        grid = torch.linspace(
            lo - 6 * sigma, hi + 6 * sigma, n_grid, dtype=A.dtype, device=A.device
        )
    diff = grid[:, None, None] - nodes_t[None]
    kern = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (kern * weights_t[None]).sum(dim=(1, 2)) / n_probes
    return SpectralDensity(grid, density, nodes_t, weights_t, float(sigma))
