"""The validated options of a fit: structure, subset, curvature, batches, memory budget.

:class:`FitOptions` checks the options of ``LaplaceWrapper(...)`` once, against the registry
of structures (``rank=`` and ``curvature="mc"`` apply to the structures whose spec says so),
and gives the structure's functions their :class:`~laplace_ggn.structures.StructureOptions`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from ._checks import (
    DEFAULT_MEMORY_BUDGET,
    Curvature,
    Likelihood,
    as_enum,
    check_generator,
    is_integer,
)
from .likelihoods import DEFAULT_IGNORE_INDEX, LikelihoodModel, get_likelihood
from .model_io import output_tensor
from .private_model import compute_dtype
from .reader import BatchReader
from .structures import STRUCTURES, StructureOptions, StructureSpec, resolve_structure

__all__ = [
    "FitOptions",
    "LogitTemperature",
    "check_logit_temperature",
    "gigabytes",
    "memory_message",
]


class LogitTemperature:
    r"""The model's outputs divided by T: the likelihood :math:`\mathrm{softmax}(f/T)`.

    Composed after the user's ``output_fn``, so that curvature, evidence and predictive all
    see :math:`f/T` (Jacobians :math:`J/T`); see ``LaplaceWrapper(logit_temperature=)``.

    Args:
        temperature: T > 0.
        output_fn: The user's map from the model output to the tensor (``None``: default).
    """

    def __init__(self, temperature: float, output_fn: Callable[[object], Tensor] | None):
        self.temperature, self.output_fn = temperature, output_fn

    def __call__(self, out: object) -> Tensor:
        """The output tensor divided by T."""
        return output_tensor(out, self.output_fn) / self.temperature


def check_logit_temperature(value: object, likelihood: object) -> float:
    """The logit temperature T as a float, checked.

    Returns:
        T.

    Raises:
        TypeError: If ``value`` is not a number (or 0-dim tensor).
        ValueError: If it is not finite and > 0, or not 1 for regression.
    """
    if isinstance(value, Tensor) and value.ndim == 0:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"logit_temperature must be a float; got {type(value).__name__}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"logit_temperature must be finite and > 0; got {value}.")
    lik = get_likelihood(likelihood)
    if value != 1 and not lik.predicts_probabilities:
        raise ValueError(
            f"logit_temperature applies to likelihoods that predict probabilities "
            f"('classification', 'binary'); got logit_temperature={value} with likelihood="
            f"{lik.name!r}."
        )
    return float(value)


def gigabytes(n_bytes: float) -> str:
    """``n_bytes`` as a short string in GB (for memory messages).

    Returns:
        E.g. ``"1.5 GB"``.
    """
    return f"{n_bytes / 2**30:.3g} GB"


@dataclass(frozen=True)
class FitOptions:
    """The validated options of a fit (see :class:`~laplace_ggn.LaplaceWrapper`).

    Attributes:
        model: The user's network (never modified).
        likelihood: The ``likelihood=`` option: a :class:`~laplace_ggn.Likelihood` member, or
            the likelihood object given.
        structure: The structure's name in :data:`~laplace_ggn.structures.STRUCTURES`.
        subset: ``"all"``, ``"trainable"``, ``"last_layer"`` or a list of names.
        rank: ``rank=`` of a structure that takes one, else ``None``.
        curvature: Exact GGN or Monte-Carlo Fisher.
        n_mc_samples: S of ``curvature="mc"`` (``None``: 1).
        memory_budget: Bytes for chunked intermediates and the largest dense structure.
        output_fn: Map from the model's output to the ``(B, C)`` tensor the likelihood sees
            (the user's ``output_fn`` divided by ``logit_temperature``), or ``None``.
        reader: How batches are read.
        likelihood_model: The likelihood object (``likelihood_model.name`` in messages).
        logit_temperature: T of the likelihood ``softmax(f/T)`` (1: none).
        user_output_fn: The user's ``output_fn``.
        n_context: M context samples of a structure that takes them (``None``: all).
    """

    model: nn.Module
    likelihood: Likelihood
    structure: str
    subset: object
    rank: int | None
    curvature: Curvature
    n_mc_samples: int | None
    memory_budget: int
    output_fn: Callable[[object], Tensor] | None
    reader: BatchReader
    likelihood_model: LikelihoodModel | None = None
    logit_temperature: float = 1.0
    user_output_fn: Callable[[object], Tensor] | None = None
    n_context: int | None = None

    @classmethod
    def create(
        cls,
        model: nn.Module,
        likelihood: object = "classification",
        *,
        structure: object = "kfac",
        subset: object = "all",
        rank: object = None,
        curvature: object = "ggn",
        n_mc_samples: object = None,
        ignore_index: object = DEFAULT_IGNORE_INDEX,
        input_key: object = None,
        target_key: object = None,
        memory_budget: object = DEFAULT_MEMORY_BUDGET,
        output_fn: object = None,
        logit_temperature: object = 1.0,
        n_context: object = None,
    ) -> FitOptions:
        """Validate the options of ``LaplaceWrapper(...)`` (arguments as there).

        Returns:
            The options.

        Raises:
            TypeError: If ``model`` is not an ``nn.Module`` or an option has the wrong type.
            ValueError: If an option has an invalid value; the message lists the valid ones.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        lik = get_likelihood(likelihood)
        kind = lik.kind if isinstance(likelihood, (str, Likelihood)) else lik
        structure = resolve_structure(structure)
        param = next(iter(model.parameters()), None)
        if param is None:
            raise ValueError("model must have parameters; got a module with none.")
        rank = _check_count(structure, rank, "rank", lambda s: s.takes_rank)
        n_context = _check_count(structure, n_context, "n_context", lambda s: s.takes_context)
        STRUCTURES[structure].check_options(rank, n_context)
        curvature = as_enum(Curvature, curvature, "curvature")
        if curvature is Curvature.MC and not STRUCTURES[structure].samples_curvature:
            sampled = [repr(n) for n, s in STRUCTURES.items() if s.samples_curvature]
            raise ValueError(
                f"curvature='mc' applies to structures {', '.join(sampled[:-1])} and "
                f"{sampled[-1]}; got structure={structure!r}, whose curvature is not "
                "built from output Hessians (none to sample)."
            )
        n_mc = n_mc_samples
        if n_mc is not None:
            if curvature is not Curvature.MC:
                raise ValueError(
                    f"n_mc_samples applies to curvature='mc' only; got n_mc_samples="
                    f"{n_mc!r} with curvature={curvature.value!r}."
                )
            if not is_integer(n_mc) or n_mc < 1:
                raise ValueError(f"n_mc_samples must be a positive integer; got {n_mc!r}.")
            n_mc = int(n_mc)
        if curvature is Curvature.MC and not lik.samples_targets:
            raise ValueError(
                f"curvature='mc' needs a likelihood that samples targets; got likelihood "
                f"{lik.name!r} without a sampler. Pass curvature='ggn', or give it one "
                "(from_nll(..., sample=...), or samples_targets = True with sample_targets)."
            )
        if not is_integer(ignore_index):
            raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}.")
        for key_name, key in (("input_key", input_key), ("target_key", target_key)):
            if key is not None and not isinstance(key, str):
                raise TypeError(f"{key_name} must be a str or None; got {type(key).__name__}.")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable or None; got {type(output_fn).__name__}.")
        if not is_integer(memory_budget) or memory_budget <= 0:
            raise ValueError(
                f"memory_budget must be a positive int (bytes); got {memory_budget!r}."
            )
        T = check_logit_temperature(logit_temperature, lik)
        reader = BatchReader(
            model,
            param.dtype,
            param.device,
            input_key,
            target_key,
            int(ignore_index),
            compute_dtype(param.dtype),
        )
        return cls(
            model,
            kind,
            structure,
            subset,
            rank,
            curvature,
            n_mc,
            int(memory_budget),
            output_fn if T == 1 else LogitTemperature(T, output_fn),
            reader,
            lik,
            T,
            output_fn,
            n_context,
        )

    @property
    def spec(self) -> StructureSpec:
        """The structure's spec.

        Raises:
            NotImplementedError: If the structure is no longer registered.
        """
        spec = STRUCTURES.get(self.structure)
        if spec is None:
            raise NotImplementedError(f"structure={self.structure!r} is not available.")
        return spec

    def structure_options(self, prior_precision: Tensor) -> StructureOptions:
        """The options the structure's functions read.

        Returns:
            The :class:`~laplace_ggn.structures.StructureOptions`.
        """
        return StructureOptions(
            self.model, prior_precision, self.rank, self.memory_budget, self.n_context
        )

    def attributes(self) -> dict[str, object]:
        """The options as ``LaplaceWrapper`` exposes them (``la.structure``, ``la.input_key``, ...).

        Returns:
            Option name to value, the reader's keys and ``ignore_index`` included.
        """
        names = ("model", "likelihood", "structure", "subset", "rank", "curvature")
        attrs = {name: getattr(self, name) for name in names}
        attrs.update(n_mc_samples=self.n_mc_samples, memory_budget=self.memory_budget)
        attrs.update(output_fn=self.user_output_fn, ignore_index=self.reader.ignore_index)
        attrs.update(logit_temperature=self.logit_temperature, n_context=self.n_context)
        attrs.update(input_key=self.reader.input_key, target_key=self.reader.target_key)
        return attrs

    def check_generator(self, generator: object) -> None:
        """Refuse a generator that is not a ``torch.Generator`` on the model's device.

        Raises:
            TypeError: If it is not a generator.
            ValueError: If it is on another device type than the model.
        """
        check_generator(generator)
        device = self.reader.device
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"generator must be on the model's device {device}; got a generator on "
                f"{generator.device}. Create it with torch.Generator(device=...)."
            )


