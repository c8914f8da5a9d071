"""``torch.compile``d models: the library differentiates the original modules, compiles nothing,
and gives the eager model's numbers; the user's compiled model stays compiled."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import make_case
from torch import nn

from laplace_ggn import LaplaceWrapper
from laplace_ggn._compiled import EagerModule

TOL = {"rtol": 1e-12, "atol": 1e-14}


class _Compilations:
    """A ``torch.compile`` backend that counts the graphs handed to it (and runs them eagerly)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward

    def assert_none(self) -> None:
        """No graph reached the backend and dynamo evaluated no frame."""
        from torch._dynamo.utils import counters

        assert self.graphs == 0
        assert sum(counters["frames"].values()) == 0


COMPILATIONS = _Compilations()


@pytest.fixture
def backend():
    from torch._dynamo.utils import counters

    counters.clear()
    COMPILATIONS.graphs = 0
    return COMPILATIONS


class _Body(nn.Module):
    def __init__(self, d_in: int = 3):
        super().__init__()
        self.fc = nn.Linear(d_in, 4)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class _DecoratedBody(_Body):
    @torch.compile(backend=COMPILATIONS)
    def forward(self, x):
        return torch.tanh(self.fc(x))


def _fit_both(eager: nn.Module, compiled: nn.Module, case, **kw):
    out = []
    for model in (eager, compiled):
        la = LaplaceWrapper(model, case.likelihood, **kw).fit(case.loader(), progress=False)
        g = torch.Generator().manual_seed(3)
        out.append(
            (
                la.posterior_covariance(),
                la.predict(case.X).mean,
                la.predict(case.X, "nn", n_samples=4, generator=g).mean,
                la.log_marginal_likelihood(),
                la,
            )
        )
    (*ref, _), (*got, la) = out
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, **TOL)
    return la


@pytest.mark.parametrize(
    "kw",
    [{"structure": "full"}, {"structure": "kfac"}, {"structure": "diag", "subset": "last_layer"}],
    ids=["full", "kfac", "diag-last_layer"],
)
def test_compiled_model_equals_eager_and_compiles_nothing(backend, kw):
    from torch._dynamo.eval_frame import OptimizedModule

    case = make_case("mlp_classification")
    compiled = torch.compile(case.model, backend=backend)
    forward_before = compiled.forward
    la = _fit_both(case.model, compiled, case, **kw)
    backend.assert_none()
    assert all(n.startswith("_orig_mod.") for n in la.fitted.layout.names)  # the user's names
    assert isinstance(la.fitted.fmodel.module, EagerModule)
    # the user's model is left compiled
    assert isinstance(compiled, OptimizedModule) and compiled.forward is forward_before


def test_compiled_submodules_in_place_compile_and_decorated_forward(backend):
    """A compiled body, a head compiled in place (``.compile()``), a ``@torch.compile`` forward."""
    from torch._dynamo.eval_frame import OptimizedModule

    case = make_case("mlp_classification")
    torch.manual_seed(0)
    eager = nn.Sequential(_Body(), _Body(4), nn.Linear(4, 3)).double()
    user = copy.deepcopy(eager)
    user[0] = torch.compile(user[0], backend=backend)
    user[1] = _DecoratedBody(4).double()
    user[1].load_state_dict(eager[1].state_dict())
    user[2].compile(backend=backend)
    la = _fit_both(eager, user, case, structure="kfac")
    backend.assert_none()
    assert la.fitted.layout.names[:2] == ("0._orig_mod.fc.weight", "0._orig_mod.fc.bias")
    assert isinstance(user[0], OptimizedModule) and user[2]._compiled_call_impl is not None
    # 'last_layer' is traced on an eager private copy too
    ll = LaplaceWrapper(user, "classification", subset="last_layer").fit(case.loader())
    assert ll.fitted.layout.names == ("2.weight", "2.bias")
    backend.assert_none()
