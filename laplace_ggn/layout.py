r"""Parameter subsets and their flat layout.

Every P-vector is ordered as ``model.named_parameters()`` restricted to the subset, each tensor
flattened row-major (the order of :func:`torch.nn.utils.parameters_to_vector`).
:func:`resolve_subset` turns ``"all"``, ``"last_layer"`` or a list of names into the
:class:`ParamLayout` of the subset.

Tied parameters: a tensor held by several modules (an embedding tied to a language model's
output layer) has one *canonical* name in ``model.named_parameters()``, that of the first
holder, and one *alias* per further holder (its place in
``model.named_parameters(remove_duplicate=False)``, e.g. ``lm_head.weight``).  The canonical
name selects every use of the tensor; an alias in a subset selects that holder's use alone,
the other uses held at θ* (:func:`untie_aliases` gives the holder its own copy of the tensor in
the library's private model).  ``"last_layer"`` names the last layer's own parameters, so the
tied output layer of a language model is its alias: the curvature of the head with its
features fixed, as for an untied head.  An alias takes the place of its holder in
``named_parameters(remove_duplicate=False)`` in every P-vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._checks import near_matches
from .batches import call_model, input_tensors
from .model_io import output_tensor
from .private_model import private_copy

__all__ = ["ParamLayout", "graph_nodes", "parameter_aliases", "resolve_subset", "untie_aliases"]


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


def graph_nodes(root: object) -> set[int]:
    """Ids of the autograd nodes reachable from ``root`` (a ``grad_fn``).

    Returns:
        The ids.
    """
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

    A layer is a module with trainable parameters of its own (not a submodule's; the
    originals of its parametrised tensors, e.g. under ``weight_norm``, are its own); the root
    module's own parameters (a positional embedding, a temperature) never count unless the
    model is a single layer.  The forward pass runs on a private eval-mode copy with autograd
    on, so that each layer's output can be followed to the model output through the graph;
    the user's BatchNorm statistics, mode and the global random state are left alone.

    Returns:
        The layer's own parameter names (for a weight tied to an earlier module, its alias).

    Raises:
        ValueError: If no such layer ran (the message names what was found).
    """
    model = private_copy(model).eval()
    # a parametrised tensor (torch.nn.utils.parametrizations.weight_norm, ...) belongs to the
    # layer it is a parameter of: its originals are the layer's own, not a separate layer's
    inner = {
        id(m)
        for module in model.modules()
        if parametrize.is_parametrized(module)
        for m in module.parametrizations.modules()
    }
    own = {
        name: [
            (f"parametrizations.{local}", p)
            for local, p in (
                module.parametrizations.named_parameters()
                if parametrize.is_parametrized(module)
                else ()
            )
            if p.requires_grad
        ]
        + [(local, p) for local, p in module.named_parameters(recurse=False) if p.requires_grad]
        for name, module in model.named_modules()
        if id(module) not in inner
    }
    layers = {n: ps for n, ps in own.items() if n and ps}
    if not layers and own.get(""):
        layers = {"": own[""]}  # a model that is a single layer
    records: list[tuple[str, list[object]]] = []
    handles = []
    for name in layers:

        def hook(mod, inp, out, name=name):
            records.append((name, [t.grad_fn for t in input_tensors(out) if t.grad_fn is not None]))

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.enable_grad():
            out = output_tensor(call_model(model, x), output_fn)
    finally:
        for h in handles:
            h.remove()
    reached = graph_nodes(out.grad_fn)
    for name, nodes in reversed(records):
        if any(id(node) in reached for node in nodes):
            # the layer's own names: the alias of a tied weight (its use in this layer)
            return [f"{name}.{local}" if name else local for local, _ in layers[name]]
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


def parameter_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: canonical name}`` of the tied parameters of ``model`` (see the module docstring).

    Returns:
        One entry per further holder of a tensor held by several modules (empty if none).
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {
        n: canonical[id(p)]
        for n, p in model.named_parameters(remove_duplicate=False)
        if canonical[id(p)] != n
    }


def untie_aliases(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """Give each alias among ``names`` its own copy of the tied tensor, in place.

    Only for the library's private copy of a model: the holder of the alias then uses a
    separate parameter of the same value, so that differentiating the alias differentiates
    that holder's use alone.  Canonical names are left alone.

    Returns:
        ``dict(model.named_parameters())`` afterwards (the aliases among ``names`` included).
    """
    named = dict(model.named_parameters())
    if named.keys() >= set(names):
        return named
    aliases = parameter_aliases(model)
    for name in names:
        if name in aliases:
            owner, _, local = name.rpartition(".")
            module = model.get_submodule(owner)
            p = getattr(module, local)
            module.register_parameter(
                local, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            )
    return dict(model.named_parameters())


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
            ``model.named_parameters()`` or aliases of tied parameters (see the module
            docstring).
        example_input: One batch of model input, needed for ``"last_layer"``.
        output_fn: Maps the model output to the prediction tensor (see :func:`output_tensor`).

    Returns:
        The :class:`ParamLayout` of the subset, in ``named_parameters(remove_duplicate=False)``
        order (that of ``named_parameters()`` without aliases).

    Raises:
        ValueError: If the subset is unknown, empty, or names unknown parameters.
        TypeError: If ``subset`` is neither a string nor a list of strings.
    """
    canonical = dict(model.named_parameters())
    params = canonical
    if isinstance(subset, str):
        if subset in ("all", "trainable"):
            names = [n for n, p in canonical.items() if p.requires_grad]
        elif subset == "last_layer":
            params = dict(model.named_parameters(remove_duplicate=False))
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
        params = dict(model.named_parameters(remove_duplicate=False))  # aliases too
        unknown = [s for s in subset if s not in params]
        if unknown:
            hints = {u: near_matches(u, params) for u in unknown}
            shown = "; ".join(
                f"{u!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "")
                for u, h in hints.items()
            )
            raise ValueError(
                f"subset names must be parameters of the model; unknown: {shown}. "
                f"Known names: {list(canonical)[:10]}{'...' if len(canonical) > 10 else ''}."
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
            f"{sum(p.requires_grad for p in canonical.values())} parameters with requires_grad."
        )
    return ParamLayout(tuple(names), tuple(params[n].shape for n in names))
