r"""Gradient, natural-gradient (GGN) and empirical-Fisher vector fields of a linear regression.

Reproduces the vector-field figure of Kunstner, Balles & Hennig (2019), "Limitations of the
empirical Fisher approximation for natural gradient descent":

    N = 1000,  x ~ LogNormal(0, 0.75),  y = 2 + 2x + N(0, 1),  f(x) = θ_b + θ x,
    prior θ ~ N(0, 0.1 I)  (prior precision α = 10).

With ℓ(θ) = Σ_n ½(y_n - f(x_n))² + ½α‖θ‖² and the mean-normalised gradient g = ∇ℓ/N, the
three fields are

    GD:   -(1/3) g,
    NGD:  -(H/N)⁻¹ g  = -(G + αI)⁻¹ ∇ℓ   (the GGN equals the Hessian: f is linear in θ),
    EF:   -3 (EF/N)⁻¹ g = -3 (Σ_n g_n g_nᵀ + αI)⁻¹ ∇ℓ,

drawn on a 15×15 grid over [-1, 5]², over the loss contours, with Euler trajectories of each
field from (2, 4.5), (1, 0), (4.5, 3) and (-0.5, 3).  The NGD steps are taken by
:class:`laplace_ggn.optim.NaturalGradient` (``curvature="ggn"`` / ``"ef"``, no damping, the
prior as ``prior_precision``); each step is one CG solve on GGN- or EF-vector products.

Coordinates are (θ_b, θ): bias on the horizontal axis, slope on the vertical axis.

Run:  python examples/linear_regression/main.py --out OUT_DIR [--small]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from laplace_ggn.optim import NaturalGradient

DT = torch.float64
PRIOR_VAR = 0.1
STARTS = [(2.0, 4.5), (1.0, 0.0), (4.5, 3.0), (-0.5, 3.0)]


class Line(nn.Module):
    """f(x) = θ_b + θ x with parameters stored as one vector (θ_b, θ)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.theta[0] + self.theta[1] * x)[:, None]


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(0.75 * torch.randn(n, generator=g, dtype=DT))
    y = 2.0 + 2.0 * x + torch.randn(n, generator=g, dtype=DT)
    return x, y[:, None]


def loss_sum(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ(θ) for θ of shape (..., 2) (constants of the likelihood dropped)."""
    f = theta[..., :1] + theta[..., 1:] * x
    return 0.5 * ((f - y[:, 0]) ** 2).sum(-1) + 0.5 / PRIOR_VAR * (theta**2).sum(-1)


class Fields:
    """Directions of the three fields at a point, each from one optimizer step of size h."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.n = x, y, len(x)
        self.model = Line()
        alpha = 1.0 / PRIOR_VAR
        common = {
            "likelihood": "regression",
            "damping": 0.0,
            "prior_precision": alpha,
            "cg_tol": 1e-12,
        }
        self.ngd = NaturalGradient(self.model.parameters(), curvature="ggn", **common)
        self.ef = NaturalGradient(self.model.parameters(), curvature="ef", **common)
        self.products = {"ngd": 0, "ef": 0}

    def _ng(self, opt: NaturalGradient, key: str, theta: torch.Tensor, h: float) -> torch.Tensor:
        with torch.no_grad():
            self.model.theta.copy_(theta)
        for group in opt.param_groups:
            group["lr"] = h
        opt.step(lambda: (self.model(self.x), self.y))
        self.products[key] += opt.last_solve.n_products
        return self.model.theta.detach().clone() - theta

    def gd(self, theta: torch.Tensor, h: float) -> torch.Tensor:
        t = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_sum(t, self.x, self.y), t)
        return -h * g / (3.0 * self.n)

    def natural(self, theta: torch.Tensor, h: float) -> torch.Tensor:
        return self._ng(self.ngd, "ngd", theta, h)

    def empirical(self, theta: torch.Tensor, h: float) -> torch.Tensor:
        return self._ng(self.ef, "ef", theta, 3.0 * h)


def euler(step, start: tuple[float, float], h: float, n_steps: int) -> torch.Tensor:
    path = [torch.tensor(start, dtype=DT)]
    for _ in range(n_steps):
        path.append(path[-1] + step(path[-1], h))
    return torch.stack(path)


