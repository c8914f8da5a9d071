"""Smoke test: the transformer example runs at small size, prints its table, writes its PNG."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "transformer" / "main.py"


def test_transformer_example_small(tmp_path: Path, capsys) -> None:
    main = runpy.run_path(str(EXAMPLE), run_name="example_transformer")["main"]
    report = main(["--out", str(tmp_path), "--small"])
    png = Path(report["figure"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = report["metrics"]
    assert set(rows) == {"MAP", "Laplace (kfac)", "Laplace (last layer)"}
    for r in rows.values():
        assert all(math.isfinite(v) for v in r.values())
        assert r["accuracy"] > 0.6  # the task is learnt
    # linearised Laplace is less confident than the MAP network where there is no answer
    assert rows["Laplace (kfac)"]["ood_confidence"] < rows["MAP"]["ood_confidence"]
    assert "OOD confidence" in capsys.readouterr().out
