"""Inputs of the decomposition and the fit of posterior samples on them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..functional import split_batch
from .report import SampleFit

__all__ = ["gather_inputs"]


def gather_inputs(
    x: object, *, input_key: str | None = None, target_key: str | None = None
) -> tuple[object, Tensor | None]:
    """Model inputs as one batch: a tensor/tuple/dict as is, or a loader's inputs concatenated.

    Args:
        x: Model input (tensor, tuple or dict of tensors) or an iterable of ``(x, y)`` batches.
        input_key: Key of the inputs in mapping batches (see
            :func:`~laplace_ggn.functional.split_batch`).
        target_key: Key of the targets in mapping batches.

    Returns:
        ``(inputs, targets)``; ``targets`` is ``None`` for a plain input and the concatenated
        targets for a loader.

    Raises:
        TypeError: If ``x`` is neither an input nor an iterable of batches.
        ValueError: If the loader is empty or its batches are malformed.
    """
    if isinstance(x, (Tensor, Mapping, tuple, list)):
        return x, None
    if not isinstance(x, Iterable):
        raise TypeError(
            "x must be a tensor, a tuple or dict of tensors, or a DataLoader of (x, y) batches; "
            f"got {type(x).__name__}."
        )
    xs, ys, spec = [], [], None
    for i, batch in enumerate(x):
        xb, yb = split_batch(batch, input_key=input_key, target_key=target_key, where=f"batch {i}")
        leaves, spec = tree_flatten(xb)
        xs.append(leaves)
        ys.append(torch.as_tensor(yb))
    if not xs:
        raise ValueError("x must yield at least one batch; got an empty loader.")
    leaves = [torch.cat([b[j] for b in xs]) for j in range(len(xs[0]))]
    return tree_unflatten(leaves, spec), torch.cat(ys)


class _FitAccumulator:
    """Running sums of NLL, squared error and correct predictions per sample."""

    def __init__(self, lik, sigma: Tensor):
        self.lik, self.sigma = lik, sigma
        self.nll: dict[tuple[str, str], Tensor] = {}
        self.metric: dict[tuple[str, str], Tensor] = {}
        self.n = 0
        self.n_out = 0

    def add(self, key: tuple[str, str], F: Tensor, y: Tensor) -> None:
        """Add outputs ``F`` of shape ``(S, B, C)`` against targets ``y``."""
        nll = torch.stack([self.lik.nll(f, y, self.sigma) for f in F])
        met = self.lik.fit_metric_sum(F, y)
        self.nll[key] = self.nll.get(key, 0) + nll
        self.metric[key] = self.metric.get(key, 0) + met

    def rows(self) -> tuple[SampleFit, ...]:
        out = []
        for key in self.nll:
            nll = self.nll[key] / self.n
            met = self.lik.fit_metric(self.metric[key], self.n, self.n_out)
            sd = (lambda t: float(t.std())) if nll.numel() > 1 else (lambda t: 0.0)
            out.append(
                SampleFit(key[0], key[1], float(nll.mean()), sd(nll), float(met.mean()), sd(met))
            )
        return tuple(out)
