"""Tiny seeded float64 models and data shared by the tests (<= 60 parameters each), and the
helpers several test files use to fit them and compare saved states."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper


@dataclass
class Case:
    """A model, its data and the likelihood it is trained for."""

    name: str
    likelihood: str
    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor

    def loader(self, batch_size: int = 5) -> DataLoader:
        return DataLoader(TensorDataset(self.X, self.y), batch_size=batch_size)


def make_case(name: str, seed: int = 0, n: int = 12) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if name == "linear_regression":
        model = nn.Linear(3, 2)
        y = torch.randn(n, 2, generator=g, dtype=torch.float64)
        lik = "regression"
    elif name == "mlp_regression":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        y = torch.randn(n, 2, generator=g, dtype=torch.float64)
        lik = "regression"
    elif name == "mlp_classification":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        y = torch.randint(0, 3, (n,), generator=g)
        lik = "classification"
    elif name == "mlp_binary":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        y = torch.randint(0, 2, (n,), generator=g).double()
        lik = "binary"
    elif name == "mlp_nobias_classification":
        model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False))
        y = torch.randint(0, 3, (n,), generator=g)
        lik = "classification"
    else:
        raise KeyError(name)
    return Case(name, lik, model.double(), X, y)


CASE_NAMES = [
    "linear_regression",
    "mlp_regression",
    "mlp_classification",
    "mlp_binary",
    "mlp_nobias_classification",
]


def assert_same_state(a, b) -> None:
    """Recursive exact equality of state dicts (tensors bit for bit)."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same_state(u, v)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


def same_state(a, b) -> bool:
    """Recursive exact equality of state dicts (tensors bit for bit)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def fit_case(case, structure="full", batch_size=5, **kwargs) -> LaplaceWrapper:
    return LaplaceWrapper(case.model, case.likelihood, structure=structure, **kwargs).fit(
        case.loader(batch_size)
    )


def quiet_fit(la: LaplaceWrapper, loader) -> LaplaceWrapper:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return la.fit(loader)


def saturated_model(
    likelihood: str, scale: float = 1e20
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    C = {"classification": 3, "binary": 1, "regression": 2}[likelihood]
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C))
    with torch.no_grad():
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 3, generator=g)
    y = torch.randint(0, C, (12,), generator=g)
    if likelihood == "binary":
        y = torch.randint(0, 2, (12,), generator=g).float()
    elif likelihood == "regression":
        y = torch.randn(12, C, generator=g)
    return model, X, y
