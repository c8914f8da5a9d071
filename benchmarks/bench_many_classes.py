"""Many classes: fit and GLM predict with C = 10 … 10,000 outputs, exact against Monte Carlo.

Network: MLP 64-256-256-C (ReLU), seeded random weights (the cost of curvature does not depend
on training), synthetic inputs and labels: N = 2,000 training points in batches of 100, 500
test inputs. One run per C (``--classes``); the floor row is one training epoch
(forward + backward of the summed cross-entropy) at that C.

Rows per task: ours with ``curvature="mc", n_mc_samples=1`` (role "ours") and with the exact
``curvature="ggn"``; laplace-torch 0.3 where it runs within the memory guard (its diag and
last-layer predictive form (B, C, P) Jacobians; its kron is curvlinops' type-2 KFAC, C
back-propagated columns, or the MC Fisher with ``backend_kwargs={"stochastic": True}``).
Predict rows: the GLM probit predictive of a last-layer posterior on the 500 test inputs
(ours: from the features entering the head, no Jacobians), with the MAP forward pass as the
reference ("ours / this" is then predict / forward).

The exact rows at C ≥ 1,000 raise ``memory_budget`` to 8 GiB: with the default 1 GiB our
exact path refuses (one sample's C·P square-root rows exceed it) and names
``curvature="mc"``; that refusal is shown in the last rows of the table.

``--ours-only`` keeps the epoch, our diag and kfac mc fits and last-layer predict rows (probit,
and the bridge with ``--links probit,bridge``) with their MAP forward reference: the rows of the
speed targets, in a few minutes, runnable against any version of the library (``PYTHONPATH``).

    python benchmarks/bench_many_classes.py --classes 1000 [--quick]
    python benchmarks/bench_many_classes.py --classes 1000 --ours-only --links probit,bridge
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C
import _ours
import torch
from _harness import FLOOR, OURS, REF, Case, main
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", message=".*link_approx.*")

D_IN, WIDTH, N_TEST = 64, 256, 500
GUARD_BYTES = 1.5 * 2**30  # skip a reference whose largest tensor would exceed this
BIG_BUDGET = 8 * 2**30


def extra(p) -> None:
    p.add_argument("--classes", type=int, default=1000, help="number of classes C")
    p.add_argument("--n-train", type=int, default=2000, help="training points N")
    p.add_argument(
        "--ours-only",
        action="store_true",
        help="only the epoch, our mc fits and the predict rows (no exact or laplace-torch rows)",
    )
    p.add_argument("--links", default="probit", help="links of the predict rows, comma-separated")


def _data(args):
    g = torch.Generator().manual_seed(args.seed)
    n = 400 if args.quick else args.n_train
    X = torch.randn(n, D_IN, generator=g)
    y = torch.randint(0, args.classes, (n,), generator=g)
    Xte = torch.randn(100 if args.quick else N_TEST, D_IN, generator=g)
    return DataLoader(TensorDataset(X, y), batch_size=100), Xte


def _lt(model, dl, subset, structure, stochastic=False):
    from laplace import Laplace

    kw = {"backend_kwargs": {"stochastic": True}} if stochastic else {}
    la = Laplace(
        model, "classification", subset_of_weights=subset, hessian_structure=structure, **kw
    )
    la.fit(dl, progress_bar=False)
    return la


def _ours_fit(model, dl, structure, subset, curvature, **kw):
    extra_kw = {"n_mc_samples": 1} if curvature == "mc" else {}
    la = _ours.wrapper(model, structure, subset=subset, curvature=curvature, **extra_kw, **kw)
    gen = torch.Generator().manual_seed(0)
    if curvature == "mc":
        return la.fit(dl, progress=False, generator=gen)
    return la.fit(dl, progress=False)


def build(args) -> list[Case]:
    Cn = args.classes
    model = C.mlp([D_IN, WIDTH, WIDTH, Cn], act=torch.nn.ReLU, seed=args.seed).eval()
    dl, Xte = _data(args)
    n = len(dl.dataset)
    B = 100
    P_all = C.n_params(model)
    P_ll = (WIDTH + 1) * Cn
    big = Cn >= 1000
    exact_kw = {"memory_budget": BIG_BUDGET} if big else {}
    note_big = (
        "memory_budget=8 GiB (the default 1 GiB refuses where one sample's C·P rows exceed it; "
        "last row)"
        if big
        else ""
    )
    cases: list[Case] = [
        Case(f"epoch (fwd+bwd, N={n})", "torch", lambda _: C.epoch(model, dl), role=FLOOR)
    ]

    def fits(subset: str, structure: str, lt: str | None, P: int, **kw) -> None:
        task = f"fit {subset} {structure}"
        # SLOT ours: LaplaceWrapper(model, structure=..., subset=..., curvature="mc").fit(dl)
        cases.append(
            Case(
                task,
                "laplace_ggn mc S=1",
                lambda _: _ours_fit(model, dl, structure, subset, "mc", **kw),
                role=OURS,
            )
        )
        if args.ours_only:
            return
        if not (Cn >= 10000):
            cases.append(
                Case(
                    task,
                    "laplace_ggn exact",
                    lambda _: _ours_fit(model, dl, structure, subset, "ggn", **exact_kw, **kw),
                    reps=1 if big else None,
                    warmup=not big,
                    note=note_big,
                )
            )
        if lt is None:
            return
        jac_bytes = B * Cn * P * 4
        if lt == "diag" and subset == "all":
            cases.append(
                Case(
                    task,
                    f"laplace-torch ({lt})",
                    lambda _: None,
                    role=REF,
                    setup=_skip(
                        "per-sample Jacobians of all P parameters; a smoke "
                        "run took 524 s for N=400 at C=10"
                    ),
                )
            )
            return
        if lt == "diag" or lt == "full":
            if jac_bytes <= GUARD_BYTES:
                cases.append(
                    Case(
                        task,
                        f"laplace-torch ({lt})",
                        lambda _: _lt(model, dl, subset, lt),
                        role=REF,
                        reps=1,
                        warmup=False,
                    )
                )
            else:
                cases.append(
                    Case(
                        task,
                        f"laplace-torch ({lt})",
                        lambda _: None,
                        role=REF,
                        setup=_skip(f"(B, C, P) Jacobians of {jac_bytes / 2**30:.3g} GB per batch"),
                    )
                )
            return
        # kron: type-2 back-propagates C columns per sample (C³ per sample for the head's B)
        if Cn <= 100:
            cases.append(
                Case(
                    task,
                    "laplace-torch (kron)",
                    lambda _: _lt(model, dl, subset, "kron"),
                    role=REF,
                    reps=1,
                    warmup=False,
                )
            )
        if Cn <= 1000:
            cases.append(
                Case(
                    task,
                    "laplace-torch (kron, stochastic)",
                    lambda _: _lt(model, dl, subset, "kron", stochastic=True),
                    role=REF,
                    reps=1,
                    warmup=False,
                )
            )

    fits("all", "diag", "diag", P_all)
    fits("all", "kfac", "kron", P_all)
    fits("last_layer", "diag", "diag", P_ll)
    fits("last_layer", "kfac", "kron", P_ll)
    if Cn <= 10 and not args.ours_only:
        fits("last_layer", "full", "full", P_ll)
    if not args.ours_only:
        fits("last_layer", "lowrank", None, P_ll, rank=20)

    def forward(_):
        with torch.no_grad():
            return model(Xte)

    predict_structs = [("kfac", "kron", {}), ("diag", "diag", {}), ("lowrank", None, {"rank": 20})]
    if args.ours_only:  # the structures of the targets
        predict_structs = predict_structs[:2]
    elif Cn <= 10:
        predict_structs.insert(0, ("full", "full", {}))
    for structure, lt, kw in predict_structs:
        task = f"predict last_layer {structure} ({len(Xte)} inputs)"
        # SLOT ours: la.predict(Xte, method="glm", link="probit").mean
        cases.append(
            Case(
                task,
                "laplace_ggn",
                lambda la: _ours.predict_glm_probit(la, Xte),
                setup=lambda s=structure, kw=kw: _ours_fit(model, dl, s, "last_layer", "mc", **kw),
                role=OURS,
            )
        )
        cases.append(Case(task, "MAP forward", forward, role=REF))
        for link in [k for k in args.links.split(",") if k and k != "probit"]:
            task_l = f"predict last_layer {structure} {link} ({len(Xte)} inputs)"
            cases.append(
                Case(
                    task_l,
                    "laplace_ggn",
                    lambda la, link=link: la.predict(Xte, method="glm", link=link).mean,
                    setup=lambda s=structure, kw=kw: _ours_fit(
                        model, dl, s, "last_layer", "mc", **kw
                    ),
                    role=OURS,
                )
            )
            cases.append(Case(task_l, "MAP forward", forward, role=REF))
        if lt is None or args.ours_only:
            continue
        per_input = Cn * P_ll * 4
        chunk = int(max(1, min(len(Xte), GUARD_BYTES // (4 * per_input))))
        if per_input * chunk <= GUARD_BYTES and len(Xte) // chunk <= 50:
            cases.append(
                Case(
                    task,
                    f"laplace-torch ({lt})",
                    lambda la: [
                        la(xb, pred_type="glm", link_approx="probit") for xb in Xte.split(chunk)
                    ],
                    setup=lambda lt=lt: _lt(model, dl, "last_layer", lt, stochastic=lt == "kron"),
                    role=REF,
                    reps=3,
                    note=f"in chunks of {chunk} inputs",
                )
            )
        else:
            need = len(Xte) * per_input / 2**30
            cases.append(
                Case(
                    task,
                    f"laplace-torch ({lt})",
                    lambda _: None,
                    role=REF,
                    setup=_skip(f"(B, C, P) Jacobians of {need:.3g} GB for {len(Xte)} inputs"),
                )
            )
    if big and not args.ours_only:
        # the exact path at the default budget: refused before allocating
        cases.append(
            Case(
                "fit all kfac exact, default 1 GiB budget",
                "laplace_ggn (refused)",
                lambda _: _ours_fit(model, dl, "kfac", "all", "ggn"),
                memory=False,
                reps=1,
                warmup=False,
            )
        )
    return cases


def _skip(why: str):
    def setup():
        raise NotImplementedError(f"not run: {why}")

    return setup


if __name__ == "__main__":
    argv = sys.argv[1:]
    classes = next((argv[i + 1] for i, a in enumerate(argv) if a == "--classes"), "1000")
    main(
        f"Many classes: MLP {D_IN}-{WIDTH}-{WIDTH}-{classes}, N=2,000, batch 100, "
        f"{N_TEST} test inputs",
        build,
        extra_args=extra,
        script=os.path.abspath(__file__),
    )
