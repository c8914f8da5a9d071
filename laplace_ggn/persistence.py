"""Saved wrapper states: their layout and their validation before loading.

A state is the dict of :meth:`LaplaceWrapper.state_dict`.  Every key is checked at load time
(type, shape, finiteness, consistency with the structure and with the model), so that a
damaged, hand-edited or foreign state is refused with a ``ValueError`` / ``TypeError`` naming
the key, what it must be and what it holds, never accepted to fail (or predict NaN) later.

Format versions: 1 (no record of the model's architecture) and 2 (adds ``model_parameters``,
the names and shapes of every parameter of the saved model, so that a model with other or
extra layers is refused).  Version-1 states still load; they only skip that check.  The keys
``curvature``, ``n_mc_samples``, ``ignore_index`` and ``fit_statistics['output_ndim']`` are
optional in both (states written before them load with the defaults "ggn", None, -100, 2).

The posterior's entries are checked by the ``check_state`` of its structure
(:class:`~laplace_ggn.structures.StructureSpec`); the checks of the built-in structures are
here, as :func:`check_full_state` and its siblings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ._checks import Curvature, Likelihood, as_enum, check_finite, near_matches, shape_str

__all__ = [
    "STATE_FORMAT_VERSION",
    "SavedSubset",
    "check_diag_state",
    "check_eigen_state",
    "check_full_state",
    "check_kfac_state",
    "check_state",
    "check_tensor_state",
    "model_parameters",
    "save_state",
    "saved_options",
]

STATE_FORMAT_VERSION = 2

_COMMON_KEYS = (
    "format_version",
    "likelihood",
    "structure",
    "subset",
    "shapes",
    "prior_precision",
    "sigma_noise",
    "temperature",
    "rank",
    "input_key",
    "target_key",
    "memory_budget",
    "mean",
    "fit_statistics",
    "posterior",
)
_KEYS = {1: _COMMON_KEYS, 2: (*_COMMON_KEYS, "model_parameters")}
_STATS_KEYS = ("n_data", "n_outputs", "loss_sum")
_STATS_OPTIONAL = ("output_ndim",)


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


def model_parameters(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of every parameter of ``model``, in ``named_parameters()`` order."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _kind(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {shape_str(value.shape)} and dtype {value.dtype}"
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor(state: Mapping, key: str, name: str, shape: tuple | None = None) -> Tensor:
    """A finite floating tensor ``state[key]`` of ``shape`` (``None``: any shape)."""
    t = state[key]
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got {_kind(t)}.")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {shape_str(shape)}; got {shape_str(t.shape)}. "
            "Was the state saved from another model or structure?"
        )
    check_finite(t, name)
    return t


def _check_keys(mapping: Mapping, expected: Sequence[str], name: str, hint: str = "") -> None:
    missing = [k for k in expected if k not in mapping]
    if missing:
        raise ValueError(
            f"{name} must hold the keys {list(expected)}; missing {missing} (got keys "
            f"{sorted(map(str, mapping))}).{hint}"
        )


def _check_version(state: Mapping) -> int:
    if "format_version" not in state:
        raise ValueError(
            "state must hold the key 'format_version' (a dict from LaplaceWrapper.state_dict()); "
            f"got keys {sorted(map(str, state))}."
        )
    version = state["format_version"]
    if not _is_int(version):
        raise TypeError(
            f"state['format_version'] must be an int in [1, {STATE_FORMAT_VERSION}]; "
            f"got {_kind(version)}."
        )
    if version > STATE_FORMAT_VERSION:
        raise ValueError(
            f"state format_version must be <= {STATE_FORMAT_VERSION}; got {version}. "
            "It was written by a newer laplace_ggn: upgrade to load it."
        )
    if version < 1:
        raise ValueError(
            f"state['format_version'] must be an int in [1, {STATE_FORMAT_VERSION}]; got {version}."
        )
    return version


def _check_subset(state: Mapping, model: nn.Module) -> tuple[list[str], list[tuple[int, ...]]]:
    subset, shapes = state["subset"], state["shapes"]
    if (
        not isinstance(subset, (list, tuple))
        or not subset
        or not all(isinstance(n, str) for n in subset)
    ):
        raise TypeError(
            f"state['subset'] must be a non-empty list of parameter names; got {_kind(subset)}."
        )
    if len(set(subset)) != len(subset):
        raise ValueError(f"state['subset'] must hold unique names; got {list(subset)}.")
    if (
        not isinstance(shapes, (list, tuple))
        or len(shapes) != len(subset)
        or not all(
            isinstance(s, (list, tuple, torch.Size)) and all(_is_int(d) and d >= 0 for d in s)
            for s in shapes
        )
    ):
        raise ValueError(
            f"state['shapes'] must be a list of {len(subset)} shapes (tuples of ints >= 0), one "
            f"per name of state['subset']; got {_kind(shapes)}."
        )
    named = dict(model.named_parameters())
    for name, shape in zip(subset, shapes):
        if name not in named:
            raise ValueError(f"model must have parameter {name!r} of the saved state; it has none.")
        if tuple(named[name].shape) != tuple(shape):
            raise ValueError(
                f"parameter {name!r} must have shape {tuple(shape)} as in the saved state; "
                f"got {tuple(named[name].shape)}."
            )
    return list(subset), [tuple(s) for s in shapes]


def _check_architecture(saved: object, model: nn.Module) -> None:
    """Refuse a model whose parameters (names and shapes) differ from the saved model's."""
    if not isinstance(saved, (list, tuple)) or not all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str) for e in saved
    ):
        raise TypeError(
            f"state['model_parameters'] must be a list of (name, shape) pairs; got {_kind(saved)}."
        )
    want = {n: tuple(s) for n, s in saved}
    have = dict(model_parameters(model))
    extra = [n for n in have if n not in want]
    missing = [n for n in want if n not in have]
    other = [f"{n} {have[n]} (saved {want[n]})" for n in have if n in want and have[n] != want[n]]
    if extra or missing or other:
        raise ValueError(
            "model must have the same parameters (names and shapes) as the saved model; got "
            f"extra {extra}, missing {missing}, other shapes {other}. The posterior was "
            "computed for the saved architecture: load it into the same architecture."
        )


