"""Confidence far from the data: test inputs scaled ×1 … ×100, every structure × link, 3 seeds.

Cases (scikit-learn's bundled or generated data, inputs standardised on the training split,
ReLU networks trained with Adam and weight decay α/N, α = 5, float64):

- ``digits-mlp``: the demo's MLP 64-16-16-10 (P = 1,482) and splits (``laplace_ggn.cli``);
- ``digits-cnn``: conv 3×3 (8) - ReLU - max-pool - conv 3×3 (8) - ReLU - max-pool - linear
  32-10 on the same digits as 1×8×8 images (P = 994);
- ``moons``: 600 points, noise 0.2, MLP 2-32-32-2 (P = 1,218);
- ``iris``: MLP 4-16-16-3 (P = 403), 90 / 30 / 30 points;
- ``synth15``: 1,500 points of ``make_classification`` (20 features, 15 classes), MLP
  20-24-24-15 (P = 1,479).

Structures: full, diag, kfac, lowrank (top-50), projected and last-layer (full on the last
``nn.Linear``), prior precision α tuned by the evidence (``optimize_prior_precision()``);
links: the GLM predictive with probit, bridge and mc (100 draws), and the sampled network
(``method="nn"``, 100 draws). For every scale s: the mean max-confidence on the test inputs
times s, and the AUROC of test inputs (×1) against test inputs ×s by the max-confidence
(1: far-away inputs all less confident; 0.5: no separation; below 0.5: more confident).
MAP (the softmax of the network) is the baseline.

Also measured: gridsearch on the validation split instead of the evidence (probit); three
extra output variances added to the linearised logits of the full posterior (a constant, as
from a wide prior on the last layer's bias; one growing like ‖x‖², as from a wide prior over
the input-scale direction; one growing like ‖x‖³, the infinite-ReLU-feature GP residual of
``laplace_ggn.relu_gp``); and the projected posterior against MAP under Gaussian-noise shift
and on uniform noise, with the rank R of its Jacobian range against P.

    python benchmarks/bench_far_from_data.py                 # 3 seeds, the tables of docs/far-from-data.md
    python benchmarks/bench_far_from_data.py --quick         # 1 seed, two cases: a smoke run
    python benchmarks/bench_far_from_data.py --plot docs/img/far_from_data.png
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from laplace_ggn import LaplaceWrapper  # noqa: E402
from laplace_ggn._checks import Link  # noqa: E402
from laplace_ggn.calibration import classification_metrics  # noqa: E402
from laplace_ggn.cli import DemoConfig, load_digits_splits, train_mlp  # noqa: E402
from laplace_ggn.glm import functional_moments, glm_from_moments  # noqa: E402
from laplace_ggn.marglik import tune_predictive_temperature  # noqa: E402
from laplace_ggn.predictive import Prediction, temper  # noqa: E402
from laplace_ggn.relu_gp import predict_relu_gp  # noqa: E402

DTYPE = torch.float64
SCALES = (1, 2, 5, 10, 20, 50, 100)
CASES = ("digits-mlp", "digits-cnn", "moons", "iris", "synth15")
STRUCTURES = ("full", "diag", "kfac", "lowrank", "projected", "last-layer")
LINKS = ("probit", "bridge", "mc", "nn")
GRID = ("full", "kfac")  # structures also tuned by gridsearch (17 points, 1e-4 … 1e4)
N_TEST = 200  # test inputs per case (the first of the test split)
LOWRANK_RANK = 50
RELU_GP = (0.1, 1.0, 10.0, 100.0)  # σ² of the DSCS residual
EXTRA = {"constant": 0, "‖x‖²": 2, "‖x‖³ (relu_gp)": 3}  # power of |x_i| in the extra variance


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def auroc(c_in: torch.Tensor, c_out: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    truth = torch.cat([torch.ones_like(c_in), torch.zeros_like(c_out)])
    return float(roc_auc_score(truth.numpy(), torch.cat([c_in, c_out]).numpy()))


# ------------------------------------------------------------------------------- data, models


def _split(X, y, n_val, n_test, seed):
    X, y = torch.as_tensor(X, dtype=DTYPE), torch.as_tensor(y, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    te, va, tr = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    mean, std = X[tr].mean(0), X[tr].std(0).clamp_min(1e-6)
    d = {f"x_{k}": (X[i] - mean) / std for k, i in (("train", tr), ("val", va), ("test", te))}
    d.update({f"y_{k}": y[i] for k, i in (("train", tr), ("val", va), ("test", te))})
    return d


def _train(model, x, y, *, epochs, seed, batch=128, alpha=5.0):
    torch.manual_seed(seed)
    model = model.to(DTYPE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=alpha / x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch):
            idx = perm[i : i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _mlp(d_in, h, c, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, c))


def make_case(name: str, seed: int) -> tuple[dict, nn.Module]:
    """Splits (standardised on the training split) and the trained network of a case."""
    from sklearn import datasets

    if name.startswith("digits"):
        d = load_digits_splits(DemoConfig(), seed=seed)
        if name == "digits-mlp":
            return d, train_mlp(d["x_train"], d["y_train"], DemoConfig(), seed=seed, progress=False)
        d = {k: (v.reshape(-1, 1, 8, 8) if k.startswith("x_") else v) for k, v in d.items()}
        torch.manual_seed(seed)
        cnn = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32, 10),
        )  # fmt: skip
        return d, _train(cnn, d["x_train"], d["y_train"], epochs=40, seed=seed)
    if name == "moons":
        X, y = datasets.make_moons(n_samples=600, noise=0.2, random_state=seed)
        d = _split(X, y, 100, 100, seed)
        return d, _train(_mlp(2, 32, 2, seed), d["x_train"], d["y_train"], epochs=100, seed=seed)
    if name == "iris":
        X, y = datasets.load_iris(return_X_y=True)
        d = _split(X, y, 30, 30, seed)
        return d, _train(_mlp(4, 16, 3, seed), d["x_train"], d["y_train"], epochs=300, seed=seed)
    X, y = datasets.make_classification(
        n_samples=1500, n_features=20, n_informative=10, n_redundant=0, n_classes=15,
        n_clusters_per_class=1, class_sep=2.0, random_state=seed,
    )  # fmt: skip
    d = _split(X, y, 200, 300, seed)
    return d, _train(_mlp(20, 24, 15, seed), d["x_train"], d["y_train"], epochs=60, seed=seed)


# ------------------------------------------------------------------------------ predictions


def wrapper(model, structure: str) -> LaplaceWrapper:
    if structure == "last-layer":
        return LaplaceWrapper(model, "classification", structure="full", subset="last_layer",
                              prior_precision=5.0)  # fmt: skip
    rank = LOWRANK_RANK if structure == "lowrank" else None
    return LaplaceWrapper(
        model, "classification", structure=structure, rank=rank, prior_precision=5.0
    )


def moments(la, x):
    """Outputs at θ* and J Σ Jᵀ (dense), the GLM predictive's inputs (``la.predict`` = link of these)."""
    fitted = la.fitted
    with torch.no_grad():
        return functional_moments(fitted.fmodel, fitted.posterior, x,
                                  n_outputs=fitted.statistics.n_outputs, head=fitted.head)  # fmt: skip


