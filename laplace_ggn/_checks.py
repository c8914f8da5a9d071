"""Shared validation, error messages and the option enums.

Every public entry point converts its string options here once (``Structure(structure)``
through :func:`as_enum`) and compares enum members afterwards.  Error messages follow one
template: "``<arg>`` must be <expectation>; got <actual>. <hint>".
"""

from __future__ import annotations

import difflib
import enum
import numbers
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "Likelihood",
    "Structure",
    "Link",
    "PredictMethod",
    "Curvature",
    "as_enum",
    "check_computed_finite",
    "check_finite",
    "check_generator",
    "check_memory",
    "check_positive",
    "check_positive_int",
    "check_target_tensor",
    "is_integer",
    "shape_str",
    "near_matches",
    "DEFAULT_MEMORY_BUDGET",
]

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes; intermediate tensors are chunked below this
_FINITE_CHUNK = 1 << 20  # entries checked at once by check_finite


class Likelihood(str, enum.Enum):
    """Observation model of the network output."""

    REGRESSION = "regression"
    CLASSIFICATION = "classification"
    BINARY = "binary"
    HETEROSCEDASTIC = "heteroscedastic"
    POISSON = "poisson"
    REWARD_MODELING = "reward_modeling"


class Structure(str, enum.Enum):
    """Structure of the curvature (and so of the posterior precision)."""

    FULL = "full"
    DIAG = "diag"
    KFAC = "kfac"
    LOWRANK = "lowrank"
    PROJECTED = "projected"
    GP = "gp"
    ELLA = "ella"


class Link(str, enum.Enum):
    """Approximation of the expected softmax / sigmoid under a Gaussian over logits."""

    PROBIT = "probit"
    BRIDGE = "bridge"
    BRIDGE_NORM = "bridge_norm"
    MC = "mc"


class PredictMethod(str, enum.Enum):
    """Predictive: linearised network (``glm``) or sampled network (``nn``)."""

    GLM = "glm"
    NN = "nn"


class Curvature(str, enum.Enum):
    """How the output Hessians are factorised: exactly (``ggn``) or by sampled labels (``mc``)."""

    GGN = "ggn"
    MC = "mc"


E = TypeVar("E", bound=enum.Enum)


def as_enum(cls: type[E], value: object, name: str) -> E:
    """Convert a user option to its enum member, or raise naming the valid values.

    Args:
        cls: The enum class.
        value: A member of ``cls`` or its string value.
        name: Argument name used in the error message.

    Returns:
        The enum member.

    Raises:
        ValueError: If ``value`` is not one of the valid options.
    """
    if isinstance(value, cls):
        return value
    valid = [m.value for m in cls]
    if isinstance(value, str):
        try:
            return cls(value.lower())
        except ValueError:
            pass
    hint = near_matches(str(value), valid)
    raise ValueError(
        f"{name} must be one of {valid}; got {value!r}."
        + (f" Did you mean {hint[0]!r}?" if hint else "")
    )


def near_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates close to ``word`` (for 'did you mean' hints)."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)


def shape_str(shape: Sequence[int] | torch.Size) -> str:
    """Format a shape as ``(a, b, c)``."""
    dims = [str(int(s)) for s in shape]
    return "(" + dims[0] + ",)" if len(dims) == 1 else "(" + ", ".join(dims) + ")"