def _check_structure(value: object, structures: Mapping[str, object]) -> str:
    if isinstance(value, str) and value in structures:
        return value
    valid = list(structures)
    hint = near_matches(str(value), valid)
    raise ValueError(
        f"state['structure'] must be one of {valid}; got {value!r}."
        + (f" Did you mean {hint[0]!r}?" if hint else "")
    )


def _check_options(state: Mapping, structures: Mapping[str, object]) -> str:
    as_enum(Likelihood, state["likelihood"], "state['likelihood']")
    structure = _check_structure(state["structure"], structures)
    for key in ("input_key", "target_key"):
        if state[key] is not None and not isinstance(state[key], str):
            raise TypeError(f"state[{key!r}] must be a str or None; got {_kind(state[key])}.")
    budget = state["memory_budget"]
    if not _is_int(budget) or budget <= 0:
        raise ValueError(f"state['memory_budget'] must be a positive int; got {_kind(budget)}.")
    temp = state["temperature"]
    if isinstance(temp, bool) or not isinstance(temp, (int, float)):
        raise TypeError(f"state['temperature'] must be a float; got {_kind(temp)}.")
    if not (math.isfinite(temp) and temp > 0):
        raise ValueError(f"state['temperature'] must be finite and > 0; got {temp!r}.")
    curvature = as_enum(Curvature, state.get("curvature", "ggn"), "state['curvature']")
    n_mc = state.get("n_mc_samples")
    if n_mc is not None and (not _is_int(n_mc) or n_mc < 1 or curvature is not Curvature.MC):
        raise ValueError(
            "state['n_mc_samples'] must be None, or a positive int with curvature 'mc'; got "
            f"{_kind(n_mc)} with curvature {curvature.value!r}."
        )
    if not _is_int(state.get("ignore_index", -100)):
        raise TypeError(
            f"state['ignore_index'] must be an int; got {_kind(state['ignore_index'])}."
        )
    rank = state["rank"]
    ranked = [name for name, spec in structures.items() if spec.takes_rank]
    if rank is not None and (not _is_int(rank) or rank < 1 or structure not in ranked):
        raise ValueError(
            "state['rank'] must be None, or a positive int with structure "
            f"{' or '.join(repr(n) for n in ranked)}; got {_kind(rank)} with structure "
            f"{structure!r}."
        )
    if "predictive_temperature" in state:  # optional: states written before it existed lack it
        t = state["predictive_temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"state['predictive_temperature'] must be a float; got {_kind(t)}.")
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"state['predictive_temperature'] must be finite and > 0; got {t!r}.")
    for key in ("prior_precision", "sigma_noise"):
        t = state[key]
        if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
            raise TypeError(f"state[{key!r}] must be a float or a tensor; got {_kind(t)}.")
        t = torch.as_tensor(t)
        if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise ValueError(
                f"state[{key!r}] must be finite and > 0; got {t.flatten()[:5].tolist()} "
                f"(shape {shape_str(t.shape)})."
            )
    return structure


