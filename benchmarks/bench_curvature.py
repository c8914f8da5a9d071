"""Curvature kernels on an MLP 64-128-128-10 (P = 26,122), N = 1,000 digits, batch 100.

Reference side:
* one GGN-vector product over the data: curvlinops ``GGNLinearOperator @ v``;
* the exact GGN diagonal: BackPACK ``DiagGGNExact`` summed over the batches, and
  laplace-torch's diag fit (default curvlinops backend);
* KFAC factors, exact type-2: curvlinops ``KFACLinearOperator(fisher_type="type-2")
  .compute_kronecker_factors()``, and laplace-torch's kron fit;
* the floor: one training epoch (forward + backward of the summed cross-entropy, batch 100).

Ours: ``laplace_ggn.operators.GGNOperator @ v`` (default, and with ``cache=True``: the first
product, which builds the per-batch graphs, and a later one, which reuses them; curvlinops
recomputes everything at each product, so its row is repeated in each of these tasks),
``LaplaceWrapper(structure="diag").fit`` and ``LaplaceWrapper(structure="kfac").fit``. All
losses are sums over the data (DESIGN.md).

    python benchmarks/bench_curvature.py [--quick]
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C
import _ours
import torch
from _harness import FLOOR, OURS, Case, main
from torch import nn


def _problem(args):
    n = 200 if args.quick else 1000
    Xtr, ytr, _, _ = C.digits(args.seed)
    X, y = Xtr[:n], ytr[:n]
    model = C.mlp([64, 128, 128, 10], act=nn.ReLU, seed=args.seed).eval()
    assert C.n_params(model) == 26122
    dl = C.loader(X, y, 100)
    v = torch.randn(C.n_params(model), generator=torch.Generator().manual_seed(1))
    return n, model, dl, list(dl), v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check(args) -> str:
    """Ours against the references on this problem: relative errors (float32)."""
    n, model, dl, batches, v = _problem(args)
    from curvlinops import GGNLinearOperator

    G = GGNLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        list(model.parameters()),
        batches,
        check_deterministic=False,
        num_data=n,
    )
    ref_gv = G @ v
    ours_op = _ours.ggn_operator(model, dl)
    err = _rel(ours_op @ v, ref_gv)
    cached = _ours.ggn_operator(model, dl, cache=True)
    err_c = max(_rel(cached @ v, ref_gv) for _ in range(2))
    lines = [
        f"- GGN matvec: ‖ours − curvlinops‖/‖curvlinops‖ = {err:.1e} (default), "
        f"{err_c:.1e} (cache=True, first and later product; cache "
        f"{getattr(cached, '_cached_bytes', 0) / 2**20:.1f} MiB of saved tensors)"
    ]
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact

        m = extend(copy.deepcopy(model))
        loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
        diag = [torch.zeros_like(p) for p in m.parameters()]
        for xb, yb in batches:
            m.zero_grad(set_to_none=True)
            with backpack(DiagGGNExact()):
                loss_fn(m(xb), yb).backward()
            for d, p in zip(diag, m.parameters()):
                d += p.diag_ggn_exact
        ref_d = torch.cat([d.flatten() for d in diag])
        lines.append(
            f"- GGN diagonal: ‖ours − BackPACK‖/‖BackPACK‖ = {_rel(ours_op.diagonal(), ref_d):.1e}"
        )
    except NotImplementedError as e:
        lines.append(f"- GGN diagonal: not compared ({e})")
    return "Agreement (float32):\n" + "\n".join(lines)


def build(args) -> list[Case]:
    n, model, dl, batches, v = _problem(args)
    params = list(model.parameters())

    # ---- curvlinops GGN matvec
    def cl_ggn_setup():
        from curvlinops import GGNLinearOperator

        return GGNLinearOperator(
            model,
            nn.CrossEntropyLoss(reduction="sum"),
            params,
            batches,
            check_deterministic=False,
            num_data=n,
        )

    # ---- curvlinops KFAC type-2 factors
    def cl_kfac_setup():
        from curvlinops import FisherType, KFACLinearOperator

        return KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(reduction="sum"),
            params,
            batches,
            fisher_type=FisherType.TYPE2,
            check_deterministic=False,
            num_data=n,
            num_per_example_loss_terms=1,
        )

    # ---- BackPACK exact diagonal GGN
    def bp_setup():
        from backpack import extend

        m = extend(copy.deepcopy(model))
        return m, extend(nn.CrossEntropyLoss(reduction="sum"))

    def bp_diag(state):
        from backpack import backpack
        from backpack.extensions import DiagGGNExact

        m, loss_fn = state
        diag = [torch.zeros_like(p) for p in m.parameters()]
        for xb, yb in batches:
            m.zero_grad(set_to_none=True)
            with backpack(DiagGGNExact()):
                loss_fn(m(xb), yb).backward()
            for d, p in zip(diag, m.parameters()):
                d += p.diag_ggn_exact
        return diag

    def lt_fit(structure):
        from laplace import Laplace

        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
        la.fit(dl, progress_bar=False)
        return la

    def cached_first(G):
        G.clear_cache()
        return G @ v

    def cached_later_setup():
        G = _ours.ggn_operator(model, dl, cache=True)
        G @ v
        return G

    mv_cached_1 = "GGN matvec, cache=True: 1st product"
    mv_cached_n = "GGN matvec, cache=True: later products"
    return [
        Case("GGN matvec", "curvlinops GGNLinearOperator", lambda G: G @ v, setup=cl_ggn_setup),
        # SLOT ours: laplace_ggn.operators.GGNOperator(model, "classification", dl) @ v
        Case(
            "GGN matvec",
            "laplace_ggn GGNOperator",
            lambda G: G @ v,
            setup=lambda: _ours.ggn_operator(model, dl),
            role=OURS,
        ),
        Case(mv_cached_1, "curvlinops GGNLinearOperator", lambda G: G @ v, setup=cl_ggn_setup),
        Case(
            mv_cached_1,
            "laplace_ggn GGNOperator(cache=True)",
            cached_first,
            setup=lambda: _ours.ggn_operator(model, dl, cache=True),
            role=OURS,
        ),
        Case(mv_cached_n, "curvlinops GGNLinearOperator", lambda G: G @ v, setup=cl_ggn_setup),
        Case(
            mv_cached_n,
            "laplace_ggn GGNOperator(cache=True)",
            lambda G: G @ v,
            setup=cached_later_setup,
            role=OURS,
        ),
        Case("exact diag GGN", "BackPACK DiagGGNExact", bp_diag, setup=bp_setup),
        Case("exact diag GGN", "laplace-torch diag fit", lambda _: lt_fit("diag")),
        # SLOT ours: LaplaceWrapper(model, structure="diag").fit(dl)
        Case(
            "exact diag GGN",
            "laplace_ggn diag fit",
            lambda _: _ours.fit(model, dl, "diag"),
            role=OURS,
        ),
        Case(
            "KFAC type-2",
            "curvlinops KFACLinearOperator",
            lambda K: K.compute_kronecker_factors(),
            setup=cl_kfac_setup,
        ),
        Case("KFAC type-2", "laplace-torch kron fit", lambda _: lt_fit("kron")),
        # SLOT ours: LaplaceWrapper(model, structure="kfac").fit(dl)
        Case(
            "KFAC type-2", "laplace_ggn kfac fit", lambda _: _ours.fit(model, dl, "kfac"), role=OURS
        ),
        Case(f"epoch (fwd+bwd, N={n})", "torch", lambda _: C.epoch(model, dl), role=FLOOR),
    ]


if __name__ == "__main__":
    main(
        "Curvature kernels: MLP 64-128-128-10 (P=26,122), N=1,000, batch 100",
        build,
        script=os.path.abspath(__file__),
        check=check,
    )
