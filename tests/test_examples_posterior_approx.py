"""Smoke tests: the posterior_approx examples run at small size and show what they claim."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "posterior_approx"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"posterior_approx_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linear_model(tmp_path):
    s = _load("linear_model").main(["--out", str(tmp_path), "--small"])
    for png in ("linear_exact.png", "linear_overparam.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    exact, over = s["exact"], s["overparam"]
    assert exact["P"] <= exact["N"] and exact["rank_Phi"] == exact["P"] and exact["kernel_dim"] == 0
    assert exact["kernel_variance_fraction"] == 0.0 and exact["kernel_variance_on_grid_max"] == 0.0
    assert over["P"] > over["N"] and over["kernel_dim"] >= over["P"] - over["N"]
    assert over["kernel_variance_on_train_max"] < 1e-6 * over["kernel_variance_on_grid_max"]
    # linear in θ: kernel samples leave the training fit as it was
    # (up to the few range directions below tol·λ_max, counted as kernel)
    assert over["train_rmse_kernel_network"] == pytest.approx(over["train_rmse_map"], rel=1e-4)
    assert json.loads((tmp_path / "summary.json").read_text())["exact"]["kernel_dim"] == 0


def test_mlp_regression(tmp_path, capsys):
    s = _load("mlp_regression").main(["--out", str(tmp_path), "--small"])
    for png in ("variance_grid.png", "fit_table.png", "functions.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "increase of the network's training RMSE over MAP: kernel-only" in out
    net, lin = s["train_rmse_network"], s["train_rmse_linearised"]
    inc_kernel = net["kernel"] - net["MAP"]
    inc_nonkernel = net["non-kernel"] - net["MAP"]
    assert inc_kernel > 3 * inc_nonkernel > 0
    assert lin["kernel"] == pytest.approx(net["MAP"], rel=1e-3)
    assert s["kernel_share_of_predictive_variance_on_train"] < 1e-4
    assert s["kernel_share_of_predictive_variance_on_grid_max"] > 0.2


def test_digits(tmp_path):
    s = _load("digits").main(["--out", str(tmp_path), "--small"])
    for png in ("digits_kernel_train.png", "digits_kernel_test.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    acc = s["train_accuracy"]
    assert s["kernel_dim"] > 0
    assert acc["kernel/linearised"] == pytest.approx(acc["MAP/linearised"], abs=1e-12)
    assert acc["kernel/network"] < acc["MAP/network"]
