"""laplace_ggn: post-hoc Laplace approximations from the generalised Gauss-Newton matrix."""

from ._checks import Likelihood, Link, PredictMethod, Structure
from .wrapper import LaplaceWrapper
from .operators import CallableOperator, DenseOperator, LinearOperator, as_operator

__version__ = "0.1.0"

__all__ = [
    "LaplaceWrapper",
    "Likelihood",
    "Link",
    "PredictMethod",
    "Structure",
    "LinearOperator",
    "DenseOperator",
    "CallableOperator",
    "as_operator",
    "__version__",
]