def _check_prior_shape(prec: object, n_tensors: int, P: int) -> None:
    shape = tuple(torch.as_tensor(prec).shape)
    if shape not in ((), (1,), (n_tensors,), (P,)):
        raise ValueError(
            f"state['prior_precision'] must be a scalar or have shape ({n_tensors},) (one per "
            f"parameter tensor of state['subset']) or ({P},); got {shape_str(shape)}."
        )


def _check_stats(stats: object) -> None:
    if not isinstance(stats, Mapping):
        raise TypeError(f"state['fit_statistics'] must be a dict; got {_kind(stats)}.")
    _check_keys(stats, _STATS_KEYS, "state['fit_statistics']")
    unexpected = [k for k in stats if k not in _STATS_KEYS + _STATS_OPTIONAL]
    if unexpected:
        raise ValueError(
            f"state['fit_statistics'] must hold exactly the keys {list(_STATS_KEYS)} (and "
            f"optionally {list(_STATS_OPTIONAL)}); got unexpected {unexpected}."
        )
    if "output_ndim" in stats and stats["output_ndim"] not in (2, 3):
        raise ValueError(
            "state['fit_statistics']['output_ndim'] must be 2 (outputs (B, C)) or 3 (outputs "
            f"(B, T, C)); got {_kind(stats['output_ndim'])}."
        )
    for key in ("n_data", "n_outputs"):
        if not _is_int(stats[key]) or stats[key] < 1:
            raise ValueError(
                f"state['fit_statistics'][{key!r}] must be an int >= 1; got {_kind(stats[key])}."
            )
    loss = stats["loss_sum"]
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(f"state['fit_statistics']['loss_sum'] must be a float; got {_kind(loss)}.")
    if not (math.isfinite(loss) and loss >= 0):
        raise ValueError(
            f"state['fit_statistics']['loss_sum'] must be finite and >= 0; got {loss!r}."
        )


