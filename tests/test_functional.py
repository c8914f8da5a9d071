import warnings

import pytest
import torch
from cases import make_case
from torch import nn

from laplace_ggn.functional import FunctionalModel, batch_size_of, resolve_subset, split_batch
from laplace_ggn.testing import dense_jacobian


def test_layout_flatten_order_matches_parameters_to_vector():
    case = make_case("mlp_classification")
    layout = resolve_subset(case.model, "all")
    flat = nn.utils.parameters_to_vector(case.model.parameters())
    torch.testing.assert_close(layout.flatten(dict(case.model.named_parameters())), flat)
    back = layout.unflatten(flat)
    for n, p in case.model.named_parameters():
        torch.testing.assert_close(back[n], p)
    assert layout.offsets[-1] == layout.n_params == flat.numel()


def test_jacobians_match_dense_and_chunking(case):
    layout = resolve_subset(case.model, "all")
    ref = dense_jacobian(case.model, case.X)
    for budget in [2**30, 800]:  # 800 bytes: one sample's Jacobian (<= 744), one per chunk
        fm = FunctionalModel(case.model, layout, memory_budget=budget)
        J, f = fm.jacobians(case.X)
        torch.testing.assert_close(J, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f, case.model(case.X).detach().reshape(f.shape))


class NotVmappable(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 2)

    def forward(self, x):
        if float(x.sum()) > 1e9:  # data-dependent control flow: vmap cannot run it
            return self.l(x) * 0
        return torch.tanh(self.l(x))


def test_non_vmappable_model_uses_batched_reverse_mode_every_call():
    torch.manual_seed(0)
    model = NotVmappable().double()
    X = torch.randn(5, 3, dtype=torch.float64)
    fm = FunctionalModel(model, resolve_subset(model, "all"), memory_budget=400)  # 3 chunks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the batched reverse mode is no slow fallback
        for _ in range(2):  # decided per call, nothing cached
            J, f = fm.jacobians(X)
            torch.testing.assert_close(J, dense_jacobian(model, X), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(f, model(X).detach())
    assert not hasattr(fm, "_vmap_ok")


def test_jvp_vjp_matches_dense():
    case = make_case("mlp_regression")
    fm = FunctionalModel(case.model, resolve_subset(case.model, "all"))
    J = dense_jacobian(case.model, case.X)
    V = torch.randn(fm.n_params, 2, dtype=torch.float64)
    out, _ = fm.jvp_vjp(case.X, V, lambda f, u: 2 * u)
    torch.testing.assert_close(
        out, 2 * torch.einsum("bcp,bcq,qk->pk", J, J, V), rtol=1e-10, atol=1e-12
    )
    U = torch.randn(len(case.X), 2, dtype=torch.float64)
    torch.testing.assert_close(
        fm.vjp(case.X, U), torch.einsum("bcp,bc->p", J, U), rtol=1e-10, atol=1e-12
    )


def test_last_layer_traced_by_forward_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)  # defined first, runs last
            self.body = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    layout = resolve_subset(Net(), "last_layer", torch.randn(2, 3))
    assert layout.names == ("head.weight", "head.bias")


def test_subset_list_keeps_model_order_and_errors():
    case = make_case("mlp_classification")
    layout = resolve_subset(case.model, ["2.bias", "0.weight"])
    assert layout.names == ("0.weight", "2.bias")
    with pytest.raises(ValueError, match="subset names must be unique"):
        resolve_subset(case.model, ["2.bias", "2.bias"])
    with pytest.raises(
        TypeError, match="subset must be 'all', 'last_layer' or a list of parameter names; got int"
    ):
        resolve_subset(case.model, 3)
    frozen = make_case("mlp_classification").model.requires_grad_(False)
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        resolve_subset(frozen, "all")


def test_split_batch_forms():
    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert split_batch((x, y))[0] is x
    assert split_batch({"input": x, "target": y})[1] is y
    with pytest.raises(
        ValueError, match="must be \\(input, target\\) pairs or mappings; got Tensor"
    ):
        split_batch(x)


# -- model inputs and outputs that are not tensors -------------------------------------------------


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