def deviation_from_segment(path: torch.Tensor, end: torch.Tensor) -> float:
    """Largest distance of the path from the straight segment start -> end, over its length."""
    a, d = path[0], end - path[0]
    length = torch.linalg.vector_norm(d)
    t = ((path - a) @ d / length**2).clamp(0.0, 1.0)
    dist = torch.linalg.vector_norm(path - (a + t[:, None] * d), dim=1)
    return float(dist.max() / length)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    parser.add_argument("--small", action="store_true", help="fewer data, grid points, steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    n_data, n_grid, h, t_end = (100, 6, 0.2, 6.0) if args.small else (1000, 15, 0.05, 8.0)
    x, y = make_data(n_data, args.seed)
    X = torch.stack([torch.ones_like(x), x], dim=1)
    alpha = 1.0 / PRIOR_VAR
    theta_star = torch.linalg.solve(X.T @ X + alpha * torch.eye(2, dtype=DT), X.T @ y[:, 0])
    fields = Fields(x, y)
    kinds = [
        ("gd", r"GD: $-\frac{1}{3}\,g$", fields.gd),
        ("ngd", r"NGD (GGN = Hessian): $-H^{-1} g$", fields.natural),
        ("ef", r"Empirical Fisher: $-3\,\widetilde{F}^{-1} g$", fields.empirical),
    ]

    # vector fields on the grid
    ticks = torch.linspace(-1.0, 5.0, n_grid, dtype=DT)
    TB, TW = torch.meshgrid(ticks, ticks, indexing="xy")
    grid = torch.stack([TB.flatten(), TW.flatten()], dim=1)
    arrows = {k: torch.stack([fn(p, 1.0) for p in grid]) for k, _, fn in kinds}

    # Euler trajectories
    n_steps = round(t_end / h)
    paths = {k: [euler(fn, s, h, n_steps) for s in STARTS] for k, _, fn in kinds}

    # numbers: straightness and distance to the optimum
    report: dict = {"theta_star": theta_star.tolist(), "h": h, "n_steps": n_steps}
    print(f"data: N={n_data}, MAP (theta_b, theta) = ({theta_star[0]:.4f}, {theta_star[1]:.4f})")
    print(f"Euler step h={h}, {n_steps} steps (time {t_end})")
    print(f"{'field':6s} {'start':>12s} {'max dev/len':>12s} {'end dist':>10s}")
    for k, _, _ in kinds:
        devs, ends = [], []
        for s, path in zip(STARTS, paths[k]):
            dev = deviation_from_segment(path, theta_star)
            end = float(torch.linalg.vector_norm(path[-1] - theta_star))
            devs.append(dev)
            ends.append(end)
            print(f"{k:6s} {s!s:>12s} {dev:12.2e} {end:10.2e}")
        report[k] = {"max_deviation": max(devs), "end_distance": ends}
    print(
        f"max relative deviation from the straight segment to the MAP: "
        f"NGD {report['ngd']['max_deviation']:.1e}, EF {report['ef']['max_deviation']:.2f}, "
        f"GD {report['gd']['max_deviation']:.2f}"
    )
    print(
        f"CG products (curvature-vector) over all steps: NGD {fields.products['ngd']}, "
        f"EF {fields.products['ef']}"
    )

    # figure: data panel + three fields
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.4))
    ax = axes[0]
    ax.scatter(x, y[:, 0], s=4, alpha=0.35, color="0.3", label="data")
    xs = torch.linspace(0.0, float(x.max()), 100, dtype=DT)
    ax.plot(xs, theta_star[0] + theta_star[1] * xs, color="C3", lw=2, label="MAP fit")
    ax.plot(xs, 2 + 2 * xs, color="C0", lw=1, ls="--", label="truth 2 + 2x")
    ax.set(xlabel="x", ylabel="y", title=f"Data (N={n_data})")
    ax.legend(loc="upper left", fontsize=8)

    fine = torch.linspace(-1.0, 5.0, 121, dtype=DT)
    FB, FW = torch.meshgrid(fine, fine, indexing="xy")
    L = loss_sum(torch.stack([FB, FW], dim=-1).reshape(-1, 2), x, y).reshape(FB.shape)
    levels = torch.quantile(L.flatten(), torch.linspace(0.002, 0.9, 12, dtype=DT)).tolist()
    spacing = 6.0 / (n_grid - 1)
    scale = float(torch.linalg.vector_norm(arrows["ngd"], dim=1).quantile(0.9)) / (0.9 * spacing)
    colors = ["C0", "C1", "C2", "C4"]
    for ax, (k, title, _) in zip(axes[1:], kinds):
        ax.contour(FB, FW, L, levels=sorted(set(levels)), colors="0.75", linewidths=0.8)
        ax.quiver(
            grid[:, 0],
            grid[:, 1],
            arrows[k][:, 0],
            arrows[k][:, 1],
            angles="xy",
            scale_units="xy",
            scale=scale,
            width=0.004,
            color="0.35",
        )
        for c, s, path in zip(colors, STARTS, paths[k]):
            ax.plot(path[:, 0], path[:, 1], color=c, lw=2)
            ax.plot(*s, "o", color=c, ms=5)
        ax.plot(*theta_star.tolist(), "*", color="C3", ms=13, mec="k", label="MAP")
        ax.set(
            xlim=(-1.3, 5.3),
            ylim=(-1.3, 5.3),
            xlabel=r"bias $\theta_b$",
            ylabel=r"slope $\theta$",
            title=title,
            aspect="equal",
        )
    axes[1].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = args.out / "vecfield.png"
    fig.savefig(path, dpi=80 if not args.small else 50)
    plt.close(fig)
    print(f"wrote {path}")
    report["png"] = str(path)
    return report


if __name__ == "__main__":
    main()