def check_kfac_state(post: Mapping, saved: SavedSubset) -> None:
    """Check the saved state of a KFAC posterior: Kronecker blocks and a diagonal rest.

    Raises:
        ValueError: If a key is missing, a block names no parameter of the subset or has
            factors of the wrong shape, or the blocks do not cover the subset exactly once.
        TypeError: If a factor is not a floating tensor.
    """
    subset, shapes = saved.names, saved.shapes
    _check_keys(post, ("n_blocks", "diag_names", "diag"), "state['posterior']")
    n_blocks = post["n_blocks"]
    if not _is_int(n_blocks) or n_blocks < 0:
        raise ValueError(
            f"state['posterior']['n_blocks'] must be an int >= 0; got {_kind(n_blocks)}."
        )
    shape_of = dict(zip(subset, shapes))
    names = post["diag_names"]
    if not isinstance(names, (list, tuple)) or not all(n in shape_of for n in names):
        raise ValueError(
            "state['posterior']['diag_names'] must be a list of names of state['subset']; "
            f"got {_kind(names)}."
        )
    covered = list(names)
    n_diag = sum(math.prod(shape_of[n]) for n in names)
    _tensor(post, "diag", "state['posterior']['diag']", (n_diag,))
    for i in range(n_blocks):
        keys = [f"block.{i}.{k}" for k in ("weight", "bias", "A", "B")]
        _check_keys(post, keys, "state['posterior']")
        w, b = post[keys[0]], post[keys[1]]
        if (w is None and b is None) or any(n is not None and n not in shape_of for n in (w, b)):
            raise ValueError(
                f"state['posterior'] block {i} must name a weight and/or a bias of "
                f"state['subset']; got weight={w!r}, bias={b!r}."
            )
        out = shape_of[w][0] if w is not None else shape_of[b][0]
        fan_in = math.prod(shape_of[w][1:]) if w is not None else 0
        D = fan_in + (b is not None)
        _tensor(post, keys[2], f"state['posterior'][{keys[2]!r}]", (D, D))
        _tensor(post, keys[3], f"state['posterior'][{keys[3]!r}]", (out, out))
        covered += [n for n in (w, b) if n is not None]
    if sorted(covered) != sorted(subset):
        raise ValueError(
            "state['posterior'] (kfac) must cover every name of state['subset'] exactly once "
            f"by its blocks and diag_names; covers {sorted(covered)}, subset {sorted(subset)}."
        )


def _check_exact_keys(post: Mapping, expected: Sequence[str], saved: SavedSubset) -> None:
    hint = f" Was the state saved with another structure than {saved.structure!r}?"
    _check_keys(post, expected, "state['posterior']", hint)
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
    _tensor(post, "ggn", _entry("ggn"), (P, P))


def check_diag_state(post: Mapping, saved: SavedSubset) -> None:
    """Check the saved state of a diag posterior: the GGN diagonal ``(P,)``, >= 0.

    Raises:
        ValueError: If the keys or the shape are not those of the structure, or an entry is
            negative.
        TypeError: If the diagonal is not a floating tensor.
    """
    _check_exact_keys(post, ("ggn_diag",), saved)
    d = _tensor(post, "ggn_diag", _entry("ggn_diag"), (saved.n_params,))
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
    lam = _tensor(post, "eigenvalues", _entry("eigenvalues"))
    if lam.ndim != 1 or bool((lam < 0).any()):
        raise ValueError(
            f"{_entry('eigenvalues')} must be a vector (R,) of values >= 0; got "
            f"{_kind(lam)}{' with negatives' if lam.ndim == 1 else ''}."
        )
    _tensor(post, "eigenvectors", _entry("eigenvectors"), (saved.n_params, lam.shape[0]))


def check_tensor_state(post: Mapping, saved: SavedSubset) -> None:
    """Check a posterior state whose structure declares no check: its tensors are finite.

    Raises:
        ValueError: If a floating tensor holds NaN or Inf.
    """
    for key, value in post.items():
        if isinstance(value, Tensor):
            check_finite(value, _entry(key))


def _check_posterior(post: object, check: Callable[[Mapping, SavedSubset], None], saved) -> None:
    if not isinstance(post, Mapping):
        raise TypeError(f"state['posterior'] must be a dict; got {_kind(post)}.")
    check(post, saved)


