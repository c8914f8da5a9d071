r"""Pieces shared by the posterior structures: the prior, robust factorisations, sampling noise.

The prior is :math:`p(\theta) = N(\theta_0, \Lambda_0^{-1})` with a diagonal precision
:math:`\Lambda_0` given as a scalar α, one α per parameter tensor ("layerwise") or one per
parameter ("diagonal").
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_positive, is_integer, shape_str
from ..functional import ParamLayout

__all__ = ["PriorKind", "Prior", "make_prior", "robust_cholesky", "standard_normal", "check_J"]


class PriorKind(str, enum.Enum):
    """Structure of the prior precision."""

    SCALAR = "scalar"
    LAYERWISE = "layerwise"
    DIAGONAL = "diagonal"


@dataclass(frozen=True)
class Prior:
    r"""Gaussian prior :math:`N(\theta_0, \Lambda_0^{-1})` with diagonal :math:`\Lambda_0`.

    Attributes:
        precision: shape ``()`` (scalar), ``(T,)`` (one per tensor) or ``(P,)``.
        layout: The parameter layout (gives T, P and the tensor sizes).
        kind: Which of the three structures ``precision`` has.
        mean: θ₀, shape ``(P,)`` (``None``: 0).
        base: Curvature of earlier data carried into the prior (a posterior used as the
            prior, :mod:`laplace_ggn.continual`), or ``None``: then the prior precision is
            :math:`sG_0 + \Lambda_0` with ``base.quadratic(d)`` :math:`= d^\top G_0 d` and
            ``base.log_det(prior, s)`` :math:`= \log|sG_0 + \Lambda_0|`.
    """

    precision: Tensor
    layout: ParamLayout
    kind: PriorKind
    mean: Tensor | None = None
    base: object = None

    @property
    def is_scalar(self) -> bool:
        """Whether Λ₀ = α I."""
        return self.kind is PriorKind.SCALAR

    def diag(self) -> Tensor:
        """The diagonal of Λ₀, shape ``(P,)``."""
        if self.kind is PriorKind.SCALAR:
            return self.precision.expand(self.layout.n_params)
        if self.kind is PriorKind.LAYERWISE:
            return self.layout.expand_per_tensor(self.precision)
        return self.precision

    def log_det(self) -> Tensor:
        """log|Λ₀|, shape ``()``."""
        if self.kind is PriorKind.SCALAR:
            return self.layout.n_params * torch.log(self.precision)
        if self.kind is PriorKind.LAYERWISE:
            n = torch.tensor(self.layout.numels, dtype=self.precision.dtype)
            return (n.to(self.precision.device) * torch.log(self.precision)).sum()
        return torch.log(self.precision).sum()

    def quadratic(self, theta: Tensor) -> Tensor:
        """(θ − θ₀)ᵀ Λ₀ (θ − θ₀) of the diagonal Λ₀ for θ of shape ``(P,)``; shape ``()``."""
        delta = theta if self.mean is None else theta - self.mean
        return (self.diag() * delta**2).sum()

    def centered(self, theta: Tensor) -> Tensor:
        """θ − θ₀, shape of ``theta``."""
        return theta if self.mean is None else theta - self.mean


def make_prior(
    precision: float | Tensor,
    layout: ParamLayout,
    *,
    dtype: torch.dtype,
    device: torch.device,
    mean: Tensor | None = None,
    base: object = None,
) -> Prior:
    """Validate a prior precision and give it its structure.

    Args:
        precision: A float or a tensor of shape ``()``, ``(1,)``, ``(T,)`` (T parameter tensors
            in the subset) or ``(P,)``.
        layout: The subset's layout.
        dtype: Floating dtype of the posterior.
        device: Device of the posterior.
        mean: Prior mean θ₀, shape ``(P,)`` (``None``: 0).
        base: Carried curvature of earlier data (see :class:`Prior`).

    Returns:
        The :class:`Prior`.

    Raises:
        TypeError: If ``precision`` is not a number or tensor.
        ValueError: If its shape fits none of the structures, an entry is not > 0, or
            ``mean`` does not have shape ``(P,)``.
    """
    if isinstance(precision, bool) or not isinstance(precision, (int, float, Tensor)):
        raise TypeError(
            f"prior_precision must be a float or a tensor; got {type(precision).__name__}."
        )
    t = torch.as_tensor(precision, dtype=dtype, device=device)
    T, P = len(layout.names), layout.n_params
    if t.ndim == 0 or t.shape == (1,):
        kind, t = PriorKind.SCALAR, t.reshape(())
    elif t.shape == (T,):
        kind = PriorKind.LAYERWISE
    elif t.shape == (P,):
        kind = PriorKind.DIAGONAL
    else:
        raise ValueError(
            f"prior_precision must be a scalar, or have shape ({T},) (one per parameter tensor) "
            f"or ({P},) (one per parameter); got {shape_str(t.shape)}."
        )
    check_positive(t.detach(), "prior_precision")
    if mean is not None and tuple(mean.shape) != (P,):
        raise ValueError(
            f"prior_mean must have shape ({P},) (one value per parameter of the subset); got "
            f"{shape_str(mean.shape)}."
        )
    if mean is not None:
        mean = mean.to(dtype=dtype, device=device)
    return Prior(t, layout, kind, mean, base)


def robust_cholesky(A: Tensor, what: str, *, max_tries: int = 6) -> Tensor:
    """Cholesky factor of a symmetric matrix, adding escalating jitter if it is not PD.

    Args:
        A: Symmetric matrix, shape ``(P, P)``.
        what: Name of the quantity, for warnings and errors.
        max_tries: Jitter escalations (×10 each, starting at 1e-10 × mean diagonal).

    Returns:
        Lower-triangular factor, shape ``(P, P)``.

    Raises:
        RuntimeError: If ``A`` is not positive definite even with the largest jitter.
    """
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return L
    scale = A.diagonal().abs().mean().clamp_min(torch.finfo(A.dtype).tiny)
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    jitter = 1e-10 * scale
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(A + jitter * eye)
        if int(info) == 0:
            warnings.warn(
                f"{what} was not positive definite; added jitter {float(jitter):.3g} to its "
                "diagonal.",
                RuntimeWarning,
                stacklevel=3,
            )
            return L
        jitter = jitter * 10
    raise RuntimeError(
        f"{what} must be positive definite; Cholesky failed even with jitter "
        f"{float(jitter / 10):.3g}. Increase prior_precision or check the curvature for NaN."
    )


def standard_normal(
    n: int, P: int, *, dtype: torch.dtype, device: torch.device, generator=None
) -> Tensor:
    """Draw ``(n, P)`` standard normal noise.

    Returns:
        Standard normal noise, shape ``(n, P)``.

    Raises:
        ValueError: If ``n`` is not a positive integer.
    """
    if not is_integer(n) or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}.")
    return torch.randn(int(n), P, dtype=dtype, device=device, generator=generator)


def check_J(J: Tensor, P: int) -> None:
    """Check a Jacobian batch ``(B, C, P)``.

    Raises:
        ValueError: If ``J`` is not 3-D with last dimension ``P``.
    """
    if J.ndim != 3 or J.shape[-1] != P:
        raise ValueError(
            f"J must have shape (B, C, {P}); got {shape_str(J.shape)}. "
            "Was the posterior built on another parameter subset?"
        )


def check_V(V: Tensor, P: int) -> None:
    """Check an operand ``(P,)`` or ``(P, K)``.

    Raises:
        ValueError: If the leading dimension is not ``P``.
    """
    if V.ndim not in (1, 2) or V.shape[0] != P:
        raise ValueError(f"V must have shape ({P},) or ({P}, K); got {shape_str(V.shape)}.")