def check_finite(tensor: Tensor, what: str, where: str = "") -> None:
    """Raise if ``tensor`` holds NaN or Inf.

    Args:
        tensor: Any tensor (non-floating tensors always pass).
        what: Name of the quantity, e.g. ``"model output"``.
        where: Location, e.g. ``"batch 3"``.

    Raises:
        ValueError: If the tensor holds a NaN or an Inf.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    if bool(torch.isfinite(tensor.sum())):  # one reduction; NaN/Inf anywhere make it non-finite
        return
    if tensor.is_contiguous() and tensor.numel() > _FINITE_CHUNK:
        # in slices: isfinite makes temporaries of the tensor's size (e.g. a P×P GGN)
        if all(bool(torch.isfinite(c).all()) for c in tensor.reshape(-1).split(_FINITE_CHUNK)):
            return
    elif bool(torch.isfinite(tensor).all()):
        return
    finite = torch.isfinite(tensor)
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int((~finite).sum()) - n_nan
    loc = f" in {where}" if where else ""
    raise ValueError(
        f"{what}{loc} must be finite; got {n_nan} NaN and {n_inf} Inf values "
        f"out of {tensor.numel()} (shape {shape_str(tensor.shape)}). "
        "Clean the data or check the model for numerical overflow."
    )


def check_positive(value: Tensor, name: str) -> None:
    """Raise unless every entry of ``value`` is finite and strictly positive.

    Raises:
        ValueError: If an entry is not finite or not positive.
    """
    if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
        shown = value.detach().flatten()[:5].tolist()
        raise ValueError(
            f"{name} must be finite and > 0; got {shown}"
            + ("..." if value.numel() > 5 else "")
            + f" (shape {shape_str(value.shape)})."
        )


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer scalar: a Python, NumPy or 0-dim integer torch value.

    Counts (``n``, ``n_samples``, ``rank``, ``n_steps``, ...) accept all three; ``bool`` (and
    NumPy / torch booleans) are refused, so that ``True`` is never read as 1.

    Returns:
        ``True`` for an integer scalar, ``False`` otherwise (booleans included).
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return (
        isinstance(value, Tensor)
        and value.ndim == 0
        and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    )


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer (see :func:`is_integer`).

    Returns:
        The integer.

    Raises:
        ValueError: If it is not a positive integer.
    """
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def check_generator(generator: object) -> None:
    """Raise unless ``generator`` is a ``torch.Generator`` or ``None``.

    Raises:
        TypeError: If it is anything else.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None; got {type(generator).__name__}."
        )


def check_target_tensor(y: object, where: str = "") -> Tensor:
    """Return ``y`` if it is a real-valued tensor of targets.

    Targets are not converted: NumPy arrays, lists, numbers and ``None`` are refused, as
    floating inputs of another dtype are (a ``DataLoader`` already turns NumPy arrays into
    tensors).

    Args:
        y: Targets of one batch.
        where: Location, e.g. ``"batch 3"``.

    Returns:
        ``y`` unchanged.

    Raises:
        TypeError: If ``y`` is not a tensor, or is complex.
    """
    loc = f" in {where}" if where else ""
    if not isinstance(y, Tensor):
        raise TypeError(
            f"targets{loc} must be a torch.Tensor; got {type(y).__name__}. Convert them with "
            "torch.as_tensor(y) (a DataLoader does this for NumPy arrays)."
        )
    if y.is_complex():
        raise TypeError(f"targets{loc} must be real-valued; got dtype {y.dtype}.")
    return y


def check_computed_finite(tensor: Tensor, what: str, hint: str = "") -> None:
    """Raise if a computed quantity holds NaN or Inf (a numerical failure, not bad input).

    Args:
        tensor: The result to check (non-floating tensors always pass).
        what: Name of the quantity, e.g. ``"functional covariance J Σ Jᵀ"``.
        hint: What to try instead; a default about overflow is used when empty.

    Raises:
        RuntimeError: If the tensor holds a NaN or an Inf.
    """
    if not tensor.is_floating_point():
        return
    if bool(torch.isfinite(tensor.sum())):  # one reduction; NaN/Inf anywhere make it non-finite
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise RuntimeError(
        f"{what} must be finite; got {n_nan} NaN and {n_inf} Inf values out of "
        f"{tensor.numel()} (shape {shape_str(tensor.shape)}, {tensor.dtype}). "
        + (
            hint
            or f"The computation overflowed {tensor.dtype}: a value is too large for it "
            "(saturated outputs or Jacobians, or a huge σ or posterior variance). Evaluate a "
            "float64 copy of the model (model.double()) or rescale it."
        )
    )


def check_memory(need: int, budget: int, what: str, hint: str) -> None:
    """Refuse an allocation of ``need`` bytes over the memory budget, before it is made.

    Args:
        need: Bytes the allocation would take.
        budget: The wrapper's ``memory_budget`` (bytes).
        what: The tensor, with its shape, e.g. ``"one sample's Jacobian (M=3, P=31)"``.
        hint: The way out (a smaller subset or input, another option, a larger budget).

    Raises:
        ValueError: If ``need > budget``, naming both sizes and the hint.
    """
    if need > budget:
        raise ValueError(
            f"{what} must fit in the memory budget of {_gb(budget)}; got {_gb(need)}. {hint}"
        )


def _gb(n_bytes: float) -> str:
    """``n_bytes`` in GB for messages, e.g. ``"1.5 GB"``."""
    return f"{n_bytes / 2**30:.3g} GB"
