r"""Affine-layer discovery: the ``nn.Linear`` / ``nn.Conv2d`` layers holding a parameter subset.

Layer hooks (square-root GGN rows, the exact diagonal, KFAC factors, Linear heads and the KFAC
natural gradient) all start from the same question: which modules compute
:math:`z = W\tilde a` with :math:`\tilde a = [a; 1]`, and which of their weight and bias are in
the subset.  :func:`affine_layers` answers it once; :class:`AffineLayer` carries the answer
with the sizes and the Kronecker index of ``[W b]``.

Kinds: ``nn.Linear`` (and subclasses), Hugging Face's ``Conv1D`` (a Linear layer with its
weight stored transposed, :func:`is_transposed_linear`), and ``nn.Conv2d`` with one group and
zero padding given as numbers (:func:`conv_supported`), whose inputs are unfolded into patches.

All of them assume that a parameter of such a layer is used only inside that layer's forward.
A weight also used elsewhere (tied to another module, or reused by a functional call such as
``F.linear(h, self.enc.weight.t())``) breaks that assumption; :func:`trace_foreign_uses`
finds such parameters from one forward pass, so that the callers can take them from exact
per-sample Jacobians instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._checks import shape_str
from .functional import UNBATCHED_HINT, LayerRecord, ParamLayout, capture_layers
from .kfac import kron_index
from .layout import graph_nodes

__all__ = [
    "AffineLayer",
    "affine_layers",
    "check_layer_inputs",
    "raise_for_unbatched_layers",
    "conv_supported",
    "is_transposed_linear",
    "layer_owners",
    "tied_parameters",
    "trace_foreign_uses",
    "with_bias_column",
]


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D``: ``y = x W + b`` with ``W`` ``(I, O)``.

    GPT-2-style models use it for every affine layer; it is an ``nn.Linear`` with the weight
    stored transposed.

    Returns:
        ``True`` for a ``Conv1D``.
    """
    cls = type(module)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers")
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.ndim == 2
        and getattr(module, "nf", None) == module.weight.shape[1]
    )


def conv_supported(module: nn.Conv2d) -> bool:
    """Whether a convolution unfolds into patches as KFAC assumes (one group, zero padding)."""
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def tied_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter that more than one module of ``model`` holds (tied weights)."""
    seen: set[int] = set()
    tied: set[int] = set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            (tied if id(p) in seen else seen).add(id(p))
    return tied


@dataclass(frozen=True)
class AffineLayer:
    r"""One affine layer :math:`z = W\tilde a` and the names of its parameters in a subset.

    Attributes:
        name: Module name in the model (``""`` for the model itself).
        module: The ``nn.Linear``, ``Conv1D`` or ``nn.Conv2d``.
        weight: Name of the weight if in the subset, else ``None``.
        bias: Name of the bias if in the subset, else ``None``.
    """

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored ``(I, O)`` (Hugging Face ``Conv1D``)."""
        return is_transposed_linear(self.module)

    @property
    def n_out(self) -> int:
        """O, the outputs (channels for a convolution)."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            return m.out_channels
        return m.weight.shape[1] if self.transposed else m.weight.shape[0]

    @property
    def n_features(self) -> int:
        """I, the input features (``C_in·kh·kw`` patch entries for a convolution)."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            return m.in_channels * math.prod(m.kernel_size)
        return m.weight.shape[0] if self.transposed else m.weight.shape[1]

    @property
    def n_in(self) -> int:
        """D, the columns of ``[W b]`` in the subset: I with the weight, +1 with the bias."""
        return (self.n_features if self.weight else 0) + (1 if self.bias else 0)

    def kron_index(self, layout: ParamLayout) -> Tensor:
        """Flat positions of ``[W b]`` in Kronecker order, shape ``(O, D)``."""
        return kron_index(layout, self.weight, self.bias, self.n_out, self.n_in)


