"""The layering rule (DESIGN.md), read from the source with ``ast`` so it cannot regress silently.

A stage depends only on stages below it: ``train/`` imports no eval/infer/post/export; eval, infer
and export do not import ``train/`` (``post/`` may: it plugs into the engine); ``infer/`` does not
import ``export/``; the low layer imports no stage. Every import counts, lazy ones inside functions
and ``importlib.import_module("codefoundry...")`` included. The command level (``codefoundry/cli.py``,
each stage's ``cli.py``, the speedruns) may import every stage, and nothing below it imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import codefoundry

PACKAGE = Path(codefoundry.__file__).resolve().parent
STAGES = {"data", "train", "eval", "infer", "post", "export"}
LOW = {"checkpoint", "config", "runtime", "errors", "progress", "presets", "recipes", "extras", "sandbox", "model",
       "tokenizer"}
COMMANDS = {"cli", "speedrun", "speedrun_recipe", "recipe_cli"}  # plus every <stage>/cli.py
FORBIDDEN: dict[str, set[str]] = {
    "data": STAGES - {"data"},
    "train": {"eval", "infer", "post", "export"},
    "eval": {"train"},
    "infer": {"train", "export"},
    "export": {"train"},
    **{part: set(STAGES) for part in LOW},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``, relative ones resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")[:len(module.split(".")) - node.level + is_package] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if part_of(name):
                found.append((node.lineno, name))
            else:  # `from codefoundry import eval`: the names are the modules
                found += [(node.lineno, f"{name}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def part_of(module: str) -> str:
    """The layer a module belongs to: its first component below the package."""
    return module.split(".")[1] if module.count(".") else ""


def is_command(module: str) -> bool:
    return part_of(module) in COMMANDS or module.endswith(".cli")


def violations(root: Path) -> list[str]:
    """Every import under package ``root`` that breaks the rule, as ``path:line: a -> b (why)``."""
    name = root.name
    out = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        part = part_of(module)
        if part and part not in STAGES | LOW | COMMANDS:
            out.append(f"{path.relative_to(root.parent)}: {part} is in no layer; add it to tests/test_layering.py")
            continue
        if is_command(module) or not part:
            continue
        for line, target in imported(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py"):
            if not target.startswith(f"{name}.") or part_of(target) == part:
                continue
            where = f"{path.relative_to(root.parent)}:{line}: {module} -> {target}"
            if is_command(target):
                out.append(f"{where} (the command level is the top; nothing below imports it)")
            elif part_of(target) in FORBIDDEN.get(part, set()):
                out.append(f"{where} ({part}/ must not import {part_of(target)}/)")
    return out


def test_the_package_keeps_its_layers():
    found = violations(PACKAGE)
    assert not found, "layering rule broken (see DESIGN.md):\n" + "\n".join(found)


@pytest.mark.parametrize(("file", "source", "expected"), [
    ("train/step.py", "def f():\n    from codefoundry.eval.codegen import quick_humaneval\n",
     "train/ must not import eval/"),
    ("infer/run.py", "import codefoundry.export.hf as hf\n", "infer/ must not import export/"),
    ("model/x.py", "import importlib\nm = importlib.import_module('codefoundry.train.engine')\n",
     "model/ must not import train/"),
    ("config.py", "from codefoundry.infer import load\n", "config/ must not import infer/"),
    ("eval/y.py", "from ..train import engine\n", "eval/ must not import train/"),
    ("export/w.py", "from codefoundry import train\n", "export/ must not import train/"),
    ("data/z.py", "from codefoundry.cli import main\n", "nothing below imports it"),
    ("widgets.py", "x = 1\n", "widgets is in no layer"),
])
def test_a_broken_rule_is_caught(tmp_path, file, source, expected):
    root = tmp_path / "codefoundry"
    (root / file).parent.mkdir(parents=True, exist_ok=True)
    (root / file).write_text(source)
    (root / "train" / "cli.py").parent.mkdir(exist_ok=True)
    (root / "train" / "cli.py").write_text("from codefoundry.eval import codegen\n")  # the command level may
    (root / "post").mkdir(exist_ok=True)
    (root / "post" / "sft.py").write_text("from codefoundry.train.engine import train\n")  # post/ may use the engine
    found = violations(root)
    assert len(found) == 1 and expected in found[0], found
