r"""Matrix-free linear algebra on symmetric curvature operators.

Every function takes a :class:`~laplace_ggn.operators.LinearOperator` (a GGN, Hessian or EF
operator streaming over data, or any composition of them) or a plain 2-D tensor, and touches it
only through products :math:`A v`.  The cost of each routine is stated as a number of such
products, which is also what the result objects report.

- Linear systems :math:`A x = b`: :func:`cg` (conjugate gradients) and :func:`neumann`
  (truncated Neumann series); :func:`inverse_matvec` dispatches between them and KFAC.
- Eigenvalues: :func:`power_iteration` (largest-magnitude eigenpair) and :func:`lanczos`
  (top-k eigenpairs, full re-orthogonalisation).
- Trace and diagonal: :func:`hutchinson_trace`, :func:`hutchinson_diagonal`,
  :func:`hutchpp_trace`.
- Spectrum: :func:`spectral_density` (stochastic Lanczos quadrature).

Randomness comes only from the keyword-only ``generator`` argument.
"""

from ._common import CGResult, NeumannResult, ProbeDistribution, SolveMethod, SpectralDensity
from .eigen import lanczos, power_iteration
from .solvers import cg, inverse_matvec, neumann
from .stochastic import hutchinson_diagonal, hutchinson_trace, hutchpp_trace, spectral_density

__all__ = [
    "CGResult",
    "NeumannResult",
    "ProbeDistribution",
    "SolveMethod",
    "SpectralDensity",
    "cg",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "inverse_matvec",
    "lanczos",
    "neumann",
    "power_iteration",
    "spectral_density",
]