def affine_layers(
    model: nn.Module,
    names: Iterable[str] | None = None,
    *,
    conv: bool = False,
    transposed: bool = False,
    untied: bool = False,
) -> dict[str, AffineLayer]:
    """The affine layers of ``model`` with a weight or bias in ``names``, by module name.

    Args:
        model: The network.
        names: Parameter names of the subset (``None``: every parameter).
        conv: Include ``nn.Conv2d`` layers that :func:`conv_supported` accepts.
        transposed: Include Hugging Face ``Conv1D`` layers.
        untied: Leave out layers holding a parameter another module also holds.

    Returns:
        ``{module name: AffineLayer}`` in ``named_modules()`` order.
    """
    subset = None if names is None else set(names)
    tied = tied_parameters(model) if untied else set()
    out: dict[str, AffineLayer] = {}
    for mname, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if not (conv and conv_supported(module)):
                continue
        elif not (isinstance(module, nn.Linear) or (transposed and is_transposed_linear(module))):
            continue
        if any(id(p) in tied for p in module.parameters(recurse=False)):
            continue
        prefix = f"{mname}." if mname else ""
        w, b = prefix + "weight", prefix + "bias"
        w = w if subset is None or w in subset else None
        b = b if module.bias is not None and (subset is None or b in subset) else None
        if w or b:
            out[mname] = AffineLayer(mname, module, w, b)
    return out


def with_bias_column(a: Tensor, weight: bool, bias: bool) -> Tensor:
    r"""Features :math:`\tilde a` of rows ``a`` ``(N, I)``: ``[a]``, ``[a, 1]`` or ``[1]``.

    Returns:
        The features, shape ``(N, D)``.
    """
    cols = ([a] if weight else []) + (
        [torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)] if bias else []
    )
    return torch.cat(cols, dim=1)


def check_layer_inputs(records: Mapping[str, LayerRecord], where: str = "") -> None:
    """Refuse a hooked layer that received an input without a batch dimension.

    An ``nn.Linear`` needs ``(B, ..., I)`` (at least 2-D), an ``nn.Conv2d`` ``(B, C, H, W)``.
    Both accept an unbatched sample too, which a loader of single samples produces.

    Raises:
        ValueError: Naming the layer, the shape it needs and the shape it got.
    """
    loc = f" in {where}" if where else ""
    for name, rec in records.items():
        conv = isinstance(rec.module, nn.Conv2d)
        need = 4 if conv else 2
        for a in rec.inputs:
            if a.ndim < need:
                kind = "nn.Conv2d" if conv else "nn.Linear"
                expect = "(B, C, H, W)" if conv else f"(B, ..., {a.shape[-1] if a.ndim else 'I'})"
                raise ValueError(
                    f"input of layer {name!r} ({kind}){loc} must have a batch dimension, shape "
                    f"{expect}; got {shape_str(a.shape)}. {UNBATCHED_HINT}"
                )


def raise_for_unbatched_layers(module: nn.Module, run: Callable[[], object]) -> None:
    """After the model failed: refuse an affine layer that received a sample without a batch dim.

    ``nn.Conv2d`` accepts an unbatched ``(C, H, W)`` sample, so a loader of single images
    fails only later, at a shape error of another layer.  ``run`` repeats the failed forward
    pass (outside any ``torch.func`` transform) with every Linear / Conv2d layer hooked; if one
    of them received an input without a batch dimension, that is the error the user needs.

    Args:
        module: The module that ran.
        run: Repeats its forward pass.

    Raises:
        ValueError: From :func:`check_layer_inputs`, naming the layer and the shape it got.
    """
    layers = {
        name: m for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    }
    with torch.no_grad(), capture_layers(layers) as records:
        try:
            run()
        except Exception:  # noqa: BLE001 -- the failure is known; only the records are read
            pass
    check_layer_inputs(records)


