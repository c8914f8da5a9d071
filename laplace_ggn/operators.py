r"""Linear operators and the curvature operators over a DataLoader.

A :class:`LinearOperator` is anything with ``shape``, ``dtype``, ``device`` and a product with
vectors ``(P,)`` or matrices ``(P, K)``.  Operators compose with ``@``, ``+``, scalar ``*`` and
``.T``; ``to_dense()`` materialises them (tests and tiny problems only).

The curvature operators stream over a DataLoader at every product:

.. math::
    G v = \sum_n J_n^\top \Lambda_n J_n v, \qquad
    H v = \nabla_\theta (\nabla_\theta \ell^\top v), \qquad
    \mathrm{EF}\, v = \sum_n g_n (g_n^\top v).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import DEFAULT_MEMORY_BUDGET, is_integer, shape_str
from .functional import FunctionalModel, resolve_subset, split_batch
from .likelihoods import get_likelihood

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "CallableOperator",
    "as_operator",
    "GGNOperator",
    "HessianOperator",
    "EFOperator",
    "MCFisherOperator",
]


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


# ---------------------------------------------------------------------------------------------
# Curvature operators over a DataLoader
# ---------------------------------------------------------------------------------------------


class _DataCurvatureOperator(LinearOperator):
    """Shared set-up of the curvature operators: functional model, data stream, likelihood."""

    def __init__(
        self,
        model,
        loader,
        *,
        likelihood="classification",
        subset="all",
        sigma_noise: float = 1.0,
        input_key: str | None = None,
        target_key: str | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        self.likelihood = get_likelihood(likelihood)
        first = next(iter(loader), None)
        if first is None:
            raise ValueError("loader must yield at least one batch; got an empty loader.")
        x0, _ = split_batch(first, input_key=input_key, target_key=target_key)
        layout = resolve_subset(model, subset, x0)
        self.fmodel = FunctionalModel(model, layout, memory_budget=memory_budget)
        self.loader = loader
        self.input_key, self.target_key = input_key, target_key
        sigma = float(sigma_noise)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma_noise must be finite and > 0; got {sigma_noise}.")
        self.sigma2 = self.likelihood.sigma2(sigma)
        P = layout.n_params
        self.shape = (P, P)
        self.dtype, self.device = self.fmodel.dtype, self.fmodel.device

    def batches(self):
        """Yield ``(index, x, y)`` with ``x`` on the model's device (``y`` unchecked)."""
        for i, batch in enumerate(self.loader):
            x, y = split_batch(
                batch, input_key=self.input_key, target_key=self.target_key, where=f"batch {i}"
            )
            yield i, self.fmodel.prepare(x), y.to(self.device)

    def _output_matvec(self, f: Tensor, u: Tensor, y: Tensor, index: int) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def _matmat(self, V: Tensor) -> Tensor:
        V = V.to(self.dtype)
        out = torch.zeros(self.shape[0], V.shape[1], dtype=self.dtype, device=self.device)
        for i, x, y in self.batches():
            out += self.fmodel.jvp_vjp(x, V, lambda f, u: self._output_matvec(f, u, y, i))[0]
        return out


