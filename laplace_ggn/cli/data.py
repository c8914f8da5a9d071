"""The demo's data and network: digits splits, out-of-distribution digits, a trained MLP."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["DemoConfig", "load_digits_splits", "train_mlp"]

DEMO_DTYPE = torch.float64


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; :meth:`small` is the seconds-long smoke-test variant.

    Attributes:
        n_test: Held-out test digits.
        n_val: Held-out validation digits (tune the predictive temperature); the remaining
            ones train the network.
        hidden: Width of the two hidden layers.
        epochs: Adam epochs over the training set.
        batch_size: Mini-batch size of training and of the curvature pass.
        lowrank_rank: k of the ``lowrank`` structure (top-k eigenpairs of G).
        n_train: Cap on the training set size (``None``: all remaining digits).
        prior_precision: α of the Gaussian prior the MAP is trained under (weight decay
            α/N on the mean loss); also where the evidence maximisation starts.
    """

    n_test: int = 500
    n_val: int = 200
    hidden: int = 16
    epochs: int = 40
    batch_size: int = 128
    lowrank_rank: int = 300
    n_train: int | None = None
    prior_precision: float = 5.0

    @classmethod
    def small(cls) -> DemoConfig:
        """Return a configuration that runs in a few seconds.

        Returns:
            The small configuration.
        """
        return cls(
            n_test=200, n_val=100, hidden=8, epochs=40, batch_size=100, lowrank_rank=30, n_train=400
        )


def _rotate_and_noise(images: Tensor, *, generator: torch.Generator) -> Tensor:
    """Rotate each 8×8 digit by 90°, 180° or 270° and add strong pixel noise (raw 0-16 scale).

    Args:
        images: Raw digits, shape ``(M, 64)``.
        generator: Random generator of the noise.

    Returns:
        Rotated noisy digits clipped to ``[0, 16]``, shape ``(M, 64)``.
    """
    img = images.reshape(-1, 8, 8)
    k = torch.arange(img.shape[0]) % 3 + 1
    rotated = torch.stack([torch.rot90(im, int(r), dims=(0, 1)) for im, r in zip(img, k)])
    noise = 4.0 * torch.randn(rotated.shape, generator=generator, dtype=rotated.dtype)
    return (rotated + noise).clamp(0.0, 16.0).reshape(-1, 64)


def load_digits_splits(config: DemoConfig, *, seed: int) -> dict[str, Tensor]:
    """Standardised train / validation / test / out-of-distribution splits of the digits.

    Pixels are standardised with the training mean and standard deviation (floored at one
    grey level, so that pixels that are blank in every training image stay finite). The
    out-of-distribution set is the test set rotated by 90°/180°/270° with Gaussian noise of
    standard deviation 4 grey levels (of 16), keeping the original labels.

    Args:
        config: Sizes.
        seed: Seed of the split and of the noise.

    Returns:
        ``{"x_train" (N, 64), "y_train" (N,), "x_val" (V, 64), "y_val" (V,), "x_test" (M, 64),
        "y_test" (M,), "x_ood" (M, 64)}``.
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X, dtype=DEMO_DTYPE)
    y = torch.as_tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(X.shape[0], generator=gen)
    test = perm[: config.n_test]
    val = perm[config.n_test : config.n_test + config.n_val]
    train = perm[config.n_test + config.n_val :]
    if config.n_train is not None:
        train = train[: config.n_train]
    mean = X[train].mean(0)
    std = X[train].std(0).clamp_min(1.0)
    x_ood = _rotate_and_noise(X[test], generator=gen)
    return {
        "x_train": (X[train] - mean) / std,
        "y_train": y[train],
        "x_val": (X[val] - mean) / std,
        "y_val": y[val],
        "x_test": (X[test] - mean) / std,
        "y_test": y[test],
        "x_ood": (x_ood - mean) / std,
    }


# ------------------------------------------------------------------------------------ model


def train_mlp(x: Tensor, y: Tensor, config: DemoConfig, *, seed: int, progress: bool) -> nn.Module:
    r"""Train a ReLU MLP ``64 → h → h → 10`` with Adam: the MAP under the prior N(0, α⁻¹I).

    The objective is the mean cross-entropy plus the weight decay :math:`\alpha/N`, i.e.
    :math:`(\ell(\theta) + \tfrac{\alpha}{2}\lVert\theta\rVert^2)/N` with ℓ summed.

    Returns:
        The trained network in eval mode (float64).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    h = config.hidden
    model = nn.Sequential(
        nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)
    ).to(DEMO_DTYPE)
    opt = torch.optim.Adam(
        model.parameters(), lr=1e-2, weight_decay=config.prior_precision / x.shape[0]
    )
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(
        range(config.epochs), desc="train MAP", disable=not progress, leave=False, file=sys.stderr
    )
    for _ in bar:
        perm = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], config.batch_size):
            idx = perm[start : start + config.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()
