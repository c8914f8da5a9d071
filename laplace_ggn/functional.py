r"""The functional model: a private copy of a network evaluated as :math:`f(x, \theta)`.

Every P-vector is ordered as ``model.named_parameters()`` restricted to the subset, each tensor
flattened row-major (the order of :func:`torch.nn.utils.parameters_to_vector`).

:class:`FunctionalModel` holds a private copy of the user's network in eval mode and evaluates
it as :math:`f(x, \theta)` for a flat θ of the subset; parameters outside the subset stay at
their trained values.  It provides per-sample Jacobians ``(B, C, P)``, Jacobian-vector and
vector-Jacobian products (computed in :mod:`laplace_ggn.jacobians`), all chunked so that
intermediates stay under a memory budget.  Subsets and their layout are in
:mod:`laplace_ggn.layout`, batches and model calls in :mod:`laplace_ggn.batches`; their public
names are available here too.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from ._autodiff import (
    FORWARD_AD_LOCK,
    NO_MKLDNN,
    differentiating,
    is_forward_ad_error,
    plain_attention,
    prepare_attention_layers,
    shared_clone,
    unroll_recurrent_layers,
    warn_reverse_fallback,
)
from ._checks import DEFAULT_MEMORY_BUDGET
from .batches import (
    UNBATCHED_HINT,
    as_2d_output,
    batch_size_of,
    call_model,
    check_batch_dims,
    flatten_items,
    group_items,
    input_tensors,
    split_batch,
    to_device,
)
from .jacobians import (
    LayerRecord,
    batched_output_grads,
    capture_layers,
    forward_mode_matmat,
    is_model_output,
    matmat_from_jacobians,
    per_sample_jacobians,
)
from .layout import ParamLayout, resolve_subset, untie_aliases
from .model_io import InputSpec, output_tensor, raise_for_input_shape
from .private_model import private_copy

__all__ = [
    "UNBATCHED_HINT",
    "FunctionalModel",
    "LayerRecord",
    "ParamLayout",
    "batch_size_of",
    "batched_output_grads",
    "call_model",
    "capture_layers",
    "check_batch_dims",
    "input_tensors",
    "is_model_output",
    "resolve_subset",
    "split_batch",
    "to_device",
]


class FunctionalModel:
    r"""A private eval-mode copy of a network, evaluated as :math:`f(x, \theta)`.

    The user's module is deep-copied once; its parameters, buffers, mode and hooks are never
    touched.  Products are chunked over the batch so that the largest intermediate stays under
    ``memory_budget`` bytes.

    Thread safety: :func:`torch.func.functional_call` swaps tensors into the module's
    attributes for the duration of a call, and the layer collectors register hooks on it, so
    every thread evaluates its own structural copy of the private module (new module objects
    and dictionaries, shared parameter and buffer tensors), made on its first call.  No
    decision about how to differentiate is cached between calls.

    Per-sample Jacobians are computed by :func:`torch.func.vmap` over the samples where the
    model allows; models with data-dependent control flow (attention masks checked with
    ``.item()``, nested-tensor fast paths) or recurrent layers use one forward pass of a chunk
    and a batched backward pass of its B·C one-hot cotangents instead, which gives the same
    per-sample Jacobians because the samples do not interact in eval mode.  Attention runs
    through torch's math kernel, without the layers' inference fast paths, during every pass
    that differentiates or runs under vmap (see :func:`~laplace_ggn._autodiff.plain_attention`,
    which acts on the calling thread's copy only); plain forward passes keep the fused kernels.

    The alias of a tied tensor in the subset gets its own copy
    (:func:`~laplace_ggn.layout.untie_aliases`).

    Args:
        model: The trained network (copied, not modified).
        layout: Subset of parameters to differentiate, from :func:`resolve_subset`.
        memory_budget: Bytes allowed for intermediates such as per-sample Jacobians.
        copy_model: Deep-copy ``model`` (default). ``False`` uses it as is (it must already be
            a private copy in eval mode).
        output_fn: Maps the model output to the prediction tensor (see :func:`output_tensor`).
        input_spec: The training inputs' structure; an error of the model on an input of
            another shape then names both shapes (:func:`~laplace_ggn.model_io.raise_for_input_shape`).
        dtype: Floating dtype of the private copy (``None``: the model's); inputs must have it.
        input_dtype: The user's model dtype, when ``dtype`` differs from it (a half-precision
            model computed in float32): :meth:`prepare` casts inputs of that dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        *,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        copy_model: bool = True,
        output_fn: Callable[[object], Tensor] | None = None,
        input_spec: InputSpec | None = None,
        dtype: torch.dtype | None = None,
        input_dtype: torch.dtype | None = None,
    ):
        if copy_model:
            model = private_copy(model)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        if dtype is not None:
            model.to(dtype)  # the private copy only (float32 for a half-precision model)
        self._template = model
        self._local = threading.local()
        self._hooks: list[tuple[str, Callable]] = []  # permanent hooks of every thread's copy
        self.layout = layout
        self.memory_budget = int(memory_budget)
        self.output_fn = output_fn
        self.input_spec = input_spec
        #: Items scored one at a time per sample (see :meth:`with_items`).
        self.items_per_sample = 1
        # recurrent layers step by step (vmap, batched backward and forward mode all work);
        # True only if fused recurrent kernels remain (subclasses, packed sequences)
        self.has_rnn = unroll_recurrent_layers(model)
        prepare_attention_layers(model)
        named = untie_aliases(model, layout.names)  # an alias of a tied tensor: its holder's use
        self.theta = layout.flatten({n: named[n].detach() for n in layout.names}).clone()
        self.device = self.theta.device
        self.dtype = self.theta.dtype
        # inputs of the user's model dtype are cast to that of the private copy in prepare()
        self._cast_from = input_dtype if input_dtype not in (None, self.dtype) else None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    @property
    def module(self) -> nn.Module:
        """This thread's copy of the private module (tensors shared with every thread)."""
        local = self._local
        module = getattr(local, "module", None)
        if module is None:
            module = local.module = shared_clone(self._template)
            local.n_hooks = 0
        if local.n_hooks < len(self._hooks):
            for name, hook in self._hooks[local.n_hooks :]:
                module.get_submodule(name).register_forward_hook(hook)
            local.n_hooks = len(self._hooks)
        return module

    def register_forward_hook(self, module_name: str, hook: Callable) -> None:
        """Install a permanent forward hook on layer ``module_name`` of every thread's copy.

        A hook registered on :attr:`module` reaches the calling thread's copy only; this one
        is added to each thread's copy (existing or future) on its next use.  The hook itself
        must keep per-thread state apart (e.g. in a ``threading.local``).
        """
        self._template.get_submodule(module_name)  # raises for an unknown name
        self._hooks.append((module_name, hook))

    @property
    def n_params(self) -> int:
        """P."""
        return self.layout.n_params

    def with_items(self, k: int) -> FunctionalModel:
        """The same model (shared copy and θ) on samples of ``k`` items, ``(B, k, ...)``.

        Each input tensor leads with ``(B, k)``; the network scores the B·k items one at a
        time and the outputs of a sample's items are its outputs, ``(B, k·C)`` (reward
        modelling: the two rewards of a pair).  ``k = 1`` returns ``self``.

        Returns:
            The functional model of the samples.
        """
        if k == 1:
            return self
        other = copy.copy(self)
        other.items_per_sample = int(k)
        return other

    # -- evaluation ----------------------------------------------------------------------------

    def __call__(self, theta: Tensor, x: object) -> Tensor:
        """Outputs ``(B, C)`` at flat parameters ``theta`` ``(P,)`` of the subset."""
        return self.call_dict(self.layout.unflatten(theta), x)

    def call_dict(self, params: Mapping[str, Tensor], x: object) -> Tensor:
        """Outputs ``(B, C)`` with the named tensors replacing the model's own."""
        k = self.items_per_sample
        x = flatten_items(x, k) if k > 1 else x
        out = _call_module(self.module, params, x, self.input_spec)
        out = as_2d_output(output_tensor(out, self.output_fn))
        return group_items(out, k) if k > 1 else out

    def forward(self, x: object) -> Tensor:
        """Outputs at θ*, shape ``(B, C)``, without autograd."""
        with torch.no_grad():
            return self(self.theta, x)

    def prepare(self, x: object) -> object:
        """Move a model input to the model's device (and a half-precision model's to float32).

        Returns:
            The input, its tensors on the device; floating tensors of the user's model dtype
            in the private copy's dtype when the two differ.
        """
        x = to_device(x, self.device)
        if self._cast_from is None:
            return x
        cast = lambda t: t.to(self.dtype) if t.dtype == self._cast_from else t  # noqa: E731
        return tree_map(lambda t: cast(t) if isinstance(t, Tensor) else t, x)

    # -- chunking ----------------------------------------------------------------------------

    def chunk_size(self, per_sample_bytes: int) -> int:
        """Samples per chunk so that ``chunk * per_sample_bytes`` fits the budget (>= 1)."""
        return max(1, int(self.memory_budget // max(1, per_sample_bytes)))

    def chunks(self, x: object, size: int) -> Iterator[object]:
        """Split a model input into consecutive chunks of at most ``size`` samples."""
        B = batch_size_of(x)
        for start in range(0, B, size):
            stop = min(B, start + size)
            yield tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) else t, x)

    # -- Jacobians -----------------------------------------------------------------------------

    def jacobians(self, x: object, *, n_outputs: int | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians of the outputs w.r.t. the subset at θ*.

        Args:
            x: Model input of batch size B (on the model's device).
            n_outputs: C if known (improves chunking); found by a forward pass otherwise.

        Returns:
            ``(J, f)``: Jacobians of shape ``(B, C, P)`` and outputs of shape ``(B, C)``; for
            outputs ``(B, T, C)`` the Jacobians have shape ``(B, T·C, P)`` (row ``t·C + c``).
        """
        return per_sample_jacobians(self, x, self.layout, n_outputs=n_outputs)

    def jacobians_wrt(
        self, x: object, layout: ParamLayout, *, n_outputs: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians w.r.t. the parameters of ``layout`` (a sub-layout), ``(B, C, P')``.

        Autograd is switched on inside (callers may hold ``torch.no_grad()``); the way of
        differentiating is chosen afresh on every call (see the class docstring).

        Returns:
            ``(J, f)``: J of shape ``(B, C, P')`` (``(B, T·C, P')`` for outputs ``(B, T, C)``)
            and the outputs f.
        """
        return per_sample_jacobians(self, x, layout, n_outputs=n_outputs)

    # -- products -----------------------------------------------------------------------------

    @contextmanager
    def forward_mode(self) -> Iterator[None]:
        """Kernels with forward-mode derivatives for the block (oneDNN RNNs off if needed).

        Holds :data:`FORWARD_AD_LOCK`: forward-mode passes of all threads run one at a time.
        """
        with FORWARD_AD_LOCK, NO_MKLDNN.hold() if self.has_rnn else contextlib.nullcontext():
            yield

    def jvp_vjp(
        self, x: object, V: Tensor, output_matvec: Callable[[Tensor, Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        r"""Compute :math:`\sum_n J_n^\top M_n J_n V` on one batch with one forward per column.

        Forward-mode dual numbers give :math:`J V` in the same pass whose graph gives the
        reverse product.  If an operation of the model has no forward-mode derivative, the
        product is formed from reverse-mode Jacobians instead, with a warning (once per call).

        Args:
            x: Model input (batch of size B).
            V: Columns, shape ``(P, K)``.
            output_matvec: ``(f (B, C), u (B, C)) -> M u (B, C)``.

        Returns:
            ``(J^T M J V, f)`` of shapes ``(P, K)`` and ``(B, C)``.

        Raises:
            RuntimeError: If the forward-mode pass fails for another reason than a missing
                forward-mode derivative (re-raised).
        """
        try:
            with self.forward_mode():
                return forward_mode_matmat(self, x, V, output_matvec)
        except (NotImplementedError, RuntimeError) as err:
            if not is_forward_ad_error(err):
                raise
            warn_reverse_fallback(err, stacklevel=3)
        return self.matmat_from_jacobians(x, V, output_matvec)

    def matmat_from_jacobians(
        self, x: object, V: Tensor, output_matvec: Callable[[Tensor, Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        r""":math:`\sum_n J_n^\top M_n J_n V` from reverse-mode Jacobians ``(B, C, P)``.

        Args:
            x: Model input (batch of size B).
            V: Columns, shape ``(P, K)``.
            output_matvec: ``(f (B, C), u (B, C)) -> M u (B, C)``.

        Returns:
            ``(J^T M J V, f)`` of shapes ``(P, K)`` and ``(B, C)``.
        """
        return matmat_from_jacobians(self, x, V, output_matvec)

    def vjp(self, x: object, U: Tensor) -> Tensor:
        r""":math:`\sum_n J_n^\top u_n` for cotangents ``U`` of shape ``(B, C)``; returns ``(P,)``."""
        leaf = self.theta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = self(leaf, x)
            (g,) = torch.autograd.grad(out, leaf, U)
        return g


def _call_module(module: nn.Module, params: Mapping[str, Tensor], x: object, spec) -> object:
    """Run ``module`` with ``params`` on ``x``; a shape error names the input shapes it needs."""

    def call() -> object:
        if isinstance(x, Mapping):
            return functional_call(module, dict(params), args=(), kwargs=dict(x))
        if isinstance(x, (tuple, list)):
            return functional_call(module, dict(params), tuple(x))
        return functional_call(module, dict(params), (x,))

    try:
        with plain_attention() if differentiating() else contextlib.nullcontext():
            return call()
    except RuntimeError as err:  # torch's shape errors: name the shapes if the input's differ
        raise_for_input_shape(err, x, spec)
        if not differentiating():  # a sample without batch dimension accepted by a Conv2d
            from .layers import raise_for_unbatched_layers

            raise_for_unbatched_layers(module, call)
        raise
