r"""Kernel / non-kernel decomposition of a Laplace posterior (Roy et al., NeurIPS 2024).

With the eigendecomposition of the unit-noise GGN :math:`G = U \mathrm{diag}(\lambda) U^\top`
and :math:`r` the number of eigenvalues above ``tol·λ_max``, the parameter space splits into

- the non-kernel :math:`P_\perp = U_r U_r^\top` (directions that change the function on the
  training inputs), and
- the kernel :math:`P_{ker} = I - P_\perp` (reparameterisations: to first order they leave the
  function on the training inputs unchanged).

With a scalar prior α and curvature scale s (:math:`\Lambda = sG + \alpha I`) the covariance
splits exactly, because :math:`P_{ker}` commutes with Λ:

.. math::
    \Sigma = P_{ker}\Sigma P_{ker} + P_\perp \Sigma P_\perp, \quad
    P_\perp \Sigma P_\perp = U_r \mathrm{diag}\big(1/(s\lambda_r + \alpha)\big) U_r^\top, \quad
    P_{ker}\Sigma P_{ker} = \alpha^{-1} P_{ker} \text{ (eigenvalues exactly 0)}.

Eigenvalues that are below the threshold but not exactly zero keep their exact variance
:math:`1/(s\lambda + \alpha)` inside the kernel block, so the parts always add up to Σ.
With a layerwise or diagonal prior Λ does not commute with :math:`P_{ker}`; then
:math:`\Sigma = P_{ker}\Sigma P_{ker} + P_\perp\Sigma P_\perp + (P_{ker}\Sigma P_\perp +
P_\perp\Sigma P_{ker})` and the cross part is reported on its own (its trace is zero, so the
variance fraction needs no cross term).

For a top-k low-rank posterior the held subspace is that of the k largest eigenpairs; its
complement is counted as kernel (the posterior there is the prior), and the report says so.
"""

from ._samples import gather_inputs
from .kernel import decompose_fitted, eigenbasis, kernel_decomposition, supported_structures
from .report import KernelDecomposition, SampleFit

__all__ = [
    "SUPPORTED_STRUCTURES",  # noqa: F822 (provided by the module __getattr__ below)
    "KernelDecomposition",
    "SampleFit",
    "decompose_fitted",
    "eigenbasis",
    "gather_inputs",
    "kernel_decomposition",
    "supported_structures",
]


def __getattr__(name: str) -> object:
    """``SUPPORTED_STRUCTURES``: :func:`supported_structures` of the registry as it is now.

    Returns:
        The tuple of structure names that hold an eigenbasis of G.

    Raises:
        AttributeError: For any other name.
    """
    if name == "SUPPORTED_STRUCTURES":
        return supported_structures()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
