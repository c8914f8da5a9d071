"""Digits MLP 64-32-32-10 (P = 3,466): fit, marglik tuning and GLM-probit predict.

laplace-torch full / diag / kron against laplace_ggn full / diag / kfac on the same trained
network, the same 1,297 training points (batch 100) and the same 500 test points.

    python benchmarks/bench_digits.py            # full run (several minutes: full is slow)
    python benchmarks/bench_digits.py --quick    # smoke run

marglik: laplace-torch ``optimize_prior_precision(method="marglik", n_steps=100)`` (Adam,
lr 0.1, scalar prior). For ``full`` laplace-torch re-factorises the P×P precision at every
step; 10 steps are timed and the time is multiplied by 10 (row marked ``*``). marglik is
timed on a freshly fitted object in every repetition (both sides), so one-time factorisations
that a tuner caches are counted. predict reuses one fitted object per side: after the warm-up
round it is the steady-state cost per call.
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C
import _ours
from _harness import FLOOR, OURS, Case, main

warnings.filterwarnings("ignore", message=".*link_approx.*")

#: (laplace-torch hessian_structure, laplace_ggn structure)
STRUCTURES = [("diag", "diag"), ("kron", "kfac"), ("full", "full")]
FULL_MARGLIK_STEPS = 10


def build(args) -> list[Case]:
    Xtr, ytr, Xte, _ = C.digits(args.seed)
    model = C.mlp([64, 32, 32, 10], act=C.nn.ReLU, seed=args.seed)
    model = C.train(model, Xtr, ytr, epochs=30, seed=args.seed, tag="digits")
    assert C.n_params(model) == 3466
    dl = C.loader(Xtr, ytr, 100)
    n_pred = 100 if args.quick else 500
    Xp = Xte[:n_pred]
    steps = 3 if args.quick else 100
    full_steps = 1 if args.quick else FULL_MARGLIK_STEPS

    def lt_fit(structure):
        from laplace import Laplace

        la = Laplace(
            model,
            "classification",
            subset_of_weights="all",
            hessian_structure=structure,
            prior_precision=1.0,
        )
        la.fit(dl, progress_bar=False)
        return la

    cases: list[Case] = []
    for lt_s, our_s in STRUCTURES:
        expensive = lt_s == "full"
        cap = 3 if expensive else None
        n_lt = full_steps if expensive else steps
        scale = steps / n_lt
        # ---- fit
        cases.append(
            Case(
                f"fit {our_s}",
                f"laplace-torch ({lt_s})",
                lambda _, s=lt_s: lt_fit(s),
                reps=cap,
                warmup=not expensive,
            )
        )
        # SLOT ours: LaplaceWrapper(model, likelihood="classification", structure=our_s).fit(dl)
        cases.append(
            Case(
                f"fit {our_s}", "laplace_ggn", lambda _, s=our_s: _ours.fit(model, dl, s), role=OURS
            )
        )
        # ---- marglik tuning of a scalar prior precision
        cases.append(
            Case(
                f"marglik {our_s}",
                f"laplace-torch ({lt_s})",
                lambda la, n=n_lt: la.optimize_prior_precision(method="marglik", n_steps=n),
                setup=lambda s=lt_s: lt_fit(s),
                fresh=True,
                reps=cap,
                warmup=not expensive,
                scale=scale,
                note=(f"{n_lt} steps timed, ×{scale:g} for {steps}" if scale != 1 else ""),
            )
        )
        # SLOT ours: la.optimize_prior_precision(method="marglik") on the fitted wrapper
        cases.append(
            Case(
                f"marglik {our_s}",
                "laplace_ggn",
                lambda la: _ours.optimize_marglik(la, steps),
                setup=lambda s=our_s: _ours.fit(model, dl, s),
                fresh=True,
                role=OURS,
            )
        )
        # ---- GLM probit predictive on n_pred test points
        cases.append(
            Case(
                f"predict {our_s}",
                f"laplace-torch ({lt_s})",
                lambda la: la(Xp, pred_type="glm", link_approx="probit"),
                setup=lambda s=lt_s: lt_fit(s),
                reps=cap,
                warmup=not expensive,
            )
        )
        # SLOT ours: la.predict(Xp, method="glm", link="probit").mean
        cases.append(
            Case(
                f"predict {our_s}",
                "laplace_ggn",
                lambda la: _ours.predict_glm_probit(la, Xp),
                setup=lambda s=our_s: _ours.fit(model, dl, s),
                role=OURS,
            )
        )
    cases.append(Case("epoch (fwd+bwd, N=1297)", "torch", lambda _: C.epoch(model, dl), role=FLOOR))
    return cases


if __name__ == "__main__":
    main(
        "Digits MLP 64-32-32-10 (P=3,466, N=1,297, 500 test points)",
        build,
        script=os.path.abspath(__file__),
    )
