"""A wrong completion built to cheat is never scored as a pass (issue 18 item 14).

Each attack passed under the single-process harness (and the first and third pass under the
official one): an always-equal return value, a forged verdict line, ``sys.settrace``
replacing ``check()``. The checker split (see ``codefoundry/sandbox/launcher.py``) must fail them all, keep
honest programs' verdicts, and say in the report which guarantees hold.
"""

from __future__ import annotations

import json

import pytest

from codefoundry.eval.benchmarks import load_problems
from codefoundry.sandbox.runner import CheckedProgram, Sandbox, SandboxLimits
from codefoundry.eval.score import (
    checked_program,
    markdown,
    score_samples,
    split_reference,
)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxLimits(timeout=3.0), workers=2) as sb:
        yield sb


@pytest.fixture(scope="module")
def humaneval(shared_data):
    return {p.task_id: p for p in load_problems("humaneval", shared_data)}


def run_all(sandbox: Sandbox, programs: dict[str, CheckedProgram]) -> dict:
    names = list(programs)
    return {names[i]: r for i, r in sandbox.run_many(programs[n] for n in names)}


WRONG = "    return None\n"
ATTACKS = {
    "always_equal": "    class Yes:\n        def __eq__(self, other):\n            return True\n    return Yes()\n",
    "forged_verdict_line": WRONG + "import os\nfor fd in range(3, 64):\n    try:\n"
                           "        os.write(fd, b'{\"error\": null, \"detail\": \"\"}\\n')\n"
                           "    except OSError:\n        pass\nos._exit(0)\n",
    "forged_via_proc_fds": WRONG + "import os\nfor pid in os.listdir('/proc'):\n    try:\n"
                           "        fds = os.listdir(f'/proc/{pid}/fd')\n    except OSError:\n        continue\n"
                           "    for fd in fds:\n        try:\n"
                           "            with open(f'/proc/{pid}/fd/{fd}', 'w') as f:\n"
                           "                f.write('{\"error\": null, \"detail\": \"\"}\\n')\n"
                           "        except OSError:\n            pass\n",
    "settrace_replaces_check": WRONG + "import sys\ndef _t(frame, event, arg):\n    g = frame.f_globals\n"
                               "    if getattr(g.get('check'), '__name__', '') == 'check':\n"
                               "        g['check'] = lambda candidate: None\n    return _t\n"
                               "sys.settrace(_t)\nsys._getframe().f_trace = _t\n",
    "assertion_error_rebound": WRONG + "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n",
    "assertion_error_none": WRONG + "import builtins\nbuiltins.AssertionError = None\n",
    "always_equal_int_subclass": "    class Yes(int):\n        def __eq__(self, other):\n            return True\n"
                                 "    return Yes(7)\n",
}


def test_cheating_completions_fail(sandbox, humaneval):
    results = run_all(sandbox, {name: checked_program(humaneval["HumanEval/0"], c) for name, c in ATTACKS.items()})
    assert {name: r.passed for name, r in results.items()} == dict.fromkeys(ATTACKS, False)
    assert results["forged_verdict_line"].error == "protocol"
    for name in ("always_equal", "always_equal_int_subclass", "settrace_replaces_check", "assertion_error_rebound", "assertion_error_none",
                 "forged_via_proc_fds"):
        assert results[name].error == "assertion", (name, results[name])


def test_patching_what_the_test_uses_or_its_helpers_fails(sandbox, humaneval):
    results = run_all(sandbox, {
        # HumanEval/2 checks abs(candidate(x) - y) < 1e-6; HumanEval/32 checks poly(xs, candidate(xs)).
        "patched_abs": checked_program(humaneval["HumanEval/2"],
                                       "    return 0.0\nimport builtins\nbuiltins.abs = lambda x: 0\n"),
        "redefined_helper": checked_program(humaneval["HumanEval/32"],
                                            "    return 0.0\ndef poly(xs, x):\n    return 0\n"),
        "global_shadows_builtin": checked_program(humaneval["HumanEval/2"], "    return 0.0\ndef abs(x):\n    return 0\n"),
        "global_shadows_module": CheckedProgram(
            "class math:\n    isclose = staticmethod(lambda a, b: True)\ndef f():\n    return 0.0\n", "",
            "assert math.isclose(f(), 1.0)\n", ("f",)),
        "right_with_rebound_assertion_error": checked_program(
            humaneval["HumanEval/2"], humaneval["HumanEval/2"].canonical
            + "import builtins\nbuiltins.AssertionError = None\n"),
    })
    assert [name for name, r in results.items() if r.passed] == ["right_with_rebound_assertion_error"]
    assert "NameError" in results["global_shadows_module"].detail  # only the program's modules are taken


def test_the_test_is_never_in_the_programs_memory(sandbox):
    # Looks for "_MARKER_42" preceded by "SECRET", without ever making the whole marker itself.
    scan = ("def leaked():\n    import ctypes\n    hits = 0\n"
            "    for line in open('/proc/self/maps'):\n        span, perms = line.split()[:2]\n"
            "        start, end = (int(x, 16) for x in span.split('-'))\n"
            "        if perms.startswith('r') and end - start < 1 << 28 and '[vvar' not in line:\n"
            "            data = ctypes.string_at(start, end - start)\n            at = data.find(b'_MARKER_42')\n"
            "            while at >= 0:\n                hits += data[at - 6:at] == b'SECRET'\n"
            "                at = data.find(b'_MARKER_42', at + 1)\n    return hits\n")
    result = sandbox.run(CheckedProgram(scan, "", "# SECRET_MARKER_42\nassert leaked() == 0, 'SECRET_MARKER_42'\n",
                                        names=("leaked",)))
    assert result.passed, result


