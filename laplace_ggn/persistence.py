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
(:class:`~laplace_ggn.structures.StructureSpec`; the built-in ones are in
:mod:`laplace_ggn.posterior_states`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict

import torch
from torch import Tensor, nn

from ._checks import Curvature, Likelihood, as_enum, near_matches, shape_str
from .continual.prior import check_saved_prior, save_prior_base, saved_prior_options
from .likelihoods import restore_likelihood
from .per_output import split_state
from .posterior_states import SavedSubset, check_keys, describe, is_int, state_tensor
from .private_model import compute_dtype

__all__ = [
    "STATE_FORMAT_VERSION",
    "check_state",
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
_STATS_OPTIONAL = ("output_ndim", "output_loss_sums")


def model_parameters(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of every parameter of ``model``, in ``named_parameters()`` order."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _check_version(state: Mapping) -> int:
    if "format_version" not in state:
        raise ValueError(
            "state must hold the key 'format_version' (a dict from LaplaceWrapper.state_dict()); "
            f"got keys {sorted(map(str, state))}."
        )
    version = state["format_version"]
    if not is_int(version):
        raise TypeError(
            f"state['format_version'] must be an int in [1, {STATE_FORMAT_VERSION}]; "
            f"got {describe(version)}."
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
            f"state['subset'] must be a non-empty list of parameter names; got {describe(subset)}."
        )
    if len(set(subset)) != len(subset):
        raise ValueError(f"state['subset'] must hold unique names; got {list(subset)}.")
    if (
        not isinstance(shapes, (list, tuple))
        or len(shapes) != len(subset)
        or not all(
            isinstance(s, (list, tuple, torch.Size)) and all(is_int(d) and d >= 0 for d in s)
            for s in shapes
        )
    ):
        raise ValueError(
            f"state['shapes'] must be a list of {len(subset)} shapes (tuples of ints >= 0), one "
            f"per name of state['subset']; got {describe(shapes)}."
        )
    named = dict(model.named_parameters(remove_duplicate=False))  # aliases of tied tensors too
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
            f"state['model_parameters'] must be a list of (name, shape) pairs; got {describe(saved)}."
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
    if not isinstance(state["likelihood"], str) or not state["likelihood"]:
        raise ValueError(
            f"state['likelihood'] must be one of {[m.value for m in Likelihood]} or the name of "
            f"a user likelihood (a str); got {describe(state['likelihood'])}."
        )
    if not isinstance(state.get("likelihood_state", {}), Mapping):
        raise TypeError(
            f"state['likelihood_state'] must be a dict; got {describe(state['likelihood_state'])}."
        )
    structure = _check_structure(state["structure"], structures)
    for key in ("input_key", "target_key"):
        if state[key] is not None and not isinstance(state[key], str):
            raise TypeError(f"state[{key!r}] must be a str or None; got {describe(state[key])}.")
    budget = state["memory_budget"]
    if not is_int(budget) or budget <= 0:
        raise ValueError(f"state['memory_budget'] must be a positive int; got {describe(budget)}.")
    temp = state["temperature"]
    if isinstance(temp, bool) or not isinstance(temp, (int, float)):
        raise TypeError(f"state['temperature'] must be a float; got {describe(temp)}.")
    if not (math.isfinite(temp) and temp > 0):
        raise ValueError(f"state['temperature'] must be finite and > 0; got {temp!r}.")
    curvature = as_enum(Curvature, state.get("curvature", "ggn"), "state['curvature']")
    n_mc = state.get("n_mc_samples")
    if n_mc is not None and (not is_int(n_mc) or n_mc < 1 or curvature is not Curvature.MC):
        raise ValueError(
            "state['n_mc_samples'] must be None, or a positive int with curvature 'mc'; got "
            f"{describe(n_mc)} with curvature {curvature.value!r}."
        )
    if not is_int(state.get("ignore_index", -100)):
        raise TypeError(
            f"state['ignore_index'] must be an int; got {describe(state['ignore_index'])}."
        )
    rank = state["rank"]
    ranked = [name for name, spec in structures.items() if spec.takes_rank]
    if rank is not None and (not is_int(rank) or rank < 1 or structure not in ranked):
        raise ValueError(
            "state['rank'] must be None, or a positive int with structure "
            f"{' or '.join(repr(n) for n in ranked)}; got {describe(rank)} with structure "
            f"{structure!r}."
        )
    if "predictive_temperature" in state:  # optional: states written before it existed lack it
        t = state["predictive_temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"state['predictive_temperature'] must be a float; got {describe(t)}.")
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"state['predictive_temperature'] must be finite and > 0; got {t!r}.")
    for key in ("prior_precision", "sigma_noise"):
        t = state[key]
        if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
            raise TypeError(f"state[{key!r}] must be a float or a tensor; got {describe(t)}.")
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
        raise TypeError(f"state['fit_statistics'] must be a dict; got {describe(stats)}.")
    check_keys(stats, _STATS_KEYS, "state['fit_statistics']")
    unexpected = [k for k in stats if k not in _STATS_KEYS + _STATS_OPTIONAL]
    if unexpected:
        raise ValueError(
            f"state['fit_statistics'] must hold exactly the keys {list(_STATS_KEYS)} (and "
            f"optionally {list(_STATS_OPTIONAL)}); got unexpected {unexpected}."
        )
    sums = stats.get("output_loss_sums")
    if sums is not None and not (
        isinstance(sums, (list, tuple)) and all(math.isfinite(v) and v >= 0 for v in sums)
    ):
        raise ValueError(
            "state['fit_statistics']['output_loss_sums'] must be None or a list of finite "
            f"floats >= 0; got {describe(sums)}."
        )
    if "output_ndim" in stats and stats["output_ndim"] not in (2, 3):
        raise ValueError(
            "state['fit_statistics']['output_ndim'] must be 2 (outputs (B, C)) or 3 (outputs "
            f"(B, T, C)); got {describe(stats['output_ndim'])}."
        )
    for key in ("n_data", "n_outputs"):
        if not is_int(stats[key]) or stats[key] < 1:
            raise ValueError(
                f"state['fit_statistics'][{key!r}] must be an int >= 1; got {describe(stats[key])}."
            )
    loss = stats["loss_sum"]
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(
            f"state['fit_statistics']['loss_sum'] must be a float; got {describe(loss)}."
        )
    if not (math.isfinite(loss) and loss >= 0):
        raise ValueError(
            f"state['fit_statistics']['loss_sum'] must be finite and >= 0; got {loss!r}."
        )


def _check_posterior(post: object, check: Callable[[Mapping, SavedSubset], None], saved) -> None:
    if not isinstance(post, Mapping):
        raise TypeError(f"state['posterior'] must be a dict; got {describe(post)}.")
    for part in split_state(post) if "n_outputs" in post else [post]:  # one σ per output
        check(part, saved)


def check_state(state: object, model: nn.Module, structures: Mapping[str, object]) -> dict:
    """Validate a saved state against ``model``; return it with tensors ready for the model.

    The posterior's tensors are cast to the dtype and device of the model's parameters (a
    float32 state loads into a float64 model; float32 for a float16 / bfloat16 model, whose
    computations run in float32); nothing else changes, so the round trip of a state into a
    model of its own dtype is bit-exact.

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
    check_keys(state, _KEYS[version], "state", " Was it written by LaplaceWrapper.state_dict()?")
    structure = _check_options(state, structures)
    subset, shapes = _check_subset(state, model)
    if version >= 2:
        _check_architecture(state["model_parameters"], model)
    P = sum(math.prod(s) for s in shapes)
    _check_prior_shape(state["prior_precision"], len(subset), P)
    state_tensor(state, "mean", "state['mean']", (P,))
    _check_stats(state["fit_statistics"])
    saved = SavedSubset(structure, subset, shapes)
    _check_posterior(state["posterior"], structures[structure].check_state, saved)
    check_saved_prior(state, P, structures[structure].check_state, saved, _check_posterior)
    ref = next(iter(model.parameters()))
    dtype = compute_dtype(ref.dtype)  # float32 for a half-precision model
    post = {
        k: v.to(dtype=dtype, device=ref.device) if isinstance(v, Tensor) else v
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
        "likelihood": fitted.likelihood.name,
        "likelihood_state": dict(fitted.likelihood.state_dict()),
        "structure": options.structure,
        "subset": list(layout.names),
        "shapes": [tuple(s) for s in layout.shapes],
        "prior_precision": hp.prior_precision.detach().clone(),
        "sigma_noise": hp.sigma_noise.detach().clone(),
        "temperature": hp.temperature,
        "predictive_temperature": float(hp.predictive_temperature),
        "rank": options.rank,
        "n_context": options.n_context,
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
        **save_prior_base(hp, options.logit_temperature),
    }


def saved_options(state: Mapping, likelihood: object = None) -> dict:
    """The keyword options of ``LaplaceWrapper(...)`` recorded in a checked state.

    Args:
        state: The checked state.
        likelihood: The likelihood object of a user likelihood (see
            :func:`~laplace_ggn.likelihoods.restore_likelihood`).

    Returns:
        ``{"likelihood": ..., "structure": ..., ...}`` with the defaults of optional keys.
    """
    return {
        "likelihood": restore_likelihood(
            state["likelihood"], state.get("likelihood_state", {}), likelihood
        ),
        "structure": state["structure"],
        "subset": list(state["subset"]),
        "prior_precision": state["prior_precision"],
        "sigma_noise": state["sigma_noise"],
        "temperature": state["temperature"],
        "rank": state["rank"],
        "n_context": state.get("n_context"),
        "curvature": state.get("curvature", Curvature.GGN.value),
        "n_mc_samples": state.get("n_mc_samples"),
        "ignore_index": state.get("ignore_index", -100),
        "input_key": state["input_key"],
        "target_key": state["target_key"],
        "memory_budget": state["memory_budget"],
        **saved_prior_options(state),
    }
