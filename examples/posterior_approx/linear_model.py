r"""A model linear in its parameters: its GGN kernel is empty exactly when P ≤ N·C and Φ has full
column rank, and then the Laplace posterior is exact and has no kernel variance.

f(x, θ) = Φ(x) θ with fixed features Φ, Gaussian noise σ and a scalar prior α. Then G = ΦᵀΦ equals the Hessian, Λ = ΦᵀΦ/σ² + αI is the exact
posterior precision (Bayesian linear regression), and

- with P = 4 polynomial features (1, x/2, (x/2)², (x/2)³) and N = 20 points
  (``linear_exact.png``) rank(G) = P: the kernel is empty, all predictive variance is non-kernel;
- with P = 30 features (a constant and 29 Gaussian bumps) and the same 20 points (``linear_overparam.png``) rank(G) ≤ N < P: the
  kernel has dimension P − r; its part of the predictive variance, α⁻¹ Φ(x) P_ker Φ(x)ᵀ, is zero
  at the training inputs and grows away from them.

Because f is linear in θ, the network and the linearised model are the same function, so
kernel-only samples do not change the training fit of either (``summary.json``).

Run:  python examples/posterior_approx/linear_model.py --out OUT_DIR [--small]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper

DT = torch.float64
SIGMA = 0.2
PRIOR_PRECISION = 1.0


class Features(nn.Module):
    """f(x) = Φ(x)θ with polynomial features (1, x/2, ..., (x/2)^(P-1)) or a constant plus P - 1
    Gaussian bumps with centres evenly on [-3, 3]."""

    def __init__(self, kind: str, n_features: int):
        super().__init__()
        self.kind = kind
        n_bumps = n_features - 1
        self.register_buffer("centres", torch.linspace(-3, 3, n_bumps, dtype=DT))
        self.width = 6.0 / max(n_bumps - 1, 1)
        self.weight = nn.Parameter(torch.zeros(n_features, dtype=DT))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "poly":
            return (x / 2) ** torch.arange(self.weight.shape[0], dtype=DT)
        bumps = torch.exp(-0.5 * ((x - self.centres) / self.width) ** 2)
        return torch.cat([torch.ones_like(x), bumps], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x) @ self.weight[:, None]


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.cat(
        [
            -2.0 + 1.2 * torch.rand(n // 2, generator=g, dtype=DT),
            0.6 + 1.2 * torch.rand(n - n // 2, generator=g, dtype=DT),
        ]
    )
    y = torch.sin(2 * x) + SIGMA * torch.randn(n, generator=g, dtype=DT)
    return x[:, None], y[:, None]


def fit_map(model: Features, X: torch.Tensor, y: torch.Tensor) -> None:
    """Exact MAP of the ridge problem (what training converges to)."""
    Phi = model.features(X)
    A = Phi.T @ Phi / SIGMA**2 + PRIOR_PRECISION * torch.eye(Phi.shape[1], dtype=DT)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.solve(A, Phi.T @ y[:, 0] / SIGMA**2))


def run(
    kind: str, n_features: int, X, y, grid, n_samples: int, seed: int
) -> tuple[dict, object, object]:
    model = Features(kind, n_features)
    fit_map(model, X, y)
    la = LaplaceWrapper(
        model, "regression", structure="full", prior_precision=PRIOR_PRECISION, sigma_noise=SIGMA
    ).fit(DataLoader(TensorDataset(X, y), batch_size=len(X)))
    gen = torch.Generator().manual_seed(seed)
    on_train = la.kernel_decomposition(X, y=y, n_samples=n_samples, generator=gen)
    on_grid = la.kernel_decomposition(grid, n_samples=0)
    Phi = model.features(X)
    numbers = {
        "P": la.n_params,
        "N": len(X),
        "rank_Phi": int(torch.linalg.matrix_rank(Phi)),
        "rank": on_train.rank,
        "kernel_dim": on_train.kernel_dim,
        "kernel_variance_fraction": on_train.kernel_variance_fraction,
        "kernel_variance_on_train_max": float(on_train.predictive_variance_kernel.max()),
        "kernel_variance_on_grid_max": float(on_grid.predictive_variance_kernel.max()),
        "train_rmse_map": on_train.fit_of("MAP", "network").metric_mean,
        "train_rmse_kernel_network": on_train.fit_of("kernel", "network").metric_mean,
        "train_rmse_kernel_linearised": on_train.fit_of("kernel", "linearised").metric_mean,
        "train_rmse_nonkernel_network": on_train.fit_of("non-kernel", "network").metric_mean,
    }
    print(f"--- P = {la.n_params} features, N = {len(X)} points ---")
    print(on_train)
    print()
    return numbers, on_grid, on_train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "out", help="output folder"
    )
    parser.add_argument("--small", action="store_true", help="fewer grid points and samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    n_grid, n_samples = (80, 8) if args.small else (300, 64)
    X, y = make_data(20, args.seed)
    grid = torch.linspace(-3.5, 3.5, n_grid, dtype=DT)[:, None]
    summary = {}
    for tag, kind, P in (("exact", "poly", 4), ("overparam", "bumps", 30)):
        numbers, on_grid, _ = run(kind, P, X, y, grid, n_samples, args.seed)
        summary[tag] = numbers
        fig = on_grid.plot(x_axis=grid[:, 0], train_x=X[:, 0])
        fig.set_size_inches(6.4, 3.6)
        fig.axes[0].set_title(
            f"f(x) = Φ(x)θ, P = {P} {'polynomial' if kind == 'poly' else 'bump'} features, N = {len(X)}: rank r = {on_grid.rank}, "
            f"kernel dim {on_grid.kernel_dim}\nkernel share of tr Σ = "
            f"{on_grid.kernel_variance_fraction:.2f} (tol = {on_grid.tol:g})",
            fontsize=9,
        )
        fig.savefig(args.out / f"linear_{tag}.png", dpi=110)
        plt.close(fig)
    for tag, n in summary.items():
        print(
            f"{tag:>9}: P = {n['P']:2d}, N·C = {n['N']}, rank Φ = {n['rank_Phi']:2d} -> kernel dim "
            f"{n['kernel_dim']:2d}; max kernel variance on train {n['kernel_variance_on_train_max']:.1e}, "
            f"on the grid {n['kernel_variance_on_grid_max']:.3g}; training RMSE MAP "
            f"{n['train_rmse_map']:.4f}, kernel samples {n['train_rmse_kernel_network']:.4f}"
        )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
