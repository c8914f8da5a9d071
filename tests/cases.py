"""Tiny seeded float64 models and data shared by the tests (<= 60 parameters each)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


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
