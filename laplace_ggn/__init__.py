"""laplace_ggn: post-hoc Laplace approximations from the generalised Gauss-Newton matrix."""

from . import gp as _gp  # noqa: F401  (registers structure="gp" and "ella")
from ._checks import Curvature, Likelihood, Link, PredictMethod, Structure
from .diagnostics import KernelDecomposition
from .fitted import FittedLaplace
from .function_space import JointPrediction
from .hyperparameters import Hyperparameters
from .linalg import (
    cg,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    inverse_matvec,
    lanczos,
    neumann,
    power_iteration,
    spectral_density,
)
from .marglik import GridSearch, Marglik, MarglikTemperature, Temperature
from .operators import (
    CallableOperator,
    DenseOperator,
    EFOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    MCFisherOperator,
    as_operator,
)
from .optim import NaturalGradient
from .predictive import Prediction
from .preference import predict_preference
from .training import MarglikHistory, MarglikTrainingResult, marglik_training
from .wrapper import LaplaceWrapper

__version__ = "0.1.0"

__all__ = [
    "LaplaceWrapper",
    "FittedLaplace",
    "marglik_training",
    "MarglikTrainingResult",
    "MarglikHistory",
    "Hyperparameters",
    "Marglik",
    "GridSearch",
    "MarglikTemperature",
    "Temperature",
    "Prediction",
    "JointPrediction",
    "predict_preference",
    "KernelDecomposition",
    "Likelihood",
    "Link",
    "PredictMethod",
    "Structure",
    "Curvature",
    "LinearOperator",
    "DenseOperator",
    "CallableOperator",
    "as_operator",
    "GGNOperator",
    "HessianOperator",
    "EFOperator",
    "MCFisherOperator",
    "cg",
    "neumann",
    "power_iteration",
    "lanczos",
    "hutchinson_trace",
    "hutchinson_diagonal",
    "hutchpp_trace",
    "spectral_density",
    "inverse_matvec",
    "NaturalGradient",
    "__version__",
]
