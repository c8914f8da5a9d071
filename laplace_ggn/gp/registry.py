"""The ``gp`` and ``ella`` entries of the structure registry.

``gp`` holds the GGN square-root rows of its context in a
:class:`~laplace_ggn.gp.gp_posterior.GPPosterior`, ``ella`` the eigenpairs of the projected
GGN in an :class:`~laplace_ggn.gp.posterior.EllaPosterior`; both implement the whole posterior
protocol, so every predictive, the evidence and its tuning, sampling, the head path of
``subset="last_layer"`` and saved states work as for the other structures.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..posterior_states import SavedSubset, check_eigen_state, check_keys, state_tensor
from ..structures import StructureSpec, register_structure
from .context import GPContextCollector, gp_memory_bytes
from .ella import EllaCollector, check_ella_options, ella_memory_bytes
from .gp_posterior import GPPosterior
from .posterior import EllaPosterior

__all__ = ["ELLA_SPEC", "GP_SPEC", "check_rows_state"]


def check_rows_state(post: Mapping, saved: SavedSubset) -> None:
    """Check a saved GP posterior: exactly the key ``rows``, a finite ``(R, P)`` tensor.

    Raises:
        ValueError: If the keys or the shape are not those of the structure.
        TypeError: If ``rows`` is not a floating tensor.
    """
    hint = f" Was the state saved with another structure than {saved.structure!r}?"
    check_keys(post, ("rows",), "state['posterior']", hint)
    if set(post) != {"rows"}:
        raise ValueError(
            f"state['posterior'] must hold exactly the key 'rows' of structure 'gp'; got "
            f"{sorted(post)}.{hint}"
        )
    rows = state_tensor(post, "rows", "state['posterior']['rows']")
    if rows.ndim != 2 or rows.shape[1] != saved.n_params:
        raise ValueError(
            f"state['posterior']['rows'] must have shape (R, {saved.n_params}); got "
            f"{tuple(rows.shape)}.{hint}"
        )


GP_SPEC = register_structure(
    StructureSpec(
        name="gp",
        make_collector=lambda fm, curv, opts: GPContextCollector(
            fm, curv, n_context=opts.n_context, memory_budget=opts.memory_budget
        ),
        build=lambda V, mean, prior, scale, opts: GPPosterior(mean, V.rows, prior, scale),
        posterior_cls=GPPosterior,
        memory_bytes=lambda P, dtype, opts: gp_memory_bytes(P, dtype, opts.n_context),
        takes_context=True,
        check_state=check_rows_state,
    )
)
ELLA_SPEC = register_structure(
    StructureSpec(
        name="ella",
        make_collector=lambda fm, curv, opts: EllaCollector(
            fm, curv, n_context=opts.n_context, rank=opts.rank, memory_budget=opts.memory_budget
        ),
        build=lambda E, mean, prior, scale, opts: EllaPosterior(
            mean, E.eigenvalues, E.eigenvectors, prior, scale
        ),
        posterior_cls=EllaPosterior,
        memory_bytes=lambda P, dtype, opts: ella_memory_bytes(P, dtype, opts.n_context, opts.rank),
        takes_rank=True,
        takes_context=True,
        check_options=check_ella_options,
        check_state=check_eigen_state,
    )
)
