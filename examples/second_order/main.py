r"""Inverse-curvature-vector products of a small sigmoid MLP: exact vs CG vs Neumann.

A 3 -> 5 -> 1 sigmoid MLP (P = 26) on 10 random points with the squared-error loss
ℓ(θ) = Σ_n ½(f(x_n) - y_n)² and a prior precision α (so the systems are those of a Laplace
posterior precision, and of a damped Newton / natural-gradient step):

    (H + αI) x = g      and      (G + αI) x = g,      g = ∇ℓ(θ).

Both are solved exactly (dense ``torch.linalg.solve``), by conjugate gradients
(:func:`laplace_ggn.linalg.cg`) and by the Neumann series (:func:`laplace_ggn.linalg.neumann`,
scale 1/λ_max from power iteration), touching the matrices only through products
(Hessian-vector products by double backward, GGN products as Jᵀ(Jv) on a retained autograd
graph).  It reports the
relative error ‖x̂ - x‖/‖x‖ and the cosine similarity to the exact solution, the number of
products each method used, and the products needed to reach a relative error of 1e-6.

Two points are examined: the random initialisation (where the Hessian is usually indefinite,
so CG stops with a warning and the Neumann series is refused) and the MAP reached by a few
:class:`laplace_ggn.optim.NaturalGradient` steps.

Run:  python examples/second_order/main.py --out OUT_DIR [--small]
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.func import functional_call

from laplace_ggn.linalg import cg, lanczos, neumann
from laplace_ggn.operators import CallableOperator
from laplace_ggn.optim import NaturalGradient

DT = torch.float64
TARGET = 1e-6


def make_problem(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 1)).to(DT)
    x = torch.randn(10, 3, dtype=DT)
    y = torch.randn(10, 1, dtype=DT)
    return model, x, y


def flat_fn(model: nn.Module, x: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def f(theta: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            params[n] = theta[i : i + k].reshape(s)
            i += k
        return functional_call(model, params, (x,))

    return f


class Problem:
    """Loss, gradient and matrix-free H / G products at θ, plus dense references."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float):
        self.f = flat_fn(model, x)
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        self.P = self.theta.numel()
        self.alpha = alpha
        self.y = y

        def loss(t: torch.Tensor) -> torch.Tensor:
            return 0.5 * ((self.f(t) - y) ** 2).sum()

        self.loss = loss
        t = self.theta.clone().requires_grad_(True)
        (self.g,) = torch.autograd.grad(loss(t), t)
        self.H = torch.autograd.functional.hessian(loss, self.theta)
        J = torch.autograd.functional.jacobian(self.f, self.theta).reshape(-1, self.P)
        self.G = J.T @ J
        self._ops: dict[str, CallableOperator] = {}

    def operator(self, kind: str) -> CallableOperator:
        """Matrix-free (A + αI) with A = H (forward-over-reverse) or G (Jᵀ(Jv)); cached."""
        if kind not in self._ops:
            self._ops[kind] = self._operator(kind)
        return self._ops[kind]

    def _operator(self, kind: str) -> CallableOperator:
        # products on a retained autograd graph: Hv by double backward, Jv by the
        # double-vjp trick (Jv = ∂/∂u [(Jᵀu)·v]), Jᵀw by one backward pass
        theta = self.theta.clone().requires_grad_(True)
        if kind == "hessian":
            (grad,) = torch.autograd.grad(self.loss(theta), theta, create_graph=True)

            def one(v: torch.Tensor) -> torch.Tensor:
                (Hv,) = torch.autograd.grad(grad, theta, v, retain_graph=True)
                return Hv + self.alpha * v
        else:
            f = self.f(theta)
            u = torch.zeros_like(f, requires_grad=True)
            (JTu,) = torch.autograd.grad(f, theta, u, create_graph=True)

            def one(v: torch.Tensor) -> torch.Tensor:
                (Jv,) = torch.autograd.grad(JTu, u, v, retain_graph=True)
                (JTJv,) = torch.autograd.grad(f, theta, Jv, retain_graph=True)
                return JTJv + self.alpha * v

        def matmat(V: torch.Tensor) -> torch.Tensor:
            return torch.stack([one(v) for v in V.T], dim=1)

        return CallableOperator(matmat, self.P, dtype=DT)

    def dense(self, kind: str) -> torch.Tensor:
        A = self.H if kind == "hessian" else self.G
        return A + self.alpha * torch.eye(self.P, dtype=DT)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)))


