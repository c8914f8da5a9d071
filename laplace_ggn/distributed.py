r"""Reductions over ``torch.distributed`` ranks, so that a fit on shards equals the fit on all data.

Every rank streams its own shard of the training data through the same collector; the
curvature is a sum over data points, so summing the collectors' states over ranks gives the
state of a single pass over all the data:

.. math::
    G = \sum_{r} \sum_{n \in \mathcal D_r} J_n^\top \Lambda_n J_n .

The module speaks the *collector distribution protocol*: a collector provides

- ``distributed_state() -> dict[str, tuple[Tensor, Reduction]]``: name -> (tensor, how ranks
  combine it: :class:`Reduction`, or its value ``"sum"`` / ``"gather"``); a collector that has
  seen no data returns zeros of the right shape for ``SUM`` entries and zero rows for
  ``GATHER`` entries;
- ``load_distributed_state(state: dict[str, Tensor])``: replace its state with the summed
  (all-reduce) or gathered (concatenated along dim 0, in rank order) tensors.

The collectors of :mod:`laplace_ggn.collectors` derive both from the states they declare with
:meth:`~laplace_ggn.collectors.base.Collector.add_state`.

:class:`DistributedFit` runs the collectives of one :meth:`LaplaceWrapper.fit
<laplace_ggn.wrapper.LaplaceWrapper.fit>` in a fixed order on every rank:

1. :meth:`~DistributedFit.agree` (before the pass): models identical on every rank (a checksum
   per parameter and buffer), at least one rank holds data, the ``"last_layer"`` subset traced
   on the lowest rank that holds data (ranks with an empty shard, or only batches of 0 rows,
   cannot trace), and any error
   raised on one rank before the pass raised on every rank;
2. :meth:`~DistributedFit.finish` (after the pass): errors of the pass raised on every rank,
   the number of data points N, the output dimension C and the loss sum combined, the
   collector states checked for agreement and reduced (one all-reduce per dtype for the sums,
   one padded all-gather per gathered tensor).

Works with gloo (CPU) and NCCL (tensors are moved to the current CUDA device for NCCL; call
``torch.cuda.set_device(local_rank)`` before the fit, as for DDP).
"""

from __future__ import annotations

import builtins
import enum
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .functional import ParamLayout, resolve_subset

__all__ = ["DistributedFit", "Reduction", "model_digests", "resolve_distributed"]


class Reduction(str, enum.Enum):
    """How the ranks combine one tensor of a collector's state."""

    SUM = "sum"  #: element-wise sum (all-reduce)
    GATHER = "gather"  #: row blocks concatenated along dim 0 in rank order (all-gather)


