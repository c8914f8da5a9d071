"""Calibration on the demo's digits MLP: every structure × tuning, sampled predictives, laplace-torch.

The earlier single-case benchmark, kept for its laplace-torch row and the alternating
projections (``--alternating``); ``bench_calibration.py`` is the benchmark of many cases.

The model, data and split are the demo's (``laplace_ggn.cli``): a ReLU MLP 64-16-16-10
(P = 1,482) trained with Adam and weight decay α/N (α = 5) on 1,097 standardised digits;
200 validation digits (gridsearch and the predictive temperature), 500 test digits, and the
same 500 rotated by 90/180/270 degrees with pixel noise as the out-of-distribution set.
Every Laplace row uses the GLM predictive with the probit link unless marked "nn" (the
sampled network, 100 samples).

    python benchmarks/bench_calibration_digits.py                # 3 seeds, the table of docs/benchmarks.md
    python benchmarks/bench_calibration_digits.py --quick        # 1 seed, smaller grids: a smoke run
    python benchmarks/bench_calibration_digits.py --alternating  # also: alternating projections (seed 0)

The laplace-torch row (last-layer KFAC, evidence-tuned prior, its recommended setting) runs
when laplace-torch is importable (``.bench-venv``) and is skipped otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from laplace_ggn import LaplaceWrapper  # noqa: E402
from laplace_ggn.calibration import classification_metrics  # noqa: E402
from laplace_ggn.cli import DemoConfig, load_digits_splits, train_mlp  # noqa: E402
from laplace_ggn.predictive import Prediction, temper  # noqa: E402

STRUCTURES = ["full", "diag", "kfac", "lowrank", "projected"]
TUNINGS = {"marglik": "evidence", "gridsearch": "gridsearch", "marglik_temperature": "evidence + T"}
COLUMNS = [
    ("test", "accuracy", "acc"),
    ("test", "nll", "NLL"),
    ("test", "ece", "ECE"),
    ("test", "brier", "Brier"),
    ("ood", "nll", "OOD NLL"),
    ("ood", "ece", "OOD ECE"),
    ("ood", "brier", "OOD Brier"),
    ("ood", "auroc", "AUROC"),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def auroc(p_in: torch.Tensor, p_out: torch.Tensor) -> float:
    """In- against out-of-distribution by the confidence max_c p_c (1: perfectly separated)."""
    from sklearn.metrics import roc_auc_score

    c_in, c_out = p_in.max(-1).values, p_out.max(-1).values
    truth = torch.cat([torch.ones_like(c_in), torch.zeros_like(c_out)])
    return float(roc_auc_score(truth.numpy(), torch.cat([c_in, c_out]).numpy()))


def score(p_test, p_ood, data) -> dict:
    test = classification_metrics(p_test, data["y_test"])
    ood = classification_metrics(p_ood, data["y_test"])
    ood["auroc"] = auroc(p_test, p_ood)
    return {"test": test, "ood": ood}


def one_seed(seed: int, quick: bool, alternating: tuple[int, ...]) -> dict[str, dict]:
    config = DemoConfig()
    data = load_digits_splits(config, seed=seed)
    model = train_mlp(data["x_train"], data["y_train"], config, seed=seed, progress=False)
    train = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=128)
    val = DataLoader(TensorDataset(data["x_val"], data["y_val"]), batch_size=128)
    x_test, x_ood = data["x_test"], data["x_ood"]
    rows: dict[str, dict] = {}
    with torch.no_grad():
        logits = {k: model(data[f"x_{k}"]) for k in ("test", "ood", "val")}
    rows["MAP"] = score(logits["test"].softmax(-1), logits["ood"].softmax(-1), data)
    # temperature scaling of the MAP network on the same validation split (no Bayes)
    from laplace_ggn.marglik import tune_predictive_temperature

    # plain temperature scaling (the NLL alone), the practitioner's baseline
    T = tune_predictive_temperature(logits["val"].softmax(-1), data["y_val"], regularize=False)
    T = float(T.temperature)
    tmp = {k: temper(Prediction(logits[k].softmax(-1), logits[k] * 0), T).mean for k in logits}
    rows["MAP, temperature (validation)"] = score(tmp["test"], tmp["ood"], data)

    default = LaplaceWrapper(model, "classification").fit(train)  # kfac, α = 1, untuned
    rows["kfac, α = 1 untuned (constructor defaults)"] = score(
        default.predict(x_test).mean, default.predict(x_ood).mean, data
    )
    grid = {"n_points": 9} if quick else {}
    for structure in STRUCTURES:
        rank = config.lowrank_rank if structure == "lowrank" else None
        la = LaplaceWrapper(
            model, "classification", structure=structure, rank=rank, prior_precision=5.0
        )
        t0 = time.perf_counter()
        la.fit(train)
        fit_s = time.perf_counter() - t0
        for method, name in TUNINGS.items():
            kw = {} if method == "marglik" else {"val_loader": val}
            if method == "gridsearch":
                kw.update(grid)
            la.set_hyperparameters(prior_precision=5.0)  # every tuning starts from the same α
            la.optimize_prior_precision(method, **kw)
            label = f"{structure}, {name}"
            rows[label] = score(la.predict(x_test).mean, la.predict(x_ood).mean, data)
            log(f"  seed {seed}: {label}")
            rows[label]["alpha"] = float(la.prior_precision)
            rows[label]["T"] = float(la.predictive_temperature)
            rows[label]["fit_s"] = fit_s
            if method == "marglik" and structure in ("projected", "kfac"):
                gen = torch.Generator().manual_seed(seed)
                nn_rows = {
                    k: la.predict(x, "nn", n_samples=100, generator=gen).mean
                    for k, x in (("test", x_test), ("ood", x_ood))
                }
                rows[f"{structure}, evidence, sampled (nn)"] = score(
                    nn_rows["test"], nn_rows["ood"], data
                )
        if structure == "projected" and alternating:
            rows.update(alternating_rows(la, train, data, seed, alternating))
    lt = laplace_torch_row(model, train, data)
    if lt is not None:
        rows["laplace-torch: last-layer kron, marglik"] = lt
    return rows


def alternating_rows(la, train, data, seed, cycles_list) -> dict[str, dict]:
    """Samples by alternating projections after k cycles, against the exact basis."""
    la.optimize_prior_precision("marglik")
    out = {}
    exact = la.sample(100, generator=torch.Generator().manual_seed(seed))
    for cycles in cycles_list:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            thetas = la.sample_projected(
                100,
                train,
                n_iterations=cycles,
                tol=0.0,
                generator=torch.Generator().manual_seed(seed),
            )
        seconds = time.perf_counter() - t0
        rel = float((thetas - exact).norm() / (exact - la.posterior.mean).norm())
        from laplace_ggn.predictive import sample_outputs

        probs = {
            k: sample_outputs(la.fitted.fmodel, thetas, data[f"x_{k}"], n_outputs=10)
            .softmax(-1)
            .mean(0)
            for k in ("test", "ood")
        }
        row = score(probs["test"], probs["ood"], data)
        row["note"] = f"{seconds:.1f} s; distance to the exact samples {rel:.3g} (relative)"
        out[f"projected, evidence, alternating {cycles} cycles (nn)"] = row
        log(f"  alternating {cycles} cycles: {row['note']}")
    return out


def laplace_torch_row(model, train, data) -> dict | None:
    try:
        from laplace import Laplace
    except ImportError:
        return None
    import copy

    m = copy.deepcopy(model).float()
    loader = DataLoader(TensorDataset(data["x_train"].float(), data["y_train"]), batch_size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(m, "classification", subset_of_weights="last_layer", hessian_structure="kron")
        la.fit(loader)
        la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
        p = {
            k: la(data[f"x_{k}"].float(), pred_type="glm", link_approx="probit").double()
            for k in ("test", "ood")
        }
    p = {k: v / v.sum(-1, keepdim=True) for k, v in p.items()}
    return score(p["test"], p["ood"], data)


def table(results: list[dict[str, dict]]) -> str:
    names = list(results[0])
    for res in results[1:]:
        names += [n for n in res if n not in names]
    head = "| setting | " + " | ".join(c[2] for c in COLUMNS) + " |"
    lines = [head, "|---|" + "---|" * len(COLUMNS)]
    for name in names:
        cells = []
        for split, key, _ in COLUMNS:
            vals = torch.tensor([r[name][split][key] for r in results if name in r])
            std = float(vals.std()) if len(vals) > 1 else float("nan")
            cells.append(f"{float(vals.mean()):.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hyper_table(results: list[dict[str, dict]]) -> str:
    lines = ["| setting | α (per seed) | T (per seed) |", "|---|---|---|"]
    for name in results[0]:
        if "alpha" not in results[0][name]:
            continue
        a = ", ".join(f"{r[name]['alpha']:.3g}" for r in results)
        t = ", ".join(f"{r[name]['T']:.3g}" for r in results)
        lines.append(f"| {name} | {a} | {t} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="one seed, a 9-point grid")
    parser.add_argument("--alternating", action="store_true", help="add alternating projections")
    parser.add_argument(
        "--cycles", type=int, nargs="+", default=[2, 10], help="cycles of --alternating"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds[:1] if args.quick else args.seeds
    t0 = time.perf_counter()
    results = []
    for seed in seeds:
        # alternating projections are slow on this small model: the first seed only
        cycles = tuple(args.cycles) if args.alternating and seed == seeds[0] else ()
        results.append(one_seed(seed, args.quick, cycles))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"Digits, ReLU MLP 64-16-16-10, seeds {seeds}: mean ± std over seeds.\n")
    print(table(results))
    print("\nTuned hyperparameters:\n")
    print(hyper_table(results))
    notes = {n: r[n]["note"] for r in results for n in r if "note" in r[n]}
    for name, note in notes.items():
        print(f"\n{name}: {note}")
    print(f"\nTotal {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
