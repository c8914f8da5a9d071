r"""Laplace evidence and the tuning of the prior precision and the observation noise.

.. math::
    \log p(\mathcal D) \approx -\ell(\theta_*) - \tfrac12 (\theta_*-\theta_0)^\top \Lambda_0
    (\theta_*-\theta_0) - \tfrac12 \log|\Lambda| + \tfrac12 \log|\Lambda_0|,

with :math:`\Lambda = G/(\tau\sigma^2) + \Lambda_0` (the 2π terms of the Gaussian
approximation cancel; σ enters ℓ and G for regression).

Each tuning method is an object holding its validated options — :class:`Marglik`,
:class:`GridSearch`, :class:`MarglikTemperature`, :class:`Temperature` — with ``tune(fitted)``; the strings of
``optimize_prior_precision`` are converted into them once (:func:`tuning_method`).

Tuning by evidence (``method="marglik"``) runs Adam on the log hyperparameters.  Each step
reuses one factorisation of the curvature: when the precision is diagonal in a fixed basis —
a scalar prior with the full (eigenvalues of G), KFAC (products of factor eigenvalues) or
low-rank structure, and any prior with the diag structure — the evidence is a sum over the
P eigenvalues :math:`\lambda_i` of G,
:math:`\log|\Lambda| = \sum_i \log(s\lambda_i + \alpha_i)`, O(P) per step.  Otherwise the
evidence is evaluated through ``posterior.with_prior``: O(P) for KFAC with a layerwise prior,
but one Cholesky factorisation (O(P³)) per step for the full structure with a layerwise or
per-parameter prior (no shared factorisation diagonalises sG + D for a non-scalar D).

Tuning by validation (``method="gridsearch"``) scores each prior precision of a log-spaced
grid by the mean validation negative log predictive density.

Both together (``method="marglik_temperature"``, classification): the evidence tunes the prior
precision, then a predictive temperature T (:math:`p_T \propto \bar p^{1/T}`) is chosen on
validation data (:mod:`.temperature`; a pseudo-observation and a prior on log T keep it finite
when no validation point is misclassified).  ``method="temperature"`` tunes T alone at the
current prior precision.  Without a method, ``optimize_prior_precision`` uses the evidence, or
with a ``val_loader`` the evidence and T.
"""

from .evidence import (
    SpectralEvidence,
    check_evidence,
    curvature_spectrum,
    log_marginal_likelihood,
)
from .methods import GridSearch, Marglik, MarglikTemperature, Temperature, tuning_method
from .optimize import MarglikResult, convert_prior, optimize_marglik
from .options import Tuned, TuneMethod
from .temperature import TemperatureResult, temperature_edge_warning, tune_predictive_temperature
from .validation import (
    GridsearchResult,
    check_grid,
    default_grid,
    grid_edge_warning,
    gridsearch,
)

__all__ = [
    "GridsearchResult",
    "MarglikResult",
    "SpectralEvidence",
    "TemperatureResult",
    "TuneMethod",
    "Tuned",
    "GridSearch",
    "Marglik",
    "MarglikTemperature",
    "Temperature",
    "check_evidence",
    "check_grid",
    "tuning_method",
    "convert_prior",
    "curvature_spectrum",
    "default_grid",
    "grid_edge_warning",
    "gridsearch",
    "log_marginal_likelihood",
    "optimize_marglik",
    "temperature_edge_warning",
    "tune_predictive_temperature",
]
