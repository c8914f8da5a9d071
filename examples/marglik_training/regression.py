r"""Training with the evidence on a 1-D regression: the noise level and the width, no validation.

y = sin(2x) + ε, ε ~ N(0, 0.3²), N = 300 points with x uniform in [-3, 3]. A tanh MLP 1-W-1 is
trained by ``laplace_ggn.marglik_training`` with the full GGN posterior (the exact Laplace
evidence): the weights, the prior precision and the noise σ together, from the training
data alone. For each width W in 5 / 50 /
500 the script prints the learned σ (the truth is 0.3), the log evidence at the end of
training and the test NLL and RMSE of the GLM predictive on 1,000 fresh points, and marks
the width the evidence chooses; it draws the predictive of each width
(``marglik_regression.png``).

Run:  python examples/marglik_training/regression.py --out OUT_DIR [--seed N] [--small]
(a few minutes on a CPU; ``--small``: widths 5 and 20, a few seconds).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import marglik_training

SIGMA, N_TRAIN, N_TEST = 0.3, 300, 1000


def make_data(seed: int, n: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, torch.Tensor]:
    """Training and test sets of y = sin(2x) + 0.3 ε, x ~ U(-3, 3) (float64)."""
    g = torch.Generator().manual_seed(seed)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = 6 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 3
        return x, torch.sin(2 * x) + SIGMA * torch.randn(m, 1, generator=g, dtype=torch.float64)

    (x, y), (xt, yt) = draw(n), draw(n_test)
    return {"x": x, "y": y, "x_test": xt, "y_test": yt}


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1)).double()


def train(
    width: int,
    data: dict,
    seed: int,
    *,
    n_epochs: int = 300,
    prior_structure: str = "scalar",
    progress: bool = False,
) -> dict:
    """Train one width with the evidence; its σ, evidence, test NLL / RMSE and predictive."""
    model = mlp(width, seed)
    loader = DataLoader(
        TensorDataset(data["x"], data["y"]), batch_size=32, shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    start = time.perf_counter()
    res = marglik_training(
        model, loader, "regression", structure="full", prior_structure=prior_structure,
        n_epochs=n_epochs, optimizer_kwargs={"lr": 1e-2}, n_epochs_burnin=n_epochs // 6,
        marglik_frequency=10, n_hypersteps=50, progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    la = res.laplace
    pred = la.predict(data["x_test"])
    var = pred.variance
    nll = 0.5 * (torch.log(2 * math.pi * var) + (data["y_test"] - pred.mean) ** 2 / var)
    rmse = ((data["y_test"] - pred.mean) ** 2).mean().sqrt()
    return {
        "width": width,
        "sigma": float(res.sigma_noise),
        "log_evidence": float(la.log_marginal_likelihood()),
        "test_nll": float(nll.mean()),
        "test_rmse": float(rmse),
        "seconds": seconds,
        "laplace": la,
    }


def plot(rows: list[dict], data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = torch.linspace(-4, 4, 400, dtype=torch.float64).unsqueeze(1)
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.4), sharey=True)
    for ax, row in zip(axes, rows):
        pred = row["laplace"].predict(xs)
        m, s = pred.mean[:, 0], pred.variance[:, 0].sqrt()
        ax.scatter(data["x"][:, 0], data["y"][:, 0], s=4, color="0.6", label="training data")
        ax.plot(xs[:, 0], torch.sin(2 * xs[:, 0]), color="k", lw=1, ls="--", label="sin(2x)")
        ax.plot(xs[:, 0], m, color="C0", label="GLM mean")
        ax.fill_between(xs[:, 0], m - 2 * s, m + 2 * s, color="C0", alpha=0.25, label="± 2 sd")
        ax.set_title(
            f"width {row['width']}: σ = {row['sigma']:.3f}, log ev. = {row['log_evidence']:.1f}\n"
            f"test NLL = {row['test_nll']:.3f}",
            fontsize=9,
        )
        ax.set_xlabel("x")
        ax.set_ylim(-2.5, 2.5)
    axes[0].set_ylabel("y")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="widths 5 and 20, few epochs")
    args = parser.parse_args(argv)
    widths, epochs = ((5, 20), 40) if args.small else ((5, 50, 500), 300)
    data = make_data(args.seed, n=80 if args.small else N_TRAIN)
    rows = [train(w, data, args.seed, n_epochs=epochs) for w in widths]
    best_ev = max(rows, key=lambda r: r["log_evidence"])
    best_nll = min(rows, key=lambda r: r["test_nll"])
    print(
        f"{'width':>6} {'sigma':>7} {'log evidence':>13} {'test NLL':>9} {'test RMSE':>10} {'s':>6}"
    )
    for r in rows:
        mark = "  <- evidence" if r is best_ev else ""
        print(
            f"{r['width']:>6} {r['sigma']:>7.3f} {r['log_evidence']:>13.2f} {r['test_nll']:>9.3f} "
            f"{r['test_rmse']:>10.3f} {r['seconds']:>6.1f}{mark}"
        )
    print(f"true sigma {SIGMA}; best test NLL at width {best_nll['width']}")
    args.out.mkdir(parents=True, exist_ok=True)
    figure = plot(rows, data, args.out / "marglik_regression.png")
    return {
        "rows": [{k: v for k, v in r.items() if k != "laplace"} for r in rows],
        "evidence_choice": best_ev["width"],
        "nll_choice": best_nll["width"],
        "figure": str(figure),
    }


if __name__ == "__main__":
    main()
