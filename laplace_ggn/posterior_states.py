"""Saved posterior states: the checks of each structure's entries, and their shared helpers.

Each :class:`~laplace_ggn.structures.StructureSpec` names the check of its saved posterior
(``check_state``); :func:`~laplace_ggn.persistence.check_state` runs it after the checks
common to every state.  A check raises ``ValueError`` / ``TypeError`` naming the entry, what
it must be and what it holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from ._checks import check_finite, shape_str

__all__ = [
    "SavedSubset",
    "check_diag_state",
    "check_eigen_state",
    "check_full_state",
    "check_keys",
    "check_kfac_state",
    "check_tensor_state",
    "describe",
    "is_int",
    "state_tensor",
]


@dataclass(frozen=True)
class SavedSubset:
    """The parameter subset of a saved state, against which its posterior is checked.

    Attributes:
        structure: The structure's name.
        names: Parameter names of the subset.
        shapes: Their shapes.
    """

    structure: str
    names: list[str]
    shapes: list[tuple[int, ...]]

    @property
    def n_params(self) -> int:
        """P of the subset."""
        return sum(math.prod(s) for s in self.shapes)


def describe(value: object) -> str:
    """A value as error messages show it: a tensor's shape and dtype, else its repr and type."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {shape_str(value.shape)} and dtype {value.dtype}"
    return f"{value!r} ({type(value).__name__})"


