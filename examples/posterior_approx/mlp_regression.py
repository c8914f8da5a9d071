r"""Over-parameterised tanh MLP on 1-D regression: most posterior mass lies in the GGN's kernel.

Twenty points y = sin(3x) + ε in two clusters, a 1-32-32-1 tanh network (P = 1153 ≫ N = 20),
and a full Laplace posterior Λ = G/σ² + αI. With r = rank(G) ≤ N, the kernel P_ker = I − U_r U_rᵀ
has dimension P − r and, for MSE, J(x_n) P_ker = 0 at every training input x_n. Hence

- the kernel part of the linearised predictive variance, α⁻¹ diag(J(x) P_ker J(x)ᵀ), is zero on
  the training inputs and grows away from them (``variance_grid.png``);
- kernel-only samples θ* + α^{-1/2} P_ker z leave the linearised model's training fit unchanged
  but move the *network* far from its fit, while non-kernel-only samples barely do
  (``functions.png``, ``fit_table.png`` and the numbers printed at the end).

Run:  python examples/posterior_approx/mlp_regression.py --out OUT_DIR [--small]
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
SIGMA = 0.1
PRIOR_PRECISION = 1.0


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    x = torch.cat(
        [
            -1.2 + 0.7 * torch.rand(half, generator=g, dtype=DT),
            0.5 + 0.7 * torch.rand(n - half, generator=g, dtype=DT),
        ]
    )
    y = torch.sin(3 * x) + SIGMA * torch.randn(n, generator=g, dtype=DT)
    return x[:, None], y[:, None]


def make_model(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).to(DT)


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return float(loss.detach().sqrt())


def projected_samples(la: LaplaceWrapper, rank: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Full posterior draws θ* + δ and their kernel / non-kernel projections, each (n, P)."""
    _, U = la.posterior.eig  # ascending eigenvalues of G
    Ur = U[:, U.shape[1] - rank :]
    delta = la.sample(n, generator=torch.Generator().manual_seed(seed)) - la.posterior.mean
    d_nonk = (delta @ Ur) @ Ur.T
    return {"kernel": delta - d_nonk, "non-kernel": d_nonk, "full": delta}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "out", help="output folder"
    )
    parser.add_argument("--small", action="store_true", help="narrower network, fewer steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    width, steps, n_grid, n_samples = (12, 800, 100, 12) if args.small else (32, 4000, 300, 64)
    X, y = make_data(20, args.seed)
    model = make_model(width, args.seed)
    rmse_train = train(model, X, y, steps)

    la = LaplaceWrapper(
        model, "regression", structure="full", prior_precision=PRIOR_PRECISION, sigma_noise=SIGMA
    ).fit(DataLoader(TensorDataset(X, y), batch_size=20))
    gen = torch.Generator().manual_seed(args.seed)
    on_train = la.kernel_decomposition(X, y=y, n_samples=n_samples, generator=gen)
    grid = torch.linspace(-3, 3, n_grid, dtype=DT)[:, None]
    on_grid = la.kernel_decomposition(grid, n_samples=0)
    print(on_train)
    print()

    # -- figures ------------------------------------------------------------------------------
    fig = on_grid.plot(x_axis=grid[:, 0], train_x=X[:, 0])
    fig.axes[0].set_title(
        f"Linearised predictive variance of a 1-{width}-{width}-1 tanh MLP (P = {la.n_params}, "
        f"N = 20)\nr = {on_grid.rank}, kernel dim = {on_grid.kernel_dim}, tol = {on_grid.tol:g}",
        fontsize=9,
    )
    fig.savefig(args.out / "variance_grid.png", dpi=110)
    plt.close(fig)

    fig = on_train.plot()
    fig.axes[0].set_title("variance on the 20 training inputs\n(kernel part ≈ 0)", fontsize=9)
    fig.savefig(args.out / "fit_table.png", dpi=110)
    plt.close(fig)

    D = projected_samples(la, on_train.rank, 12, args.seed + 1)
    theta, fm = la.posterior.mean, la.fitted.fmodel
    with torch.no_grad():
        (f_map,) = fm(theta, grid).T
        J, _ = la.jacobians(grid)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True, layout="constrained")
    panels = [
        ("network, kernel-only samples", "kernel", False, "#D55E00"),
        ("linearised, kernel-only samples", "kernel", True, "#009E73"),
        ("network, non-kernel-only samples", "non-kernel", False, "#0072B2"),
    ]
    for ax, (title, kind, linear, color) in zip(axes, panels):
        for d in D[kind]:
            with torch.no_grad():
                f = (f_map + J[:, 0] @ d) if linear else fm(theta + d, grid)[:, 0]
            ax.plot(grid[:, 0], f, color=color, lw=0.9, alpha=0.6)
        ax.plot(grid[:, 0], f_map, color="k", lw=1.6, label="MAP")
        ax.plot(X[:, 0], y[:, 0], "o", ms=4, mfc="white", mec="k", label="data")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-4, 4)
        ax.set_xlabel("x")
        ax.grid(True, color="#e6e6e6")
    axes[0].set_ylabel("f(x)")
    axes[0].legend(fontsize=8, frameon=False, loc="lower left")
    fig.savefig(args.out / "functions.png", dpi=110)
    plt.close(fig)

    # -- the numbers --------------------------------------------------------------------------
    tot_train = on_train.predictive_variance.sum()
    rows = {(r.samples, r.model): r for r in on_train.sample_fit}
    rmse = {k: rows[(k, "network")].metric_mean for k in ("MAP", "kernel", "non-kernel", "full")}
    rmse_lin = {k: rows[(k, "linearised")].metric_mean for k in ("kernel", "non-kernel", "full")}
    summary = {
        "n_params": la.n_params,
        "rank": on_train.rank,
        "kernel_dim": on_train.kernel_dim,
        "kernel_variance_fraction": on_train.kernel_variance_fraction,
        "kernel_share_of_predictive_variance_on_train": float(
            on_train.predictive_variance_kernel.sum() / tot_train
        ),
        "kernel_share_of_predictive_variance_on_grid_max": float(
            (on_grid.predictive_variance_kernel / on_grid.predictive_variance).max()
        ),
        "train_rmse_map": rmse["MAP"],
        "train_rmse_network": rmse,
        "train_rmse_linearised": rmse_lin,
    }
    print(
        f"MAP training RMSE                               : {rmse['MAP']:.4f} (trained to {rmse_train:.4f})"
    )
    for kind in ("kernel", "non-kernel", "full"):
        r_net, r_lin = rows[(kind, "network")], rows[(kind, "linearised")]
        print(
            f"{kind + '-only' if kind != 'full' else 'full':<15} samples: training RMSE  network "
            f"{r_net.metric_mean:8.4f} ± {r_net.metric_std:.3g}   linearised "
            f"{r_lin.metric_mean:8.4f} ± {r_lin.metric_std:.3g}"
        )
    inc_k = rmse["kernel"] - rmse["MAP"]
    inc_n = rmse["non-kernel"] - rmse["MAP"]
    print(
        f"increase of the network's training RMSE over MAP: kernel-only {inc_k:.4f}, "
        f"non-kernel-only {inc_n:.4f} (ratio {inc_k / max(inc_n, 1e-12):.1f})"
    )
    print(
        "kernel part of the predictive variance on the training inputs: "
        f"{summary['kernel_share_of_predictive_variance_on_train']:.2e} of the total"
    )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
