"""Smoke test: the Bayesian-optimisation example runs at small size and reports its regrets."""

from __future__ import annotations

import math
import runpy
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_bayesopt_example_smoke(tmp_path: Path, capsys) -> None:
    main = runpy.run_path(str(EXAMPLES / "bayesopt/main.py"), run_name="example")["main"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = main(["--out", str(tmp_path), "--smoke", "--no-progress"])
    assert Path(report["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["rows"]) == {"branin", "hartmann6"}
    for problem, methods in report["curves"].items():
        for method, runs in methods.items():
            for regret in runs:
                assert len(regret) == 10
                assert all(math.isfinite(r) and r >= -1e-4 for r in regret), (problem, method)
                assert all(b <= a for a, b in zip(regret, regret[1:]))  # best so far
    assert "Thompson < random" in capsys.readouterr().out