def is_int(value: object) -> bool:
    """Whether ``value`` is a Python int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def state_tensor(state: Mapping, key: str, name: str, shape: tuple | None = None) -> Tensor:
    """A finite floating tensor ``state[key]`` of ``shape`` (``None``: any shape).

    Returns:
        The tensor.

    Raises:
        TypeError: If it is not a floating tensor.
        ValueError: If its shape differs or it holds NaN/Inf.
    """
    t = state[key]
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got {describe(t)}.")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {shape_str(shape)}; got {shape_str(t.shape)}. "
            "Was the state saved from another model or structure?"
        )
    check_finite(t, name)
    return t


def check_keys(mapping: Mapping, expected: Sequence[str], name: str, hint: str = "") -> None:
    """Raise naming the keys of ``expected`` that ``mapping`` lacks.

    Raises:
        ValueError: If a key is missing.
    """
    missing = [k for k in expected if k not in mapping]
    if missing:
        raise ValueError(
            f"{name} must hold the keys {list(expected)}; missing {missing} (got keys "
            f"{sorted(map(str, mapping))}).{hint}"
        )


def check_kfac_state(post: Mapping, saved: SavedSubset) -> None:
    """Check the saved state of a KFAC posterior: Kronecker blocks and a diagonal rest.

    Raises:
        ValueError: If a key is missing, a block names no parameter of the subset or has
            factors of the wrong shape, or the blocks do not cover the subset exactly once.
        TypeError: If a factor is not a floating tensor.
    """
    subset, shapes = saved.names, saved.shapes
    check_keys(post, ("n_blocks", "diag_names", "diag"), "state['posterior']")
    n_blocks = post["n_blocks"]
    if not is_int(n_blocks) or n_blocks < 0:
        raise ValueError(
            f"state['posterior']['n_blocks'] must be an int >= 0; got {describe(n_blocks)}."
        )
    shape_of = dict(zip(subset, shapes))
    names = post["diag_names"]
    if not isinstance(names, (list, tuple)) or not all(n in shape_of for n in names):
        raise ValueError(
            "state['posterior']['diag_names'] must be a list of names of state['subset']; "
            f"got {describe(names)}."
        )
    covered = list(names)
    n_diag = sum(math.prod(shape_of[n]) for n in names)
    state_tensor(post, "diag", "state['posterior']['diag']", (n_diag,))
    for i in range(n_blocks):
        keys = [f"block.{i}.{k}" for k in ("weight", "bias", "A", "B")]
        check_keys(post, keys, "state['posterior']")
        w, b = post[keys[0]], post[keys[1]]
        if (w is None and b is None) or any(n is not None and n not in shape_of for n in (w, b)):
            raise ValueError(
                f"state['posterior'] block {i} must name a weight and/or a bias of "
                f"state['subset']; got weight={w!r}, bias={b!r}."
            )
        out = shape_of[w][0] if w is not None else shape_of[b][0]
        fan_in = math.prod(shape_of[w][1:]) if w is not None else 0
        D = fan_in + (b is not None)
        state_tensor(post, keys[2], f"state['posterior'][{keys[2]!r}]", (D, D))
        state_tensor(post, keys[3], f"state['posterior'][{keys[3]!r}]", (out, out))
        covered += [n for n in (w, b) if n is not None]
    if sorted(covered) != sorted(subset):
        raise ValueError(
            "state['posterior'] (kfac) must cover every name of state['subset'] exactly once "
            f"by its blocks and diag_names; covers {sorted(covered)}, subset {sorted(subset)}."
        )


def _check_exact_keys(post: Mapping, expected: Sequence[str], saved: SavedSubset) -> None:
    hint = f" Was the state saved with another structure than {saved.structure!r}?"
    check_keys(post, expected, "state['posterior']", hint)
    unexpected = [k for k in post if k not in expected]
    if unexpected:
        raise ValueError(
            f"state['posterior'] must hold exactly the keys {list(expected)} of structure "
            f"{saved.structure!r}; got unexpected {unexpected}.{hint}"
        )


_entry = "state['posterior'][{!r}]".format


def check_full_state(post: Mapping, saved: SavedSubset) -> None:
    """Check the saved state of a full posterior: the dense GGN ``(P, P)``.

    Raises:
        ValueError: If the keys or the shape are not those of the structure.
        TypeError: If the GGN is not a floating tensor.
    """
    _check_exact_keys(post, ("ggn",), saved)
    P = saved.n_params
    state_tensor(post, "ggn", _entry("ggn"), (P, P))


def check_diag_state(post: Mapping, saved: SavedSubset) -> None:
    """Check the saved state of a diag posterior: the GGN diagonal ``(P,)``, >= 0.

    Raises:
        ValueError: If the keys or the shape are not those of the structure, or an entry is
            negative.
        TypeError: If the diagonal is not a floating tensor.
    """
    _check_exact_keys(post, ("ggn_diag",), saved)
    d = state_tensor(post, "ggn_diag", _entry("ggn_diag"), (saved.n_params,))
    if bool((d < 0).any()):
        raise ValueError(f"{_entry('ggn_diag')} must be >= 0 (a GGN diagonal); got negatives.")


def check_eigen_state(post: Mapping, saved: SavedSubset) -> None:
    """Check a saved eigendecomposition: eigenvalues ``(R,)`` >= 0 and eigenvectors ``(P, R)``.

    Raises:
        ValueError: If the keys or the shapes are not those of the structure, or an
            eigenvalue is negative.
        TypeError: If an entry is not a floating tensor.
    """
    _check_exact_keys(post, ("eigenvalues", "eigenvectors"), saved)
    lam = state_tensor(post, "eigenvalues", _entry("eigenvalues"))
    if lam.ndim != 1 or bool((lam < 0).any()):
        raise ValueError(
            f"{_entry('eigenvalues')} must be a vector (R,) of values >= 0; got "
            f"{describe(lam)}{' with negatives' if lam.ndim == 1 else ''}."
        )
    state_tensor(post, "eigenvectors", _entry("eigenvectors"), (saved.n_params, lam.shape[0]))


def check_tensor_state(post: Mapping, saved: SavedSubset) -> None:
    """Check a posterior state whose structure declares no check: its tensors are finite.

    Raises:
        ValueError: If a floating tensor holds NaN or Inf.
    """
    for key, value in post.items():
        if isinstance(value, Tensor):
            check_finite(value, _entry(key))