def layer_owners(
    layers: Mapping[str, AffineLayer], params: Mapping[str, Tensor]
) -> dict[str, tuple[Tensor, nn.Module]]:
    """``{name: (tensor, layer module)}`` of the layers' parameters in ``params``, to trace.

    Returns:
        The owners for :func:`trace_foreign_uses`.
    """
    return {
        n: (params[n], lay.module) for lay in layers.values() for n in (lay.weight, lay.bias) if n
    }


def _tensor_args(args: tuple, kwargs: Mapping | None) -> Iterator[Tensor]:
    """The tensors among the arguments of an op (and one level into lists and tuples)."""
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))


def _grad_fn_of(out: object) -> object:
    """The autograd node of an op's (first) tensor output, ``None`` if it has none."""
    if isinstance(out, (list, tuple)):
        out = next((t for t in out if isinstance(t, Tensor)), None)
    return out.grad_fn if isinstance(out, Tensor) else None


class _UseTracer(TorchFunctionMode):
    """Record each op consuming a traced tensor while its owner is not the running module.

    ``stack`` holds the traced modules whose forward is running (the innermost last); ops
    are looked at only while ``stack`` is non-empty, or always with ``everywhere``.
    """

    def __init__(self, owners: Mapping[int, tuple[str, nn.Module]], everywhere: bool):
        super().__init__()
        self.owners = owners
        self.everywhere = everywhere
        self.stack: list[nn.Module] = []
        self.uses: list[tuple[str, object]] = []  # (parameter name, autograd node of the output)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack or self.everywhere:
            top = self.stack[-1] if self.stack else None
            for t in _tensor_args(args, kwargs):
                hit = self.owners.get(id(t))
                if hit is not None and hit[1] is not top:
                    self.uses.append((hit[0], _grad_fn_of(out)))
        return out


class ForeignUses:
    """The uses of parameters outside their owner's forward seen by :func:`trace_foreign_uses`."""

    def __init__(self, tracer: _UseTracer):
        self._tracer = tracer

    def names(self, f: Tensor) -> set[str]:
        """Names of the parameters with a use outside their owner that reaches the output ``f``.

        A use whose result does not reach ``f`` through the autograd graph (detached, under
        ``torch.no_grad()``, or not part of the output) does not change the Jacobian of ``f``
        and is not counted.

        Returns:
            The parameter names.
        """
        uses = self._tracer.uses
        if not uses or f.grad_fn is None:
            return set()
        reached = graph_nodes(f.grad_fn)
        return {name for name, node in uses if node is not None and id(node) in reached}


@contextmanager
def trace_foreign_uses(
    owners: Mapping[str, tuple[Tensor, nn.Module]], root: nn.Module | None = None
) -> Iterator[ForeignUses]:
    """Trace, during the forward passes of the block, the uses of parameters outside their layer.

    Every op (a torch function: ``F.linear``, ``Tensor.t``, ``F.embedding``, ...) that
    consumes one of the traced tensors while its owner module is not the innermost traced
    module running counts as a foreign use; uses inside the owner's forward (however many
    times it runs) do not.  Only ops that run while ``root`` runs are looked at (with
    ``root=None``, every op of the block, e.g. a closure that runs the model).  Hooks are
    registered on the owners and ``root`` for the block only.

    Args:
        owners: ``{parameter name: (tensor used in the forward, owner module)}``; the
            tensors must require grad for :meth:`ForeignUses.names` to see their uses.
        root: The module whose forward the block runs, or ``None``.

    Yields:
        A :class:`ForeignUses`; call :meth:`ForeignUses.names` with the output after the block.
    """
    tracer = _UseTracer(
        {id(t): (name, module) for name, (t, module) in owners.items()}, root is None
    )
    modules = {id(m): m for _, m in owners.values()}
    if root is not None:
        modules[id(root)] = root

    def push(module, args):
        tracer.stack.append(module)

    def pop(module, args, out):
        if tracer.stack and tracer.stack[-1] is module:
            tracer.stack.pop()

    handles = []
    try:
        for m in modules.values():
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop, always_call=True))
        with tracer:
            yield ForeignUses(tracer)
    finally:
        for h in handles:
            h.remove()
