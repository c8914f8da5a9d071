r"""Parameter subsets, flat views, functional calls and batched Jacobian products.

Every P-vector is ordered as ``model.named_parameters()`` restricted to the subset, each tensor
flattened row-major (the order of :func:`torch.nn.utils.parameters_to_vector`).

:class:`FunctionalModel` holds a private copy of the user's network in eval mode and evaluates
it as :math:`f(x, \theta)` for a flat θ of the subset; parameters outside the subset stay at
their trained values.  It provides per-sample Jacobians ``(B, C, P)``, Jacobian-vector and
vector-Jacobian products, all chunked so that intermediates stay under a memory budget.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_map

from ._checks import DEFAULT_MEMORY_BUDGET, near_matches, shape_str

__all__ = [
    "ParamLayout",
    "FunctionalModel",
    "resolve_subset",
    "split_batch",
    "check_batch_dims",
    "call_model",
    "batch_size_of",
    "model_input_device",
]


# ---------------------------------------------------------------------------------------------
# Flat parameter layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the parameters of a subset, and their place in the flat vector.

    Attributes:
        names: Parameter names in ``model.named_parameters()`` order.
        shapes: Their shapes.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def numels(self) -> tuple[int, ...]:
        """Number of entries of each tensor."""
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def n_params(self) -> int:
        """P, the length of the flat vector."""
        return sum(self.numels)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each tensor in the flat vector (length ``len(names) + 1``)."""
        out = [0]
        for n in self.numels:
            out.append(out[-1] + n)
        return tuple(out)

    def slice_of(self, name: str) -> slice:
        """Slice of the flat vector holding parameter ``name``."""
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat vector ``(P,)`` into a name -> tensor dict (views)."""
        parts = theta.split(self.numels)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate tensors (dict by name, or sequence in order) into ``(P,)``."""
        if isinstance(tensors, Mapping):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def flatten_batched(self, tensors: Mapping[str, Tensor], n_lead: int) -> Tensor:
        """Flatten a dict of tensors with ``n_lead`` leading batch dims into ``(*lead, P)``."""
        parts = [tensors[n] for n in self.names]
        lead = parts[0].shape[:n_lead]
        return torch.cat([t.reshape(*lead, -1) for t in parts], dim=-1)

    def unflatten_batched(self, X: Tensor) -> dict[str, Tensor]:
        """Split the last dimension ``P`` of ``X`` ``(..., P)`` into a name -> ``(..., numel)`` dict."""
        return dict(zip(self.names, X.split(self.numels, dim=-1)))

    def expand_per_tensor(self, values: Tensor) -> Tensor:
        """Repeat one value per tensor ``(T,)`` into a per-parameter vector ``(P,)``."""
        reps = torch.tensor(self.numels, device=values.device)
        return torch.repeat_interleave(values, reps)

    def sub_layout(self, names: Sequence[str]) -> ParamLayout:
        """Layout of a subset of these names (kept in this layout's order)."""
        keep = set(names)
        pairs = [(n, s) for n, s in zip(self.names, self.shapes) if n in keep]
        return ParamLayout(tuple(n for n, _ in pairs), tuple(s for _, s in pairs))


# ---------------------------------------------------------------------------------------------
# Batches and model calls
# ---------------------------------------------------------------------------------------------


