"""laplace-torch 0.3's marglik_training on the digits networks of examples/marglik_training/digits.py.

The reference row of docs/marglik-training.md (kron, layerwise prior, refit every 5 epochs,
50 hyperparameter steps; it learns no temperature). Run with the interpreter of .bench-venv:

    .bench-venv/bin/python benchmarks/_lt_marglik_digits.py --arch cnn --seeds 1 2
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location(
        "digits", ROOT / "examples" / "marglik_training" / "digits.py"
    )
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    from laplace.marglik_training import marglik_training as lt_marglik

    rows = {"glm": [], "network": []}
    for seed in args.seeds:
        data = digits.load_digits(seed, images=args.arch == "cnn")
        model = digits.make_model(args.arch, seed).float()
        g = torch.Generator().manual_seed(seed)
        x, y = data["x_train"].float(), data["y_train"]
        loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lap, model, _, _ = lt_marglik(
                model, loader, likelihood="classification", hessian_structure="kron",
                n_epochs=digits.SETTINGS[args.arch]["epochs"],
                optimizer_kwargs={"lr": digits.SETTINGS[args.arch]["lr"]}, n_epochs_burnin=10,
                marglik_frequency=5, n_hypersteps=50, prior_structure="layerwise",
            )  # fmt: skip
            xt, xo = data["x_test"].float(), data["x_ood"].float()

            def glm(x):  # in chunks: one call on 500 inputs ran out of memory (19 GB)
                parts = [lap(c, pred_type="glm", link_approx="probit") for c in x.split(25)]
                p = torch.cat(parts).double()
                return p / p.sum(-1, keepdim=True)  # float32 rows, renormalised in float64

            p, po = glm(xt), glm(xo)
        rows["glm"].append(digits.scores(p, po, data["y_test"]))
        with torch.no_grad():
            rows["network"].append(
                digits.scores(
                    model(xt).double().softmax(-1), model(xo).double().softmax(-1), data["y_test"]
                )
            )
        print(f"seed {seed}: {rows['glm'][-1]} network {rows['network'][-1]}", file=sys.stderr)
    print(f"\nlaplace-torch 0.3 marglik_training, {args.arch}, seeds {args.seeds} (mean)\n")
    print("| predictive | NLL | accuracy | ECE | uniform-noise AUROC |")
    print("|---|---|---|---|---|")
    for name, rs in rows.items():
        m = {k: statistics.mean(r[k] for r in rs) for k in ("nll", "accuracy", "ece", "auroc")}
        print(f"| laplace-torch kron, layerwise: {name} | {m['nll']:.4f} | {m['accuracy']:.4f} | "
              f"{m['ece']:.4f} | {m['auroc']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
