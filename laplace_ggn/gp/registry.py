"""The ``gp`` and ``ella`` entries of the structure registry.

``gp`` holds the eigenpairs of the GGN of its context in a
:class:`~laplace_ggn.posteriors.LowRankPosterior`, ``ella`` the eigenpairs of the projected
GGN in an :class:`~laplace_ggn.gp.posterior.EllaPosterior`; both implement the whole posterior
protocol, so every predictive, the evidence and its tuning, sampling, the head path of
``subset="last_layer"`` and saved states work as for the other structures.
"""

from __future__ import annotations

from ..posterior_states import check_eigen_state
from ..posteriors import LowRankPosterior
from ..structures import StructureSpec, register_structure
from .context import GPContextCollector, gp_memory_bytes
from .ella import EllaCollector, check_ella_options, ella_memory_bytes
from .posterior import EllaPosterior

__all__ = ["ELLA_SPEC", "GP_SPEC"]


def _build(E, mean, prior, scale, opts) -> LowRankPosterior:
    return LowRankPosterior(mean, E.eigenvalues, E.eigenvectors, prior, scale)


GP_SPEC = register_structure(
    StructureSpec(
        name="gp",
        make_collector=lambda fm, curv, opts: GPContextCollector(
            fm, curv, n_context=opts.n_context, memory_budget=opts.memory_budget
        ),
        build=_build,
        posterior_cls=LowRankPosterior,
        memory_bytes=lambda P, dtype, opts: gp_memory_bytes(P, dtype, opts.n_context),
        takes_context=True,
        check_state=check_eigen_state,
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
