r"""Parameter subsets, flat views, functional calls and batched Jacobian products.

Every P-vector is ordered as ``model.named_parameters()`` restricted to the subset, each tensor
flattened row-major (the order of :func:`torch.nn.utils.parameters_to_vector`).

:class:`FunctionalModel` holds a private copy of the user's network in eval mode and evaluates
it as :math:`f(x, \theta)` for a flat θ of the subset; parameters outside the subset stay at
their trained values.  It provides per-sample Jacobians ``(B, C, P)``, Jacobian-vector and
vector-Jacobian products, all chunked so that intermediates stay under a memory budget.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_map

from ._autodiff import (
    NO_MKLDNN,
    differentiating,
    is_forward_ad_error,
    plain_attention,
    prepare_attention_layers,
    shared_clone,
    unroll_recurrent_layers,
    warn_reverse_fallback,
)
from ._checks import DEFAULT_MEMORY_BUDGET, near_matches, shape_str
from .model_io import output_tensor, resolve_target_key

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
    batch: object,
    *,
    input_key: str | None = None,
    target_key: str | None = None,
    where: str = "",
) -> tuple[object, Tensor]:
    """Split a loader batch into model input and targets.

    Mapping batches (e.g. from a Hugging Face tokenizer and collator) hold the targets under
    ``target_key`` (default: whichever of ``"target"``, ``"labels"``, ``"label"`` is present).
    With ``input_key`` set, the input is ``batch[input_key]`` and no other key may be present.
    Without it, every other key is a keyword input of the model (``model(**rest)``), except
    that a single remaining key ``"input"`` is passed positionally (``model(batch["input"])``).

    Args:
        batch: ``(x, y)`` pair (tuple/list) or a mapping as above. ``x`` may be a tensor, a
            tuple of tensors (passed positionally) or a dict of tensors (passed as keyword
            arguments).
        input_key: Key of the input in mapping batches whose input sits under one key.
        target_key: Key of the targets in mapping batches.
        where: Location for error messages, e.g. ``"batch 3"``.

    Returns:
        ``(x, y)``.

    Raises:
        ValueError: If the batch has neither form, or a mapping's keys leave the choice of
            inputs and targets ambiguous (the message names the keys).

    Example:
        >>> batch = {"input_ids": torch.ones(2, 5), "attention_mask": torch.ones(2, 5),
        ...          "labels": torch.zeros(2)}
        >>> x, y = split_batch(batch)
        >>> sorted(x)
        ['attention_mask', 'input_ids']
    """
    loc = f" ({where})" if where else ""
    if isinstance(batch, Mapping):
        tkey = resolve_target_key(batch, target_key, where)
        keys = [str(k) for k in batch.keys()]
        if input_key is not None:
            if input_key not in batch:
                raise ValueError(
                    f"mapping batches{loc} must hold input_key {input_key!r}; got keys {keys}. "
                    "Set input_key= to the key of the inputs, or leave it unset to pass every "
                    "key but the targets as keyword arguments."
                )
            extra = [str(k) for k in batch if k not in (input_key, tkey)]
            if extra:
                raise ValueError(
                    f"mapping batches{loc} must hold only input_key {input_key!r} and the "
                    f"targets {tkey!r} when input_key is set; got the other keys {extra}, which "
                    "would be ignored. Leave input_key unset to pass every key but the targets "
                    "as keyword arguments (model(**inputs)), or drop these keys from the batch."
                )
            return batch[input_key], batch[tkey]
        rest = {k: v for k, v in batch.items() if k != tkey}
        if not rest:
            raise ValueError(
                f"mapping batches{loc} must hold model inputs besides the targets {tkey!r}; "
                f"got keys {keys}."
            )
        if list(rest) == ["input"]:
            return rest["input"], batch[tkey]
        return rest, batch[tkey]
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


def _graph_nodes(root: object) -> set[int]:
    """Ids of the autograd nodes reachable from ``root`` (a ``grad_fn``)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(nxt for nxt, _ in getattr(node, "next_functions", ()))
    return seen


