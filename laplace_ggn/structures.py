r"""The registry of posterior structures: how each is collected, built and sized.

A structure is a name in :data:`STRUCTURES` and a :class:`StructureSpec`: a collector that
streams over the data once and returns the curvature, a function turning that curvature into
a posterior (a class of the :class:`~laplace_ggn.posteriors.Posterior` protocol), and the
memory it needs before the data is seen.  ``LaplaceWrapper(structure=...)`` accepts exactly
the names registered here, so a new structure is its posterior, its collector and one call:

.. code-block:: python

    register_structure(StructureSpec(
        name="mine",
        make_collector=lambda fmodel, curvature, options: MyCollector(fmodel, curvature),
        build=lambda G, mean, prior, scale, options: MyPosterior(mean, G, prior, scale),
        posterior_cls=MyPosterior,
        memory_bytes=lambda P, dtype, options: P * torch.finfo(dtype).bits // 8,
    ))

The functions of a spec read the wrapper's options through a :class:`StructureOptions`, never
the wrapper itself.  ``docs/architecture.md`` walks through the steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import DEFAULT_MEMORY_BUDGET, Structure, near_matches
from .collectors import (
    DiagGGNCollector,
    FullGGNCollector,
    dense_bytes,
    lowrank_memory_bytes,
    make_kfac_collector,
    make_lowrank_collector,
    make_projected_collector,
    projected_memory_bytes,
)
from .kfac import kfac_factor_bytes
from .posterior_states import (
    SavedSubset,
    check_diag_state,
    check_eigen_state,
    check_full_state,
    check_kfac_state,
    check_tensor_state,
)
from .posteriors import (
    DiagPosterior,
    FullPosterior,
    KFACPosterior,
    LowRankPosterior,
    Prior,
    ProjectedPosterior,
)
from .posteriors.kfac import check_kfac_prior

__all__ = [
    "STRUCTURES",
    "StructureOptions",
    "StructureSpec",
    "register_structure",
    "registered_structure",
    "resolve_structure",
]


@dataclass(frozen=True)
class StructureOptions:
    """The options of a fit that a structure's functions may read.

    Attributes:
        model: The user's network (read only: e.g. its Linear layers for the KFAC estimate).
        prior_precision: The prior precision of the fit, shape ``()``, ``(T,)`` or ``(P,)``.
        rank: ``rank=`` of the wrapper (``None`` unless the structure takes one).
        memory_budget: Bytes for chunked intermediates and the largest dense structure.
        n_context: ``n_context=`` of the wrapper, M context samples (``None`` unless the
            structure takes one, or for all of them).
    """

    model: nn.Module
    prior_precision: Tensor
    rank: int | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    n_context: int | None = None


def _any_prior(prior: Prior) -> None:
    """Accept every prior (the default of :attr:`StructureSpec.check_prior`)."""


def _any_options(rank: int | None, n_context: int | None) -> None:
    """Accept every ``rank`` / ``n_context`` (the default of :attr:`StructureSpec.check_options`)."""


@dataclass(frozen=True)
class StructureSpec:
    r"""How one structure is collected from data, turned into a posterior and sized.

    Attributes:
        name: The value of ``structure=`` that selects it (lower case).
        make_collector: ``(fmodel, output_curvature, options) -> collector``; the collector
            has ``update(x, where, *, y) -> f`` (outputs of the batch) and
            ``finalize() -> curvature``.
        build: ``(curvature, mean, prior, scale, options) -> posterior``, with ``mean`` of
            shape ``(P,)`` and ``scale`` the factor s of :math:`\Lambda = sG + \Lambda_0`.
        posterior_cls: The posterior class; ``posterior_cls.from_state_dict(state, mean,
            prior, scale)`` rebuilds a saved posterior.
        memory_bytes: ``(P, dtype, options) -> bytes`` the stored structure needs.
        check_prior: Raises ``ValueError`` for a prior the structure cannot hold.
        takes_rank: Whether ``rank=`` applies.
        takes_context: Whether ``n_context=`` applies.
        check_options: ``(rank, n_context) -> None``, raising ``ValueError`` for a
            combination the structure refuses (called when the wrapper is built).
        samples_curvature: Whether ``curvature="mc"`` applies (the curvature is built from
            output Hessians whose square roots can be sampled).
        exact_rows: Whether the collector holds one sample's C·P exact square-root rows at
            once, so that ``curvature="ggn"`` is refused when they exceed the memory budget.
        check_state: ``(posterior_state, saved_subset) -> None``, raising ``ValueError`` /
            ``TypeError`` naming the entry of a saved posterior state that is invalid (see
            :mod:`laplace_ggn.posterior_states`; default: every tensor finite).
        correlated: Whether the posterior keeps the correlations between parameters.  Without
            them (diag) the evidence counts each parameter as determined by the data on its
            own and runs σ away, so ``tune_sigma_noise`` takes σ from the training residuals.
    """

    name: str
    make_collector: Callable[..., object]
    build: Callable[..., object]
    posterior_cls: type
    memory_bytes: Callable[[int, torch.dtype, StructureOptions], int]
    check_prior: Callable[[Prior], None] = _any_prior
    takes_rank: bool = False
    takes_context: bool = False
    check_options: Callable[[int | None, int | None], None] = _any_options
    samples_curvature: bool = True
    exact_rows: bool = False
    check_state: Callable[[Mapping, SavedSubset], None] = check_tensor_state
    correlated: bool = True

    def __reduce__(self) -> tuple:
        """Pickle a registered spec by its name (its functions may be lambdas).

        Returns:
            The registry lookup and the name; unpickled, it is the spec registered under
            that name in the loading process.

        Raises:
            TypeError: If the spec is not the one registered under its name.
        """
        if STRUCTURES.get(self.name) is not self:
            raise TypeError(
                f"StructureSpec {self.name!r} must be registered (register_structure) to be "
                "pickled; it is pickled by its name. Save la.state_dict() instead."
            )
        return (registered_structure, (self.name,))


def registered_structure(name: str) -> StructureSpec:
    """The spec registered under ``name`` (how a pickled spec is loaded).

    Returns:
        The :class:`StructureSpec`.

    Raises:
        ValueError: If no structure of that name is registered in this process.
    """
    spec = STRUCTURES.get(name)
    if spec is None:
        raise ValueError(
            f"structure {name!r} must be registered to load a pickled wrapper of it; got the "
            f"registered structures {list(STRUCTURES)}. Register it (register_structure) first."
        )
    return spec


#: The structures ``LaplaceWrapper(structure=...)`` accepts, by name, in the order listed.
STRUCTURES: dict[str, StructureSpec] = {}


def register_structure(spec: StructureSpec, *, replace: bool = False) -> StructureSpec:
    """Add a structure to :data:`STRUCTURES` under ``spec.name``.

    Args:
        spec: The structure.
        replace: Allow replacing a structure of the same name.

    Returns:
        ``spec``.

    Raises:
        TypeError: If ``spec`` is not a :class:`StructureSpec`.
        ValueError: If the name is empty or not lower case, or already registered and
            ``replace`` is false.
    """
    if not isinstance(spec, StructureSpec):
        raise TypeError(f"spec must be a StructureSpec; got {type(spec).__name__}.")
    name = spec.name
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"spec.name must be a non-empty lower-case str; got {name!r}.")
    if name in STRUCTURES and not replace:
        raise ValueError(
            f"spec.name must not name a registered structure; got {name!r}, which is one of "
            f"{list(STRUCTURES)}. Pass replace=True to replace it."
        )
    STRUCTURES[str(name)] = spec
    return spec


def resolve_structure(structure: object) -> str:
    """The registered name of a ``structure=`` option (a str or a :class:`Structure`).

    Args:
        structure: The option as given.

    Returns:
        The key of :data:`STRUCTURES`.

    Raises:
        ValueError: If it names no registered structure; the message lists the valid ones.
    """
    if isinstance(structure, Structure):
        structure = structure.value
    if isinstance(structure, str) and structure.lower() in STRUCTURES:
        return structure.lower()
    valid = list(STRUCTURES)
    hint = near_matches(str(structure), valid)
    raise ValueError(
        f"structure must be one of {valid}; got {structure!r}."
        + (f" Did you mean {hint[0]!r}?" if hint else "")
    )


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


register_structure(
    StructureSpec(
        name=Structure.FULL.value,
        make_collector=lambda fm, curv, opts: FullGGNCollector(fm, curv),
        build=lambda G, mean, prior, scale, opts: FullPosterior(mean, G, prior, scale),
        posterior_cls=FullPosterior,
        memory_bytes=lambda P, dtype, opts: dense_bytes(P, dtype),
        exact_rows=True,
        check_state=check_full_state,
    )
)
register_structure(
    StructureSpec(
        name=Structure.DIAG.value,
        make_collector=lambda fm, curv, opts: DiagGGNCollector(fm, curv),
        build=lambda d, mean, prior, scale, opts: DiagPosterior(mean, d, prior, scale),
        posterior_cls=DiagPosterior,
        memory_bytes=lambda P, dtype, opts: P * _element_bytes(dtype),
        exact_rows=True,
        check_state=check_diag_state,
        correlated=False,
    )
)
register_structure(
    StructureSpec(
        name=Structure.KFAC.value,
        make_collector=lambda fm, curv, opts: make_kfac_collector(
            fm, curv, prior_precision=opts.prior_precision
        ),
        build=lambda K, mean, prior, scale, opts: KFACPosterior(mean, K, prior, scale),
        posterior_cls=KFACPosterior,
        memory_bytes=lambda P, dtype, opts: (
            kfac_factor_bytes(opts.model, dtype) + 2 * P * _element_bytes(dtype)
        ),
        check_prior=check_kfac_prior,
        exact_rows=True,
        check_state=check_kfac_state,
    )
)
register_structure(
    StructureSpec(
        name=Structure.LOWRANK.value,
        make_collector=lambda fm, curv, opts: make_lowrank_collector(
            fm, curv, rank=opts.rank, memory_budget=opts.memory_budget
        ),
        build=lambda E, mean, prior, scale, opts: LowRankPosterior(
            mean, E.eigenvalues, E.eigenvectors, prior, scale
        ),
        posterior_cls=LowRankPosterior,
        memory_bytes=lambda P, dtype, opts: lowrank_memory_bytes(P, dtype, opts.rank),
        takes_rank=True,
        check_state=check_eigen_state,
    )
)
register_structure(
    StructureSpec(
        name=Structure.PROJECTED.value,
        make_collector=lambda fm, curv, opts: make_projected_collector(
            fm, curv, rank=opts.rank, memory_budget=opts.memory_budget
        ),
        build=lambda E, mean, prior, scale, opts: ProjectedPosterior(
            mean, E.eigenvalues, E.eigenvectors, prior, scale
        ),
        posterior_cls=ProjectedPosterior,
        memory_bytes=lambda P, dtype, opts: projected_memory_bytes(P, dtype, opts.rank),
        takes_rank=True,
        samples_curvature=False,
        check_state=check_eigen_state,
    )
)