def run_cg(prob: Problem, kind: str, exact: torch.Tensor, max_iter: int) -> dict:
    errs: list[float] = []
    op = prob.operator(kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = cg(
            op,
            prob.g,
            tol=1e-14,
            max_iter=max_iter,
            callback=lambda xk: errs.append(rel_err(xk, exact)),
        )
    hit = next((i + 1 for i, e in enumerate(errs) if e <= TARGET), None)
    return {
        "method": "CG",
        "products": res.n_products,
        "rel_err": rel_err(res.solution, exact),
        "cosine": cosine(res.solution, exact),
        "to_target": hit,
        "curve": errs,
        "note": "stopped: p^T A p <= 0 (indefinite)" if caught else "",
    }


def run_neumann(prob: Problem, kind: str, exact: torch.Tensor, n_terms: int) -> dict:
    errs: list[float] = []
    op = prob.operator(kind)
    try:
        res = neumann(
            op,
            prob.g,
            n_terms=n_terms,
            n_power_iter=200,
            tol=1e-13,
            generator=torch.Generator().manual_seed(0),
            callback=lambda xk: errs.append(rel_err(xk, exact)),
        )
    except ValueError as err:
        return {
            "method": "Neumann",
            "products": None,
            "rel_err": None,
            "cosine": None,
            "to_target": None,
            "curve": [],
            "note": "refused: " + str(err).split(";")[0],
        }
    spent_on_spectrum = res.n_products - (res.n_terms - 1)
    hit = next((spent_on_spectrum + i for i, e in enumerate(errs) if e <= TARGET), None)
    # the error contracts by rho = max |1 - s lambda_i| per term (eigenvalues from eigh)
    rho = float((1 - res.scale * torch.linalg.eigvalsh(prob.dense(kind))).abs().max())
    predicted = spent_on_spectrum + math.ceil(math.log(TARGET / errs[0]) / math.log(rho))
    return {
        "method": "Neumann",
        "products": res.n_products,
        "rel_err": rel_err(res.solution, exact),
        "cosine": cosine(res.solution, exact),
        "to_target": hit,
        "curve": errs,
        "offset": spent_on_spectrum,
        "note": f"s = 1/lambda_max = {res.scale:.3g} ({spent_on_spectrum} power-iteration "
        f"products), rho = {rho:.6f}: ~{predicted} products to 1e-6 predicted",
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    parser.add_argument("--small", action="store_true", help="fewer Neumann terms")
    parser.add_argument("--alpha", type=float, default=0.1, help="prior precision / damping")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    n_terms = 300 if args.small else 10000
    cg_iter = 200

    model, x, y = make_problem(args.seed)
    points = {"initialisation": Problem(model, x, y, args.alpha)}
    opt = NaturalGradient(model.parameters(), damping=0.1, prior_precision=args.alpha)
    for _ in range(30):
        opt.step(lambda: (model(x), y))
    points["MAP (30 NGD steps)"] = Problem(model, x, y, args.alpha)

    rows: list[dict] = []
    spectra = {}
    for point, prob in points.items():
        gnorm = float(torch.linalg.vector_norm(prob.g))
        map_grad = float(torch.linalg.vector_norm(prob.g + args.alpha * prob.theta))
        print(
            f"\n== {point}: loss {float(prob.loss(prob.theta)):.4f}, |g| = {gnorm:.3e}, "
            f"|g + alpha theta| = {map_grad:.1e} (gradient with the prior), P = {prob.P}"
        )
        for kind in ("hessian", "ggn"):
            A = prob.dense(kind)
            evals = torch.linalg.eigvalsh(A)
            top = lanczos(
                prob.operator(kind), 3, n_iter=prob.P, generator=torch.Generator().manual_seed(0)
            )[0]
            assert torch.allclose(top, evals.flip(0)[:3], rtol=1e-8, atol=1e-10)
            spectra[(point, kind)] = evals
            exact = torch.linalg.solve(A, prob.g)
            print(
                f"  {kind} + alpha I: eigenvalues in [{evals[0]:.3e}, {evals[-1]:.3e}]"
                + (
                    f", condition number {float(evals[-1] / evals[0]):.3g}"
                    if evals[0] > 0
                    else ", indefinite"
                )
            )
            for r in (run_cg(prob, kind, exact, cg_iter), run_neumann(prob, kind, exact, n_terms)):
                r.update(point=point, matrix=kind)
                rows.append(r)

    print(
        f"\nSolving (A + alpha I) x = g, alpha = {args.alpha}; relative error and cosine to the exact solve"
    )
    head = f"{'point':20s} {'matrix':8s} {'method':8s} {'products':>9s} {'rel. error':>11s} {'cosine':>9s} {'to 1e-6':>9s}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)
        hit = "-" if r["to_target"] is None else str(r["to_target"])
        if r["to_target"] is None and r["products"] is not None:
            hit = f">{r['products']}"
        print(
            f"{r['point']:20s} {r['matrix']:8s} {r['method']:8s} {fmt(r['products'], 'd'):>9s} "
            f"{fmt(r['rel_err'], '.2e'):>11s} {fmt(r['cosine'], '.6f'):>9s} {hit:>9s}  {r['note']}"
        )

    # figure: error curves per point, and the spectra
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {
        ("hessian", "CG"): ("C0", "-"),
        ("hessian", "Neumann"): ("C0", "--"),
        ("ggn", "CG"): ("C1", "-"),
        ("ggn", "Neumann"): ("C1", "--"),
    }
    for ax, point in zip(axes[:2], points):
        for r in rows:
            if r["point"] != point or not r["curve"]:
                continue
            off = r.get("offset", 0)
            steps = torch.arange(1, len(r["curve"]) + 1) + off
            c, ls = styles[(r["matrix"], r["method"])]
            label = f"{'H' if r['matrix'] == 'hessian' else 'G'} + αI, {r['method']}"
            ax.loglog(steps, r["curve"], color=c, ls=ls, label=label)
        ax.axhline(TARGET, color="0.5", lw=0.8, ls=":")
        ax.set(
            xlabel="curvature-vector products",
            ylabel="relative error to exact solve",
            title=f"{point}",
            ylim=(1e-12, 1e2),
        )
        ax.legend(fontsize=8)
    ax = axes[2]
    for (point, kind), ev in spectra.items():
        c = "C0" if kind == "hessian" else "C1"
        ls = "-" if point == "initialisation" else "--"
        ax.plot(
            torch.arange(1, len(ev) + 1),
            ev.flip(0),
            color=c,
            ls=ls,
            marker=".",
            label=f"{'H' if kind == 'hessian' else 'G'} + αI, {point}",
        )
    ax.set_yscale("symlog", linthresh=args.alpha / 10)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set(xlabel="index (descending)", ylabel="eigenvalue (symlog)", title="Spectra (eigh)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = args.out / "second_order.png"
    fig.savefig(path, dpi=90 if not args.small else 60)
    plt.close(fig)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
