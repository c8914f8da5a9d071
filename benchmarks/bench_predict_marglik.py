"""Marglik tuning and GLM-probit prediction of laplace_ggn on the digits MLP 64-32-32-10.

The network (ReLU, P = 3,466) is trained in the script on scikit-learn's digits (1,297 training
points, batch 100; the same seeded split and training as ``bench_digits.py``, cached on disk).
For diag / kfac / full (and lowrank with ``--lowrank``) it times:

- ``marglik``: ``optimize_prior_precision(method="marglik", n_steps=100)`` (Adam, lr 0.1,
  scalar prior) on a freshly fitted wrapper, so that for ``full`` the one eigendecomposition
  of G is included;
- ``predict``: ``predict(X, method="glm", link="probit")`` on 500 test points.

laplace-torch 0.3 reference figures (measured earlier on the same machine type, 2 threads)
are printed next to ours; ``bench_digits.py`` measures
both sides live when the ``.bench-venv`` environment is present.

    python benchmarks/bench_predict_marglik.py [--threads 2] [--reps 3] [--lowrank]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C
import torch

from laplace_ggn import LaplaceWrapper

#: laplace-torch 0.3 seconds: (marglik 100 Adam steps, GLM probit predict on 500 points)
REFERENCE = {"diag": (0.033, 2.3), "kfac": (0.042, 1.0), "full": (100.0, 3.3)}
TARGET_FULL_MARGLIK = 3.0


def _time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lowrank", action="store_true", help="also time structure='lowrank'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    Xtr, ytr, Xte, _ = C.digits(args.seed)
    model = C.mlp([64, 32, 32, 10], act=C.nn.ReLU, seed=args.seed)
    model = C.train(model, Xtr, ytr, epochs=30, seed=args.seed, tag="digits")
    dl = C.loader(Xtr, ytr, 100)
    X = Xte[:500]
    structures = ["diag", "kfac", "full"] + (["lowrank"] if args.lowrank else [])
    print(
        f"digits MLP 64-32-32-10, P={C.n_params(model)}, N={len(Xtr)}, "
        f"threads={args.threads}, best of {args.reps}"
    )
    print(
        f"{'structure':<9} {'task':<8} {'ours s':>9} {'l-torch s':>10} {'ratio':>7} {'target':>7}"
    )
    for s in structures:
        t_fit = time.perf_counter()
        la = LaplaceWrapper(model, "classification", structure=s, prior_precision=1.0).fit(dl)
        t_fit = time.perf_counter() - t_fit
        # marglik on the fresh fit (full: includes its one eigvalsh, timed apart as well)
        t_eig = 0.0
        if s == "full":
            t0 = time.perf_counter()
            _ = la.posterior.eigenvalues  # the one eigvalsh the evidence needs, cached
            t_eig = time.perf_counter() - t0
        t0 = time.perf_counter()
        la.optimize_prior_precision(method="marglik", n_steps=100)
        first = time.perf_counter() - t0 + t_eig

        def tune(la=la):
            la.set_hyperparameters(prior_precision=1.0)
            la.optimize_prior_precision(method="marglik", n_steps=100)

        t_ml = first if s == "full" else min(first, _time(tune, args.reps))
        alpha = float(la.prior_precision)
        la.predict(X[:10])  # warm-up
        t_pr = _time(lambda la=la: la.predict(X, method="glm", link="probit"), args.reps)
        ref = REFERENCE.get(s)
        for task, ours, r in (("marglik", t_ml, ref and ref[0]), ("predict", t_pr, ref and ref[1])):
            target = (
                (min(0.5 * r, TARGET_FULL_MARGLIK) if (s, task) == ("full", "marglik") else 0.5 * r)
                if r
                else None
            )
            print(
                f"{s:<9} {task:<8} {ours:>9.4f} {r if r else '-':>10} "
                f"{(ours / r if r else float('nan')):>7.3f} "
                f"{(f'{target:.3g}' if target else '-'):>7}"
            )
        extra = (
            f", of which eigvalsh {t_eig:.2f} s and 100 steps {t_ml - t_eig:.4f} s" if t_eig else ""
        )
        print(f"{'':<9} (fit {t_fit:.2f} s, tuned alpha {alpha:.4g}{extra})")


if __name__ == "__main__":
    main()
