"""Training with the Laplace evidence (Immer et al., ICML 2021): ``marglik_training``.

The network, its prior precision and the likelihood's σ (regression) or temperature T
(classification) are learned together, without a validation split; the result holds the
fitted posterior at the final weights.  See ``docs/marglik-training.md``.
"""

from .loop import marglik_training
from .result import MarglikHistory, MarglikTrainingResult

__all__ = ["MarglikHistory", "MarglikTrainingResult", "marglik_training"]
