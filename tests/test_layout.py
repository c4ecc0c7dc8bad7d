"""The package's layers: no import (at module top or inside a function) points up from a lower
layer to the trainer, the command line or the experiments."""

from __future__ import annotations

import ast
from pathlib import Path

import modlm

PACKAGE = Path(modlm.__file__).parent

# Who may import each upper layer: the CLI only from `python -m modlm`; the trainer from the CLI
# and the experiment runner (which trains each run); the experiments from the CLI and each other.
UPPER = {
    "modlm.cli": ("modlm.__main__",),
    "modlm.train": ("modlm.cli", "modlm.experiments.runner", "modlm.experiments.plan"),
    "modlm.experiments": ("modlm.cli", "modlm.experiments"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every module `source` (module `name`) imports anywhere in its body, relative imports
    resolved; `from a import b` counts as importing a.b too (b may be a module), as does
    `importlib.import_module("a.b")` with a literal name."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            found.add(node.args[0].value)
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def upward_imports(name: str, imported: set[str]) -> list[str]:
    return sorted(f"{name} imports {target}" for target in imported
                  for upper, allowed in UPPER.items()
                  if within(target, upper) and not within(name, upper)
                  and not any(within(name, a) for a in allowed))


def test_no_module_imports_the_trainer_the_cli_or_the_experiments_from_below():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 40 and any(p.name == "train.py" for p in modules)
    found = []
    for path in modules:
        name = module_name(path)
        found += upward_imports(name, imports(path.read_text(), name, path.name == "__init__.py"))
    assert found == []


def test_the_import_check_sees_lazy_relative_and_dynamic_imports():
    source = ("import modlm.flops\n"
              "def f():\n"
              "    from modlm import train\n"
              "    from .. import cli\n"
              "    importlib.import_module('modlm.experiments.demo')\n")
    seen = imports(source, "modlm.hf.export")
    assert {"modlm.flops", "modlm.train", "modlm.cli", "modlm.experiments.demo"} <= seen
    assert upward_imports("modlm.hf.export", seen) == [
        "modlm.hf.export imports modlm.cli", "modlm.hf.export imports modlm.experiments.demo",
        "modlm.hf.export imports modlm.train"]
    # The allowed arrows stay allowed: the CLI trains, the runner trains, an experiment imports
    # the runner.
    assert upward_imports("modlm.cli", {"modlm.train", "modlm.experiments.runner"}) == []
    assert upward_imports("modlm.experiments.demo", {"modlm.experiments.runner"}) == []
    assert upward_imports("modlm.experiments.demo", {"modlm.train"}) == [
        "modlm.experiments.demo imports modlm.train"]