def _last_layer_names(
    model: nn.Module, x: object, output_fn: Callable[[object], Tensor] | None = None
) -> list[str]:
    """Names of the parameters of the last layer whose output reaches the model output.

    A layer is a module with trainable parameters of its own (not a submodule's); the root
    module's own parameters (a positional embedding, a temperature) never count unless the
    model is a single layer.  The forward pass runs on a private eval-mode copy with autograd
    on, so that each layer's output can be followed to the model output through the graph;
    the user's BatchNorm statistics, mode and the global random state are left alone.

    Raises:
        ValueError: If no such layer ran (the message names what was found).
    """
    model = copy.deepcopy(model).eval()
    canonical = {id(p): n for n, p in model.named_parameters()}
    own = {
        name: [p for p in module.parameters(recurse=False) if p.requires_grad]
        for name, module in model.named_modules()
    }
    layers = {n: ps for n, ps in own.items() if n and ps}
    if not layers and own.get(""):
        layers = {"": own[""]}  # a model that is a single layer
    records: list[tuple[str, list[object]]] = []
    handles = []
    for name in layers:

        def hook(mod, inp, out, name=name):
            records.append((name, [t.grad_fn for t in _leaves(out) if t.grad_fn is not None]))

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.enable_grad():
            out = output_tensor(call_model(model, x), output_fn)
    finally:
        for h in handles:
            h.remove()
    reached = _graph_nodes(out.grad_fn)
    for name, nodes in reversed(records):
        if any(id(node) in reached for node in nodes):
            return [canonical[id(p)] for p in layers[name] if id(p) in canonical]
    ran = list(dict.fromkeys(name for name, _ in records))
    free = [n for n, p in model.named_parameters(recurse=False) if p.requires_grad]
    found = (
        f"the traced forward pass ran the layers {ran}, none of whose outputs reaches the "
        "model output"
        if ran
        else "the traced forward pass ran no module with trainable parameters of its own"
    )
    raise ValueError(
        "subset='last_layer' needs a module with trainable parameters of its own whose output "
        f"reaches the model output; {found}"
        + (f" (root-level parameters {free} never count)" if free else "")
        + ". Pass subset= a list of parameter names."
    )


_SUBSET_WORDS = ("all", "trainable", "last_layer")


