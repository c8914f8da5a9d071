"""Smoke tests: the marglik-training and continual examples run at small size and report."""

from __future__ import annotations

import math
import runpy
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _main(path: str):
    return runpy.run_path(str(EXAMPLES / path), run_name="example")["main"]


def _png(path: str) -> None:
    p = Path(path)
    assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regression_example_small(tmp_path: Path, capsys) -> None:
    report = _main("marglik_training/regression.py")(["--out", str(tmp_path), "--small"])
    _png(report["figure"])
    assert [r["width"] for r in report["rows"]] == [5, 20]
    for r in report["rows"]:
        assert (
            0 < r["sigma"] < 2 and math.isfinite(r["log_evidence"]) and math.isfinite(r["test_nll"])
        )
    assert report["evidence_choice"] in (5, 20)
    assert "<- evidence" in capsys.readouterr().out


def test_digits_example_small(tmp_path: Path, capsys) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = _main("marglik_training/digits.py")(["--out", str(tmp_path), "--small"])
    _png(report["figure"])
    rows = report["rows"]
    assert len(rows) == 3
    for r in rows.values():
        assert all(math.isfinite(v) for v in r.values())
        assert r["accuracy"] > 0.3  # learnt something in 4 epochs on 150 images
    assert report["T"] > 0
    assert "Laplace GLM probit" in capsys.readouterr().out


def test_continual_example_small(tmp_path: Path, capsys) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = _main("continual/permuted_digits.py")(
            ["--out", str(tmp_path), "--small", "--structures", "diag", "kfac"]
        )
    _png(report["figure"])
    assert set(report["means"]) == {"fine-tuning", "Laplace (diag)", "Laplace (kfac)", "joint"}
    for accs in report["accuracies"].values():
        assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs)
    assert "fine-tuning" in capsys.readouterr().out
