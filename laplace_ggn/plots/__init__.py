"""Figures of calibration and uncertainty, in scikit-learn's Display pattern.

Each display is built from predictions by a ``from_*`` classmethod that computes its numbers
through :mod:`laplace_ggn.calibration` and draws them; ``plot(ax=None, ...)`` draws again
(on new axes, or on ``ax``) and returns the display, with the figure in ``figure_``, the main
axes in ``ax_`` and the drawn artists in further ``*_`` attributes. This is the only module
that imports matplotlib, and only inside the functions that draw.

Inputs may be torch tensors or numpy arrays. Where several models are allowed, pass a dict
``{"MAP": probs_map, "Laplace": probs_la}``; a single array is drawn under the name
``"model"``.
"""

from ._style import PALETTE
from .classification import ConfidenceHistogramDisplay, ReliabilityDisplay
from .kernel import KERNEL_COLORS as KERNEL_COLORS
from .kernel import plot_kernel_decomposition
from .regression import RegressionCalibrationDisplay, UncertaintyBandDisplay
from .spectrum import SpectrumDisplay

__all__ = [
    "plot_kernel_decomposition",
    "ReliabilityDisplay",
    "RegressionCalibrationDisplay",
    "UncertaintyBandDisplay",
    "SpectrumDisplay",
    "ConfidenceHistogramDisplay",
    "PALETTE",
]