def resolve_subset(
    model: nn.Module,
    subset: object,
    example_input: object = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> ParamLayout:
    """Resolve ``"all"``, ``"trainable"``, ``"last_layer"`` or a list of names to a layout.

    Args:
        model: The network.
        subset: ``"all"`` or its alias ``"trainable"`` (every parameter with
            ``requires_grad``; frozen parameters, e.g. a base model under LoRA adapters, are
            left out), ``"last_layer"`` (the last module with trainable parameters of its own
            whose output reaches the model output, in a forward pass on ``example_input``;
            root-level parameters never count) or a list of names from
            ``model.named_parameters()``.
        example_input: One batch of model input, needed for ``"last_layer"``.
        output_fn: Maps the model output to the prediction tensor (see :func:`output_tensor`).

    Returns:
        The :class:`ParamLayout` of the subset, in ``named_parameters()`` order.

    Raises:
        ValueError: If the subset is unknown, empty, or names unknown parameters.
        TypeError: If ``subset`` is neither a string nor a list of strings.
    """
    params = dict(model.named_parameters())
    if isinstance(subset, str):
        if subset in ("all", "trainable"):
            names = [n for n, p in params.items() if p.requires_grad]
        elif subset == "last_layer":
            if example_input is None:
                raise ValueError("subset='last_layer' needs an example input to trace the model.")
            chosen = set(_last_layer_names(model, example_input, output_fn))
            names = [n for n in params if n in chosen]
        else:
            hint = near_matches(subset, _SUBSET_WORDS)
            raise ValueError(
                "subset must be 'all', 'last_layer' or a list of parameter names; "
                f"got {subset!r}."
                + (f" Did you mean {hint[0]!r}?" if hint else "")
                + " ('trainable' is an alias of 'all'.)"
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


class _JacobianMode(enum.Enum):
    """How per-sample Jacobians are computed on one call (decided per call, never cached)."""

    VMAP = "vmap"  # vmap over samples of jacrev: one forward and C cotangents per sample
    BATCH = "batch"  # one forward of a chunk, B·C one-hot cotangents in one batched backward
    ROWS = "rows"  # as BATCH with one backward per row (the batched backward failed)


#: Samples per forward in the batched reverse mode: each of the B·C backward passes runs
#: over the whole chunk, so the work grows with the chunk; small chunks keep it near the
#: per-sample cost while still batching.
_REVERSE_CHUNK = 8


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

    Args:
        model: The trained network (copied, not modified).
        layout: Subset of parameters to differentiate, from :func:`resolve_subset`.
        memory_budget: Bytes allowed for intermediates such as per-sample Jacobians.
        copy_model: Deep-copy ``model`` (default). ``False`` uses it as is (it must already be
            a private copy in eval mode).
        output_fn: Maps the model output to the prediction tensor (see :func:`output_tensor`).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        *,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        copy_model: bool = True,
        output_fn: Callable[[object], Tensor] | None = None,
    ):
        if copy_model:
            model = copy.deepcopy(model)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        self._template = model
        self._local = threading.local()
        self._hooks: list[tuple[str, Callable]] = []  # permanent hooks of every thread's copy
        self.layout = layout
        self.memory_budget = int(memory_budget)
        self.output_fn = output_fn
        # recurrent layers step by step (vmap, batched backward and forward mode all work);
        # True only if fused recurrent kernels remain (subclasses, packed sequences)
        self.has_rnn = unroll_recurrent_layers(model)
        prepare_attention_layers(model)
        named = dict(model.named_parameters())
        self.theta = layout.flatten({n: named[n].detach() for n in layout.names}).clone()
        self.device = self.theta.device
        self.dtype = self.theta.dtype

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

    # -- evaluation ----------------------------------------------------------------------------

    def __call__(self, theta: Tensor, x: object) -> Tensor:
        """Outputs ``(B, C)`` at flat parameters ``theta`` ``(P,)`` of the subset."""
        return self.call_dict(self.layout.unflatten(theta), x)

    def call_dict(self, params: Mapping[str, Tensor], x: object) -> Tensor:
        """Outputs ``(B, C)`` with the named tensors replacing the model's own."""
        module = self.module
        with plain_attention() if differentiating() else contextlib.nullcontext():
            if isinstance(x, Mapping):
                out = functional_call(module, dict(params), args=(), kwargs=dict(x))
            elif isinstance(x, (tuple, list)):
                out = functional_call(module, dict(params), tuple(x))
            else:
                out = functional_call(module, dict(params), (x,))
        return _as_2d_output(output_tensor(out, self.output_fn))

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
        """Per-sample Jacobians w.r.t. the parameters of ``layout`` (a sub-layout), ``(B, C, P')``.

        Autograd is switched on inside (callers may hold ``torch.no_grad()``); the way of
        differentiating is chosen afresh on every call (see the class docstring).
        """
        named = dict(self.module.named_parameters())
        theta = layout.flatten({n: named[n].detach() for n in layout.names})
        C = n_outputs or 16
        per_sample = 4 * C * layout.n_params * theta.element_size()
        call = {"mode": _JacobianMode.BATCH if self.has_rnn else _JacobianMode.VMAP}
        Js, fs = [], []
        with torch.enable_grad():
            for xc in self.chunks(x, self.chunk_size(per_sample)):
                J, f = self._jacobian_chunk(theta, xc, layout, call)
                Js.append(J)
                fs.append(f)
        if not Js:  # an input of 0 rows: empty results of the right shapes
            C = n_outputs if n_outputs is not None else self.forward(x).shape[1]
            return theta.new_zeros(0, C, layout.n_params), theta.new_zeros(0, C)
        return torch.cat(Js), torch.cat(fs)

    def _jacobian_chunk(
        self, theta: Tensor, x: object, layout: ParamLayout, call: dict
    ) -> tuple[Tensor, Tensor]:
        if call["mode"] is _JacobianMode.VMAP:

            def f_single(th: Tensor, xs: object) -> tuple[Tensor, Tensor]:
                xb = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, xs)
                out = self.call_dict(layout.unflatten(th), xb)[0]
                return out.reshape(-1), out  # outputs (T, C) of a sequence: T·C rows

            try:
                J, f = vmap(jacrev(f_single, has_aux=True), in_dims=(None, 0))(theta, x)
                return J.detach(), f.detach()
            except Exception:
                # the model cannot run under vmap; an error of the input itself surfaces
                # again from the plain forward pass below
                call["mode"] = _JacobianMode.BATCH
        Js, fs = [], []
        for xc in self.chunks(x, _REVERSE_CHUNK):
            J, f = self._reverse_jacobian(theta, xc, layout, call)
            Js.append(J)
            fs.append(f)
        return torch.cat(Js), torch.cat(fs)

    def _reverse_jacobian(
        self, theta: Tensor, x: object, layout: ParamLayout, call: dict
    ) -> tuple[Tensor, Tensor]:
        """Jacobian rows of one forward pass of a chunk, ``(B, C, P')``, and ``f``.

        Outputs ``(B, T, C)`` give ``(B, T·C, P')`` (row ``t·C + c``), as the vmap path does.
        """
        params = {n: t.detach().requires_grad_(True) for n, t in layout.unflatten(theta).items()}
        leaves = list(params.values())
        saved = [0]

        def pack(t: Tensor) -> Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.call_dict(params, x)
        f = out.detach()
        B, K = f.shape[0], math.prod(f.shape[1:])  # K = C, or T·C for sequence outputs
        n_rows, P = B * K, layout.n_params
        J = torch.zeros(n_rows, P, dtype=theta.dtype, device=theta.device)
        if not out.requires_grad:  # no parameter of the subset reaches the output
            return J.view(B, K, P), f
        # a batched backward holds about one copy of the saved activations per cotangent
        step = max(1, min(n_rows, self.memory_budget // max(1, 2 * (saved[0] + P * 8))))
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            cot = torch.zeros(stop - start, n_rows, dtype=out.dtype, device=out.device)
            cot[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            cot = cot.view(stop - start, *f.shape)
            if call["mode"] is _JacobianMode.BATCH:
                try:
                    grads = torch.autograd.grad(
                        out,
                        leaves,
                        cot,
                        retain_graph=True,
                        is_grads_batched=True,
                        allow_unused=True,
                    )
                except RuntimeError as err:
                    call["mode"] = _JacobianMode.ROWS
                    warnings.warn(
                        f"batched backward failed ({type(err).__name__}: {str(err)[:120]}); "
                        "computing the Jacobian rows one backward pass at a time (slower).",
                        RuntimeWarning,
                        stacklevel=5,
                    )
            if call["mode"] is _JacobianMode.ROWS:
                rows = [
                    torch.autograd.grad(out, leaves, c, retain_graph=True, allow_unused=True)
                    for c in cot
                ]
                grads = [
                    None if rows[0][i] is None else torch.stack([r[i] for r in rows])
                    for i in range(len(leaves))
                ]
            for name, g in zip(params, grads):
                if g is not None:
                    J[start:stop, layout.slice_of(name)] = g.reshape(stop - start, -1)
        return J.view(B, K, P), f

    # -- products -----------------------------------------------------------------------------

    @contextmanager
    def forward_mode(self) -> Iterator[None]:
        """Kernels with forward-mode derivatives for the block (oneDNN RNNs off if needed)."""
        if self.has_rnn:
            with NO_MKLDNN.hold():
                yield
        else:
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
        """
        try:
            with self.forward_mode():
                return self._jvp_vjp_forward(x, V, output_matvec)
        except (NotImplementedError, RuntimeError) as err:
            if not is_forward_ad_error(err):
                raise
            warn_reverse_fallback(err, stacklevel=3)
        return self.matmat_from_jacobians(x, V, output_matvec)

    def _jvp_vjp_forward(
        self, x: object, V: Tensor, output_matvec: Callable[[Tensor, Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        cols, f_out = [], None
        with torch.enable_grad():
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
        J, f = self.jacobians(x)  # (B, M, P); M = C, or T·C for outputs (B, T, C)
        V = V.to(J.dtype)
        JV = torch.einsum("bmp,pk->kbm", J, V)
        cols = [
            torch.einsum(
                "bmp,bm->p", J, output_matvec(f, JV[k].reshape(f.shape)).reshape(JV[k].shape)
            )
            for k in range(V.shape[1])
        ]
        out = torch.stack(cols, dim=1) if cols else torch.zeros_like(V)
        return out, f

    def vjp(self, x: object, U: Tensor) -> Tensor:
        r""":math:`\sum_n J_n^\top u_n` for cotangents ``U`` of shape ``(B, C)``; returns ``(P,)``."""
        leaf = self.theta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
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
