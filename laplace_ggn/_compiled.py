r"""``torch.compile``\ d models differentiated as the original, eager modules.

The library's passes differentiate the network in ways a compiled graph was not built for
(``torch.func.vmap`` over samples, forward-mode dual numbers, batched backward passes through
:func:`torch.func.functional_call`).  On a compiled model each of them would trigger a new
compilation of the library's own passes (seconds to minutes on the first fit and the first
prediction) for the same numbers as the eager module.  So the library's *private copy* of the
model is made eager before it is first called:

- every ``torch.compile(module)`` wrapper (an ``OptimizedModule``, the whole model or any
  submodule) is replaced by :class:`EagerModule`, which calls the original module
  ``_orig_mod`` directly and keeps it under the same attribute name, so every parameter and
  module name (``_orig_mod.0.weight``, ``body._orig_mod.fc.bias``) is the user's;
- a module compiled in place (``module.compile()``) gets its plain ``__call__`` back;
- a ``forward`` decorated with ``@torch.compile`` is replaced, on the copy's instances, by the
  undecorated function it wraps.

The user's model is never touched: it stays compiled for the user's own calls.
"""

from __future__ import annotations

import sys
import types

from torch import nn

__all__ = ["EagerModule", "eager_modules"]


class EagerModule(nn.Module):
    """The original module of a ``torch.compile`` wrapper, called without compilation.

    Args:
        orig: The wrapper's ``_orig_mod``; registered under that name, so parameter names are
            those of the wrapper.
    """

    def __init__(self, orig: nn.Module):
        super().__init__()
        self._orig_mod = orig
        self.training = orig.training

    def forward(self, *args, **kwargs):
        """The original module's call (its hooks included)."""
        return self._orig_mod(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes of the original module, as the wrapper forwards them
            orig = self.__dict__.get("_modules", {}).get("_orig_mod")
            if orig is None:
                raise
            return getattr(orig, name)


def _is_optimized(module: nn.Module) -> bool:
    # no module is a compile wrapper unless torch._dynamo was imported (importing it costs ~1 s)
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def _uncompiled_forward(module: nn.Module) -> None:
    """Undo ``module.compile()`` and a ``@torch.compile``-decorated ``forward`` on ``module``."""
    if getattr(module, "_compiled_call_impl", None) is not None:
        module._compiled_call_impl = None
    orig = getattr(type(module).forward, "_torchdynamo_orig_callable", None)
    if orig is not None:
        module.forward = types.MethodType(orig, module)


def eager_modules(model: nn.Module) -> nn.Module:
    """Remove every ``torch.compile`` wrapper from a private model copy (see the module docstring).

    Submodules are replaced in place; the root is returned (an :class:`EagerModule` if the
    model itself was compiled).  A model without compiled parts is returned unchanged.

    Args:
        model: A private copy of the user's network (modified).

    Returns:
        The eager model, with the same parameter and module names.
    """
    if _is_optimized(model):
        model = EagerModule(model._orig_mod)
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if child is not None and _is_optimized(child):
                module._modules[name] = EagerModule(child._orig_mod)
    for module in model.modules():
        _uncompiled_forward(module)
    return model
