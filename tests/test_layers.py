"""The package's layers: each imports only from the layers before it, so a change has one obvious home."""

from __future__ import annotations

import ast
from pathlib import Path

import radio

ROOT = Path(radio.__file__).parent
LAYERS = [{"errors", "logs", "native", "status"}, {"config"}, {"musicgen"}, {"station"}, {"engine", "pool"}, {"output"}, {"control"},
          {"daemon", "cli"}]
TOOLS = "tools"  # beside the layers: may use any of them, and only the CLI may use it (lazily, for its commands)


def _unit(module: str) -> str:
    """radio.musicgen.model -> musicgen; radio.engine -> engine."""
    return module.split(".")[1] if module.count(".") else module


def _imports(path: Path) -> set[str]:
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("radio."):
                found.add(_unit(name))
            elif name == "radio":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(_unit(a.name) for a in node.names if a.name.startswith("radio."))
    return found


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def test_every_layer_imports_only_from_the_layers_before_it() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        unit = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem
        if unit in ("__init__", "__main__"):
            continue
        for dep in _imports(path) - {unit}:
            if unit == TOOLS:
                continue
            if dep == TOOLS:
                if unit != "cli":
                    wrong.append(f"{rel} imports tools")
                continue
            if _layer(dep) > _layer(unit):
                wrong.append(f"{rel} ({unit}) imports {dep}, a layer above it")
    assert not wrong, "\n".join(wrong)


def test_radio_run_does_not_load_the_test_model_builder() -> None:
    import subprocess
    import sys

    code = ("import sys, radio.cli, radio.daemon; "
            "print(sorted(m for m in sys.modules if m.startswith('radio.tools.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
