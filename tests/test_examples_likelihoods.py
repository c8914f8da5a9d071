"""Smoke tests: the likelihood examples run at small size and report sensible figures."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _main(name: str):
    return runpy.run_path(str(EXAMPLES / name / "main.py"), run_name="example_" + name)["main"]


def test_custom_likelihood_student_t(capsys) -> None:
    report = _main("custom_likelihood")(["--small"])
    t, gauss = report["student_t"], report["gaussian"]
    assert all(math.isfinite(v) for r in report.values() for v in r.values())
    # the Student-t fit is not pulled by the outliers; the Gaussian one is
    assert t["rmse_clean"] < gauss["rmse_clean"]
    assert 0.5 < t["coverage_90"] <= 1.0
    assert "clamped to its positive semi-definite part" in capsys.readouterr().out


def test_reward_model_example() -> None:
    pytest.importorskip("transformers")
    report = _main("reward_model")(["--small"])
    assert all(math.isfinite(v) for v in report.values())
    assert report["reward_variance_mean"] > 0
    assert 0 <= report["laplace_accuracy"] <= 1
