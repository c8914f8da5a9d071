r"""What goes into and comes out of the user's model.

Target keys of mapping batches, keyword inputs, the output tensor, and the checks of model
inputs shared by every entry point.

A model input is a tensor, a tuple of tensors (passed positionally) or a mapping of tensors
(passed as keyword arguments); its tensors have the batch dimension first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import shape_str

__all__ = [
    "DEFAULT_TARGET_KEYS",
    "InputSpec",
    "check_keyword_inputs",
    "check_model_input",
    "input_spec",
    "output_tensor",
    "raise_for_input_shape",
    "resolve_target_key",
]


#: Keys taken as the targets of a mapping batch when ``target_key`` is not given.
DEFAULT_TARGET_KEYS = ("target", "labels", "label")


def resolve_target_key(batch: Mapping, target_key: str | None, where: str = "") -> str:
    """The key of the targets in a mapping batch.

    Args:
        batch: The mapping batch.
        target_key: The key set by the user, or ``None`` to take the one of
            :data:`DEFAULT_TARGET_KEYS` the batch holds.
        where: Location for error messages, e.g. ``"batch 3"``.

    Returns:
        The key.

    Raises:
        ValueError: If the key is missing, or ``target_key`` is ``None`` and the batch holds
            none or several of the default keys.
    """
    loc = f" ({where})" if where else ""
    keys = [str(k) for k in batch.keys()]
    if target_key is not None:
        if target_key not in batch:
            raise ValueError(
                f"mapping batches{loc} must hold target_key {target_key!r}; got keys {keys}. "
                "Set target_key= to the key of the targets."
            )
        return target_key
    found = [k for k in DEFAULT_TARGET_KEYS if k in batch]
    if len(found) != 1:
        what = "none" if not found else f"several: {found}"
        raise ValueError(
            f"mapping batches{loc} must hold exactly one target key of "
            f"{list(DEFAULT_TARGET_KEYS)} when target_key is not set; got keys {keys} ({what}). "
            "Set target_key= to the key of the targets."
        )
    return found[0]


def check_keyword_inputs(model: nn.Module, x: object, where: str = "") -> None:
    """Refuse keyword inputs that ``model.forward`` does not take, naming them.

    Args:
        model: The network.
        x: Model input; only mappings (keyword inputs) are checked.
        where: Location for error messages.

    Raises:
        ValueError: If a key is not a parameter of ``forward`` and it takes no ``**kwargs``.
    """
    if not isinstance(x, Mapping):
        return
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    unknown = [str(k) for k in x if k not in names]
    if unknown:
        loc = f" ({where})" if where else ""
        raise ValueError(
            f"keyword inputs{loc} must be arguments of {type(model).__name__}.forward"
            f"({', '.join(names)}); got the keys {unknown}. Rename the keys of the batch, or set "
            "input_key= if the input sits under one key."
        )


def _paths(x: object, path: str = "") -> list[tuple[str, Tensor]]:
    """Tensor leaves of a nested input with their paths (``"[0]"``, ``"['input_ids']"``)."""
    if isinstance(x, Tensor):
        return [(path, x)]
    if isinstance(x, Mapping):
        return [pt for k, v in x.items() for pt in _paths(v, f"{path}[{k!r}]")]
    if isinstance(x, (tuple, list)):
        return [pt for i, v in enumerate(x) for pt in _paths(v, f"{path}[{i}]")]
    return []


_EMBEDDING_BAG_HINT = (
    " The model has an nn.EmbeddingBag: inputs (text, offsets) pack B bags into one 1-D "
    "tensor without a batch dimension. Pass the bags as one (B, L) tensor instead "
    "(offsets=None), padded with the layer's padding_idx (left out of each bag's sum, mean or "
    "max), or, with mode='sum', padded with any index and per_sample_weights of shape (B, L) "
    "that are 0 on the padding."
)


@dataclass(frozen=True)
class InputSpec:
    """Structure of the training inputs: ``(path, ndim, floating)`` per tensor leaf.

    ``shapes`` holds each leaf's shape after the batch dimension in the first training batch
    (named when the model fails on an input of another shape).
    """

    leaves: tuple[tuple[str, int, bool], ...]
    shapes: tuple[tuple[int, ...], ...] = ()


def input_spec(x: object) -> InputSpec:
    """The :class:`InputSpec` of a model input (batch dimension included in ``ndim``)."""
    leaves = _paths(x)
    return InputSpec(
        tuple((p, t.ndim, t.is_floating_point()) for p, t in leaves),
        tuple(tuple(int(d) for d in t.shape[1:]) for _, t in leaves),
    )


def raise_for_input_shape(err: Exception, x: object, spec: InputSpec | None) -> None:
    """Name the expected and received input shapes when the model failed on another shape.

    Called with an error of the model's forward pass (e.g. ``mat1 and mat2 shapes cannot be
    multiplied`` for a wrong feature width).  Shapes after the batch dimension are compared
    with the first training batch; where none differs, nothing is raised (the caller
    re-raises ``err``).

    Args:
        err: The error the model raised.
        x: The model input it was given.
        spec: The training inputs' structure (``None``: unknown, nothing raised).

    Raises:
        ValueError: If a tensor of ``x`` differs in shape from the training inputs (caused by
            ``err``).
    """
    if spec is None or not spec.shapes:
        return
    leaves = _paths(x)
    if len(leaves) != len(spec.shapes):
        return
    for (path, t), want in zip(leaves, spec.shapes):
        got = tuple(int(d) for d in t.shape[1:])
        if got != want:
            first = str(err).splitlines()[0][:200] if str(err) else ""
            raise ValueError(
                f"model input{path} must have shape {_batch_shape(want)} like the training "
                f"inputs (any batch size B); got {_batch_shape(got)}, on which the model "
                f"raised {type(err).__name__}: {first}"
            ) from err


def _batch_shape(dims: tuple[int, ...]) -> str:
    """``(B, 3)`` for the dimensions ``(3,)`` after the batch dimension."""
    return "(" + ", ".join(["B", *map(str, dims)]) + ("," if not dims else "") + ")"


def check_model_input(
    x: object,
    *,
    dtype: torch.dtype,
    spec: InputSpec | None = None,
    name: str = "x",
    where: str = "",
    model: nn.Module | None = None,
) -> None:
    """Check a model input before any computation, as :meth:`LaplaceWrapper.fit` does.

    Floating tensors must have the model's dtype, every tensor a batch dimension of the same
    size and, when ``spec`` (the training inputs' structure) is known, the same structure and
    number of dimensions as in training.

    Args:
        x: Model input: a tensor, a tuple or a dict of tensors.
        dtype: The model's dtype.
        spec: Structure of the training inputs, if known.
        name: Name of the argument in messages.
        where: Location for messages, e.g. ``"batch 3"``.
        model: The network, if known (its ``nn.EmbeddingBag`` layers add a hint).

    Raises:
        TypeError: If ``x`` holds no tensor.
        ValueError: If a tensor has the wrong dtype, no batch dimension, another batch size
            than the others, or another structure / number of dimensions than in training.
    """
    leaves = _paths(x)
    label = f"{name} in {where}" if where else name
    if not leaves:
        raise TypeError(
            f"{label} must be a tensor, a tuple or a dict of tensors; got {type(x).__name__}."
        )
    for path, t in leaves:
        if t.is_floating_point() and t.dtype != dtype:
            raise ValueError(
                f"{name}{path}{' in ' + where if where else ''} must have the model's dtype "
                f"{dtype}; got {t.dtype}. Cast the data (x.to({dtype})) or the model "
                f"(model.to({t.dtype}))."
            )
        if t.ndim == 0:
            raise ValueError(
                f"model input{' in ' + where if where else ''} must have a leading batch "
                "dimension; got a 0-dim tensor. Add one with x.unsqueeze(0) (a batch of one)."
            )
    sizes = {path: int(t.shape[0]) for path, t in leaves}
    if len(set(sizes.values())) > 1:
        bag = model is not None and any(isinstance(m, nn.EmbeddingBag) for m in model.modules())
        raise ValueError(
            f"{label} tensors must share the batch size (first dimension); got {sizes}."
            + (_EMBEDDING_BAG_HINT if bag else "")
        )
    if spec is None:
        return
    paths = [p for p, _ in leaves]
    want = [p for p, _, _ in spec.leaves]
    if paths != want:
        raise ValueError(
            f"{label} must have the structure of the training inputs, tensors at {want}; "
            f"got tensors at {paths}."
        )
    for (path, t), (_, ndim, floating) in zip(leaves, spec.leaves):
        if t.ndim != ndim:
            hint = " Add the batch dimension: x.unsqueeze(0)." if t.ndim == ndim - 1 else ""
            raise ValueError(
                f"{name}{path} must have {ndim} dimensions (batch first) like the training "
                f"inputs; got shape {shape_str(t.shape)}.{hint}"
            )
        if t.is_floating_point() != floating:
            kind = "floating" if floating else "integer"
            raise ValueError(
                f"{name}{path} must be a {kind} tensor like the training inputs; got {t.dtype}."
            )


def output_tensor(out: object, output_fn: Callable[[object], Tensor] | None = None) -> Tensor:
    """The prediction tensor of a model output.

    Accepted without ``output_fn``: a tensor; a mapping with a ``"logits"`` entry or an object
    with a ``logits`` attribute (Hugging Face ``ModelOutput``); a tuple or list whose first
    element is a tensor.  ``output_fn`` maps any other output to the tensor.

    Args:
        out: What the model returned.
        output_fn: Callable ``out -> Tensor``, applied first when given.

    Returns:
        The output tensor.

    Raises:
        TypeError: If no tensor can be taken from ``out`` (the message names its type).
    """
    if output_fn is not None:
        t = output_fn(out)
        if not isinstance(t, Tensor):
            raise TypeError(
                f"output_fn must return a tensor of shape (B, C); got {type(t).__name__} from a "
                f"model output of type {type(out).__name__}."
            )
        return t
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    found = f" with keys {[str(k) for k in out.keys()]}" if isinstance(out, Mapping) else ""
    raise TypeError(
        f"model output must be a tensor, a mapping or object with 'logits', or a tuple whose "
        f"first element is the output tensor; got {type(out).__name__}{found}. Pass output_fn= "
        "(a callable taking the model output and returning the (B, C) tensor)."
    )
