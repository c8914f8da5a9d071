r"""Making every model differentiable in every mode the library needs, without the user's help.

Fused kernels are fast for a plain forward and backward but lack what Jacobians of many
samples need: the fused scaled-dot-product attention kernels have neither batching rules nor
forward-mode derivatives, oneDNN's RNN kernel has no forward-mode derivative (and keeps no
workspace for a backward under ``torch.no_grad``), and the native RNN kernels write into
unbatched tensors under :func:`torch.func.vmap`. This module provides

- process-wide switches (:data:`MATH_ATTENTION`, :data:`NO_MKLDNN`) held, reference counted,
  for the duration of the library's passes and restored afterwards; they only choose between
  kernels that give the same results, so other threads' forwards stay correct;
- :func:`plain_attention`: for the calling thread only, ``nn.MultiheadAttention`` and
  ``nn.TransformerEncoder(Layer)`` of a private model copy prepared by
  :func:`prepare_attention_layers` leave their inference fast paths (fused layers, nested
  tensors), which have no batching rules or forward-mode derivatives. The switch is
  per thread because the fast-path decision is taken twice in one forward (encoder, then
  attention layer): a process-wide flag changed between the two by another thread breaks it;
- :func:`unroll_recurrent_layers`: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` layers of a private
  model copy evaluated step by step with ordinary operations (same parameters, same
  results up to round-off), which vmap, batched backward passes and forward mode all handle;
- :func:`shared_clone`: a per-thread copy of a module's structure sharing its tensors.
"""

from __future__ import annotations

import copy
import itertools
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode

__all__ = [
    "FORWARD_AD_LOCK",
    "MATH_ATTENTION",
    "NO_MKLDNN",
    "cannot_transform",
    "differentiating",
    "plain_attention",
    "prepare_attention_layers",
    "is_forward_ad_error",
    "shared_clone",
    "unroll_recurrent_layers",
    "warn_reverse_fallback",
]


