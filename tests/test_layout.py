"""The layout the design asks for: no module imports from a layer above it, and no function outside the
kernels is longer than 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the hetero_moe packages and modules it must not import
FORBIDDEN = {
    "kernels": ["ops", "inject", "loader", "engine", "server", "cli", "llm", "settings", "bench", "synth", "tune"],
    "ops": ["inject", "loader", "engine", "server", "cli", "llm", "settings", "bench", "synth", "tune"],
    "inject": ["loader", "engine", "server", "cli", "llm", "bench", "synth", "tune"],
    "loader": ["engine", "server", "cli", "llm", "bench", "synth", "tune"],
    "engine": ["server", "cli", "llm", "bench", "synth", "tune"],
    "server": ["cli", "bench", "synth", "tune"],
}


def modules(package: str) -> list[Path]:
    base = ROOT / "kernels" if package == "kernels" else ROOT / "hetero_moe" / package
    return sorted(base.rglob("*.py"))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_no_import_from_a_layer_above(package: str) -> None:
    bad = []
    for path in modules(package):
        for name in imported(path):
            parts = name.split(".")
            if parts[0] == "hetero_moe" and len(parts) > 1 and parts[1] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_functions_outside_kernels_are_at_most_80_lines() -> None:
    long = []
    for path in sorted((ROOT / "hetero_moe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)
