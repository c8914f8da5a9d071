"""Linear operators: a small base class and its compositions.

A :class:`LinearOperator` is anything with ``shape``, ``dtype``, ``device`` and a product with
vectors ``(P,)`` or matrices ``(P, K)``.  Operators compose with ``@``, ``+``, scalar ``*`` and
``.T``; ``to_dense()`` materialises them (tests and tiny problems only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import shape_str

__all__ = ["LinearOperator", "DenseOperator", "CallableOperator", "as_operator"]


class LinearOperator:
    """Base class: subclasses implement ``_matmat(V)`` for ``V`` of shape ``(P, K)``.

    Attributes:
        shape: ``(P, Q)``.
        dtype: Floating dtype of products.
        device: Device of products.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rmatmat(self, V: Tensor) -> Tensor:
        """Product with the transpose; symmetric operators need not override."""
        return self._matmat(V)

    def __matmul__(self, V: Tensor) -> Tensor:
        """Product with a vector ``(Q,)`` or matrix ``(Q, K)``.

        Returns:
            The product, shape ``(P,)`` or ``(P, K)``.

        Raises:
            ValueError: If the leading dimension of ``V`` is not ``Q``.
        """
        if isinstance(V, LinearOperator):
            return _ProductOperator(self, V)
        if V.ndim not in (1, 2) or V.shape[0] != self.shape[1]:
            raise ValueError(
                f"operand must have shape ({self.shape[1]},) or ({self.shape[1]}, K); "
                f"got {shape_str(V.shape)}."
            )
        if V.ndim == 1:
            return self._matmat(V.unsqueeze(1)).squeeze(1)
        return self._matmat(V)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        if other.shape != self.shape:
            raise ValueError(
                f"operators must have the same shape to add; got {self.shape} and {other.shape}."
            )
        return _SumOperator(self, other)

    def __mul__(self, scalar: float) -> LinearOperator:
        if isinstance(scalar, LinearOperator) or (
            isinstance(scalar, Tensor) and scalar.numel() != 1
        ):
            return NotImplemented
        return _ScaledOperator(self, scalar)

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return _ScaledOperator(self, -1.0)

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        return self + (-other)

    @property
    def T(self) -> LinearOperator:  # noqa: N802 - matches torch / numpy
        """The transposed operator."""
        return _TransposedOperator(self)

    def to_dense(self) -> Tensor:
        """Materialise the operator, shape ``(P, Q)``; costs Q products."""
        eye = torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return self @ eye

    def diagonal(self) -> Tensor:
        """Exact diagonal by products with unit vectors (subclasses may do better)."""
        return torch.diagonal(self.to_dense())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class DenseOperator(LinearOperator):
    """Wrap an explicit matrix ``(P, Q)``."""

    def __init__(self, A: Tensor):
        if A.ndim != 2:
            raise ValueError(f"A must be a matrix (P, Q); got shape {shape_str(A.shape)}.")
        self.A = A
        self.shape = (A.shape[0], A.shape[1])
        self.dtype = A.dtype
        self.device = A.device

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.A.T @ V

    def to_dense(self) -> Tensor:
        """The wrapped matrix ``(P, Q)``."""
        return self.A

    def diagonal(self) -> Tensor:
        """Its diagonal."""
        return torch.diagonal(self.A)


class CallableOperator(LinearOperator):
    """Wrap a function ``V (P, K) -> A V (P, K)`` of a symmetric operator."""

    def __init__(
        self,
        matmat: Callable[[Tensor], Tensor],
        size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self._fn = matmat
        self.shape = (size, size)
        self.dtype = dtype
        self.device = torch.device(device)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._fn(V)


def as_operator(A: LinearOperator | Tensor) -> LinearOperator:
    """Return ``A`` as a :class:`LinearOperator` (tensors are wrapped).

    Raises:
        TypeError: If ``A`` is neither an operator nor a 2-D tensor.
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    raise TypeError(f"A must be a LinearOperator or a 2-D tensor; got {type(A).__name__}.")


class _SumOperator(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator):
        self.a, self.b = a, b
        self.shape, self.dtype, self.device = a.shape, a.dtype, a.device

    def _matmat(self, V: Tensor) -> Tensor:
        return self.a @ V + self.b @ V

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.a.T @ V + self.b.T @ V


class _ScaledOperator(LinearOperator):
    def __init__(self, a: LinearOperator, scalar: float | Tensor):
        self.a, self.scalar = a, scalar
        self.shape, self.dtype, self.device = a.shape, a.dtype, a.device

    def _matmat(self, V: Tensor) -> Tensor:
        return self.scalar * (self.a @ V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.scalar * (self.a.T @ V)


class _TransposedOperator(LinearOperator):
    def __init__(self, a: LinearOperator):
        self.a = a
        self.shape = (a.shape[1], a.shape[0])
        self.dtype, self.device = a.dtype, a.device

    def _matmat(self, V: Tensor) -> Tensor:
        return self.a._rmatmat(V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.a._matmat(V)

    @property
    def T(self) -> LinearOperator:  # noqa: N802
        return self.a


class _ProductOperator(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator):
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"cannot multiply operators of shapes {a.shape} and {b.shape}.")
        self.a, self.b = a, b
        self.shape = (a.shape[0], b.shape[1])
        self.dtype, self.device = a.dtype, a.device

    def _matmat(self, V: Tensor) -> Tensor:
        return self.a @ (self.b @ V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.b.T @ (self.a.T @ V)
