r"""Linear heads: a parameter subset inside one ``nn.Linear`` whose output is the model output.

For such a layer (a classifier head, a language-model head, the last layer of an MLP) the
Jacobian of the output at one position w.r.t. ``[W b]`` in Kronecker order (output index
slow, input index fast) is

.. math::
    J_n = I_C \otimes \tilde\phi_n^\top, \qquad \tilde\phi_n = [\phi_n; 1],

with :math:`\phi_n` the features entering the layer (the 1 only when the bias is in the
subset).  A posterior then gives :math:`J_n \Sigma J_n^\top` from the features alone
(``linear_head_covariance(phi, index)``): no ``(B, C, P)`` Jacobian is formed and nothing is
differentiated through the body of the network.

:class:`LinearHead` finds such a layer from the subset alone (no data) and reads the features
with a forward hook that it installs once on the functional model's private copies (one per
thread).  The hook
records only for the thread that asked (thread-local state), so concurrent predictions do not
see each other's features.  Each call checks that the layer ran once and that its output is
the model output (the same tensor, or a view of it with the same shape); otherwise the call
returns ``None`` and the caller uses Jacobians, for that call only.  The first call also traces
the uses of the head's parameters (:func:`~laplace_ggn.layers.trace_foreign_uses`): if one is
used outside the layer's forward as well (a weight reused by a functional call), the formula
above misses that use, and every call returns ``None`` (Jacobians see every use).  A weight
tied to another module (``lm_head.weight`` of a language model, shared with the embedding)
is a head only when the subset names the head's own alias, which the functional model unties
(see :func:`~laplace_ggn.layout.untie_aliases`).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from .functional import FunctionalModel, is_model_output
from .layers import (
    AffineLayer,
    affine_layers,
    tied_parameters,
    trace_foreign_uses,
    with_bias_column,
)

__all__ = ["LinearHead"]


class LinearHead:
    """A subset made only of the parameters of one ``nn.Linear`` layer.

    Args:
        fmodel: The functional model whose private module receives the feature hook.
        module_name: Name of the layer in the model.
        weight: Name of its weight if in the subset, else ``None``.
        bias: Name of its bias if in the subset, else ``None``.

    Attributes:
        n_out: C, the layer's outputs.
        n_in: D, the feature length including the bias column.
        index: Flat positions of ``[W b]`` in Kronecker order, shape ``(C, D)``.
    """

    def __init__(
        self, fmodel: FunctionalModel, module_name: str, weight: str | None, bias: str | None
    ):
        self.fmodel = fmodel
        self.module_name = module_name
        layer = AffineLayer(module_name, fmodel.module.get_submodule(module_name), weight, bias)
        self.weight, self.bias = weight, bias
        self.n_out, self.n_in = layer.n_out, layer.n_in
        self.index = layer.kron_index(fmodel.layout).to(fmodel.device)
        self._local = threading.local()
        # whether a parameter of the head is also used outside it (None: not traced yet)
        self._shared: bool | None = None
        self._lock = threading.Lock()
        # on every thread's private copy, never on the user's module
        fmodel.register_forward_hook(module_name, self._hook)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_local"]  # per-thread records of a call in progress: none to keep
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._lock = threading.Lock()

    @classmethod
    def find(cls, fmodel: FunctionalModel) -> LinearHead | None:
        """The head if every parameter of the subset belongs to one untied ``nn.Linear``."""
        names = set(fmodel.layout.names)
        for mname, layer in affine_layers(fmodel.module, names).items():
            if not names <= {layer.weight, layer.bias}:
                continue
            tied = tied_parameters(fmodel.module)
            if any(id(p) in tied for p in layer.module.parameters(recurse=False)):
                return None
            return cls(fmodel, mname, layer.weight, layer.bias)
        return None

    def _hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        records = getattr(self._local, "records", None)
        if records is not None:
            records.append((inputs[0], output))

    def features(self, x: object) -> tuple[Tensor, Tensor] | None:
        r"""Features :math:`\tilde\phi` and outputs at θ*, or ``None`` if this call does not fit.

        Args:
            x: Model input of batch size B (on the model's device).

        Returns:
            ``(phi, f)``: features with the bias column, one row per position, shape
            ``(N, D)`` (N = B, or B·T for outputs ``(B, T, C)``), and the outputs ``(B, C)`` or
            ``(B, T, C)``; ``None`` if the layer did not run exactly once or its output is not
            the model output.
        """
        if self._shared is None:
            with self._lock:
                if self._shared is None:
                    self._shared = self._used_outside(x)
        if self._shared:
            return None
        self._local.records = []
        try:
            f = self.fmodel.forward(x)
        finally:
            records, self._local.records = self._local.records, None
        if len(records) != 1:
            return None
        a, o = records[0]
        if not is_model_output(o, f):
            return None
        a = a.detach().reshape(-1, a.shape[-1])
        return with_bias_column(a, bool(self.weight), bool(self.bias)), f

    def _used_outside(self, x: object) -> bool | None:
        """Whether a forward pass on the first sample of ``x`` uses a head parameter elsewhere.

        Returns:
            ``True`` if the features alone do not give the Jacobian of the subset, ``None``
            for an input of 0 rows.
        """
        fm = self.fmodel
        x = next(iter(fm.chunks(x, 1)), None)
        if x is None:  # an input of 0 rows: decide on a later call
            return None
        params = {
            n: t.detach().requires_grad_(True) for n, t in fm.layout.unflatten(fm.theta).items()
        }
        module = fm.module.get_submodule(self.module_name)
        owners = {n: (params[n], module) for n in (self.weight, self.bias) if n}
        with torch.enable_grad(), trace_foreign_uses(owners, fm.module) as uses:
            f = fm.call_dict(params, x)
        return bool(uses.names(f))
