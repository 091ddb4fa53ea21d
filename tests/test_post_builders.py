"""Built-in data: docstring -> body pairs mined from code; tool-use conversations with real outputs."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from codefoundry.cli import main
from codefoundry.errors import UserError
from codefoundry.post.builders import docstring_pairs, tool_use_conversations
from codefoundry.post.sft_data import Source, render_examples
from codefoundry.tokenizer.chat import render_chat
from helpers_post import tiny_tokenizer

MODULE = '''
import functools

def plain(x):
    return x

@functools.cache
def area(w, h):
    """Area of a rectangle."""
    result = w * h
    return result

class Box:
    def volume(self, d):
        """Volume, given depth d."""
        if d < 0:
            raise ValueError(d)
        return self.w * d
'''


def test_docstring_pairs(tmp_path):
    (tmp_path / "shapes.py").write_text(MODULE)
    (tmp_path / "broken.py").write_text("def (:\n")
    skipped: Counter = Counter()
    records = {r["source"].split("::")[1]: r for r in docstring_pairs([tmp_path], skipped=skipped)}
    assert set(records) == {"area", "volume"}
    area = records["area"]["messages"]
    assert area[0]["content"].endswith('@functools.cache\ndef area(w, h):\n    """Area of a rectangle."""')
    assert area[1]["content"] == "    result = w * h\n    return result"
    volume = records["volume"]["messages"]
    assert "def volume(self, d):" in volume[0]["content"] and volume[1]["content"].startswith("    if d < 0:\n        raise")
    # header + body is the original function again, so it compiles
    header = volume[0]["content"].split("\n\n", 1)[1]
    compile(header + "\n" + volume[1]["content"], "volume", "exec")
    assert skipped["syntax error"] == 1 and skipped["no docstring or no body"] == 1


def test_tool_use_conversations_hold_real_outputs():
    records = list(tool_use_conversations(12, seed=0))
    tok = tiny_tokenizer()
    assert len(render_examples(records, tok, 4096)) == 12  # all render and all train something
    outputs = [m["content"] for r in records for m in r["messages"] if m["role"] == "tool"]
    assert outputs and all(not o.startswith("error") for o in outputs)
    # Outputs were produced by really running the commands, e.g. "python3 alpha.py" printing a sum.
    runs = [(r, m) for r in records for m in r["messages"] if m.get("tool_calls")]
    names = {m["tool_calls"][0]["function"]["name"] for _, m in runs}
    assert {"bash", "read_file", "write_file", "edit_file"} <= names
    for r in records:
        msgs = r["messages"]
        for i, m in enumerate(msgs):
            if m.get("tool_calls") and m["tool_calls"][0]["function"]["name"] == "bash":
                args = json.loads(m["tool_calls"][0]["function"]["arguments"])
                if args["command"].startswith("python3 -c"):  # x * y evaluated by Python for real
                    a, b = map(int, args["command"].split("(")[-1].rstrip("))'").split(", "))
                    assert msgs[i + 1]["content"].startswith(f"{a * b}\n")
        render_chat(tok, msgs)


def test_sources_and_cli(tmp_path, capsys):
    with pytest.raises(UserError):
        Source.parse("data.jsonl@heavy")
    with pytest.raises(UserError):
        list(Source.parse(str(tmp_path / "missing.jsonl")).records())
    out = tmp_path / "tools.jsonl"
    assert main(["sft-data", "tools", "--count", "3", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert main(["sft", "--checkpoint", str(tmp_path / "nope"), "--data", str(out), "--out", str(tmp_path / "r"),
                 "train.max_steps=1"]) == 2
    assert "error" in capsys.readouterr().err