def extra_variance(x, power: int, variance: float):
    """σ² · mean_i |x_i|^p / p (p = 3: the DSCS variance of ``relu_gp``), σ² for p = 0."""
    h = x.reshape(x.shape[0], -1).abs()
    if power == 0:
        return torch.full((len(h),), variance, dtype=h.dtype)
    return variance * h.pow(power).mean(-1) / power


def link_probs(f, cov, link, gen, extra=None):
    if extra is not None:
        cov = cov + extra[:, None, None] * torch.eye(cov.shape[-1], dtype=cov.dtype)
    link = Link(link)  # an enum: older glm_from_moments read a name as the mc link
    return glm_from_moments(f, cov, likelihood="classification", link=link, generator=gen).mean


def curve_from(probs: dict, data) -> dict:
    """Mean confidence per scale, AUROC ×1 vs ×s, NLL at ×1, from ``{scale: probs}``."""
    conf = {s: p.max(-1).values for s, p in probs.items()}
    return {
        "conf": {s: float(c.mean()) for s, c in conf.items()},
        "auroc": {s: auroc(conf[1], c) for s, c in conf.items() if s > 1},
        "nll": float(classification_metrics(probs[1], data["y_test"])["nll"]),
    }


def curve(prob_fn, data, scales=SCALES) -> dict:
    return curve_from({s: prob_fn(data["x_test"] * s) for s in scales}, data)


