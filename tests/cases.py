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


# ---------------------------------------------------------------------------------------------
# Shared (tied) weights
# ---------------------------------------------------------------------------------------------


class TiedAutoencoder(nn.Module):
    """Encoder/decoder MLP whose decoder reuses the encoder weight through a functional call.

    ``enc`` runs as a module, then ``F.linear(h, enc.weight.t(), dec_b)`` uses its weight
    again: P = 6 + 2 + 6 + 3 = 17.
    """

    def __init__(self, d: int = 3, k: int = 2):
        super().__init__()
        self.enc = nn.Linear(d, k)
        self.mid = nn.Linear(k, k)
        self.dec_b = nn.Parameter(torch.randn(d) * 0.3)

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.enc(x))))
        return nn.functional.linear(h, self.enc.weight.t(), self.dec_b)


def tied_autoencoder_case(likelihood: str = "regression", seed: int = 0, n: int = 8) -> Case:
    """A :class:`TiedAutoencoder` (3 outputs) with regression or 3-class targets."""
    torch.manual_seed(seed)
    model = TiedAutoencoder().double()
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if likelihood == "regression":
        y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, 3, (n,), generator=g)
    return Case("tied_autoencoder", likelihood, model, X, y)


def dense_ggn_of(fn, theta: torch.Tensor, likelihood: str, y: torch.Tensor) -> torch.Tensor:
    """G = Σ_r J_rᵀ Λ_r J_r of the outputs ``fn(theta)`` by ``torch.func.jacrev``, ``(P, P)``.

    Outputs ``(B, C)`` or ``(B, T, C)``: every row (sample or position) is an observation;
    ``y`` holds one target per row.
    """
    from torch.func import jacrev

    from laplace_ggn.testing import dense_output_hessians

    J = jacrev(fn)(theta).detach()
    with torch.no_grad():
        f = fn(theta)
    C, P = f.shape[-1], theta.numel()
    J, f = J.reshape(-1, C, P), f.reshape(-1, C)
    y = y.reshape(f.shape[0], -1) if likelihood == "regression" else y.reshape(-1)
    return torch.einsum("rcp,rcd,rdq->pq", J, dense_output_hessians(likelihood, f, y), J)


def stored_curvature(la: LaplaceWrapper) -> torch.Tensor:
    """The fitted curvature as a dense ``(P, P)`` matrix (projected: the range's projector)."""
    post = la.posterior
    if la.structure == "full":
        return post.ggn
    if la.structure == "diag":
        return torch.diag(post.ggn_diag)
    if la.structure == "kfac":
        return post.curvature.to_dense()
    U = post.eigenvectors
    if la.structure == "projected":
        return U @ U.T
    return U @ torch.diag(post.eigenvalues) @ U.T


def range_projector(J: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the span of the rows of ``J`` ``(..., P)``, ``(P, P)``."""
    R = J.reshape(-1, J.shape[-1])
    _, S, Vh = torch.linalg.svd(R, full_matrices=False)
    keep = S > S.max() * max(R.shape) * torch.finfo(R.dtype).eps
    return Vh[keep].T @ Vh[keep]
