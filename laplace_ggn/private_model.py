"""The private copy of the user's model that every computation runs on, and checks of its θ*.

The library never runs its passes on the user's module: :func:`private_copy` makes the copy
(with a clear error naming the attribute when the module cannot be copied; eager, when the
model or a submodule is compiled by ``torch.compile``), and
:func:`check_finite_parameters` refuses a non-finite θ* of the subset before any pass.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ._checks import shape_str
from ._compiled import eager_modules

__all__ = [
    "check_finite_parameters",
    "compute_dtype",
    "nonfinite_parameters",
    "private_copy",
    "with_nonfinite_hint",
]

#: Model dtypes computed in float32: torch has no CPU factorisations (Cholesky, eigh, SVD, QR)
#: in half precision, and a curvature summed with an 8-bit (bfloat16) or 11-bit (float16)
#: mantissa is rounding noise.
_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every computation of a model of ``dtype`` runs in: float32 for half precision.

    Returns:
        ``torch.float32`` for float16 / bfloat16, else ``dtype``.
    """
    return torch.float32 if dtype in _HALF else dtype


#: Module attributes holding the module's structure (copied with the module itself).
_STRUCTURE = ("_modules",)


def _derived_tensor_memo(model: nn.Module) -> dict[int, Tensor]:
    """Detached copies of tensors stored as plain attributes with an autograd history.

    ``torch.nn.utils.weight_norm`` (deprecated) and ``spectral_norm`` keep the weight they
    compute as an attribute; after a forward pass with autograd it is not a leaf and
    ``copy.deepcopy`` refuses it.  Such a tensor is recomputed at every forward pass of the
    copy, so its value at copy time is all the copy needs.

    Returns:
        ``{id(tensor): detached copy}``, a memo for ``copy.deepcopy``.
    """
    memo: dict[int, Tensor] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return memo


def _uncopyable(model: nn.Module) -> str | None:
    """The first attribute of a submodule that ``copy.deepcopy`` fails on, as ``'name' (type)``."""
    memo = _derived_tensor_memo(model)
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key in _STRUCTURE:
                continue
            try:
                copy.deepcopy(value, dict(memo))
            except Exception:  # noqa: BLE001 -- looking for the culprit of a failure
                path = f"{name}.{key}" if name else key
                return f"{path!r} ({type(value).__name__})"
    return None


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (parameters, buffers, hooks, mode), sharing nothing with it.

    ``torch.compile`` wrappers are removed from the copy (:func:`~laplace_ggn._compiled.
    eager_modules`): nothing is compiled by the library's passes, names are kept.

    Args:
        model: The user's network.

    Returns:
        The copy (eager).

    Raises:
        TypeError: If the module holds an object that cannot be copied (a lock, an open file,
            a socket, ...); the message names the attribute and the ways out.
    """
    try:
        copied = copy.deepcopy(model, _derived_tensor_memo(model))
    except Exception as err:  # noqa: BLE001 -- any failure of deepcopy is reported the same way
        culprit = _uncopyable(model)
        found = f" the attribute {culprit} cannot be copied" if culprit else ""
        raise TypeError(
            f"model must be deep-copyable (every pass runs on a private copy, so that yours is "
            f"never changed); copy.deepcopy(model) failed:{found} ({type(err).__name__}: "
            f"{str(err)[:200]}). Keep such objects (locks, open files, sockets, clients) outside "
            "the module, or give its class __getstate__ / __setstate__ (or __deepcopy__) that "
            "leave them out of copies."
        ) from err
    # compiled parts run eagerly: no compilation of the library's passes (see _compiled)
    return eager_modules(copied)


def nonfinite_parameters(model: nn.Module, names: object = None) -> list[str]:
    """Names of the floating parameters holding NaN or Inf (of ``names`` only, if given).

    Returns:
        The names, in ``model.named_parameters()`` order.
    """
    keep = None if names is None else set(names)
    return [
        n
        for n, p in model.named_parameters()
        if (keep is None or n in keep)
        and p.is_floating_point()
        and not bool(torch.isfinite(p.detach().sum()))
        and not bool(torch.isfinite(p.detach()).all())
    ]


def check_finite_parameters(model: nn.Module, names: tuple[str, ...]) -> None:
    """Refuse a subset whose trained values θ* hold NaN or Inf, naming the first such tensor.

    θ* is the posterior mean; a non-finite entry makes samples, the evidence and the saved
    state non-finite, so it is refused before the data pass.

    Args:
        model: The user's network.
        names: The parameters of the subset.

    Raises:
        ValueError: Naming the parameter, its NaN and Inf counts and its shape.
    """
    bad = nonfinite_parameters(model, names)
    if not bad:
        return
    p = dict(model.named_parameters())[bad[0]].detach()
    n_nan = int(torch.isnan(p).sum())
    n_inf = int(torch.isinf(p).sum())
    more = f" (also non-finite: {bad[1:]})" if len(bad) > 1 else ""
    raise ValueError(
        f"parameter {bad[0]!r} of the subset must be finite (its trained value is the posterior "
        f"mean θ*); got {n_nan} NaN and {n_inf} Inf values out of {p.numel()} (shape "
        f"{shape_str(p.shape)}){more}. The training diverged or the checkpoint is damaged: "
        "load finite weights, or leave the parameter out of subset=."
    )


def with_nonfinite_hint(err: Exception, model: nn.Module, subset: tuple[str, ...]) -> Exception:
    """``err`` of a data pass, naming the parameters outside ``subset`` that hold NaN or Inf.

    Parameters outside the subset enter the outputs at their trained values; they are not
    refused (a frozen ``-inf`` mask added before a softmax is finite in every output), but
    when the pass fails (non-finite outputs or curvature) they are the likely cause.

    Returns:
        ``err`` itself, or a ``ValueError`` / ``RuntimeError`` of the same message with the
        names added (caused by ``err``).
    """
    if type(err) not in (ValueError, RuntimeError):
        return err
    outside = [n for n in nonfinite_parameters(model) if n not in set(subset)]
    if not outside:
        return err
    new = type(err)(
        f"{err} The model's parameters {outside} (outside the subset) hold NaN or Inf and "
        "enter the outputs at their trained values: load finite weights."
    )
    new.__cause__ = err
    return new
