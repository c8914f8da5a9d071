"""Data, models and short training runs shared by the benchmark scripts.

Everything comes from scikit-learn's bundled digits data set (1,797 images of 8×8 pixels); no
download. The split is fixed: a seeded permutation, the first 1,297 points for training and
the last 500 for prediction. Trained weights are cached under the system temp directory
(keyed by architecture, seed and epochs) so that the memory subprocesses reuse them.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_TRAIN = 1297
N_TEST = 500


def digits(
    seed: int = 0, *, images: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1]: ``(X_train (1297, 64), y_train, X_test (500, 64), y_test)``.

    With ``images=True`` the inputs have shape ``(n, 1, 8, 8)``.
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    if images:
        X = X.reshape(-1, 1, 8, 8)
    return X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]


def loader(X: torch.Tensor, y: torch.Tensor, batch_size: int = 100) -> DataLoader:
    """Deterministic (unshuffled) loader, as Laplace fits use."""
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=False)


def mlp(sizes: list[int], act: type[nn.Module] = nn.Tanh, seed: int = 0) -> nn.Sequential:
    """Fully connected net ``sizes[0] -> ... -> sizes[-1]`` with ``act`` between layers."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def digits_cnn(seed: int = 0) -> nn.Sequential:
    """Small conv net for 1×8×8 digits: two 3×3 convs (8, 16 ch), max-pool, 256-64-10 head.

    P = 80 + 1,168 + 16,448 + 650 = 18,346 parameters.
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 30,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    tag: str = "",
) -> nn.Module:
    """Adam on cross-entropy for a few seconds; cached on disk by (tag, architecture, seed)."""
    sig = f"{tag}|{model}|{n_params(model)}|{epochs}|{lr}|{batch_size}|{seed}|{tuple(X.shape)}"
    h = hashlib.sha1(sig.encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"laplace_ggn_bench_{h}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss_fn(model(X[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    tmp = path + f".{os.getpid()}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(X).argmax(-1) == y).float().mean().item()


def epoch(model: nn.Module, dl: DataLoader) -> None:
    """One pass of forward + backward (summed cross-entropy) over ``dl``: the floor."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for X, y in dl:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()
    model.zero_grad(set_to_none=True)
