"""Base class of the curvature collectors: declared distributed state, ``update``, ``finalize``.

As in torchmetrics, a collector declares each tensor of its state once, with the reduction
that combines it across ranks::

    self.add_state("G", torch.zeros(P, P), reduce=Reduction.SUM)

:meth:`Collector.distributed_state` and :meth:`Collector.load_distributed_state` (the
protocol :class:`~laplace_ggn.distributed.DistributedFit` speaks) are then derived from the
declarations: a ``SUM`` state is all-reduced, a ``GATHER`` state is a list of row blocks
``(M_i, ...)`` concatenated along dim 0 in rank order.  A collector that has seen no data
reports its defaults: zeros of the declared shape, or zero rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import as_enum
from ..distributed import Reduction

__all__ = ["Collector", "Reduction"]


@dataclass(frozen=True)
class _StateSpec:
    """What :meth:`Collector.add_state` declared: the default's layout and the reduction."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    reduce: Reduction

    def full(self, value: float = 0.0) -> Tensor:
        """The default filled with ``value`` (``GATHER``: zero rows)."""
        return torch.full(self.shape, value, dtype=self.dtype, device=self.device)


class Collector(ABC):
    """One pass over the data, batch by batch, into the curvature a structure stores.

    Subclasses call :meth:`add_state` for every tensor that depends on the data and implement
    :meth:`update` and :meth:`finalize`; :meth:`_after_load` (optional) restores what derives
    from the states after a distributed reduction.

    A state is held as an attribute of its name: a tensor (``SUM``), ``None`` while nothing was
    accumulated (``SUM``: the default, zeros), a Python number (``SUM``, reported with the
    default's dtype and shape and loaded back rounded to an ``int``), or a list of row blocks
    (``GATHER``).
    """

    def __init__(self) -> None:
        self._specs: dict[str, _StateSpec] = {}

    def add_state(self, name: str, default: Tensor, *, reduce: Reduction | str) -> None:
        """Declare a state and set it to its default.

        Args:
            name: Attribute name of the state (names may hold dots, e.g. ``"A.fc1"``; read
                them with :func:`getattr`).
            default: The initial value: ``SUM``: zeros of the state's shape (a zero-stride
                view such as ``torch.zeros(()).expand(P, P)`` costs no memory); ``GATHER``:
                zero rows, shape ``(0, ...)`` (the state starts as an empty list).  Only its
                shape, dtype and device are kept by the declaration.
            reduce: How ranks combine the state.

        Raises:
            TypeError: If ``default`` is not a tensor.
            ValueError: If ``reduce`` is not a :class:`Reduction`, or a ``GATHER`` default
                has rows.
        """
        reduce = as_enum(Reduction, reduce, "reduce")
        if not isinstance(default, Tensor):
            raise TypeError(f"default must be a tensor; got {type(default).__name__}.")
        if reduce is Reduction.GATHER and (default.ndim == 0 or default.shape[0] != 0):
            raise ValueError(
                f"default of the gathered state {name!r} must have shape (0, ...); got "
                f"{tuple(default.shape)}."
            )
        self._specs[name] = _StateSpec(tuple(default.shape), default.dtype, default.device, reduce)
        setattr(self, name, [] if reduce is Reduction.GATHER else default)

    def remove_state(self, name: str) -> None:
        """Forget a declared state (e.g. a layer moved elsewhere after the first batch)."""
        del self._specs[name]
        delattr(self, name)

    @abstractmethod
    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Add one batch (targets ``y`` mark ignored positions); returns the outputs."""

    @abstractmethod
    def finalize(self) -> object:
        """The unit-noise curvature of everything seen."""

    def state_tensor(self, name: str) -> Tensor:
        """The current value of a state as one tensor.

        The row blocks of a ``GATHER`` state are moved one by one into a single tensor, which
        then replaces them (peak memory: the rows plus one block, not twice the rows).

        Returns:
            The state's value (a GATHER state: its rows concatenated along the first dimension).
        """
        spec = self._specs[name]
        value = getattr(self, name)
        if spec.reduce is Reduction.GATHER:
            if not value:
                return spec.full()
            if len(value) > 1:
                n = sum(part.shape[0] for part in value)
                out = torch.empty(
                    (n, *value[0].shape[1:]), dtype=value[0].dtype, device=value[0].device
                )
                pos = 0
                while value:
                    part = value.pop(0)
                    out[pos : pos + part.shape[0]] = part
                    pos += part.shape[0]
                    del part
                value.append(out)
            return value[0]
        if value is None:
            return spec.full()
        if isinstance(value, (int, float)):
            return spec.full(float(value))
        return value

    def distributed_state(self) -> dict[str, tuple[Tensor, Reduction]]:
        """Every declared state: ``name -> (tensor, reduction)``, in declaration order."""
        return {name: (self.state_tensor(name), spec.reduce) for name, spec in self._specs.items()}

    def load_distributed_state(self, state: dict[str, Tensor]) -> None:
        """Replace the states by their values reduced over the ranks.

        Args:
            state: ``name -> tensor``, the summed or gathered value of each state present.
        """
        for name, spec in self._specs.items():
            if name not in state:
                continue
            value = state[name]
            if spec.reduce is Reduction.GATHER:
                setattr(self, name, [value])
            elif isinstance(getattr(self, name), (int, float)):
                setattr(self, name, int(round(float(value.sum()))))
            else:
                setattr(self, name, value)
        self._after_load()

    def _after_load(self) -> None:  # noqa: B027 -- optional hook
        """Restore what derives from the states after :meth:`load_distributed_state`."""
