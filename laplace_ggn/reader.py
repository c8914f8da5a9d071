"""Reading loader batches and model inputs: splitting, checking, moving to the model's device.

One :class:`BatchReader` per wrapper holds the options that say how a batch is laid out
(``input_key``, ``target_key``, ``ignore_index``) and the model's dtype and device; the fit,
the validation loaders of tuning and the read paths (predict, jacobians) all go through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass, replace

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ._checks import check_computed_finite, check_finite, check_target_tensor
from .batches import batch_size_of, check_batch_dims, input_tensors, split_batch, to_device
from .model_io import (
    DEFAULT_TARGET_KEYS,
    InputSpec,
    check_keyword_inputs,
    check_model_input,
)

__all__ = ["BatchReader"]


@dataclass(frozen=True)
class BatchReader:
    """How batches of a loader and model inputs are read and checked.

    Attributes:
        model: The user's network (its forward signature checks keyword inputs).
        dtype: The model's floating dtype; floating inputs must have it.
        device: The model's device; inputs are moved to it.
        input_key: Key of the inputs in mapping batches (``None``: every other key).
        target_key: Key of the targets in mapping batches (``None``: the default keys).
        ignore_index: Classification / binary targets equal to it are left out.
        compute_dtype: The dtype of every computation (``None``: ``dtype``); float32 for a
            float16 / bfloat16 model (:func:`~laplace_ggn.private_model.compute_dtype`).
    """

    model: nn.Module
    dtype: torch.dtype
    device: torch.device
    input_key: str | None = None
    target_key: str | None = None
    ignore_index: int = -100
    compute_dtype: torch.dtype | None = None

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype the private model, the curvature and the posterior have."""
        return self.dtype if self.compute_dtype is None else self.compute_dtype

    def to_device(self, x: object) -> object:
        """``x`` (tensor, tuple or dict) on the model's device, floating tensors in ``work_dtype``.

        Returns:
            The moved input.
        """
        x = to_device(x, self.device)
        if self.work_dtype == self.dtype:
            return x
        return tree_map(
            lambda t: (
                t.to(self.work_dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
            ),
            x,
        )

    def result(self, value: object) -> object:
        """A result (tensor, tuple or dataclass of tensors) in the model's dtype.

        Results of a half-precision model are computed in float32 and returned in its dtype.

        Returns:
            ``value`` with its floating tensors cast to ``dtype``.

        Raises:
            RuntimeError: If a value overflows the model's dtype (float16 ends at 65504).
        """
        if self.work_dtype == self.dtype:
            return value
        if isinstance(value, Tensor):
            if not value.is_floating_point():
                return value
            out = value.to(self.dtype)
            check_computed_finite(
                out,
                f"result in the model's dtype {self.dtype}",
                f"A value computed in {self.work_dtype} exceeds the range of {self.dtype} "
                f"(largest {torch.finfo(self.dtype).max:.5g}). Use the float32 model "
                "(model.float()), or a larger prior precision.",
            )
            return out
        if isinstance(value, tuple):
            return type(value)(self.result(v) for v in value)
        if is_dataclass(value) and not isinstance(value, type):
            return replace(
                value, **{f.name: self.result(getattr(value, f.name)) for f in fields(value)}
            )
        return value

    def split(self, batch: object, where: str) -> tuple[object, Tensor, bool]:
        """``(x, y, empty)`` of a checked loader batch; ``empty`` when it holds 0 rows.

        Returns:
            The input, the targets and whether the batch is empty (then skipped).

        Raises:
            ValueError: If the batch is malformed, a floating input has another dtype than the
                model or holds NaN/Inf, the input has no batch dimension, its tensors differ
                in batch size, a key is not an argument of the model, or an empty input comes
                with targets, or the targets have no batch dimension or another batch size
                than the input (a loader of single samples).
            TypeError: If the targets are not a tensor.
        """
        x, y = split_batch(batch, input_key=self.input_key, target_key=self.target_key, where=where)
        check_model_input(x, dtype=self.dtype, name="input", where=where, model=self.model)
        check_keyword_inputs(self.model, x, where)
        for t in input_tensors(x):
            check_finite(t, "input", where)
        y = check_target_tensor(y, where)
        empty = batch_size_of(x, where=where) == 0
        if empty and (y.ndim == 0 or y.shape[0] != 0):
            raise ValueError(
                f"targets in {where} must have as many rows as the input (0); got shape "
                f"{tuple(y.shape)}."
            )
        check_batch_dims(x, y, where)
        return x, y, empty

    def model_input(self, x: object, spec: InputSpec | None, name: str = "x") -> object:
        """Validate a model input of a read path (as the fit does) and move it to the device.

        Args:
            x: Model input of batch size B.
            spec: The structure of the training inputs (``None``: unknown).
            name: The argument's name in messages.

        Returns:
            The input on the model's device.

        Raises:
            ValueError: If the input holds a target key, differs from the training inputs in
                dtype, structure or number of dimensions, or holds NaN/Inf.
        """
        if isinstance(x, Mapping):
            keys = [self.target_key] if self.target_key is not None else DEFAULT_TARGET_KEYS
            given = [k for k in keys if k in x]
            if given:
                raise ValueError(
                    f"{name} must hold the model's inputs only; got the target key "
                    f"{given[0]!r}. Drop it: {{k: v for k, v in batch.items() if k != "
                    f"{given[0]!r}}}."
                )
            check_keyword_inputs(self.model, x)
        check_model_input(x, dtype=self.dtype, spec=spec, name=name, model=self.model)
        x = self.to_device(x)
        for t in input_tensors(x):
            check_finite(t, "input")
        return x

    def validation_batches(
        self, val_loader: object, spec: InputSpec | None
    ) -> list[tuple[object, Tensor]]:
        """Checked, non-empty ``(x, y)`` batches of a validation loader, inputs on the device.

        Args:
            val_loader: Iterable of batches.
            spec: The structure of the training inputs.

        Returns:
            The batches.

        Raises:
            TypeError: If ``val_loader`` is not iterable.
        """
        if not isinstance(val_loader, Iterable):
            raise TypeError(
                f"val_loader must be an iterable of batches (e.g. a DataLoader); "
                f"got {type(val_loader).__name__}."
            )
        batches = []
        for i, batch in enumerate(val_loader):
            x, y, empty = self.split(batch, f"val_loader batch {i}")
            check_model_input(
                x, dtype=self.dtype, spec=spec, name="val_loader input", where=f"batch {i}"
            )
            if not empty:
                batches.append((self.to_device(x), y))
        return batches