class GGNOperator(_DataCurvatureOperator):
    r"""Generalised Gauss-Newton :math:`G = \sum_n J_n^\top \Lambda_n J_n` of the summed NLL.

    Products cost one forward with dual numbers and one backward per batch (and column).
    Regression uses :math:`\Lambda_n = I/\sigma^2`.

    With ``cache=True`` the first product also keeps, per batch, the autograd graph of the
    forward pass at θ* and of :math:`w \mapsto J^\top w` (built once); later products reuse
    it: :math:`J v` is the derivative of :math:`J^\top w` in :math:`w` (a backward through the
    cached graph) and :math:`J^\top u` a backward through the forward graph, so no forward is
    repeated and the loader is not read again once every batch is cached. Batches are cached
    while the tensors saved by these graphs fit ``memory_budget``; the rest are recomputed at
    every product. The operator holds a private copy of the model, so θ* cannot change under
    the cache, but the loader can: the cache assumes the loader yields the same batches at every
    pass; call :meth:`clear_cache` if it does not. Models whose operations lack a double
    backward fall back to the uncached product.

    Args:
        model: The network (copied; never modified).
        loader: Iterable of ``(x, y)`` batches or mappings.
        likelihood: ``"regression"``, ``"classification"`` or ``"binary"``.
        subset: ``"all"``, ``"last_layer"`` or a list of parameter names.
        sigma_noise: σ for regression.
        input_key: Key of the inputs in mapping batches (see
            :func:`~laplace_ggn.functional.split_batch`; default: every key but the targets).
        target_key: Key of the targets in mapping batches (default: ``"target"``,
            ``"labels"`` or ``"label"``).
        memory_budget: Bytes for chunked intermediates (and for the cache).
        cache: Keep the per-batch graphs between products (see above).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> G = GGNOperator(model, data, likelihood="classification")
        >>> (G @ torch.ones(8)).shape
        torch.Size([8])
    """

    def __init__(self, model, loader, *, cache: bool = False, **kwargs):
        super().__init__(model, loader, **kwargs)
        self.cache = bool(cache)
        self.clear_cache()

    def _output_matvec(self, f: Tensor, u: Tensor, y: Tensor, index: int) -> Tensor:
        return self.likelihood.hessian_matvec(f, u) / self.sigma2

    def clear_cache(self) -> None:
        """Drop the per-batch graphs kept by ``cache=True``; the next product rebuilds them."""
        self._entries: dict[int, tuple] = {}
        self._complete = False
        self._cached_bytes = 0
        self._budget_hit = False
        self._leaf: Tensor | None = None

    def _build_entry(self, x: object) -> tuple[tuple, int]:
        """Graphs of the forward at θ* and of ``w -> J^T w`` on one batch, and their bytes."""
        saved: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            saved[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if self._leaf is None:
                self._leaf = self.fmodel.theta.detach().clone().requires_grad_(True)
            leaf = self._leaf
            out = self.fmodel(leaf, x)
            w = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, leaf, w, create_graph=True)
        return (leaf, out, out.detach(), w, g), sum(saved.values())

    def _cached_product(self, entry: tuple, V: Tensor) -> Tensor:
        leaf, out, f, w, g = entry
        cols = []
        for k in range(V.shape[1]):
            (jv,) = torch.autograd.grad(g, w, V[:, k], retain_graph=True)
            u = self.likelihood.hessian_matvec(f, jv) / self.sigma2
            (col,) = torch.autograd.grad(out, leaf, u, retain_graph=True)
            cols.append(col)
        return torch.stack(cols, dim=1)

    def _matmat(self, V: Tensor) -> Tensor:
        if not self.cache:
            return super()._matmat(V)
        V = V.to(self.dtype)
        out = torch.zeros(self.shape[0], V.shape[1], dtype=self.dtype, device=self.device)
        if self._complete:
            for entry in self._entries.values():
                out += self._cached_product(entry, V)
            return out
        complete = True
        for i, x, y in self.batches():
            entry = self._entries.get(i)
            if entry is None and self.cache and not self._budget_hit:
                entry, nbytes = self._build_entry(x)
                self._budget_hit = self._cached_bytes + nbytes > self.fmodel.memory_budget
                if not self._budget_hit:
                    try:
                        out += self._cached_product(entry, V)
                    except RuntimeError:  # an operation without double backward
                        self.cache = False
                        self.clear_cache()
                    else:
                        self._entries[i] = entry
                        self._cached_bytes += nbytes
                        continue
                entry = None
            if entry is not None:
                out += self._cached_product(entry, V)
            else:
                complete = False
                matvec = lambda f, u, y=y, i=i: self._output_matvec(f, u, y, i)  # noqa: E731
                out += self.fmodel.jvp_vjp(x, V, matvec)[0]
        self._complete = self.cache and complete
        return out

    def to_dense(self) -> Tensor:
        """Dense G ``(P, P)`` from per-sample Jacobians (faster than P products)."""
        from .collectors import FullGGNCollector

        col = FullGGNCollector(self.fmodel, self.likelihood)
        for i, x, _ in self.batches():
            col.update(x, f"batch {i}")
        return col.finalize() / self.sigma2

    def diagonal(self) -> Tensor:
        """Exact diagonal ``(P,)`` (layer hooks for ``nn.Linear``)."""
        from .collectors import DiagGGNCollector

        col = DiagGGNCollector(self.fmodel, self.likelihood)
        for i, x, _ in self.batches():
            col.update(x, f"batch {i}")
        return col.finalize() / self.sigma2


