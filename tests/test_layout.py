"""The house rules that keep the library readable without the demo: nothing outside `vir/demo/` imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import vir

SRC = Path(vir.__file__).resolve().parent
DEMO = SRC / "demo"


def _imported_modules(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_the_library_never_imports_the_demo():
    offenders = sorted(
        f"{path.relative_to(SRC)} imports {module}"
        for path in SRC.rglob("*.py") if DEMO not in path.parents
        for module in _imported_modules(path)
        if module == "vir.demo" or module.startswith("vir.demo.")
    )
    assert not offenders, offenders
    assert any(DEMO.rglob("*.py")), "the check found no demo files: it would pass vacuously"


def test_import_scan_sees_a_demo_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from vir.demo.synthetic import generate\nimport vir.demo.bases\n")
    assert {"vir.demo.synthetic", "vir.demo.bases"} <= set(_imported_modules(probe))


def test_research_lives_outside_the_package_and_benchmarks_hold_benchmarks_only():
    repo = SRC.parents[1]
    assert not list((repo / "benchmarks").glob("probe_*.py")) and not list((repo / "benchmarks").glob("gpu_sweep*"))
    assert (repo / "research" / "probes" / "gpu_sweep.sh").is_file()
    shipped = [p.relative_to(SRC) for p in SRC.rglob("*") if p.name.startswith(("probe_", "gpu_sweep", "gpu_trains"))]
    assert not shipped, shipped  # the package ships what a user runs, not the research behind the demo
    assert "probes" not in (repo / "pyproject.toml").read_text()
