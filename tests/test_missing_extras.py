"""A command whose optional dependency is missing says so in one line, naming the extra (exit 2,
no traceback); and every third-party import in the package is a core dependency or has an extra."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import codefoundry
from codefoundry.errors import UserError
from codefoundry.extras import EXTRAS, missing_message, require

ROOT = Path(codefoundry.__file__).resolve().parents[1]
IMPORT_NAMES = {"pyyaml": "yaml"}  # distribution -> module, where they differ
GUARDED = {"triton"}  # comes with CUDA builds of torch; its import is guarded and falls back

# Runs the CLI with modules hidden the way a missing install hides them.
HIDE_AND_RUN = """
import importlib.abc, sys
hidden = set(sys.argv[1].split(","))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Hide())
from codefoundry.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_without(hidden: set[str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE_AND_RUN, ",".join(sorted(hidden)), *argv],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)


def assert_one_line_naming(result: subprocess.CompletedProcess, extra: str) -> None:
    err = result.stderr.strip()
    assert result.returncode == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"'{extra}' extra" in err and f"pip install 'codefoundry[{extra}]'" in err, err


def dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def third_party_imports() -> dict[str, str]:
    """Top-level module -> one file importing it, for every non-stdlib import in the package."""
    found: dict[str, str] = {}
    for path in (ROOT / "codefoundry").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                beside = (path.parent / f"{top}.py").exists()  # a script importing its sibling file
                if top not in sys.stdlib_module_names and top != "codefoundry" and not beside:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_optional_import_names_an_extra_that_exists():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {IMPORT_NAMES.get(d, d) for d in map(dist_name, project["dependencies"])}
    unmapped = {m: f for m, f in third_party_imports().items() if m not in core | set(EXTRAS) | GUARDED}
    assert not unmapped, f"imports with no extra in codefoundry/extras.py: {unmapped}"
    assert set(EXTRAS.values()) <= set(project["optional-dependencies"])


def test_message_and_require():
    assert missing_message("torchao.quantization") == (
        "torchao is not installed; it comes with the 'quant' extra: pip install 'codefoundry[quant]'")
    assert missing_message("no_such_module") is None and missing_message(None) is None
    with pytest.raises(ModuleNotFoundError):  # not an optional dependency: a bug, shown as one
        require("codefoundry_no_such_module")
    assert require("json").dumps([]) == "[]"


def test_require_names_the_extra_of_a_missing_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what an absent package looks like to import
    with pytest.raises(UserError, match=r"gguf is not installed; .*'export' extra"):
        require("gguf")


def test_help_needs_no_optional_dependency():
    result = run_without(set(EXTRAS), "--help")
    assert result.returncode == 0 and "export" in result.stdout, result.stderr


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer, tmp_path_factory):
    from test_export_common import make_checkpoint

    path = tmp_path_factory.mktemp("extras") / "ckpt"
    make_checkpoint(path, tiny_tokenizer[1])
    return path


@pytest.mark.parametrize("hidden, argv, extra", [
    ("gguf", ["export", "--format", "gguf", "--out", "{tmp}/m.gguf"], "export"),
    ("transformers", ["export", "--format", "hf", "--out", "{tmp}/hf"], "hf"),
    ("gguf", ["import", "--from", "gguf", "{tmp}/m.gguf", "--out", "{tmp}/imported"], "export"),
    ("transformers", ["import", "--from", "hf", "{tmp}", "--out", "{tmp}/imported"], "hf"),
    ("datatrove", ["eval", "bpb", "--data", "{tmp}", "--device", "cpu"], "data"),
    ("datatrove", ["data", "prepare", "--tokenizer", "{tokenizer}", "--out", "{tmp}/data"], "data"),
    ("fastapi", ["serve", "--device", "cpu"], "serve"),
])
def test_command_without_its_extra_prints_one_line(checkpoint, tiny_tokenizer, tmp_path, hidden, argv, extra):
    argv = [a.format(tmp=tmp_path, tokenizer=tiny_tokenizer[1]) for a in argv]
    if argv[0] in ("export", "eval", "serve"):
        argv += ["--checkpoint", str(checkpoint)]
    assert_one_line_naming(run_without({hidden}, *argv), extra)


def test_quantized_cpu_generation_needs_no_torchao(checkpoint):
    result = run_without({"torchao"}, "generate", "--checkpoint", str(checkpoint), "--prompt", "def ",
                         "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu", "--quantize", "int8")
    assert result.returncode == 0 and result.stdout.startswith("def "), result.stderr
