"""Run every benchmark script and write one Markdown report.

    python benchmarks/run_all.py                      # full run -> benchmarks/results/report.md
    python benchmarks/run_all.py --quick              # smoke run of every script
    python benchmarks/run_all.py --only digits,cnn    # a subset of the scripts
    python benchmarks/run_all.py --out PATH --threads 2 --no-memory --device cuda

Each script runs in its own interpreter (``bench_X.py ... --json``); the report gathers the
machine, the versions, the exact commands and each script's table. Copy the tables that are
to be published into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _harness import machine, versions

SCRIPTS = ["digits", "curvature", "scale", "cnn", "many_classes"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(SCRIPTS))
    p.add_argument("--out", default=os.path.join(HERE, "results", "report.md"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    names = SCRIPTS if not args.only else [s.strip() for s in args.only.split(",")]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        p.error(f"--only must name scripts among {SCRIPTS}; got {unknown}.")
    common = ["--threads", str(args.threads), "--device", args.device]
    if args.quick:
        common.append("--quick")
    if args.reps is not None:
        common += ["--reps", str(args.reps)]
    if args.no_memory:
        common.append("--no-memory")

    vers, mach = versions(), machine()
    parts = [
        "# laplace_ggn benchmarks" + (" (quick smoke run)" if args.quick else ""),
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in mach.items()) + "  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + "  ",
        "Command: `python benchmarks/run_all.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`",
        "",
        (
            "Cases run interleaved in one process (round r calls every case once, order "
            "rotated); the ratio ours/this within one run is the figure to quote, medians move "
            "with the machine's load."
        ),
        "",
    ]
    status = 0
    for name in names:
        script = os.path.join(HERE, f"bench_{name}.py")
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            js = fh.name
        cmd = [sys.executable, script, *common, "--json", js]
        print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        wall = time.perf_counter() - t0
        sys.stdout.write(proc.stdout)
        try:
            with open(js) as fh:
                data = json.load(fh)
            os.unlink(js)
            parts += [
                f"## {data['title']}",
                "",
                (f"`python benchmarks/bench_{name}.py {' '.join(common)}` ({wall:.0f} s wall)"),
                "",
                data["markdown"],
                "",
            ]
            if data.get("agreement"):
                parts += [data["agreement"], ""]
            parts += [f"Peak memory: {data['memory_method']}.", ""]
        except (OSError, json.JSONDecodeError, KeyError):
            status = 1
            parts += [f"## bench_{name}.py", "", f"failed (exit {proc.returncode}).", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(parts))
    print(f"report written to {args.out}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
