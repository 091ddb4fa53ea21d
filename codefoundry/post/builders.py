"""Post-training data that needs no download.

* :func:`docstring_pairs` — instruction pairs mined from a code corpus: a function's
  signature and docstring are the request, its body is the answer (the same split as
  HumanEval prompts and completions).
* :func:`tool_use_conversations` — agent conversations whose tool outputs are real: each
  scenario runs the agent's own tools (:class:`~codefoundry.infer.tools.Workspace`) in a
  scratch directory, and the final answer is written from what the tools returned.
* :func:`preference_pairs_from_tests` — DPO pairs from executed tests: sampled answers that
  pass a problem's tests are *chosen*, ones that fail are *rejected*.
"""

from __future__ import annotations

import ast
import json
import random
import tempfile
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from codefoundry.data.sources import iter_source_files, read_text
from codefoundry.infer.tools import AGENT_SYSTEM_PROMPT, Workspace

DOCSTRING_REQUEST = "Write the body of this Python function.\n\n{header}"
MAX_BODY_LINES = 40


def _function_pairs(source: str, where: str, skipped: Counter) -> Iterator[dict[str, Any]]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        skipped["syntax error"] += 1
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2:
            skipped["no docstring or no body"] += 1
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        header = "\n".join(lines[start:node.body[0].end_lineno])
        body = "\n".join(lines[node.body[0].end_lineno:node.end_lineno])
        if body.count("\n") + 1 > MAX_BODY_LINES:
            skipped["body too long"] += 1
            continue
        # Dedent header and body together so a method's body keeps its indentation relative to the def.
        indent = len(header) - len(header.lstrip())
        header = textwrap.dedent(header)
        body = "\n".join(ln[indent:] if not ln[:indent].strip() else ln for ln in body.splitlines())
        yield {"messages": [{"role": "user", "content": DOCSTRING_REQUEST.format(header=header)},
                            {"role": "assistant", "content": body}],
               "source": f"{where}::{node.name}"}


def docstring_pairs(sources: list[Path], limit: int = 0, skipped: Counter | None = None) -> Iterator[dict[str, Any]]:
    """Chat records (OpenAI messages) for documented functions in ``.py`` files under ``sources``."""
    skipped = skipped if skipped is not None else Counter()
    n = 0
    for sf in iter_source_files(sources):
        if sf.path.suffix != ".py":
            continue
        text, reason = read_text(sf.path)
        if reason:
            skipped[reason] += 1
            continue
        for record in _function_pairs(text, sf.relpath, skipped):
            yield record
            n += 1
            if limit and n >= limit:
                return


# --- synthetic tool use ---------------------------------------------------------------------

NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "zeta"]


def _call(name: str, **arguments: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


class _Conversation:
    """Builds one conversation while really running each tool call in the workspace."""

    def __init__(self, ws: Workspace, task: str) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": AGENT_SYSTEM_PROMPT},
                                               {"role": "user", "content": task}]

    def tool(self, say: str, name: str, **arguments: str) -> str:
        result = self.ws.run(name, arguments)
        self.messages.append({"role": "assistant", "content": say, "tool_calls": [_call(name, **arguments)]})
        self.messages.append({"role": "tool", "content": result})
        return result

    def answer(self, text: str) -> dict[str, Any]:
        self.messages.append({"role": "assistant", "content": text})
        return {"messages": self.messages, "source": "synthetic-tool-use"}


def _stdout(result: str) -> str:
    """A bash tool result without its trailing ``[exit code N]`` line."""
    return result.rpartition("[exit code")[0].strip()


