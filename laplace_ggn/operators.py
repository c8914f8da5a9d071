r"""Curvature operators over a DataLoader, on the :class:`LinearOperator` base.

The base class and its compositions (``@``, ``+``, scalar ``*``, ``.T``, ``to_dense()``) are in
:mod:`laplace_ggn.linear_operator` and available here too.  The curvature operators stream
over a DataLoader at every product:

.. math::
    G v = \sum_n J_n^\top \Lambda_n J_n v, \qquad
    H v = \nabla_\theta (\nabla_\theta \ell^\top v), \qquad
    \mathrm{EF}\, v = \sum_n g_n (g_n^\top v).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ._checks import DEFAULT_MEMORY_BUDGET, is_integer
from .functional import FunctionalModel, resolve_subset, split_batch
from .likelihoods import get_likelihood
from .linear_operator import CallableOperator, DenseOperator, LinearOperator, as_operator

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
    backward (or whose double backward drops terms: the first cached product is checked
    against the uncached one) fall back to the uncached product. Every product that
    recomputes batches without the cache warns once, with the reason.

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
        self._disabled: str | None = None  # why the cache cannot be used for this model
        self._verified = False  # a cached product was checked against the uncached one
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
        if self._disabled is not None:
            self._warn_uncached("every batch", self._disabled)
            return super()._matmat(V)
        V = V.to(self.dtype)
        out = torch.zeros(self.shape[0], V.shape[1], dtype=self.dtype, device=self.device)
        if self._complete:
            for entry in self._entries.values():
                out += self._cached_product(entry, V)
            return out
        n_batches, n_uncached = 0, 0
        for i, x, y in self.batches():
            n_batches += 1
            entry = self._entries.get(i)
            if entry is None and self._disabled is None and not self._budget_hit:
                entry, nbytes = self._build_entry(x)
                self._budget_hit = self._cached_bytes + nbytes > self.fmodel.memory_budget
                if not self._budget_hit:
                    try:
                        part = self._cached_product(entry, V)
                    except RuntimeError as err:  # an operation without double backward
                        self.clear_cache()
                        self._disabled = (
                            "an operation of the model has no double backward "
                            f"({type(err).__name__}: {str(err)[:120]})"
                        )
                    else:
                        if self._verified or self._agrees(part, x, y, i, V):
                            out += part
                            self._entries[i] = entry
                            self._cached_bytes += nbytes
                            continue
                        self.clear_cache()
                        self._disabled = (
                            "the double backward of an operation of the model gives other "
                            "products than the uncached pass (a backward that is not itself "
                            "differentiable, e.g. marked @once_differentiable)"
                        )
                entry = None
            if entry is not None:
                out += self._cached_product(entry, V)
            else:
                n_uncached += 1
                matvec = lambda f, u, y=y, i=i: self._output_matvec(f, u, y, i)  # noqa: E731
                out += self.fmodel.jvp_vjp(x, V, matvec)[0]
        self._complete = self._disabled is None and n_uncached == 0
        if n_uncached:
            reason = self._disabled or (
                f"their graphs do not fit memory_budget={self.fmodel.memory_budget} bytes next "
                f"to the {len(self._entries)} cached batches ({self._cached_bytes} bytes)"
            )
            self._warn_uncached(f"{n_uncached} of {n_batches} batches", reason)
        return out

    def _agrees(self, part: Tensor, x: object, y: Tensor, index: int, V: Tensor) -> bool:
        """Check a first cached product against the uncached one (once per operator).

        Operations whose backward is not itself differentiable can drop terms of the double
        backward without an error; the cache is used only if the products agree.

        Returns:
            Whether the cached product agrees with the uncached one (kept in ``_verified``).
        """
        matvec = lambda f, u: self._output_matvec(f, u, y, index)  # noqa: E731
        ref = self.fmodel.jvp_vjp(x, V, matvec)[0]
        tol = torch.finfo(ref.dtype).eps ** 0.5
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        self._verified = bool(torch.allclose(part, ref, rtol=tol, atol=tol * scale))
        return self._verified

    @staticmethod
    def _warn_uncached(which: str, reason: str) -> None:
        warnings.warn(
            f"GGNOperator(cache=True) recomputed {which} at this product without the cache: "
            f"{reason}.",
            RuntimeWarning,
            stacklevel=4,
        )

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
