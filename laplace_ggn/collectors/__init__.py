r"""Curvature collectors: one pass over the data, batch by batch, into what a structure stores.

Every collector has ``update(x, where="", *, y=None) -> f`` (add one batch, return its
outputs) and ``finalize()`` (the unit-noise curvature, σ = 1), and speaks the distribution
protocol of :mod:`laplace_ggn.distributed`.  One module per collector kind:

- :mod:`~laplace_ggn.collectors.full`: dense GGN ``(P, P)``;
- :mod:`~laplace_ggn.collectors.diag`: exact GGN diagonal ``(P,)``;
- :mod:`~laplace_ggn.collectors.kfac`: Kronecker factors per ``nn.Linear`` / ``nn.Conv2d``;
- :mod:`~laplace_ggn.collectors.lowrank`: every square-root row and their thin SVD (exact);
- :mod:`~laplace_ggn.collectors.nystrom`: top-k eigenpairs from a one-pass sketch;
- :mod:`~laplace_ggn.collectors.projected`: a basis of the range of the stacked Jacobian.
"""

from .diag import DiagGGNCollector
from .full import FullGGNCollector, dense_bytes
from .kfac import KFACCollector, make_kfac_collector
from .lowrank import ExactLowRankCollector, lowrank_memory_bytes, make_lowrank_collector
from .nystrom import LowRankCurvature, NystromCollector, ggn_matmat
from .projected import (
    KernelMetric,
    ProjectedCurvature,
    ProjectedExactCollector,
    make_projected_collector,
    projected_memory_bytes,
)

__all__ = [
    "DiagGGNCollector",
    "ExactLowRankCollector",
    "FullGGNCollector",
    "KFACCollector",
    "KernelMetric",
    "LowRankCurvature",
    "NystromCollector",
    "ProjectedCurvature",
    "ProjectedExactCollector",
    "dense_bytes",
    "ggn_matmat",
    "lowrank_memory_bytes",
    "make_kfac_collector",
    "make_lowrank_collector",
    "make_projected_collector",
    "projected_memory_bytes",
]