def resolve_distributed(
    distributed: bool | None, process_group: Any = None
) -> DistributedFit | None:
    """Decide whether a fit runs distributed, and over which group.

    Args:
        distributed: ``None``: distributed when ``torch.distributed`` is initialised; ``True``:
            required; ``False``: local fit on this process only.
        process_group: Group to reduce over (default: the default group).

    Returns:
        The :class:`DistributedFit` context, or ``None`` for a local fit.

    Raises:
        TypeError: If ``distributed`` is not ``None`` or a bool.
        ValueError: If ``distributed=True`` without an initialised process group, if
            ``process_group`` is given with ``distributed=False``, or if this process is not a
            member of ``process_group``.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False; got {distributed!r}.")
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is False:
        if process_group is not None:
            raise ValueError(
                "process_group must be None with distributed=False; got a process group. "
                "Drop distributed=False to reduce over that group."
            )
        return None
    if not initialised:
        if distributed or process_group is not None:
            raise ValueError(
                "distributed=True (or a process_group) needs torch.distributed to be initialised; "
                "got no process group. Call torch.distributed.init_process_group() first "
                "(torchrun sets the environment), or pass distributed=False."
            )
        return None
    return DistributedFit(process_group)


def model_digests(model: nn.Module) -> dict[str, str]:
    """Checksum every parameter and buffer, by name (blake2b of the raw bytes).

    Args:
        model: The network.

    Returns:
        ``{"param:<name>" | "buffer:<name>": hex digest}``, in ``named_parameters()`` then
        ``named_buffers()`` order. Shape and dtype are part of the digest.
    """
    out: dict[str, str] = {}
    items = [("param", n, t) for n, t in model.named_parameters()]
    items += [("buffer", n, t) for n, t in model.named_buffers()]
    for kind, name, t in items:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.detach().reshape(-1).contiguous().cpu()
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
        out[f"{kind}:{name}"] = h.hexdigest()
    return out


def _reduction(op: object, name: str) -> Reduction:
    """The :class:`Reduction` of a collector state, converted once from its value.

    Returns:
        The reduction.

    Raises:
        ValueError: If ``op`` names no reduction.
    """
    try:
        return Reduction(op)
    except ValueError:
        raise ValueError(
            f"collector state {name!r} must be reduced by one of "
            f"{[r.value for r in Reduction]}; got {op!r}."
        ) from None


@dataclass(frozen=True)
class _StateMeta:
    """What a rank reports of one collector tensor before the reduction."""

    op: Reduction
    shape: tuple[int, ...]
    dtype: torch.dtype


class DistributedFit:
    """The collectives of one distributed fit, run in the same order on every rank.

    Args:
        process_group: Group to reduce over (``None``: the default group).

    Raises:
        ValueError: If this process is not a member of ``process_group``.
    """

    def __init__(self, process_group: Any = None):
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        if self.rank < 0:
            raise ValueError(
                "process_group must contain this process; got a group without rank "
                f"{dist.get_rank()}. Call fit() only on the members of the group."
            )
        self.world_size = dist.get_world_size(process_group)
        backend = str(dist.get_backend(process_group)).lower()
        self.comm_device = (
            torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else None
        )

    # -- object collectives -----------------------------------------------------------------

    def _all_gather(self, obj: object) -> list:
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _raise_errors(self, reports: list[dict], local: BaseException | None, stage: str) -> None:
        failed = [(r, rep["error"]) for r, rep in enumerate(reports) if rep["error"] is not None]
        if not failed:
            return
        if local is not None:
            raise local
        r, (kind, msg) = failed[0]
        cls = getattr(builtins, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, (ValueError, TypeError, RuntimeError))):
            cls = RuntimeError
        raise cls(f"fit failed on rank {r} {stage}: {kind}: {msg}")

    @staticmethod
    def _error_report(exc: BaseException | None) -> tuple[str, str] | None:
        return None if exc is None else (type(exc).__name__, str(exc))

    # -- before the pass ----------------------------------------------------------------------

    def agree(
        self,
        model: nn.Module,
        subset: object,
        layout: ParamLayout | None,
        *,
        has_data: bool,
        error: BaseException | None = None,
    ) -> ParamLayout:
        """Check that every rank can fit the same model, and agree on the parameter subset.

        Args:
            model: The user's network on this rank.
            subset: The wrapper's subset option.
            layout: The layout resolved on this rank (``None`` if this rank could not trace
                ``"last_layer"`` because its shard is empty).
            has_data: Whether this rank's shard yields at least one batch with rows (batches
                of 0 rows are skipped, so a shard of only those counts as empty).
            error: An exception raised on this rank before the pass (re-raised here after the
                collective, so that no rank waits for it).

        Returns:
            The layout shared by every rank.

        Raises:
            ValueError: If the models differ across ranks (naming the first parameter or
                buffer that differs), if no rank holds data, or if ranks traced different
                ``"last_layer"`` subsets. Errors of other ranks are raised on every rank.
        """
        digests = model_digests(model) if error is None else {}
        report = {
            "error": self._error_report(error),
            "digests": digests,
            "has_data": has_data,
            "names": None if layout is None else list(layout.names),
        }
        reports = self._all_gather(report)
        self._raise_errors(reports, error, "before the pass")
        ref = reports[0]["digests"]
        for r, rep in enumerate(reports[1:], start=1):
            if rep["digests"] == ref:
                continue
            keys = list(dict.fromkeys(list(ref) + list(rep["digests"])))
            first = next(k for k in keys if ref.get(k) != rep["digests"].get(k))
            kind, name = first.split(":", 1)
            detail = (
                f"{kind} {name!r} is missing on one of them"
                if first not in ref or first not in rep["digests"]
                else f"{kind} {name!r} differs (checksums {ref[first][:12]} vs "
                f"{rep['digests'][first][:12]})"
            )
            raise ValueError(
                f"model must be identical on every rank; the models differ between rank 0 and "
                f"rank {r}: {detail}. Load the same trained weights on every rank (DDP keeps "
                "them in sync) before fitting."
            )
        with_data = [r for r, rep in enumerate(reports) if rep["has_data"]]
        if not with_data:
            raise ValueError(
                f"train_loader must yield at least one non-empty batch on some rank; got no "
                f"data on all {self.world_size} ranks (empty loaders or batches of 0 rows)."
            )
        if layout is not None and subset != "last_layer":
            return layout
        source = reports[with_data[0]]["names"]
        traced = {r: reports[r]["names"] for r in with_data}
        if any(v != source for v in traced.values()):
            raise ValueError(
                f"subset='last_layer' must resolve to the same parameters on every rank; got "
                f"{traced}. Pass an explicit list of parameter names as subset."
            )
        return resolve_subset(model, list(source))

    # -- after the pass -----------------------------------------------------------------------

    def finish(
        self,
        collector: object,
        *,
        n_data: int,
        n_outputs: int | None,
        loss_sum: float,
        error: BaseException | None = None,
    ) -> tuple[int, int, float]:
        """Combine the statistics of the pass and reduce the collector in place.

        Args:
            collector: Collector implementing the distribution protocol.
            n_data: Data points seen on this rank.
            n_outputs: C seen on this rank (``None`` for an empty shard).
            loss_sum: Loss statistic summed on this rank.
            error: An exception raised on this rank during the pass.

        Returns:
            ``(N, C, loss_sum)`` over all ranks (the loss sums added in rank order, so every
            rank gets the same float).

        Raises:
            ValueError: If ranks disagree on C or on the collector's state names, operations,
                dtypes or shapes. Errors of other ranks are raised on every rank.
        """
        meta: dict[str, _StateMeta] = {}
        state: dict[str, tuple[Tensor, Reduction]] = {}
        if error is None:
            try:
                state = collector.distributed_state()
                for name, (t, op) in state.items():
                    meta[name] = _StateMeta(_reduction(op, name), tuple(t.shape), t.dtype)
            except Exception as exc:  # noqa: BLE001 -- raised on every rank below
                error = exc
        report = {
            "error": self._error_report(error),
            "n_data": n_data,
            "n_outputs": n_outputs,
            "loss_sum": loss_sum,
            "meta": meta,
        }
        reports = self._all_gather(report)
        self._raise_errors(reports, error, "during the pass")
        outs = {
            r: rep["n_outputs"] for r, rep in enumerate(reports) if rep["n_outputs"] is not None
        }
        if len(set(outs.values())) > 1:
            raise ValueError(
                f"model output must have the same number of columns C on every rank; got {outs}."
            )
        ref = reports[0]["meta"]
        for r, rep in enumerate(reports[1:], start=1):
            self._check_meta(ref, rep["meta"], r)
        total = sum(rep["n_data"] for rep in reports)
        loss = 0.0
        for rep in reports:
            loss += rep["loss_sum"]
        C = next(iter(outs.values())) if outs else 0
        rows = {
            name: [rep["meta"][name].shape[0] for rep in reports]
            for name, m in ref.items()
            if m.op is Reduction.GATHER
        }
        collector.load_distributed_state(self._reduce(state, ref, rows))
        return total, C, loss

    @staticmethod
    def _check_meta(ref: dict[str, _StateMeta], other: dict[str, _StateMeta], r: int) -> None:
        if list(ref) != list(other):
            raise ValueError(
                f"collector state must have the same entries on every rank; got {list(ref)} on "
                f"rank 0 and {list(other)} on rank {r}."
            )
        for name, a in ref.items():
            b = other[name]
            same_shape = a.shape == b.shape if a.op is Reduction.SUM else a.shape[1:] == b.shape[1:]
            if a.op != b.op or a.dtype != b.dtype or not same_shape:
                raise ValueError(
                    f"collector state {name!r} must agree across ranks; got {a.op.value} "
                    f"{a.shape} {a.dtype} on rank 0 and {b.op.value} {b.shape} {b.dtype} on "
                    f"rank {r}."
                )

    def _to_comm(self, t: Tensor) -> Tensor:
        return t if self.comm_device is None else t.to(self.comm_device)

    def _reduce(
        self,
        state: dict[str, tuple[Tensor, Reduction]],
        meta: dict[str, _StateMeta],
        rows: dict[str, list[int]],
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        # sums: one flat all-reduce per dtype, in the (agreed) order of the entries
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, m in meta.items():
            if m.op is Reduction.SUM:
                by_dtype.setdefault(m.dtype, []).append(name)
        for names in by_dtype.values():
            tensors = [state[n][0] for n in names]
            # torch.cat copies: the collective never writes into the collector's own storage
            flat = self._to_comm(torch.cat([t.detach().reshape(-1) for t in tensors]))
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            for name, t, part in zip(names, tensors, flat.split([t.numel() for t in tensors])):
                out[name] = part.reshape(t.shape).to(t.device).clone()
        # gathers: pad to the largest row count, all-gather, trim, concatenate in rank order
        for name, m in meta.items():
            if m.op is not Reduction.GATHER:
                continue
            t = state[name][0].detach()
            counts = rows[name]
            width = max(counts)
            if width == 0:
                out[name] = t.new_zeros((0, *t.shape[1:]))
                continue
            padded = t.new_zeros((width, *t.shape[1:]))
            padded[: t.shape[0]] = t
            padded = self._to_comm(padded)
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded, group=self.group)
            out[name] = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)
        return out
