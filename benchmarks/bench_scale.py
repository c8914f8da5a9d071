"""Scale: an MLP 64-2200-2200-10 (P = 5,007,210) on the 1,297 digits, batch 100.

Ours: ``LaplaceWrapper(structure="lowrank", rank=100).fit`` (top-100 eigenpairs of the GGN,
matrix-free) and ``LaplaceWrapper(structure="kfac").fit``: fit time and peak memory.
Reference: laplace-torch's kron fit (its low-rank Laplace needs the old ``asdfghjkl`` from a
git branch and is not installable from PyPI, so it is not compared). Floor: one epoch.
The network is not trained: fit cost does not depend on the weights' values.

    python benchmarks/bench_scale.py [--quick] [--rank 100]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C
import _ours
from _harness import FLOOR, OURS, Case, main
from torch import nn


def extra(p) -> None:
    p.add_argument("--rank", type=int, default=100, help="rank k of the low-rank fit")
    p.add_argument("--width", type=int, default=2200, help="hidden width (2200 -> P = 5.0M)")


def build(args) -> list[Case]:
    width = 256 if args.quick else args.width
    rank = 10 if args.quick else args.rank
    n = 200 if args.quick else C.N_TRAIN
    Xtr, ytr, _, _ = C.digits(args.seed)
    model = C.mlp([64, width, width, 10], act=nn.ReLU, seed=args.seed).eval()
    dl = C.loader(Xtr[:n], ytr[:n], 100)

    def lt_fit(structure):
        from laplace import Laplace

        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
        la.fit(dl, progress_bar=False)
        return la

    P = C.n_params(model)
    return [
        # SLOT ours: LaplaceWrapper(model, structure="lowrank", rank=k).fit(dl)
        # (P·k float32 storage is over the wrapper's default 1 GB memory budget at P = 5M)
        Case(
            f"fit lowrank k={rank}",
            "laplace_ggn",
            lambda _: _ours.fit(model, dl, "lowrank", rank=rank, memory_budget=8 * 2**30),
            role=OURS,
            reps=2,
            warmup=False,
        ),
        Case("fit kfac", "laplace-torch (kron)", lambda _: lt_fit("kron"), reps=3),
        # SLOT ours: LaplaceWrapper(model, structure="kfac").fit(dl)
        Case("fit kfac", "laplace_ggn", lambda _: _ours.fit(model, dl, "kfac"), role=OURS, reps=3),
        Case(f"epoch (fwd+bwd, N={n}, P={P:,})", "torch", lambda _: C.epoch(model, dl), role=FLOOR),
    ]


if __name__ == "__main__":
    main(
        "Scale: MLP 64-2200-2200-10 (P=5,007,210), N=1,297, batch 100",
        build,
        extra_args=extra,
        script=os.path.abspath(__file__),
    )
