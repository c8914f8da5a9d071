"""CNN on digits as 1×8×8 images (P = 18,346): kfac, diag and low-rank fits.

Network: conv 3×3 (8 ch) - ReLU - conv 3×3 (16 ch) - ReLU - max-pool 2 - linear 256-64 - ReLU -
linear 64-10, trained for a few seconds with Adam. Ours: ``LaplaceWrapper(structure=
"kfac" | "diag" | "lowrank", rank=100).fit``, plus the GLM-probit predictive on 500 test
images for kfac and diag. Reference: laplace-torch's kron and diag fits; its GLM predictive
only with ``--lt-predict CHUNK`` (on all 500 images at once it needed over 22 GB of memory
and was killed by the OOM killer on a 24 GB machine).

    python benchmarks/bench_cnn.py [--quick]
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


def extra(p) -> None:
    p.add_argument(
        "--lt-predict",
        type=int,
        default=0,
        metavar="CHUNK",
        help="also time laplace-torch's GLM predictive, CHUNK test images per call "
        "(off by default: on all 500 images at once it took over 22 GB and was "
        "killed by the OOM killer)",
    )


def build(args) -> list[Case]:
    Xtr, ytr, Xte, _ = C.digits(args.seed, images=True)
    model = C.train(C.digits_cnn(args.seed), Xtr, ytr, epochs=15, seed=args.seed, tag="cnn")
    assert C.n_params(model) == 18346
    n = 300 if args.quick else C.N_TRAIN
    dl = C.loader(Xtr[:n], ytr[:n], 100)
    Xp = Xte[: 100 if args.quick else 500]
    rank = 10 if args.quick else 100

    def lt_fit(structure):
        from laplace import Laplace

        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
        la.fit(dl, progress_bar=False)
        return la

    cases: list[Case] = []
    for lt_s, our_s in (("kron", "kfac"), ("diag", "diag")):
        slow = lt_s == "diag"  # laplace-torch's diag on convolutions takes tens of seconds
        cases.append(
            Case(
                f"fit {our_s}",
                f"laplace-torch ({lt_s})",
                lambda _, s=lt_s: lt_fit(s),
                reps=3 if slow else None,
                warmup=not slow,
            )
        )
        # SLOT ours: LaplaceWrapper(model, structure=our_s).fit(dl)
        cases.append(
            Case(
                f"fit {our_s}", "laplace_ggn", lambda _, s=our_s: _ours.fit(model, dl, s), role=OURS
            )
        )
    # SLOT ours: LaplaceWrapper(model, structure="lowrank", rank=100).fit(dl)
    cases.append(
        Case(
            f"fit lowrank k={rank}",
            "laplace_ggn",
            lambda _: _ours.fit(model, dl, "lowrank", rank=rank),
            role=OURS,
            reps=3,
            warmup=False,
        )
    )
    for lt_s, our_s in (("kron", "kfac"), ("diag", "diag")):
        if args.lt_predict:
            cases.append(
                Case(
                    f"predict {our_s}",
                    f"laplace-torch ({lt_s})",
                    lambda la: [
                        la(xb, pred_type="glm", link_approx="probit")
                        for xb in Xp.split(args.lt_predict)
                    ],
                    setup=lambda s=lt_s: lt_fit(s),
                    reps=3,
                    memory=False,
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
    cases.append(Case(f"epoch (fwd+bwd, N={n})", "torch", lambda _: C.epoch(model, dl), role=FLOOR))
    return cases


if __name__ == "__main__":
    main(
        "CNN on 8×8 digits (P=18,346), N=1,297, batch 100, 500 test images",
        build,
        extra_args=extra,
        script=os.path.abspath(__file__),
    )
