"""The `laplace-ggn` command, its demo, and the code in README.md / docs/getting-started.md."""

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from laplace_ggn import cli
from laplace_ggn._checks import Structure
from laplace_ggn.structures import STRUCTURES

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ help


def test_help_lists_the_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "laplace_ggn.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "benchmark" in proc.stdout


def test_console_script_is_installed():
    # the script installed with this interpreter (a venv's bin/, or pyenv's version bin/)
    exe = Path(sys.executable).parent / "laplace-ggn"
    if not exe.is_file():
        pytest.skip(f"no console script next to {sys.executable}")
    proc = subprocess.run([exe, "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--structure" in proc.stdout


def test_demo_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--structure", "--out", "--small", "--no-progress", "--seed"):
        assert option in out


def test_no_command_prints_help_and_returns_2(capsys):
    assert cli.main([]) == 2
    assert "usage: laplace-ggn" in capsys.readouterr().out


def test_bad_structure_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--structure", "kron"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_run_demo_rejects_unknown_structure(tmp_path):
    with pytest.raises(ValueError, match="structure must be one of .*'kfac'.*got 'kron'"):
        cli.run_demo(structure="kron", out=tmp_path)


def test_out_that_is_a_file_refused_before_any_work(tmp_path, monkeypatch, capsys):
    # the whole demo used to run, then fail with a raw FileExistsError
    target = tmp_path / "metrics.txt"
    target.write_text("keep me")

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started before checking --out")

    monkeypatch.setattr(cli.demo, "load_digits_splits", no_work)
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--small", "--out", str(target)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--out must be a directory for the figures and metrics.json; got" in err
    assert "an existing file. Pass a new or existing directory." in err
    with pytest.raises(
        ValueError, match=r"--out must be a directory .* \(its parent .* is a file\)"
    ):
        cli.run_demo(out=target / "sub", small=True)
    assert target.read_text() == "keep me"
    assert cli.demo.check_out_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"


# ------------------------------------------------------------------------------------ data


def test_digit_splits_are_standardised_and_ood_is_rotated():
    config = cli.DemoConfig.small()
    d = cli.load_digits_splits(config, seed=0)
    assert d["x_train"].shape == (config.n_train, 64) and d["x_test"].shape == (config.n_test, 64)
    assert d["x_ood"].shape == d["x_test"].shape and d["y_test"].shape == (config.n_test,)
    torch.testing.assert_close(
        d["x_train"].mean(0), torch.zeros(64, dtype=torch.float64), rtol=0, atol=1e-12
    )
    # OOD images are far from their unrotated originals
    dist = (d["x_ood"] - d["x_test"]).norm(dim=1) / d["x_test"].norm(dim=1).clamp_min(1e-9)
    assert float(dist.median()) > 0.5
    # the rotation without noise: image 0 is turned by 90 degrees
    from sklearn.datasets import load_digits

    imgs = torch.as_tensor(load_digits().images[:3], dtype=torch.float64)
    rot = cli.data._rotate_and_noise(
        imgs.reshape(3, 64), generator=torch.Generator().manual_seed(0)
    )
    expect = torch.rot90(imgs[0], 1, dims=(0, 1)).reshape(64)
    assert float((rot[0] - expect).abs().mean()) < 4.0  # only the noise (std 4, clipped) differs
    off_by_rotation = float((rot[0] - imgs[0].reshape(64)).abs().mean())
    assert off_by_rotation > float((rot[0] - expect).abs().mean())


# ------------------------------------------------------------------------------------ demo


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["demo", "--small", "--out", str(out), "--no-progress"])
    return code, buf.getvalue(), out


def test_demo_prints_the_tables(small_demo):
    code, text, _ = small_demo
    assert code == 0
    assert "ECE" in text and "NLL" in text and "Brier" in text and "AUROC" in text
    available = [s.value for s in Structure if s in STRUCTURES]
    for name in ["MAP"] + [f"LA {s}" for s in available]:
        # one row in each table
        assert len(re.findall(rf"^{re.escape(name)}\s+\d", text, flags=re.M)) == 2, name


def test_demo_writes_figures_and_metrics(small_demo):
    _, text, out = small_demo
    for name in ("reliability.png", "reliability_ood.png", "confidence.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 10_000
        assert str(path) in text
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"MAP"}
    for row in metrics.values():
        for split in ("test", "ood"):
            for key in ("accuracy", "nll", "ece", "brier", "confidence"):
                assert 0 <= row[split][key] < 100
        assert 0 <= row["ood"]["auroc"] <= 1


def test_demo_table_matches_metrics(small_demo):
    _, text, out = small_demo
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for name, row in metrics.items():
        line = re.search(rf"^{re.escape(name)}\s+(\S+)\s+(\S+)\s+(\S+)", text, flags=re.M)
        acc, nll, ece = (float(v) for v in line.groups())
        assert acc == pytest.approx(row["test"]["accuracy"], abs=6e-4)
        assert nll == pytest.approx(row["test"]["nll"], abs=6e-4)
        assert ece == pytest.approx(row["test"]["ece"], abs=6e-4)


def test_demo_laplace_is_less_confident_out_of_distribution(small_demo):
    _, _, out = small_demo
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    laplace = {k: v for k, v in metrics.items() if k != "MAP"}
    assert laplace, "no Laplace structure was fitted"
    for name, row in laplace.items():
        assert row["ood"]["confidence"] < metrics["MAP"]["ood"]["confidence"], name
        assert row["ood"]["nll"] < metrics["MAP"]["ood"]["nll"], name
        assert row["prior_precision"] > 0 and row["fit_s"] >= 0


def _raising_spec(spec):
    def make_collector(*args, **kwargs):
        raise NotImplementedError("lowrank is switched off in this test")

    return replace(spec, make_collector=make_collector)


def test_demo_skips_a_structure_that_raises_not_implemented(tmp_path, monkeypatch, capsys):
    if Structure.LOWRANK not in STRUCTURES:
        pytest.skip("lowrank not available")
    monkeypatch.setitem(STRUCTURES, Structure.LOWRANK, _raising_spec(STRUCTURES[Structure.LOWRANK]))
    result = cli.run_demo(
        structure="lowrank", out=tmp_path, small=True, progress=False, figures=False
    )
    text = capsys.readouterr().out
    assert "note: structure 'lowrank' skipped: lowrank is switched off in this test" in text
    assert set(result.metrics) == {"MAP"} and "lowrank" in result.skipped
    assert (tmp_path / "metrics.json").is_file()


def test_demo_notes_an_unavailable_structure(tmp_path, monkeypatch, capsys):
    monkeypatch.delitem(STRUCTURES, Structure.KFAC, raising=False)
    result = cli.run_demo(structure="kfac", out=tmp_path, small=True, progress=False, figures=False)
    assert "note: structure 'kfac' skipped: not available" in capsys.readouterr().out
    assert set(result.metrics) == {"MAP"}


def test_demo_restores_the_thread_count(tmp_path, monkeypatch):
    monkeypatch.delitem(STRUCTURES, Structure.KFAC, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cli.run_demo(
            structure="kfac",
            out=tmp_path,
            small=True,
            progress=False,
            figures=False,
            stream=open(tmp_path / "log.txt", "w"),
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------- benchmark


def test_benchmark_without_suite_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(cli.benchmark, "_benchmark_script", lambda: None)
    assert cli.main(["benchmark", "--quick"]) == 2
    assert "benchmarks/run_all.py not found" in capsys.readouterr().err


def test_benchmark_runs_the_suite_with_its_arguments(tmp_path, monkeypatch):
    script = tmp_path / "benchmarks" / "run_all.py"
    script.parent.mkdir()
    record = tmp_path / "args.json"
    script.write_text(
        f"import json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\nsys.exit(3)\n"
    )
    monkeypatch.setattr(cli.benchmark, "_benchmark_script", lambda: script)
    assert cli.main(["benchmark", "--quick", "--only", "digits"]) == 3
    assert json.loads(record.read_text()) == ["--quick", "--only", "digits"]


def test_benchmark_script_is_found_in_the_checkout():
    found = cli.benchmark._benchmark_script()
    expected = ROOT / "benchmarks" / "run_all.py"
    assert found == (expected if expected.is_file() else None)


# ----------------------------------------------------------------------------------- docs


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = re.search(r"^## ", text[start + len(heading) :], flags=re.M)
    return text[start : start + len(heading) + (nxt.start() if nxt else len(text))]


def _code_blocks(text: str, lang: str | None = None) -> list[str]:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)
    return [body for tag, body in blocks if lang is None or tag == lang]


def test_readme_quick_start_is_make_demo_and_make_test():
    quick = _section((ROOT / "README.md").read_text(), "## Quick start")
    first = _code_blocks(quick)[0]
    lines = [ln.strip() for ln in first.splitlines() if ln.strip()]
    assert lines == ["make demo", "make test"]


def test_makefile_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    assert "laplace-ggn demo" in makefile


def _run_example(code: str) -> dict:
    import contextlib
    import io

    namespace: dict = {"__name__": "__example__"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "<example>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("path", ["README.md", "docs/getting-started.md"])
def test_usage_example_runs(path):
    text = (ROOT / path).read_text()
    code = _code_blocks(text, "python")[0]
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    n_lines = len(lines)
    assert n_lines <= 12, f"the usage example has grown to {n_lines} lines"
    ns = _run_example(code)
    la, pred = ns["la"], ns["pred"]
    assert la.is_fitted
    B, C = pred.mean.shape
    torch.testing.assert_close(
        pred.mean.sum(-1), torch.ones(B, dtype=pred.mean.dtype), rtol=0, atol=1e-5
    )
    assert pred.variance.shape == (B, C) and bool((pred.variance >= 0).all())
    # the prior was tuned away from its initial value by the evidence
    assert float(la.prior_precision) != 1.0
    assert bool(torch.isfinite(la.log_marginal_likelihood()))


def test_readme_and_getting_started_share_the_example():
    readme = _code_blocks((ROOT / "README.md").read_text(), "python")[0]
    started = _code_blocks((ROOT / "docs/getting-started.md").read_text(), "python")[0]
    assert readme == started


def test_docs_index_links_resolve():
    index = (ROOT / "docs" / "index.md").read_text()
    own = ["getting-started.md", "concepts.md", "api.md", "migration-from-laplace-torch.md"]
    for page in own:
        assert f"({page})" in index
        assert (ROOT / "docs" / page).is_file(), page
    readme_imgs = re.findall(r"docs/(img/[\w.-]+\.png)", (ROOT / "README.md").read_text())
    index_imgs = re.findall(r"\((img/[\w.-]+\.png)\)", index)
    assert len(readme_imgs) >= 3 and len(index_imgs) >= 3
    for img in readme_imgs + index_imgs:
        assert (ROOT / "docs" / img).is_file(), img


def test_structure_choices_follow_the_registry(monkeypatch, capsys):
    monkeypatch.setitem(STRUCTURES, "toy", next(iter(STRUCTURES.values())))
    assert cli.structure_choices()[-1] == "all" and "toy" in cli.structure_choices()
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    assert "toy" in capsys.readouterr().out
