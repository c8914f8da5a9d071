r"""The training data as :func:`~laplace_ggn.marglik_training` reads it: batches, losses, N.

Batches are read and checked by the :class:`~laplace_ggn.reader.BatchReader` of a
:class:`~laplace_ggn.LaplaceWrapper` with the same options, so that training sees exactly the
observations the Laplace fit sees: tuple and mapping (Hugging Face) batches, outputs
``(B, C)`` or ``(B, T, C)`` (one observation per position), ignored targets left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..batches import (
    as_2d_output,
    batch_size_of,
    call_model,
    flatten_items,
    group_items,
    split_batch,
)
from ..likelihoods import observations
from ..model_io import output_tensor

__all__ = ["Ranks", "TrainingData"]


class Ranks:
    """Sums and gradient averages over the ranks of a distributed run.

    Args:
        context: The :class:`~laplace_ggn.distributed.DistributedFit` of the run (its group,
            world size and communication device).
    """

    def __init__(self, context):
        self.group, self.world_size = context.group, context.world_size
        self.rank, self.device = context.rank, context.comm_device

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the ranks (a new tensor on ``t``'s device)."""
        c = t.detach().clone() if self.device is None else t.detach().to(self.device)
        dist.all_reduce(c, op=dist.ReduceOp.SUM, group=self.group)
        return c.to(t.device)

    def average_gradients(self, params: list[Tensor]) -> None:
        """Replace each parameter's gradient by its mean over the ranks (as DDP does)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = self.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / self.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.reshape(g.shape))


class TrainingData:
    """The loader, read as the Laplace fit reads it.

    Args:
        loader: The training batches (re-iterable).
        options: The :class:`~laplace_ggn.fit_options.FitOptions` of the fits.
        dist_group: ``None`` (local) or the :class:`Ranks` that sum counts and losses.
    """

    def __init__(self, loader: Iterable, options, dist_group=None):
        if not isinstance(loader, Iterable):
            raise TypeError(
                f"train_loader must be an iterable of batches (e.g. a DataLoader); "
                f"got {type(loader).__name__}."
            )
        self.loader = loader
        self.reader = options.reader
        self.likelihood = options.likelihood_model
        self.output_fn: Callable | None = options.user_output_fn
        self.dist = dist_group

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def batches(self, *, checked: bool = True) -> Iterable[tuple[object, Tensor, str]]:
        """The non-empty batches ``(x, y, where)``, on the model's device.

        Args:
            checked: Check every batch as the fit does (dtype, finiteness, batch sizes); the
                training epochs skip it after :meth:`count` has checked the data once.
        """
        r = self.reader
        for i, batch in enumerate(self.loader):
            where = f"batch {i}"
            if checked:
                x, y, empty = r.split(batch, where)
            else:
                x, y = split_batch(
                    batch, input_key=r.input_key, target_key=r.target_key, where=where
                )
                empty = batch_size_of(x, where=where) == 0
            if not empty:
                yield r.to_device(x), y.to(r.device), where

    def outputs(self, model: nn.Module, x: object) -> Tensor:
        """The model's output tensor, ``(B, C)`` or ``(B, T, C)`` (before the temperature).

        Inputs of several items per sample (preference pairs, ``(B, k, ...)``) are run as
        B·k inputs and their outputs grouped back per sample, as the fit does.

        Returns:
            The outputs.
        """
        k = self.likelihood.items_per_sample
        out = call_model(model, flatten_items(x, k) if k > 1 else x)
        out = as_2d_output(output_tensor(out, self.output_fn))
        return group_items(out, k) if k > 1 else out

    def nll(
        self,
        model: nn.Module,
        x: object,
        y: Tensor,
        where: str,
        *,
        sigma: Tensor,
        temperature: float,
    ) -> tuple[Tensor, int]:
        """Summed NLL of the batch's observations and their number n.

        Returns:
            ``(nll, n)``; the NLL is differentiable in the model's parameters.

        Raises:
            ValueError: If the targets do not fit the outputs or the likelihood.
        """
        f = self.outputs(model, x)
        if temperature != 1.0:
            f = f / temperature
        f_obs, y_obs, _ = observations(
            self.likelihood, f, y, ignore_index=self.reader.ignore_index, where=where
        )
        return self.likelihood.nll(f_obs, y_obs, sigma), int(f_obs.shape[0])

    def _sum(self, t: Tensor) -> Tensor:
        if self.dist is not None:
            t = self.dist.all_reduce_sum(t)
        return t

    @torch.no_grad()
    def count(self, model: nn.Module) -> int:
        """N, the number of observations (over every rank), from one forward pass.

        Returns:
            N.

        Raises:
            ValueError: If there is no observation.
        """
        n = 0
        for x, y, where in self.batches():
            n += self.nll(model, x, y, where, sigma=torch.ones(()), temperature=1.0)[1]
        total = int(self._sum(torch.tensor([n], dtype=torch.float64)).item())
        if total == 0:
            raise ValueError(
                "train_loader must yield at least one observation; got none (an empty loader, "
                "batches of 0 rows, or every target equal to ignore_index)."
            )
        return total

    @torch.no_grad()
    def nll_at_temperatures(self, model: nn.Module, temperatures: Tensor) -> Tensor:
        r"""Summed NLL of every observation at each temperature T_k, shape ``(K,)``.

        Returns:
            :math:`\sum_n -\log p(y_n \mid f_n / T_k)` for each k (float64, all ranks).
        """
        out = torch.zeros(temperatures.shape[0], dtype=torch.float64)
        one = torch.ones(())
        for x, y, where in self.batches():
            f = self.outputs(model, x).to(torch.float64)
            f_obs, y_obs, _ = observations(
                self.likelihood, f, y, ignore_index=self.reader.ignore_index, where=where
            )
            for k, T in enumerate(temperatures.tolist()):
                out[k] += float(self.likelihood.nll(f_obs / T, y_obs, one))
        return self._sum(out)
