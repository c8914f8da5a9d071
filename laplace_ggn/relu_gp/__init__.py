"""Infinitely many ReLU features as a GP residual: variance that grows like ‖x‖³ far from the data.

``docs/far-from-data.md`` gives the reason and the figures.
"""

from .residual import dscs_kernel, dscs_variance, predict_relu_gp

__all__ = ["dscs_kernel", "dscs_variance", "predict_relu_gp"]