def shift_ood(prob_fn, data, seed) -> dict:
    """NLL under Gaussian-noise shift (σ = 1 standardised unit) and AUROC against uniform noise."""
    gen = torch.Generator().manual_seed(seed)
    x = data["x_test"]
    noisy = x + torch.randn(x.shape, generator=gen, dtype=x.dtype)
    lo, hi = data["x_train"].amin(0), data["x_train"].amax(0)
    uniform = lo + (hi - lo) * torch.rand(x.shape, generator=gen, dtype=x.dtype)
    p_in, p_sh, p_un = prob_fn(x), prob_fn(noisy), prob_fn(uniform)
    return {
        "shift_nll": float(classification_metrics(p_sh, data["y_test"])["nll"]),
        "uniform_auroc": auroc(p_in.max(-1).values, p_un.max(-1).values),
    }


def temperature_curves(la, data, mom, gen, curves) -> dict:
    """kfac, evidence + T on the validation split, with and without the relu_gp residual."""
    x_val = data["x_val"]
    val = moments(la, x_val)
    temps = {}
    for v in (0.0, *RELU_GP):
        p_val = link_probs(*val, "probit", gen, extra_variance(x_val, 3, v))
        T = float(tune_predictive_temperature(p_val, data["y_val"]).temperature)
        probs = {s: temper(Prediction(p, p * 0), T).mean for s, p in (
            (s, link_probs(*m, "probit", gen, extra_variance(data["x_test"] * s, 3, v))) for s, m in mom.items())}  # fmt: skip
        name = "kfac, evidence + T" + (f" + relu_gp σ²={v:g}" if v else "")
        curves[(name, "probit")] = curve_from(probs, data)
        temps[name] = T
    return temps


def one(case: str, seed: int, structures, links) -> dict:
    data, model = make_case(case, seed)
    data["x_test"], data["y_test"] = data["x_test"][:N_TEST], data["y_test"][:N_TEST]
    train = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=128)
    val = DataLoader(TensorDataset(data["x_val"], data["y_val"]), batch_size=128)
    out: dict = {"curves": {}, "grid": {}, "extra": {}, "shift": {}, "alpha": {}, "rank": {}}

    def map_probs(x):
        with torch.no_grad():
            return model(x).softmax(-1)

    out["curves"][("MAP", "")] = curve(map_probs, data)
    out["shift"]["MAP"] = shift_ood(map_probs, data, seed)
    out["P"] = sum(p.numel() for p in model.parameters())
    for structure in structures:
        t0 = time.perf_counter()
        la = wrapper(model, structure).fit(train, progress=False)
        if structure in GRID:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the edge-of-grid warning
                la.optimize_prior_precision("gridsearch", val_loader=val, n_points=17)
            out["grid"][structure] = {"alpha": float(la.prior_precision),
                                      **curve(lambda x: la.predict(x).mean, data, (1, 10))}  # fmt: skip
            la.set_hyperparameters(prior_precision=5.0)
        la.optimize_prior_precision("marglik")
        out["alpha"][structure] = float(la.prior_precision)
        gen = torch.Generator().manual_seed(seed)
        mom = {s: moments(la, data["x_test"] * s) for s in SCALES}
        for link in links:
            if link == "nn":
                fn = lambda x: la.predict(x, "nn", n_samples=100, generator=gen).mean  # noqa: E731
                out["curves"][(structure, link)] = curve(fn, data)
            else:
                probs = {s: link_probs(*m, link, gen) for s, m in mom.items()}
                out["curves"][(structure, link)] = curve_from(probs, data)
        if structure in ("projected", "kfac", "full"):
            out["shift"][f"{structure}, probit"] = shift_ood(
                lambda x: la.predict(x).mean, data, seed
            )
        if structure == "projected":
            out["shift"]["projected, nn"] = shift_ood(
                lambda x: la.predict(x, "nn", n_samples=100, generator=gen).mean, data, seed
            )
            out["rank"] = {"R": int(la.posterior.rank), "P": la.n_params}
        if structure in ("full", "kfac"):
            for v in RELU_GP:
                probs = {s: link_probs(*m, "probit", gen, extra_variance(data["x_test"] * s, 3, v))
                         for s, m in mom.items()}  # fmt: skip
                out["curves"][(f"{structure} + relu_gp σ²={v:g}", "probit")] = curve_from(
                    probs, data
                )
            out["shift"][f"{structure}, probit + relu_gp σ²=1"] = shift_ood(
                lambda x: predict_relu_gp(la, x, variance=1.0).mean, data, seed
            )
        if structure == "kfac":
            out["T"] = temperature_curves(la, data, mom, gen, out["curves"])
        if structure == "full":
            for name, power in EXTRA.items():
                for v in (1.0, 10.0):
                    probs = {s: link_probs(*m, "probit", gen, extra_variance(data["x_test"] * s, power, v))
                             for s, m in mom.items()}  # fmt: skip
                    out["extra"][(name, v)] = curve_from(probs, data)
        log(f"  {case} seed {seed}: {structure} ({time.perf_counter() - t0:.1f} s)")
    return out