def _or_list(names: list[str]) -> str:
    """``'a', 'b' or 'c'``."""
    quoted = [repr(n) for n in names]
    return " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)


def _check_count(
    structure: str, value: object, name: str, applies: Callable[[object], bool]
) -> int | None:
    """``rank=`` / ``n_context=``: ``None`` or a positive int, for a structure it applies to.

    Returns:
        ``value`` as an int, or ``None``.

    Raises:
        ValueError: If it is given for another structure, or is not a positive integer.
    """
    if value is None:
        return None
    if not applies(STRUCTURES[structure]):
        takes = _or_list([n for n, s in STRUCTURES.items() if applies(s)])
        raise ValueError(
            f"{name} applies to structure={takes or 'none registered'} only; got "
            f"{name}={value!r} with structure={structure!r}."
        )
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be None or a positive integer; got {value!r}.")
    return int(value)


def memory_message(options: FitOptions, need: int, P: int, prior_precision: Tensor) -> str:
    """The error for a structure over the memory budget, naming the structures that fit.

    Returns:
        The message.
    """
    dtype, budget = options.reader.work_dtype, options.memory_budget
    opts = options.structure_options(prior_precision)
    sizes = {name: spec.memory_bytes(P, dtype, opts) for name, spec in STRUCTURES.items()}
    fits = [f"{name!r} ({gigabytes(n)})" for name, n in sizes.items() if n <= budget]
    return (
        f"structure={options.structure!r} needs {gigabytes(need)} for P={P} parameters in "
        f"{dtype}, over the memory budget of {gigabytes(budget)}. Structures that "
        f"fit: {', '.join(fits) or 'none'}; or pass memory_budget= (bytes) to allow more, "
        "or subset='last_layer'."
    )