def split_batch(
    batch: object, *, input_key: str = "input", target_key: str = "target", where: str = ""
) -> tuple[object, Tensor]:
    """Split a loader batch into model input and targets.

    Args:
        batch: ``(x, y)`` pair (tuple/list) or a mapping with ``input_key`` and ``target_key``.
            ``x`` may be a tensor, a tuple of tensors (passed positionally) or a dict of tensors
            (passed as keyword arguments).
        input_key: Key of the input in mapping batches.
        target_key: Key of the targets in mapping batches.
        where: Location for error messages, e.g. ``"batch 3"``.

    Returns:
        ``(x, y)``.

    Raises:
        ValueError: If the batch has neither form.
    """
    loc = f" ({where})" if where else ""
    if isinstance(batch, Mapping):
        missing = [k for k in (input_key, target_key) if k not in batch]
        if missing:
            raise ValueError(
                f"mapping batches{loc} must hold keys {input_key!r} and {target_key!r}; "
                f"got keys {sorted(map(str, batch.keys()))}. Set input_key= / target_key=."
            )
        return batch[input_key], batch[target_key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    kind = type(batch).__name__
    n = len(batch) if isinstance(batch, (tuple, list)) else "-"
    raise ValueError(
        f"loader batches{loc} must be (input, target) pairs or mappings; got {kind} of length {n}."
    )


UNBATCHED_HINT = (
    "If the loader yields single samples without a batch dimension (e.g. "
    "list(TensorDataset(X, y))), batch them: DataLoader(dataset, batch_size=...)."
)


def check_batch_dims(x: object, y: object, where: str = "") -> None:
    """Refuse a batch whose input and targets do not share a leading batch dimension.

    A loader of single samples (e.g. ``list(TensorDataset(X, y))``) yields ``x`` of shape
    ``(D,)`` and a 0-dim ``y``: a model would read the features as a batch of scalars, or the
    D outputs of one sample as D samples.  The targets must have a batch dimension B, and
    the first tensor of the input the same leading dimension B (inputs are batch-first
    everywhere in this package: 1-D features ``(B,)``, token ids ``(B, T)``, images
    ``(B, C, H, W)``).  Targets without a ``shape`` are left to the likelihood's checks.

    Args:
        x: Model input (tensor, tuple or dict of tensors).
        y: Targets.
        where: Location for error messages, e.g. ``"batch 3"``.

    Raises:
        ValueError: Naming both shapes and how to batch single samples.
    """
    y_shape = getattr(y, "shape", None)
    leaves = _leaves(x)
    if y_shape is None or not leaves:
        return
    loc = f" in {where}" if where else ""
    x_shape = tuple(leaves[0].shape)
    hint = UNBATCHED_HINT
    if len(y_shape) == 0:
        raise ValueError(
            f"targets{loc} must have a batch dimension, shape (B, ...); got a 0-dim target "
            f"with input of shape {shape_str(x_shape)}. {hint}"
        )
    if len(x_shape) == 0 or x_shape[0] != y_shape[0]:
        raise ValueError(
            f"input and targets{loc} must have the same batch size B (leading dimension); got "
            f"input {shape_str(x_shape)} and targets {shape_str(tuple(y_shape))}. {hint}"
        )


def _leaves(x: object) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _leaves(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _leaves(v)]
    return []


def batch_size_of(x: object, where: str = "") -> int:
    """Leading dimension of the first tensor in ``x``.

    Args:
        x: Model input (tensor, tuple or dict of tensors).
        where: Location for error messages, e.g. ``"batch 3"``.

    Returns:
        B.

    Raises:
        ValueError: If ``x`` holds no tensor, or a tensor without a batch dimension (0-dim).
    """
    leaves = _leaves(x)
    loc = f" in {where}" if where else ""
    if not leaves:
        raise ValueError(
            f"model input must be a tensor, a tuple or a dict of tensors; got {type(x).__name__}."
        )
    if leaves[0].ndim == 0:
        raise ValueError(
            f"model input{loc} must have a leading batch dimension; got a 0-dim tensor. Add one "
            "with x.unsqueeze(0) (a batch of one)."
        )
    return int(leaves[0].shape[0])


def input_tensors(x: object) -> list[Tensor]:
    """All tensors in a (possibly nested) model input."""
    return _leaves(x)


def to_device(x: object, device: torch.device) -> object:
    """Move every tensor of a nested input to ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, x)


def call_model(model: nn.Module | Callable, x: object) -> Tensor:
    """Call ``model`` on ``x``: a tensor positionally, a tuple unpacked, a dict as keywords."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _as_2d_output(out: object) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"model output must be a tensor of shape (B, C); got {type(out).__name__}. "
            "Wrap the model so that it returns the logits / predictions tensor."
        )
    if out.ndim == 1:
        return out.unsqueeze(1)
    if out.ndim not in (2, 3):
        raise ValueError(
            f"model output must have shape (B, C), (B,) or (B, T, C) (one observation per "
            f"position); got {shape_str(out.shape)}. Flatten the extra output dimensions into "
            "T in a wrapper module."
        )
    return out