# ----------------------------------------------------------------------------------- tables


def _mean(vals):
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(t) > 1 else float("nan"))


def _fmt(vals, spec=".3f"):
    m, s = _mean(vals)
    return f"{m:{spec}}" + ("" if s != s else f" ± {s:{spec}}")


def curve_table(results: dict, case: str, keys) -> str:
    head = "| setting | NLL ×1 | " + " | ".join(f"conf ×{s}" for s in SCALES)
    head += " | " + " | ".join(f"AUROC ×{s}" for s in (2, 10, 100)) + " |"
    lines = [head, "|---|" + "---|" * (1 + len(SCALES) + 3)]
    for key in keys:
        rows = [r["curves"][key] for r in results[case] if key in r["curves"]]
        if not rows:
            continue
        name = key[0] + (f", {key[1]}" if key[1] else "")
        cells = [_fmt([r["nll"] for r in rows])]
        cells += [f"{_mean([r['conf'][s] for r in rows])[0]:.3f}" for s in SCALES]
        cells += [_fmt([r["auroc"][s] for r in rows], ".2f") for s in (2, 10, 100)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(results: dict, keys) -> str:
    lines = ["| setting | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for key in keys:
        cells = []
        for case in results:
            rows = [r["curves"][key] for r in results[case] if key in r["curves"]]
            cells.append(_fmt([r["auroc"][10] for r in rows], ".2f") if rows else "–")
        lines.append(f"| {key[0]}{', ' + key[1] if key[1] else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict, structures, links) -> str:
    keys = [("MAP", "")] + [(s, lk) for s in structures for lk in links]
    gp = [(f"{s} + relu_gp σ²={v:g}", "probit") for s in ("full", "kfac") for v in RELU_GP]
    gp += [
        ("kfac, evidence + T" + (f" + relu_gp σ²={v:g}" if v else ""), "probit")
        for v in (0, *RELU_GP)
    ]
    parts = ["## AUROC of test inputs ×1 against ×10 (mean ± std over seeds)\n",
             summary_table(results, keys + gp)]  # fmt: skip
    for case in results:
        P = results[case][0]["P"]
        parts += [f"\n## {case} (P = {P})\n", curve_table(results, case, keys + gp)]
        alpha = {s: [r["alpha"][s] for r in results[case]] for s in structures}
        temps = {
            k: ", ".join(f"{r['T'][k]:.3g}" for r in results[case]) for k in results[case][0]["T"]
        }
        parts.append(
            "\nT on the validation split: " + "; ".join(f"{k}: {v}" for k, v in temps.items())
        )
        parts.append("\nα by the evidence: " + "; ".join(
            f"{s} {', '.join(f'{a:.3g}' for a in v)}" for s, v in alpha.items()))  # fmt: skip
        grid = ["\n| gridsearch (probit) | α per seed | NLL ×1 | conf ×1 | conf ×10 | AUROC ×10 |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for s in GRID:
            g = [r["grid"][s] for r in results[case]]
            alphas = ", ".join(f"{x['alpha']:.3g}" for x in g)
            grid.append(f"| {s} | {alphas} | "
                        f"{_fmt([x['nll'] for x in g])} | {_mean([x['conf'][1] for x in g])[0]:.3f} | "
                        f"{_mean([x['conf'][10] for x in g])[0]:.3f} | {_fmt([x['auroc'][10] for x in g], '.2f')} |")  # fmt: skip
        parts.append("\n".join(grid))
        if results[case][0]["extra"]:
            ex = ["\n| full, probit + extra variance | σ² | NLL ×1 | conf ×1 | conf ×10 | AUROC ×10 | AUROC ×100 |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
            for key in results[case][0]["extra"]:
                g = [r["extra"][key] for r in results[case]]
                ex.append(f"| {key[0]} | {key[1]:g} | {_fmt([x['nll'] for x in g])} | "
                          f"{_mean([x['conf'][1] for x in g])[0]:.3f} | {_mean([x['conf'][10] for x in g])[0]:.3f} | "
                          f"{_fmt([x['auroc'][10] for x in g], '.2f')} | {_fmt([x['auroc'][100] for x in g], '.2f')} |")  # fmt: skip
            parts.append("\n".join(ex))
        sh = ["\n| shift / OOD | Gaussian-noise NLL | uniform-noise AUROC |", "|---|---|---|"]
        for key in results[case][0]["shift"]:
            g = [r["shift"][key] for r in results[case]]
            sh.append(
                f"| {key} | {_fmt([x['shift_nll'] for x in g])} | {_fmt([x['uniform_auroc'] for x in g], '.2f')} |"
            )
        ranks = [r["rank"] for r in results[case] if r["rank"]]
        if ranks:
            sh.append(f"\nprojected: R = {', '.join(str(x['R']) for x in ranks)} of P = {ranks[0]['P']} "
                      f"(kernel dimension P − R = {', '.join(str(x['P'] - x['R']) for x in ranks)})")  # fmt: skip
        parts.append("\n".join(sh))
    return "\n".join(parts)


def plot(results: dict, structures, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results)
    fig, axes = plt.subplots(2, len(cases), figsize=(3.3 * len(cases), 6.4), sharex=True)
    axes = axes.reshape(2, -1)
    rows = [
        [("MAP", "")] + [(s, "probit") for s in structures],
        [("MAP", ""), ("kfac", "probit"), ("kfac", "bridge"), ("kfac", "mc"), ("kfac", "nn")]
        + [(f"kfac + relu_gp σ²={v:g}", "probit") for v in RELU_GP],
    ]
    for j, case in enumerate(cases):
        for i, keys in enumerate(rows):
            ax = axes[i, j]
            for key in keys:
                conf = [[r["curves"][key]["conf"][s] for s in SCALES] for r in results[case]
                        if key in r["curves"]]  # fmt: skip
                if not conf:
                    continue
                y = torch.tensor(conf).mean(0)
                style = (
                    {"color": "k", "lw": 1.5, "ls": (0, (4, 2)), "zorder": 5}
                    if key[0] == "MAP"
                    else {}
                )
                if "relu_gp" in key[0]:
                    style = {"ls": "--"}
                label = (
                    key[0]
                    if i == 0 or key[0] == "MAP" or "relu_gp" in key[0]
                    else f"kfac, {key[1]}"
                )
                ax.plot(SCALES, y, marker="o", ms=3, label=label, **style)
            C = results[case][0]["C"]
            ax.axhline(1 / C, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{case}" + (" (probit)" if i == 0 else " (kfac)"), fontsize=9)
            if j == 0:
                ax.set_ylabel("mean max-confidence")
            if i == 1:
                ax.set_xlabel("input scale s (test inputs × s)")
    for i in range(2):
        axes[i, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Confidence on test inputs scaled by s (α by the evidence, mean over seeds; "
                 "dotted: 1/C)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    log(f"figure written to {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1 seed, moons and iris only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--plot", type=Path, default=None, help="write the figure here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds, cases = (args.seeds[:1], ["moons", "iris"]) if args.quick else (args.seeds, args.cases)
    t0 = time.perf_counter()
    results: dict = {}
    for case in cases:
        results[case] = []
        for seed in seeds:
            r = one(case, seed, STRUCTURES, LINKS)
            r["C"] = {"moons": 2, "iris": 3, "synth15": 15}.get(case, 10)
            results[case].append(r)
    print(report(results, STRUCTURES, LINKS))
    print(f"\n(total {time.perf_counter() - t0:.0f} s, 1 thread)")
    if args.plot:
        plot(results, STRUCTURES, args.plot)


if __name__ == "__main__":
    main()
