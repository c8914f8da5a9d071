"""Loader batches and model calls: inputs and targets, batch sizes, devices, outputs.

A model input is a tensor, a tuple of tensors (passed positionally) or a dict of tensors
(passed as keyword arguments); its leading dimension is the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ._checks import shape_str
from .model_io import resolve_target_key

__all__ = [
    "UNBATCHED_HINT",
    "as_2d_output",
    "batch_size_of",
    "call_model",
    "check_batch_dims",
    "flatten_items",
    "group_items",
    "input_tensors",
    "split_batch",
    "to_device",
]


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
    leaves = input_tensors(x)
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


def input_tensors(x: object) -> list[Tensor]:
    """All tensors in a (possibly nested) model input."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in input_tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in input_tensors(v)]
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
    leaves = input_tensors(x)
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


def as_2d_output(out: object) -> Tensor:
    """The model output as ``(B, C)`` (``(B,)`` becomes ``(B, 1)``) or ``(B, T, C)``.

    Returns:
        The output, shape ``(B, C)`` or ``(B, T, C)``.

    Raises:
        TypeError: If it is not a tensor.
        ValueError: If it has another number of dimensions.
    """
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


def flatten_items(x: object, k: int, where: str = "") -> object:
    """A model input of B samples of ``k`` items, each tensor ``(B, k, ...)``, as ``(B·k, ...)``.

    Returns:
        The input with every tensor reshaped (samples major, items minor).

    Raises:
        ValueError: If a tensor does not lead with ``(B, k)``.
    """
    B = batch_size_of(x, where)

    def flat(t: object) -> object:
        if not isinstance(t, Tensor):
            return t
        if t.ndim < 2 or tuple(t.shape[:2]) != (B, k):
            loc = f" in {where}" if where else ""
            raise ValueError(
                f"every input tensor{loc} must lead with (B, {k}) = ({B}, {k}): {k} candidates "
                f"per sample, scored one at a time; got {shape_str(t.shape)}."
            )
        return t.reshape(B * k, *t.shape[2:])

    return tree_map(flat, x)


def group_items(out: Tensor, k: int) -> Tensor:
    """Outputs ``(B·k, C)`` of single items as ``(B, k·C)`` (item-major columns).

    Returns:
        Shape ``(B, k·C)``.

    Raises:
        ValueError: If the outputs have a position dimension.
    """
    if out.ndim != 2:
        raise ValueError(
            f"model output must have shape (B·{k}, C) per candidate; got {shape_str(out.shape)}."
        )
    return out.reshape(out.shape[0] // k, k * out.shape[1])
