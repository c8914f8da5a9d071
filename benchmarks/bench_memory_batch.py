"""Peak memory of a fit whose single batch is larger than ``memory_budget``.

One batch of B samples gives square-root rows ``(B, C, P)`` (full, exact lowrank) or
per-sample Jacobians ``(B, C, P)`` (diag of parameters outside ``nn.Linear``).  The collectors
build them in sub-batches that fit in the budget, and exact lowrank refuses a batch whose rows
exceed the budget before computing any of them.  Each case runs in a fresh interpreter and
reports the growth of the resident-set high-water mark during ``fit`` (``VmHWM - VmRSS``
after ``/proc/self/clear_refs``, as ``_harness.peak_memory_of``), with the outcome and time.

Run from the repository root (``PYTHONPATH`` picks the implementation measured)::

    PYTHONPATH=$PWD python benchmarks/bench_memory_batch.py

Cases (float32, MLP 100-30-10, P = 3,340, C = 10):

- ``full``: B = 2,283 (B·C·P·4 bytes = 305 MB), budget 64 MiB (G itself is 42.6 MiB);
- ``lowrank refused``: exact lowrank, B = 2,700 (rows 361 MB), budget 64 MiB: refused;
- ``lowrank fits``: the same batch with a budget of 512 MiB (fit, SVD included);
- ``diag jacobian``: the same MLP written with ``F.linear`` on its own parameters (no layer
  hooks: per-sample Jacobians), B = 2,283, budget 64 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import peak_memory_of  # noqa: E402

MIB = 2**20
CASES = {
    # name: (structure, model kind, batch size, budget MiB)
    "full": ("full", "mlp", 2283, 64),
    "lowrank refused": ("lowrank", "mlp", 2700, 64),
    "lowrank fits": ("lowrank", "mlp", 2700, 512),
    "diag jacobian": ("diag", "functional", 2283, 64),
}


class _FunctionalMLP(nn.Module):
    """100-30-10 MLP on its own parameters through ``F.linear`` (no nn.Linear to hook)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(30, 100, generator=g) / 10)
        self.b1 = nn.Parameter(torch.zeros(30))
        self.w2 = nn.Parameter(torch.randn(10, 30, generator=g) / 30**0.5)
        self.b2 = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


def _model(kind: str) -> nn.Module:
    if kind == "functional":
        return _FunctionalMLP()
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 30), nn.Tanh(), nn.Linear(30, 10))


def _child(name: str) -> None:
    from laplace_ggn import LaplaceWrapper

    torch.set_num_threads(2)
    structure, kind, B, budget = CASES[name]
    model = _model(kind)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(B, 100, generator=g), torch.randint(0, 10, (B,), generator=g)
    big = DataLoader(TensorDataset(X, y), batch_size=B)
    small = DataLoader(TensorDataset(X[:8], y[:8]), batch_size=8)
    kw = {"structure": structure, "memory_budget": budget * MIB}
    LaplaceWrapper(model, "classification", **kw).fit(small)  # warm-up: thread pools, kernels
    out = {}

    def fit(_):
        t = time.perf_counter()
        try:
            LaplaceWrapper(model, "classification", **kw).fit(big)
            out["outcome"] = "fitted"
        except (ValueError, RuntimeError) as err:
            out["outcome"] = f"{type(err).__name__}: {str(err)[:60]}..."
        out["seconds"] = time.perf_counter() - t

    mib, how = peak_memory_of(fit, None)
    print("@@MEM@@" + json.dumps({"peak_mib": mib, "method": how, **out}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help="substring filter on the case names")
    args = ap.parse_args()
    if args.child:
        _child(args.child)
        return
    import laplace_ggn

    print(f"laplace_ggn from {os.path.dirname(laplace_ggn.__file__)}; torch {torch.__version__}")
    print("| case | B | budget | B·C·P·4 | peak during fit | s | outcome |")
    print("|---|---|---|---|---|---|---|")
    for name, (_, _, B, budget) in CASES.items():
        if args.only not in name:
            continue
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name], capture_output=True, text=True, check=False
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@MEM@@")]
        if not lines:
            tail = (proc.stderr or "no output").strip().splitlines()[-1:]
            print(f"| {name} | {B} | {budget} MiB | | failed: {tail} | | |")
            continue
        d = json.loads(lines[0][len("@@MEM@@") :])
        rows = B * 10 * 3340 * 4 / 1e6
        print(
            f"| {name} | {B} | {budget} MiB | {rows:.0f} MB | +{d['peak_mib']:.0f} MiB | "
            f"{d['seconds']:.2f} | {d['outcome']} |"
        )


if __name__ == "__main__":
    main()