def _scenario(ws: Workspace, rng: random.Random) -> dict[str, Any]:
    name = rng.choice(NAMES)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    module = f"{name}.py"
    source = f"def {name}(x, y):\n    return x + y\n\n\nprint({name}({a}, {b}))\n"
    kind = rng.randrange(5)
    if kind == 0:
        c = _Conversation(ws, "Which files are in this directory?")
        files = _stdout(c.tool("", "bash", command="ls")).split()
        return c.answer("The directory contains " + (", ".join(files) if files else "no files") + ".")
    if kind == 1:
        ws.write_file(module, source)
        c = _Conversation(ws, f"What does {module} print?")
        out = _stdout(c.tool("Let me run it.", "bash", command=f"python3 {module}"))
        return c.answer(f"It prints {out}.")
    if kind == 2:
        c = _Conversation(ws, f"Create {module} with a function {name} that multiplies two numbers, and check it "
                              f"on {a} and {b}.")
        c.tool("", "write_file", path=module, content=f"def {name}(x, y):\n    return x * y\n")
        out = _stdout(c.tool("Now I test it.", "bash",
                             command=f"python3 -c 'from {name} import {name}; print({name}({a}, {b}))'"))
        return c.answer(f"Done: {name}({a}, {b}) returns {out}.")
    if kind == 3:
        ws.write_file(module, source)
        c = _Conversation(ws, f"In {module}, make {name} subtract instead of add.")
        c.tool("", "read_file", path=module)
        c.tool("", "edit_file", path=module, old="return x + y", new="return x - y")
        out = _stdout(c.tool("Let me verify.", "bash", command=f"python3 {module}"))
        return c.answer(f"{name} now subtracts; the script prints {out}.")
    ws.write_file(module, source)
    c = _Conversation(ws, f"How many lines does {module} have?")
    out = _stdout(c.tool("", "bash", command=f"wc -l < {module}"))
    return c.answer(f"{module} has {out} lines.")


def tool_use_conversations(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """``n`` agent conversations, each run in a fresh scratch workspace (commands auto-approved)."""
    rng = random.Random(seed)
    for _ in range(n):
        with tempfile.TemporaryDirectory(prefix="cf-tools-") as root:
            ws = Workspace(root, confirm=lambda command: True)
            for other in rng.sample(NAMES, rng.randint(0, 2)):  # unrelated files make listings vary
                ws.write_file(f"{other}_notes.txt", f"notes about {other}\n")
            yield _scenario(ws, rng)


# --- preference pairs from executed tests ---------------------------------------------------

def test_program(problem: dict[str, Any], answer: str) -> str:
    """The program that checks ``answer``: prompt + answer + tests (+ ``check(entry_point)``,
    HumanEval style, when the problem names one)."""
    program = problem["prompt"].rstrip() + "\n" + answer + "\n\n" + problem["test"] + "\n"
    if problem.get("entry_point"):
        program += f"\ncheck({problem['entry_point']})\n"
    return program


def preference_pairs_from_tests(model, tokenizer, problems: list[dict[str, Any]], samples: int = 8,
                                max_new_tokens: int = 256, temperature: float = 0.8, seed: int = 0,
                                sandbox=None) -> Iterator[dict[str, Any]]:
    """For each problem (``prompt``: signature + docstring, ``test``: asserts), sample answers as
    chat replies to :data:`DOCSTRING_REQUEST`, run them in the eval sandbox, and pair each
    passing answer with a failing one."""
    from codefoundry.infer.engine import Request, SamplingParams, run_batch
    from codefoundry.sandbox.runner import Sandbox
    from codefoundry.tokenizer.chat import render_chat

    sandbox = sandbox or Sandbox()
    end = {tokenizer.special_ids["<|assistant_end|>"], tokenizer.eot_id}
    for p, problem in enumerate(problems):
        messages = [{"role": "user", "content": DOCSTRING_REQUEST.format(header=problem["prompt"].rstrip())}]
        prompt = render_chat(tokenizer, messages, add_generation_prompt=True).ids
        reqs = [Request(prompt, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, stop_ids=end,
                                               seed=seed + p * samples + i)) for i in range(samples)]
        run_batch(model, tokenizer, reqs)
        answers = list(dict.fromkeys(r.text for r in reqs))  # distinct, in order
        results = dict(sandbox.run_many(test_program(problem, a) for a in answers))
        passed = [a for i, a in enumerate(answers) if results[i].passed]
        failed = [a for i, a in enumerate(answers) if not results[i].passed]
        for chosen, rejected in zip(passed, failed):
            yield {"prompt": messages[0]["content"], "chosen": chosen, "rejected": rejected,
                   "source": problem.get("task_id", str(p))}
