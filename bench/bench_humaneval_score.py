"""Seconds to score the 164 canonical HumanEval solutions in the sandbox (target: < 30 s on 2 cores).

Times the whole ``eval score`` path (load the benchmark, start the sandbox and probe it,
run every program, write results and summary) with the default worker count.

    python bench/bench_humaneval_score.py [--data DIR] [--workers N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from codefoundry.eval.benchmarks import load_problems
from codefoundry.eval.score import score_samples

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_DATA) if SHARED_DATA.is_dir() else None,
                        help="HumanEval file or directory (default: ../shared/data, else package/cache/download)")
    parser.add_argument("--workers", type=int, default=None, help="default: CPU count")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    problems = load_problems("humaneval", args.data)
    times, summary = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "canonical.jsonl"
        samples.write_text("".join(json.dumps({"task_id": p.task_id, "completion": p.canonical}) + "\n"
                                   for p in problems))
        for i in range(args.repeat):
            start = time.perf_counter()
            summary = score_samples("humaneval", samples, Path(tmp) / f"results-{i}.jsonl", data=args.data,
                                    workers=args.workers, show_progress=False)
            times.append(time.perf_counter() - start)
    assert summary["passed"] == len(problems), summary
    print(f"humaneval canonical: {len(problems)}/{len(problems)} passed, workers={summary['sandbox']['workers']}, "
          f"cpus={os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}")
    print(f"isolation: {'; '.join(summary['sandbox']['isolation'])}")
    print(f"seconds to score: median {statistics.median(times):.2f} (runs: {', '.join(f'{t:.2f}' for t in times)}; "
          f"target < 30)")


if __name__ == "__main__":
    main()
