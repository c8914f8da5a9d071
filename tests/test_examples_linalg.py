"""Smoke tests: the linear-algebra examples run at small size and write their PNGs."""

from __future__ import annotations

import runpy
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _main(name: str):
    return runpy.run_path(str(EXAMPLES / name / "main.py"), run_name="example_" + name)["main"]


def _is_png(path: Path) -> bool:
    return (
        path.is_file()
        and path.stat().st_size > 1000
        and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    )


def test_linear_regression_vector_field(tmp_path: Path) -> None:
    report = _main("linear_regression")(["--out", str(tmp_path), "--small"])
    assert _is_png(tmp_path / "vecfield.png")
    # GGN-NGD flows go in a straight line to the MAP; empirical-Fisher flows do not
    assert report["ngd"]["max_deviation"] < 1e-8
    assert report["ef"]["max_deviation"] > 0.05
    assert max(report["ngd"]["end_distance"]) < 0.05


def test_second_order_inverse_products(tmp_path: Path) -> None:
    rows = _main("second_order")(["--out", str(tmp_path), "--small"])
    assert _is_png(tmp_path / "second_order.png")
    by = {(r["point"].split()[0], r["matrix"], r["method"]): r for r in rows}
    for point in ("initialisation", "MAP"):
        ggn_cg = by[(point, "ggn", "CG")]
        assert ggn_cg["rel_err"] < 1e-6 and ggn_cg["cosine"] > 1 - 1e-9
        assert ggn_cg["to_target"] is not None and ggn_cg["to_target"] <= 26
        # Neumann converges on the SPD damped GGN, but needs far more products than CG
        neu = by[(point, "ggn", "Neumann")]
        assert neu["products"] > 10 * ggn_cg["products"]
    # the Hessian at initialisation is indefinite: Neumann refuses it
    assert by[("initialisation", "hessian", "Neumann")]["note"].startswith("refused")
