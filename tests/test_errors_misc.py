"""Raises not covered elsewhere, each with its message."""

import pytest
import torch
from cases import make_case
from torch import nn

from laplace_ggn import LaplaceWrapper
from laplace_ggn.functional import FunctionalModel, batch_size_of, resolve_subset
from laplace_ggn.linalg import inverse_matvec
from laplace_ggn.operators import DenseOperator
from laplace_ggn.testing import nll_per_sample


def test_wrapper_option_types():
    model = make_case("mlp_classification").model
    with pytest.raises(TypeError, match="temperature must be a float; got str"):
        LaplaceWrapper(model, "classification", temperature="1")
    with pytest.raises(ValueError, match="rank must be None or a positive integer; got 0"):
        LaplaceWrapper(model, "classification", structure="lowrank", rank=0)


def test_model_input_without_tensor():
    with pytest.raises(
        ValueError, match="model input must be a tensor, a tuple or a dict of tensors; got str"
    ):
        batch_size_of("abc")


def test_model_output_not_a_tensor():
    class SetOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            return {"scores": self.l(x)}

    model = SetOut()
    fm = FunctionalModel(model, resolve_subset(model, "all"))
    with pytest.raises(
        TypeError,
        match=r"model output must be a tensor, a mapping or object with 'logits', or a tuple "
        r"whose first element is the output tensor; got dict with keys \['scores'\]\. Pass "
        r"output_fn=",
    ):
        fm.forward(torch.zeros(2, 3))


def test_operator_product_shape_mismatch():
    a = DenseOperator(torch.zeros(3, 4))
    b = DenseOperator(torch.zeros(5, 2))
    with pytest.raises(
        ValueError, match=r"cannot multiply operators of shapes \(3, 4\) and \(5, 2\)"
    ):
        a @ b


def test_reference_nll_unknown_likelihood():
    with pytest.raises(
        ValueError, match="likelihood must be regression/classification/binary; got 'poisson'"
    ):
        nll_per_sample("poisson", torch.zeros(2, 1), torch.zeros(2))


def test_uncertainty_band_needs_both_train_arrays():
    from laplace_ggn.plots import UncertaintyBandDisplay

    x = torch.linspace(0, 1, 5)
    with pytest.raises(
        ValueError, match="x_train and y_train must be given together; got only one of them"
    ):
        UncertaintyBandDisplay.from_predictions(x, x, torch.ones(5), x_train=x)


def test_inverse_matvec_reports_no_convergence():
    A = torch.diag(torch.logspace(0, 6, 20, dtype=torch.float64))
    b = torch.ones(20, dtype=torch.float64)
    with pytest.raises(
        RuntimeError,
        match="inverse_matvec did not reach the relative residual tol=1e-12 in 2 CG iterations",
    ):
        inverse_matvec(A, b, method="cg", tol=1e-12, max_iter=2)


def test_structure_missing_from_the_registry(monkeypatch):
    from laplace_ggn import structures

    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="diag")
    monkeypatch.delitem(structures.STRUCTURES, "diag")
    with pytest.raises(NotImplementedError, match="structure='diag' is not available"):
        la.fit(case.loader())