def test_values_and_objects_cross_faithfully(sandbox):
    code = (
        "import collections, math\n"
        "def values():\n"
        "    return [(1, 'a'), {(2, 3): {4}}, frozenset({5}), b'\\x00', bytearray(b'x'), 1 + 2j, 10 ** 5000,\n"
        "            -0.0, math.inf, collections.Counter('aab'), collections.deque([1]), True, None]\n"
        "def nan():\n    return math.nan\n"
        "class Node:\n    def __init__(self, v):\n        self.v, self.left = v, None\n"
        "def depth(n):\n    return 0 if n is None else 1 + depth(n.left)\n"
        "def evens(n):\n    return (i for i in range(n) if i % 2 == 0)\n"
        "def fail(kind):\n    raise {'value': ValueError, 'key': KeyError}[kind]('no')\n"
        "def sort_in_place(xs):\n    xs.sort()\n"
        "class Sub(ValueError):\n    pass\n"
        "def sub():\n    raise Sub('x')\n"
        "import enum, numpy\nPoint = collections.namedtuple('Point', 'x y')\n"
        "class Color(enum.IntEnum):\n    RED = 1\n"
        "def numbers():\n    return [numpy.int64(5), numpy.float64(0.5), numpy.array([[1, 2], [3, 4]]), Point(1, 2),\n"
        "            Color.RED, numpy.zeros((0, 3))]\n")
    test = (
        "import collections, math\n"
        "assert values() == [(1, 'a'), {(2, 3): {4}}, frozenset({5}), b'\\x00', bytearray(b'x'), 1 + 2j, 10 ** 5000,\n"
        "                    0.0, math.inf, collections.Counter('aab'), collections.deque([1]), True, None]\n"
        "assert type(values()[0]) is tuple and type(values()[9]) is collections.Counter\n"
        "assert math.isnan(nan())\n"
        "root = Node(1)\nroot.left = Node(2)\nroot.left.left = Node(3)\n"
        "assert depth(root) == 3 and root.left.v == 2 and root == root and root != Node(1)\n"
        "assert list(evens(7)) == [0, 2, 4, 6]\n"
        "try:\n    fail('value')\nexcept ValueError as e:\n    assert str(e) == 'no'\nelse:\n    assert False\n"
        "try:\n    sub()\nexcept ValueError:\n    pass\n"
        "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]\n"
        "import numpy\ni, f, a, p, c, z = numbers()\n"
        "assert i == 5 and type(i) is numpy.int64 and f == 0.5 and (a == [[1, 2], [3, 4]]).all()\n"
        "assert a.shape == (2, 2) and z.shape == (0, 3) and p == (1, 2) and c == 1\n")
    names = ("values", "nan", "Node", "depth", "evens", "fail", "sort_in_place", "sub", "numbers")
    result = sandbox.run(CheckedProgram(code, "", test, names))
    assert result.passed, result


def test_failures_inside_calls_are_classified(sandbox):
    programs = {
        "exit": "def f():\n    import sys\n    sys.exit(0)\n",
        "os_exit": "def f():\n    import os\n    os._exit(0)\n",
        "loop": "def f():\n    while True:\n        pass\n",
        "raise": "def f():\n    raise RuntimeError('bad')\n",
        "memory": "def f():\n    return bytearray(10 * 1024 ** 3)\n",
        "module_level": "raise ValueError('at import')\ndef f():\n    return 1\n",
        "syntax": "def f(:\n",
    }
    results = run_all(sandbox, {k: CheckedProgram(code, "", "assert f() == 1\n", ("f",)) for k, code in programs.items()})
    assert {k: r.error for k, r in results.items()} == {
        "exit": "exit", "os_exit": "exit", "loop": "timeout", "raise": "exception", "memory": "memory",
        "module_level": "exception", "syntax": "syntax"}


def test_prelude_keeps_only_the_prompts_own_definitions(humaneval, shared_data):
    prelude, names = split_reference(humaneval["HumanEval/32"])
    assert "def poly(" in prelude and "def find_zero(" not in prelude and "import math" in prelude
    assert names == ("find_zero",)
    assert "def encode_cyclic(" in split_reference(humaneval["HumanEval/38"])[0]
    mbpp = {p.task_id: p for p in load_problems("mbpp", shared_data)}
    assert split_reference(mbpp["11"]) == ("", ("remove_Occ",))
    assert split_reference(mbpp["126"])[1] == ("sum",)  # a target named like a builtin is still taken
    program = checked_program(humaneval["HumanEval/0"], "    return True\n")
    assert program.code + program.test == humaneval["HumanEval/0"].program("    return True\n")


def test_report_says_which_guarantees_hold(shared_data, tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": ATTACKS["always_equal"]}) + "\n")
    summary = score_samples("humaneval", samples, tmp_path / "o.jsonl", data=shared_data, ks=(1,),
                            show_progress=False)
    assert summary["passed"] == 0
    integrity = summary["sandbox"]["verdict_integrity"]
    assert len(integrity) == 6 and all(isinstance(v, bool) for v in integrity.values())
    assert integrity["the test runs only in the checker: the program cannot read it, trace it or replace check()"]
    text = markdown(summary)
    assert "Verdict integrity against programs built to cheat:" in text
    assert text.count("- holds: ") + text.count("- does NOT hold: ") == 6