def model_input_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU if it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------


def _last_layer_names(model: nn.Module, x: object) -> list[str]:
    """Names of the parameters of the last module with parameters run in a forward pass.

    The pass runs on a private eval-mode copy: the user's BatchNorm statistics, mode and the
    global random state are left alone.
    """
    model = copy.deepcopy(model).eval()
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):

            def hook(mod, inp, out, name=name):
                order.append(name)

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError(
            "subset='last_layer' needs a module with trainable parameters in the forward pass; "
            "the traced forward pass ran none."
        )
    last = order[-1]
    module = model.get_submodule(last)
    prefix = f"{last}." if last else ""
    return [prefix + n for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def resolve_subset(model: nn.Module, subset: object, example_input: object = None) -> ParamLayout:
    """Resolve ``"all"``, ``"last_layer"`` or a list of parameter names to a layout.

    Args:
        model: The network.
        subset: ``"all"`` (every parameter with ``requires_grad``), ``"last_layer"`` (the last
            module with parameters that runs in a forward pass on ``example_input``) or a list
            of names from ``model.named_parameters()``.
        example_input: One batch of model input, needed for ``"last_layer"``.

    Returns:
        The :class:`ParamLayout` of the subset, in ``named_parameters()`` order.

    Raises:
        ValueError: If the subset is unknown, empty, or names unknown parameters.
        TypeError: If ``subset`` is neither a string nor a list of strings.
    """
    params = dict(model.named_parameters())
    if isinstance(subset, str):
        if subset == "all":
            names = [n for n, p in params.items() if p.requires_grad]
        elif subset == "last_layer":
            if example_input is None:
                raise ValueError("subset='last_layer' needs an example input to trace the model.")
            names = _last_layer_names(model, example_input)
        else:
            hint = near_matches(subset, ["all", "last_layer"])
            raise ValueError(
                "subset must be 'all', 'last_layer' or a list of parameter names; "
                f"got {subset!r}." + (f" Did you mean {hint[0]!r}?" if hint else "")
            )
    elif isinstance(subset, (list, tuple)) and all(isinstance(s, str) for s in subset):
        unknown = [s for s in subset if s not in params]
        if unknown:
            hints = {u: near_matches(u, params) for u in unknown}
            shown = "; ".join(
                f"{u!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "")
                for u, h in hints.items()
            )
            raise ValueError(
                f"subset names must be parameters of the model; unknown: {shown}. "
                f"Known names: {list(params)[:10]}{'...' if len(params) > 10 else ''}."
            )
        if len(set(subset)) != len(subset):
            raise ValueError(f"subset names must be unique; got {list(subset)}.")
        wanted = set(subset)
        names = [n for n in params if n in wanted]
    else:
        raise TypeError(
            "subset must be 'all', 'last_layer' or a list of parameter names; "
            f"got {type(subset).__name__}."
        )
    if not names:
        raise ValueError(
            f"subset {subset!r} selects no trainable parameter; the model has "
            f"{sum(p.requires_grad for p in params.values())} parameters with requires_grad."
        )
    return ParamLayout(tuple(names), tuple(params[n].shape for n in names))


# ---------------------------------------------------------------------------------------------
# The functional model
# ---------------------------------------------------------------------------------------------


class FunctionalModel:
    r"""A private eval-mode copy of a network, evaluated as :math:`f(x, \theta)`.

    The user's module is deep-copied once; its parameters, buffers, mode and hooks are never
    touched.  Products are chunked over the batch so that the largest intermediate stays under
    ``memory_budget`` bytes.

    Args:
        model: The trained network (copied, not modified).
        layout: Subset of parameters to differentiate, from :func:`resolve_subset`.
        memory_budget: Bytes allowed for intermediates such as per-sample Jacobians.
        copy_model: Deep-copy ``model`` (default). ``False`` uses it as is (it must already be
            a private copy in eval mode).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        *,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        copy_model: bool = True,
    ):
        if copy_model:
            model = copy.deepcopy(model)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        self.module = model
        self.layout = layout
        self.memory_budget = int(memory_budget)
        named = dict(model.named_parameters())
        self.theta = layout.flatten({n: named[n].detach() for n in layout.names}).clone()
        self.device = self.theta.device
        self.dtype = self.theta.dtype
        self._vmap_ok = True

    @property
    def n_params(self) -> int:
        """P."""
        return self.layout.n_params

    # -- evaluation ----------------------------------------------------------------------------

    def __call__(self, theta: Tensor, x: object) -> Tensor:
        """Outputs ``(B, C)`` at flat parameters ``theta`` ``(P,)`` of the subset."""
        return self.call_dict(self.layout.unflatten(theta), x)

    def call_dict(self, params: Mapping[str, Tensor], x: object) -> Tensor:
        """Outputs ``(B, C)`` with the named tensors replacing the model's own."""
        if isinstance(x, Mapping):
            out = functional_call(self.module, dict(params), args=(), kwargs=dict(x))
        elif isinstance(x, (tuple, list)):
            out = functional_call(self.module, dict(params), tuple(x))
        else:
            out = functional_call(self.module, dict(params), (x,))
        return _as_2d_output(out)

    def forward(self, x: object) -> Tensor:
        """Outputs at θ*, shape ``(B, C)``, without autograd."""
        with torch.no_grad():
            return self(self.theta, x)

    def prepare(self, x: object) -> object:
        """Move a model input to the model's device."""
        return to_device(x, self.device)

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
        return self.jacobians_wrt(x, self.layout, n_outputs=n_outputs)

    def jacobians_wrt(
        self, x: object, layout: ParamLayout, *, n_outputs: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians w.r.t. the parameters of ``layout`` (a sub-layout), ``(B, C, P')``."""
        named = dict(self.module.named_parameters())
        theta = layout.flatten({n: named[n].detach() for n in layout.names})
        C = n_outputs or 16
        per_sample = 4 * C * layout.n_params * theta.element_size()
        Js, fs = [], []
        for xc in self.chunks(x, self.chunk_size(per_sample)):
            J, f = self._jacobian_chunk(theta, xc, layout)
            Js.append(J)
            fs.append(f)
        if not Js:  # an input of 0 rows: empty results of the right shapes
            C = n_outputs if n_outputs is not None else self.forward(x).shape[1]
            return theta.new_zeros(0, C, layout.n_params), theta.new_zeros(0, C)
        return torch.cat(Js), torch.cat(fs)

    def _jacobian_chunk(
        self, theta: Tensor, x: object, layout: ParamLayout
    ) -> tuple[Tensor, Tensor]:
        def f_single(th: Tensor, xs: object) -> tuple[Tensor, Tensor]:
            xb = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, xs)
            out = self.call_dict(layout.unflatten(th), xb)[0]
            return out.reshape(-1), out  # outputs (T, C) of a sequence are flattened to T·C

        if self._vmap_ok:
            try:
                J, f = vmap(jacrev(f_single, has_aux=True), in_dims=(None, 0))(theta, x)
                return J.detach(), f.detach()
            except (RuntimeError, NotImplementedError) as err:  # model not vmappable
                self._vmap_ok = False
                warnings.warn(
                    f"vmap over samples failed ({type(err).__name__}: {str(err)[:120]}); "
                    "falling back to a slower per-sample loop for Jacobians.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        Js, fs = [], []
        for i in range(batch_size_of(x)):
            xi = tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, x)
            J, f = jacrev(f_single, has_aux=True)(theta, xi)
            Js.append(J.detach())
            fs.append(f.detach())
        return torch.stack(Js), torch.stack(fs)

    # -- products -----------------------------------------------------------------------------

    def jvp_vjp(
        self, x: object, V: Tensor, output_matvec: Callable[[Tensor, Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        r"""Compute :math:`\sum_n J_n^\top M_n J_n V` on one batch with one forward per column.

        Forward-mode dual numbers give :math:`J V` in the same pass whose graph gives the
        reverse product.

        Args:
            x: Model input (batch of size B).
            V: Columns, shape ``(P, K)``.
            output_matvec: ``(f (B, C), u (B, C)) -> M u (B, C)``.

        Returns:
            ``(J^T M J V, f)`` of shapes ``(P, K)`` and ``(B, C)``.
        """
        cols, f_out = [], None
        for k in range(V.shape[1]):
            leaf = self.theta.detach().clone().requires_grad_(True)
            with fwAD.dual_level():
                out = self(fwAD.make_dual(leaf, V[:, k].to(self.dtype)), x)
                primal, tangent = fwAD.unpack_dual(out)
            f = primal.detach()
            u = output_matvec(f, tangent)
            (g,) = torch.autograd.grad(primal, leaf, u)
            cols.append(g)
            f_out = f
        if f_out is None:
            f_out = self.forward(x)
        return torch.stack(cols, dim=1), f_out

    def vjp(self, x: object, U: Tensor) -> Tensor:
        r""":math:`\sum_n J_n^\top u_n` for cotangents ``U`` of shape ``(B, C)``; returns ``(P,)``."""
        leaf = self.theta.detach().clone().requires_grad_(True)
        out = self(leaf, x)
        (g,) = torch.autograd.grad(out, leaf, U)
        return g


# ---------------------------------------------------------------------------------------------
# Layer capture for the exact diagonal and KFAC (forward hooks on nn.Linear / nn.Conv2d)
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerRecord:
    """Inputs and outputs of one layer in one forward pass."""

    module: nn.Module
    name: str
    inputs: list[Tensor]
    outputs: list[Tensor]


@contextmanager
def capture_layers(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, LayerRecord]]:
    """Record the input and output of each module during forward passes; hooks always removed."""
    records = {n: LayerRecord(m, n, [], []) for n, m in modules.items()}
    handles = []
    try:
        for name, module in modules.items():

            def hook(mod, inp, out, rec=records[name]):
                rec.inputs.append(inp[0])
                rec.outputs.append(out)

            handles.append(module.register_forward_hook(hook))
        yield records
    finally:
        for h in handles:
            h.remove()


def is_model_output(out: object, f: Tensor) -> bool:
    """Whether a layer's recorded output is the model output ``f`` (the same values in place).

    True for the same tensor, or a view of it with the same shape (e.g. squeezed and
    unsqueezed again); the gradient of ``f`` at such a layer output is the identity.
    """
    return (
        isinstance(out, Tensor)
        and out.shape == f.shape
        and out.data_ptr() == f.data_ptr()
        and out.is_contiguous()
        and f.is_contiguous()
    )


def batched_output_grads(f: Tensor, outs: list[Tensor], cot: Tensor) -> list[Tensor]:
    """Vector-Jacobian products of K cotangents ``(K, B, C)`` of ``f`` at each tensor of ``outs``.

    One batched backward pass (vmap over the cotangents); if that fails, one backward per
    column with a warning.  Outputs that do not reach ``f`` get zero gradients.

    Returns:
        One tensor ``(K, *out.shape)`` per entry of ``outs``.
    """
    try:
        grads = torch.autograd.grad(f, outs, cot, is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        warnings.warn(
            "batched backward failed; back-propagating the curvature columns one by one.",
            RuntimeWarning,
            stacklevel=3,
        )
        cols = [
            torch.autograd.grad(f, outs, cot[k], retain_graph=True, allow_unused=True)
            for k in range(cot.shape[0])
        ]
        grads = [
            None if cols[0][i] is None else torch.stack([c[i] for c in cols])
            for i in range(len(outs))
        ]
    return [
        torch.zeros(cot.shape[0], *o.shape, dtype=o.dtype, device=o.device) if g is None else g
        for g, o in zip(grads, outs)
    ]