class EFOperator(_DataCurvatureOperator):
    r"""Empirical Fisher :math:`\mathrm{EF} = \sum_n g_n g_n^\top`, :math:`g_n = \nabla_\theta \ell_n`.

    Written as :math:`\sum_n J_n^\top r_n r_n^\top J_n` with :math:`r_n = \nabla_f \ell_n`.
    Arguments as :class:`GGNOperator`.
    """

    def _output_matvec(self, f: Tensor, u: Tensor, y: Tensor, index: int) -> Tensor:
        r = self.likelihood.grad_f(f, self.likelihood.check_targets(f, y)) / self.sigma2
        return r * (r * u).sum(-1, keepdim=True)


class MCFisherOperator(_DataCurvatureOperator):
    r"""Monte-Carlo Fisher (type-I): :math:`\sum_n J_n^\top \hat r_n \hat r_n^\top J_n`, labels sampled.

    :math:`\hat r_n = \nabla_f \ell(f_n, \hat y_n)` with :math:`\hat y_n \sim p(y \mid f_n)`,
    averaged over ``mc_samples`` draws.  Its expectation is the GGN for these likelihoods.
    Draws for batch ``i`` use a generator seeded with ``seed + i``, so the operator is a fixed
    matrix as long as the loader yields the same batches in the same order.

    Args:
        model: The network.
        loader: The data.
        mc_samples: Label draws per sample.
        seed: Base seed of the label draws.
        **kwargs: As :class:`GGNOperator` (likelihood, subset, sigma_noise, ...).
    """

    def __init__(self, model, loader, *, mc_samples: int = 1, seed: int = 0, **kwargs):
        super().__init__(model, loader, **kwargs)
        if not is_integer(mc_samples) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer; got {mc_samples!r}.")
        self.mc_samples, self.seed = int(mc_samples), int(seed)

    def _output_matvec(self, f: Tensor, u: Tensor, y: Tensor, index: int) -> Tensor:
        gen = torch.Generator(device=f.device).manual_seed(self.seed + index)
        sigma = math.sqrt(self.sigma2)
        out = torch.zeros_like(u)
        for _ in range(self.mc_samples):
            y_hat = self.likelihood.sample(f, sigma=sigma, generator=gen)
            r = self.likelihood.grad_f(f, y_hat) / self.sigma2
            out += r * (r * u).sum(-1, keepdim=True)
        return out / self.mc_samples


class HessianOperator(_DataCurvatureOperator):
    r"""Exact Hessian :math:`\nabla^2_\theta \sum_n -\log p(y_n \mid f(x_n, \theta))` (may be indefinite).

    Products by forward-over-reverse differentiation (``jvp`` of ``grad``), one per batch and
    column.  Arguments as :class:`GGNOperator`.
    """

    def _matmat(self, V: Tensor) -> Tensor:
        V = V.to(self.dtype)
        fm = self.fmodel
        out = torch.zeros(self.shape[0], V.shape[1], dtype=self.dtype, device=self.device)
        sigma = torch.tensor(math.sqrt(self.sigma2), dtype=self.dtype, device=self.device)
        for i, x, y in self.batches():
            f0 = fm.forward(x)
            yc = self.likelihood.check_targets(f0, y, f"batch {i}")

            def loss(theta: Tensor, x=x, yc=yc) -> Tensor:
                return self.likelihood.nll(fm(theta, x), yc, sigma)

            grad_fn = torch.func.grad(loss)
            with fm.forward_mode():
                for k in range(V.shape[1]):
                    out[:, k] += torch.func.jvp(grad_fn, (fm.theta,), (V[:, k],))[1]
        return out
