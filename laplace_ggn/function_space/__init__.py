r"""Function space: joint predictives, function samples and predictives differentiable in x.

- :func:`functional_covariance` / :func:`predict` with ``joint=True``: the joint Gaussian of
  the linearised outputs over a batch (:mod:`.joint`), regression as a :class:`JointPrediction`;
- :func:`functional_samples`: draws :math:`f(X,\theta_*) + J(X)(\theta_s-\theta_*)`,
  consistent across inputs, by Jacobian-vector products (:mod:`.samples`);
- ``differentiable=True``: predictives with a graph to ``x`` (:mod:`.differentiable`).

Everything is built on the :class:`~laplace_ggn.posteriors.Posterior` protocol
(``functional_covariance``, ``sample``), so it applies to every registered structure.
"""

from .api import functional_covariance, predict
from .differentiable import differentiable_moments, differentiable_predict
from .joint import JointPrediction, joint_moments, joint_predict
from .samples import functional_samples, linearised_outputs

__all__ = [
    "JointPrediction",
    "differentiable_moments",
    "differentiable_predict",
    "functional_covariance",
    "functional_samples",
    "joint_moments",
    "joint_predict",
    "linearised_outputs",
    "predict",
]
