"""Calibration in distribution, under shift and out of distribution: every case × structure × tuning.

Classification cases (``--cases``): a small CNN on the 8×8 digits (``digits_cnn``, P = 1,898), a
deeper ReLU MLP 64-32-16-16-10 trained without weight decay to a training loss near zero
(``deep_mlp``, P = 3,050), MLPs 32-32 on wine, iris, breast cancer, two moons and a 15-class
synthetic set, and, on request only, the demo's MLP 64-16-16-10 (``digits_mlp``).  Digits:
1,097 training, 200 validation and 300 test images; tabular: 60 / 20 / 20 % (at most 300 test
points).  Each is scored in
distribution (accuracy, NLL, ECE), under shift (Gaussian noise of standard deviation 1 on the
standardised inputs; images also rotated by ±40°) and out of distribution (AUROC of the
confidence max_c p_c against the test set, for uniform noise over the training range, the
test inputs × 10, and another data set: patches of scikit-learn's sample photographs for the
images, another scikit-learn table for the tabular cases).

Rows: MAP; MAP + T (plain temperature scaling on the validation split, the NLL alone); every
structure × {evidence, gridsearch, evidence + T, the default with ``val_loader``}; for the
digits CNN and the deep MLP also ``marglik_training`` (kfac, no validation split).  GLM
predictive, probit link.  Regression (``diabetes``, ``gap``): MAP (σ = training RMSE) and
every structure with α and σ by the evidence, and gridsearch at that σ; 90 % interval coverage
in range and out of range (the gap and beyond the training range; diabetes: the 15 % largest
BMI).  Mean ± standard deviation over seeds (split, initialisation, batch order, noise).

    python benchmarks/bench_calibration.py                      # the cases, seeds 0 1 2, 2 processes
    python benchmarks/bench_calibration.py --cases wine iris --seeds 0 --structures kfac
    python benchmarks/bench_calibration.py --quick              # seed 0, a 9-point grid
    python benchmarks/bench_calibration.py --tables results.json   # print saved results again
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _calib_cases import CLASSIFICATION, REGRESSION, classification_case, regression_case  # noqa: E402
from _calib_tables import print_tables  # noqa: E402

from laplace_ggn import LaplaceWrapper, marglik_training  # noqa: E402
from laplace_ggn.calibration import classification_metrics  # noqa: E402
from laplace_ggn.marglik import tune_predictive_temperature  # noqa: E402
from laplace_ggn.predictive import Prediction, temper  # noqa: E402

STRUCTURES = ["full", "diag", "kfac", "lowrank", "projected"]
TUNINGS = {"marglik": "evidence", "gridsearch": "gridsearch",
           "marglik_temperature": "evidence + T", None: "default with val_loader"}  # fmt: skip
ALPHA0 = 1.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def auroc(c_in: torch.Tensor, c_out: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    truth = torch.cat([torch.ones_like(c_in), torch.zeros_like(c_out)])
    return float(roc_auc_score(truth.numpy(), torch.cat([c_in, c_out]).numpy()))


def score(predict, case) -> dict:
    """Metrics of ``predict: x -> probabilities`` on the test, shifted and OOD sets."""
    p = predict(case["x_test"])
    m = classification_metrics(p, case["y_test"])
    row = {
        "acc": m["accuracy"],
        "nll": m["nll"],
        "ece": m["ece"],
        "conf": float(p.max(-1).values.mean()),
    }
    for k, x in case["shift"].items():
        s = classification_metrics(predict(x), case["y_test"])
        row[f"{k} nll"], row[f"{k} ece"] = s["nll"], s["ece"]
    conf = p.max(-1).values
    for k, x in case["ood"].items():
        c = predict(x).max(-1).values
        row[f"{k} auroc"], row[f"{k} conf"] = auroc(conf, c), float(c.mean())
    return row


def _tempered(probs_fn, T):
    return lambda x: temper(Prediction(probs_fn(x), torch.zeros(1)), T).mean


def classification_rows(name: str, seed: int, structures: list[str], quick: bool) -> dict:
    case = classification_case(name, seed)
    model = case["model"]
    train = DataLoader(TensorDataset(case["x_train"], case["y_train"]), batch_size=128)
    val = DataLoader(TensorDataset(case["x_val"], case["y_val"]), batch_size=256)
    rows: dict[str, dict] = {}
    softmax = lambda x: torch.softmax(model(x), -1)  # noqa: E731
    with torch.no_grad():
        rows["MAP"] = score(softmax, case)
        p_val = softmax(case["x_val"])
        for reg, label in ((False, "MAP + T"), (True, "MAP + T (regularised)")):
            res = tune_predictive_temperature(p_val, case["y_val"], regularize=reg)
            rows[label] = score(_tempered(softmax, float(res.temperature)), case)
            rows[label].update(T=float(res.temperature), val_errors=res.n_errors)
    rows["MAP"]["train_loss"] = case["train_loss"]
    grid = {"n_points": 9 if quick else 21}
    for structure in structures:
        rank = (
            300
            if structure == "lowrank" and case["x_train"].shape[0] * case["n_classes"] > 3000
            else None
        )
        la = LaplaceWrapper(
            model, "classification", structure=structure, rank=rank, prior_precision=ALPHA0
        )
        la.fit(train)
        for method, label in TUNINGS.items():
            la.set_hyperparameters(prior_precision=ALPHA0, predictive_temperature=1.0)
            kw = {} if method == "marglik" else {"val_loader": val}
            if method == "gridsearch":
                kw.update(grid)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                la.optimize_prior_precision(method, **kw)
            hp = {"alpha": float(la.prior_precision.mean()), "T": float(la.predictive_temperature),
                  "warned": any("temperature" in str(w.message) for w in caught)}  # fmt: skip
            key = f"{structure}, {label}"
            if method is None:  # same hyperparameters as evidence + T: same predictive
                same = rows[f"{structure}, evidence + T"]
                assert hp["alpha"] == same["alpha"] and hp["T"] == same["T"], (hp, same)
                rows[key] = dict(same)
            else:
                with torch.no_grad():
                    rows[key] = score(lambda x: la.predict(x).mean, case)
                rows[key].update(hp)
        log(f"{name} seed {seed}: {structure} done")
    if name in ("digits_cnn", "deep_mlp"):
        rows.update(marglik_training_rows(name, seed, case, train, quick))
    return rows


def marglik_training_rows(name, seed, case, train, quick) -> dict:
    """The same architecture trained with the evidence (kfac, layerwise prior, learned T)."""
    torch.manual_seed(seed)
    net = case["fresh"]()
    epochs = 20 if quick else 50
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = marglik_training(net, train, "classification", structure="kfac", n_epochs=epochs,
                               optimizer_kwargs={"lr": 1e-2}, progress=False,
                               generator=torch.Generator().manual_seed(seed))  # fmt: skip
    la = res.laplace
    out = {}
    with torch.no_grad():
        out["marglik_training (kfac): Laplace"] = score(lambda x: la.predict(x).mean, case)
        T = float(res.temperature)  # the network was trained on softmax(f / T)
        out["marglik_training (kfac): network"] = score(
            lambda x: torch.softmax(net(x) / T, -1), case
        )
    out["marglik_training (kfac): Laplace"]["T"] = float(res.temperature)
    log(f"{name} seed {seed}: marglik_training done")
    return out


def _moments(la, x):
    p = la.predict(x)
    return p.mean, p.variance


def coverage90(mean, var, y) -> float:
    return float(((y - mean).abs() <= 1.6448536269514722 * var.sqrt()).to(torch.float64).mean())


def gaussian_nll(mean, var, y) -> float:
    return float((0.5 * (torch.log(2 * torch.pi * var) + (y - mean) ** 2 / var)).mean())


def regression_rows(name: str, seed: int, structures: list[str], quick: bool) -> dict:
    case = regression_case(name, seed)
    model = case["model"]
    train = DataLoader(TensorDataset(case["x_train"], case["y_train"]), batch_size=128)
    val = DataLoader(TensorDataset(case["x_val"], case["y_val"]), batch_size=256)
    sets = {"in range": (case["x_test"], case["y_test"]), **case["out"]}

    def reg_score(predict):
        row = {}
        for k, (x, y) in sets.items():
            mean, var = predict(x)
            row[f"{k} cov90"], row[f"{k} nll"] = (
                coverage90(mean, var, y),
                gaussian_nll(mean, var, y),
            )
            if k == "in range":
                row["rmse"] = float(((mean - y) ** 2).mean().sqrt())
        return row

    sigma_map = case["train_loss"] ** 0.5
    rows = {}
    with torch.no_grad():
        rows["MAP (σ = training RMSE)"] = reg_score(
            lambda x: (model(x), torch.full_like(model(x), sigma_map**2))
        )
    rows["MAP (σ = training RMSE)"]["sigma"] = sigma_map
    for structure in structures:
        la = LaplaceWrapper(
            model, "regression", structure=structure, prior_precision=ALPHA0, sigma_noise=1.0
        )
        la.fit(train)
        la.optimize_prior_precision("marglik", tune_sigma_noise=True)
        hp = {"alpha": float(la.prior_precision.mean()), "sigma": float(la.sigma_noise)}
        with torch.no_grad():
            rows[f"{structure}, evidence (α, σ)"] = reg_score(lambda x: _moments(la, x))
        rows[f"{structure}, evidence (α, σ)"].update(hp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la.optimize_prior_precision(
                "gridsearch", val_loader=val, **({"n_points": 9} if quick else {})
            )
        with torch.no_grad():
            rows[f"{structure}, gridsearch (σ of the evidence)"] = reg_score(
                lambda x: _moments(la, x)
            )
        rows[f"{structure}, gridsearch (σ of the evidence)"].update(
            alpha=float(la.prior_precision.mean()), sigma=hp["sigma"]
        )
        log(f"{name} seed {seed}: {structure} done")
    return rows


def run_task(task) -> tuple[str, int, dict, float]:
    name, seed, structures, quick, only_training = task
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if only_training:
        case = classification_case(name, seed)
        train = DataLoader(TensorDataset(case["x_train"], case["y_train"]), batch_size=128)
        rows = marglik_training_rows(name, seed, case, train, quick)
    else:
        fn = regression_rows if name in REGRESSION else classification_rows
        rows = fn(name, seed, structures, quick)
    log(f"{name} seed {seed} finished in {time.perf_counter() - t0:.0f} s")
    return name, seed, rows, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=CLASSIFICATION[1:] + REGRESSION,
                        choices=CLASSIFICATION + REGRESSION)  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--structures", nargs="+", default=STRUCTURES, choices=STRUCTURES)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="seed 0, a 9-point grid, short training with the evidence",
    )
    parser.add_argument("--processes", type=int, default=2, choices=[1, 2])
    parser.add_argument("--json", type=Path, help="also save the results here")
    parser.add_argument(
        "--only-marglik-training", action="store_true", help="the marglik_training rows alone"
    )
    parser.add_argument("--tables", type=Path, nargs="+", help="print the tables of saved results")
    args = parser.parse_args()
    if args.tables:
        results: dict = {}
        for path in args.tables:
            for case, seeds in json.loads(path.read_text()).items():
                for seed, rows in seeds.items():  # later files add or replace rows
                    merged = results.setdefault(case, {}).setdefault(seed, {})
                    rows["_seconds"] = rows.get("_seconds", 0) + merged.get("_seconds", 0)
                    merged.update(rows)
        print_tables(results)
        return
    seeds = args.seeds[:1] if args.quick else args.seeds
    if args.only_marglik_training:
        args.cases = [c for c in args.cases if c in ("digits_cnn", "deep_mlp")]
    tasks = [
        (c, s, args.structures, args.quick, args.only_marglik_training)
        for c in args.cases
        for s in seeds
    ]
    t0 = time.perf_counter()
    results = {}
    if args.processes == 1:
        outs = map(run_task, tasks)
    else:
        pool = ProcessPoolExecutor(max_workers=2)
        outs = pool.map(run_task, tasks)
    for name, seed, rows, seconds in outs:
        results.setdefault(name, {})[str(seed)] = rows
        rows["_seconds"] = seconds
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"\nTotal {time.perf_counter() - t0:.0f} s ({args.processes} processes, 1 thread each).")


if __name__ == "__main__":
    main()