class _ProcessSwitch:
    """A process-wide torch setting held while any pass of this library needs it.

    Reference counted under a lock: the first pass to enter saves the current setting and
    applies the wanted one, the last to leave restores it, so passes running at the same time
    in several threads neither restore it early nor leave it changed.
    """

    def __init__(self, get: Callable[[], object], apply: Callable[[object], None], value: object):
        self._get, self._apply, self._value = get, apply, value
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: object = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the setting applied for the duration of the block."""
        with self._lock:
            if self._depth == 0:
                self._saved = self._get()
                self._apply(self._value)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._apply(self._saved)


_SDPA_BACKENDS = tuple(
    n
    for n in ("flash", "mem_efficient", "cudnn", "math")
    if hasattr(torch.backends.cuda, f"enable_{n}_sdp")
)


def _attention_flags() -> dict[str, bool]:
    return {n: bool(getattr(torch.backends.cuda, f"{n}_sdp_enabled")()) for n in _SDPA_BACKENDS}


def _set_attention_flags(flags: dict[str, bool]) -> None:
    for n, on in flags.items():
        getattr(torch.backends.cuda, f"enable_{n}_sdp")(on)


#: Scaled-dot-product attention through torch's math kernel: the fused kernels have no
#: batching rules and no forward-mode derivatives.  Held (with :func:`plain_attention`)
#: during every pass of the functional model that differentiates or runs under a
#: ``torch.func`` transform.
MATH_ATTENTION = _ProcessSwitch(
    _attention_flags, _set_attention_flags, {n: n == "math" for n in _SDPA_BACKENDS}
)


_THREAD = threading.local()


class _NoFastPath(TorchFunctionMode):
    """A pass-through torch-function mode, active for the calling thread only.

    With it active, ``torch.overrides.has_torch_function`` is true, which keeps
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` off their fused inference paths.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _plain() -> bool:
    return getattr(_THREAD, "plain_depth", 0) > 0


@contextmanager
def plain_attention() -> Iterator[None]:
    """Attention as ordinary differentiable operations, in the calling thread, for the block.

    Holds :data:`MATH_ATTENTION` and makes the layers prepared by
    :func:`prepare_attention_layers` leave their fast paths while the block runs in this
    thread; forwards in other threads keep them.
    """
    _THREAD.plain_depth = getattr(_THREAD, "plain_depth", 0) + 1
    try:
        with MATH_ATTENTION.hold():
            yield
    finally:
        _THREAD.plain_depth -= 1


class _NoFastPathLayer:
    """A layer's own forward; inside :func:`plain_attention`, without its fast path."""

    def forward(self, *args, **kwargs):
        if not _plain():
            return super().forward(*args, **kwargs)
        with _NoFastPath():
            return super().forward(*args, **kwargs)


class _NoNestedEncoder:
    """An encoder's own forward; inside :func:`plain_attention`, building no nested tensor.

    Its padding-mask check runs an operation without a batching rule before any check a
    torch-function mode could answer, so the instance's own ``use_nested_tensor`` is turned off
    for the call instead (every thread evaluates its own copy of the module).
    """

    def forward(self, *args, **kwargs):
        if not _plain():
            return super().forward(*args, **kwargs)
        saved = self.__dict__.get("use_nested_tensor", None)
        self.use_nested_tensor = False
        try:
            return super().forward(*args, **kwargs)
        finally:
            if saved is None:
                del self.use_nested_tensor
            else:
                self.use_nested_tensor = saved


_PLAINABLE: dict[type, type] = {}


def _plainable(cls: type) -> type:
    """``cls`` with the matching mixin in front (one class per ``cls``, made once)."""
    made = _PLAINABLE.get(cls)
    if made is None:
        mixin = _NoNestedEncoder if issubclass(cls, nn.TransformerEncoder) else _NoFastPathLayer
        made = _PLAINABLE.setdefault(
            cls, type(cls.__name__, (mixin, cls), {"__doc__": cls.__doc__})
        )
    return made


def prepare_attention_layers(module: nn.Module) -> None:
    """Let the attention layers of a *private* model copy follow :func:`plain_attention`.

    ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``
    (and their subclasses) change class to subclasses that differ only inside
    :func:`plain_attention`; names, parameters and results stay.
    """
    kinds = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)
    for m in module.modules():
        if isinstance(m, kinds) and not isinstance(m, (_NoFastPathLayer, _NoNestedEncoder)):
            m.__class__ = _plainable(type(m))


def _set_mkldnn(on: bool) -> None:
    torch.backends.mkldnn.enabled = on


#: oneDNN off: its fused CPU RNN kernel has no forward-mode derivative.  Held during
#: forward-mode passes of models with recurrent layers that are not unrolled.
NO_MKLDNN = _ProcessSwitch(lambda: bool(torch.backends.mkldnn.enabled), _set_mkldnn, False)

#: Held by every forward-mode pass: torch's forward-AD levels are process-wide (one level at a
#: time, shared by all threads), so two passes in two threads would close each other's level.
FORWARD_AD_LOCK = threading.RLock()


def differentiating() -> bool:
    """Whether autograd records, or a ``torch.func`` transform (vmap, grad, jvp) is active.

    Only such passes need :data:`MATH_ATTENTION`; a plain forward without autograd keeps the
    fused kernels and fast paths.

    Returns:
        ``True`` when gradients are recorded or a transform is active.
    """
    if torch.is_grad_enabled():
        return True
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is None or level() is not None


def cannot_transform(err: BaseException, *, entered: bool = True) -> bool:
    """Whether ``err`` means that the model cannot run under a ``torch.func`` transform.

    Operations without batching rules or forward-mode derivatives, data-dependent control
    flow (``.item()``, ``if tensor:``) and in-place writes into unbatched tensors raise
    ``RuntimeError`` (``NotImplementedError`` is one); so may the checks of ``vmap``'s own
    arguments, before the model runs (``entered=False``: any error then).  Any other
    exception comes from the model's own code (a ``ValueError`` of the user's ``forward``)
    and must propagate, not be retried another way.

    Args:
        err: The exception raised by the transformed call.
        entered: Whether the transformed function had started running.

    Returns:
        ``True`` if the caller should fall back to a pass without the transform.
    """
    return not entered or isinstance(err, RuntimeError)


def is_forward_ad_error(err: BaseException) -> bool:
    """Whether ``err`` says that an operation has no forward-mode derivative."""
    msg = str(err)
    return isinstance(err, NotImplementedError) or "forward AD" in msg or "forward-mode" in msg


def warn_reverse_fallback(err: BaseException, *, stacklevel: int = 2) -> None:
    """Warn that a forward-mode pass is replaced by reverse-mode Jacobians (slower)."""
    first = str(err).splitlines()[0][:120] if str(err) else ""
    warnings.warn(
        f"an operation of the model has no forward-mode derivative ({type(err).__name__}: "
        f"{first}); computing the products from reverse-mode Jacobians instead (slower, same "
        "result).",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def shared_clone(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure (own dicts, hooks, flags) sharing its tensors."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


# ---------------------------------------------------------------------------------------------
# Recurrent layers evaluated step by step
# ---------------------------------------------------------------------------------------------


def _cell(mode: str, x_t: Tensor, gh: Tensor, h: Tensor, c: Tensor | None):
    """One step: input projection ``x_t`` and hidden projection ``gh`` (biases included)."""
    if mode == "LSTM":
        i, f, g, o = (x_t + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ir, iz, inn = x_t.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        return (1 - z) * n + z * h, None
    pre = x_t + gh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def _unrolled_forward(mod: nn.RNNBase, input: Tensor, hx: object):
    """The forward pass of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (eval mode, tensor input)."""
    lstm = mod.mode == "LSTM"
    batched = input.dim() == 3
    x = input if not batched or mod.batch_first else input.transpose(0, 1)
    x = x if batched else x.unsqueeze(0)  # (N, L, I)
    N, L = x.shape[:2]
    D = 2 if mod.bidirectional else 1
    H = mod.hidden_size
    H_out = mod.proj_size if lstm and mod.proj_size > 0 else H
    if hx is None:
        h0 = x.new_zeros(mod.num_layers * D, N, H_out)
        c0 = x.new_zeros(mod.num_layers * D, N, H) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)
        if not batched:
            h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
    h_n, c_n = [], []
    for layer in range(mod.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(mod, "weight_ih" + sfx), getattr(mod, "weight_hh" + sfx)
            b_ih = getattr(mod, "bias_ih" + sfx) if mod.bias else None
            b_hh = getattr(mod, "bias_hh" + sfx) if mod.bias else None
            w_hr = getattr(mod, "weight_hr" + sfx) if H_out != H else None
            h = h0[layer * D + d]
            c = c0[layer * D + d] if lstm else None
            gi = F.linear(x, w_ih, b_ih)  # (N, L, G): every step's input projection at once
            steps: list[Tensor | None] = [None] * L
            for t in range(L) if d == 0 else range(L - 1, -1, -1):
                h, c = _cell(mod.mode, gi[:, t], F.linear(h, w_hh, b_hh), h, c)
                if w_hr is not None:
                    h = F.linear(h, w_hr)
                steps[t] = h
            outs.append(torch.stack(steps, 1))
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, -1) if D == 2 else outs[0]
    out, hn = x, torch.stack(h_n)
    cn = torch.stack(c_n) if lstm else None
    if not batched:
        out, hn = out.squeeze(0), hn.squeeze(1)
        cn = cn.squeeze(1) if cn is not None else None
    elif not mod.batch_first:
        out = out.transpose(0, 1)
    return out, ((hn, cn) if lstm else hn)


class _Unrolled:
    """Forward of a recurrent layer step by step; the fused kernel for packed sequences."""

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence) or (self.training and self.dropout > 0):
            return super().forward(input, hx)
        return _unrolled_forward(self, input, hx)


class UnrolledLSTM(_Unrolled, nn.LSTM):
    """``nn.LSTM`` evaluated step by step (see :func:`unroll_recurrent_layers`)."""


class UnrolledGRU(_Unrolled, nn.GRU):
    """``nn.GRU`` evaluated step by step (see :func:`unroll_recurrent_layers`)."""


class UnrolledRNN(_Unrolled, nn.RNN):
    """``nn.RNN`` evaluated step by step (see :func:`unroll_recurrent_layers`)."""


_UNROLLED = {nn.LSTM: UnrolledLSTM, nn.GRU: UnrolledGRU, nn.RNN: UnrolledRNN}


def unroll_recurrent_layers(module: nn.Module) -> bool:
    """Evaluate the recurrent layers of a *private* model copy step by step, in place.

    ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` layers keep their parameters and names. Subclasses with their own ``forward`` are left alone.

    Returns:
        Whether recurrent layers that still use the fused kernels remain.
    """
    native = False
    for m in module.modules():
        cls = _UNROLLED.get(type(m))
        if cls is not None:
            m.__class__ = cls
        elif isinstance(m, nn.RNNBase) and not isinstance(m, _Unrolled):
            native = True
    return native
