"""The repository's shape: every module has its place in the layers that `make lint` checks
(lint-imports, pyproject.toml), every command its console script, and no test module imports
another."""

import ast
import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = sorted((ROOT / "tests").glob("test_*.py"))


def _imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another():
    for path in TESTS:
        others = {n for n in _imported(path) if n.startswith("test_") or n == "conftest"}
        assert not others, f"{path.name} imports {others}: move what it shares to helpers.py"


def test_every_module_of_the_package_has_a_layer():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    named = {m.strip() for layer in layers for m in layer.split("|")}
    package = ROOT / "cnnjax"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert named == {f"cnnjax.{m}" for m in modules}


def test_every_command_has_a_console_script():
    """cnnjax-<name> for each command that the first import-linter layer names (the commands),
    each pointing at a `main` that exists; and the installed script runs."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = config["project"]["scripts"]
    (layers,) = [c["layers"] for c in config["tool"]["importlinter"]["contracts"]
                 if c["type"] == "layers"]  # fmt: skip
    commands = {m.strip().removeprefix("cnnjax.") for m in layers[0].split("|")}
    assert set(scripts) == {f"cnnjax-{c}" for c in commands}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
    summary = Path(sys.executable).with_name("cnnjax-summary")
    done = subprocess.run([str(summary), "model=lenet5", "format=json"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["totals"]["params"] == 59_386