def check_state(state: object, model: nn.Module, structures: Mapping[str, object]) -> dict:
    """Validate a saved state against ``model``; return it with tensors ready for the model.

    The posterior's tensors are cast to the dtype and device of the model's parameters (a
    float32 state loads into a float64 model); nothing else changes, so the round trip of a
    state into a model of its own dtype is bit-exact.

    Args:
        state: Output of :meth:`LaplaceWrapper.state_dict`.
        model: The network to load it into.
        structures: The registry of structures (``laplace_ggn.structures.STRUCTURES``); the
            saved structure must be one of its names, and its ``check_state`` checks the
            posterior.

    Returns:
        A shallow copy of ``state`` whose ``"posterior"`` tensors have the model's dtype and
        device.

    Raises:
        TypeError: If ``state`` or one of its entries has the wrong type.
        ValueError: If a key is missing, a value is out of range, not finite or of the wrong
            shape, the state is from a newer format, or the model's parameters do not match the
            saved ones (names and shapes; for format 2 every parameter of the model).
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state must be a dict from LaplaceWrapper.state_dict(); got {type(state).__name__}."
        )
    version = _check_version(state)
    _check_keys(state, _KEYS[version], "state", " Was it written by LaplaceWrapper.state_dict()?")
    structure = _check_options(state, structures)
    subset, shapes = _check_subset(state, model)
    if version >= 2:
        _check_architecture(state["model_parameters"], model)
    P = sum(math.prod(s) for s in shapes)
    _check_prior_shape(state["prior_precision"], len(subset), P)
    _tensor(state, "mean", "state['mean']", (P,))
    _check_stats(state["fit_statistics"])
    saved = SavedSubset(structure, subset, shapes)
    _check_posterior(state["posterior"], structures[structure].check_state, saved)
    ref = next(iter(model.parameters()))
    post = {
        k: v.to(dtype=ref.dtype, device=ref.device) if isinstance(v, Tensor) else v
        for k, v in state["posterior"].items()
    }
    return {**state, "posterior": post}


def save_state(fitted, options) -> dict:
    """The state of a fitted wrapper: its options, hyperparameters, θ* and posterior.

    Args:
        fitted: The :class:`~laplace_ggn.FittedLaplace`.
        options: The :class:`~laplace_ggn.fitting.FitOptions` of the fit.

    Returns:
        A dict of plain values and tensors (cloned), loadable by :func:`check_state`.
    """
    layout, hp, reader = fitted.layout, fitted.hyperparameters, options.reader
    return {
        "format_version": STATE_FORMAT_VERSION,
        "model_parameters": model_parameters(options.model),
        "likelihood": options.likelihood.value,
        "structure": options.structure,
        "subset": list(layout.names),
        "shapes": [tuple(s) for s in layout.shapes],
        "prior_precision": hp.prior_precision.detach().clone(),
        "sigma_noise": hp.sigma_noise.detach().clone(),
        "temperature": hp.temperature,
        "predictive_temperature": float(hp.predictive_temperature),
        "rank": options.rank,
        "curvature": options.curvature.value,
        "n_mc_samples": options.n_mc_samples,
        "ignore_index": reader.ignore_index,
        "input_key": reader.input_key,
        "target_key": reader.target_key,
        "memory_budget": options.memory_budget,
        "mean": fitted.posterior.mean.detach().clone(),
        "fit_statistics": asdict(fitted.statistics),
        "posterior": {
            k: v.detach().clone() if isinstance(v, Tensor) else v
            for k, v in fitted.posterior.state_dict().items()
        },
    }


def saved_options(state: Mapping) -> dict:
    """The keyword options of ``LaplaceWrapper(...)`` recorded in a checked state.

    Returns:
        ``{"likelihood": ..., "structure": ..., ...}`` with the defaults of optional keys.
    """
    return {
        "likelihood": state["likelihood"],
        "structure": state["structure"],
        "subset": list(state["subset"]),
        "prior_precision": state["prior_precision"],
        "sigma_noise": state["sigma_noise"],
        "temperature": state["temperature"],
        "rank": state["rank"],
        "curvature": state.get("curvature", Curvature.GGN.value),
        "n_mc_samples": state.get("n_mc_samples"),
        "ignore_index": state.get("ignore_index", -100),
        "input_key": state["input_key"],
        "target_key": state["target_key"],
        "memory_budget": state["memory_budget"],
    }
