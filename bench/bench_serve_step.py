"""CPU cost of one serving decode step against the number of rows, beside the same measurement
on the code of another commit (default: the one before the per-step work of issue 16).

Continuous batching pays only when a step's cost grows slower than its rows. Each row samples at
temperature 1 (the serving default) and is refilled as soon as it finishes, as the engine does;
the figure is CPU time of the decoding thread per step (``time.thread_time``), so a busy machine
distorts it less than wall-clock time. Present and reference run interleaved, in processes of their
own, each --repeats times; the best run is reported.

    python bench/bench_serve_step.py                      # speedrun-cpu model, 1 thread
    python bench/bench_serve_step.py --rows 1,8,32 --ref 16005a8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "16005a8"  # before vectorised sampling, incremental detokenizing and cached row masks


def measure(checkpoint: str, rows: int, steps: int, threads: int) -> float:
    """CPU microseconds per decode step with ``rows`` rows kept full (run in the code on sys.path)."""
    import torch

    from codefoundry.checkpoint import load_model
    from codefoundry.infer.engine import Decoder, Request, SamplingParams

    torch.set_num_threads(threads)
    model, tok = load_model(checkpoint, "cpu")
    prompt = tok.encode("def fibonacci(n):\n    ")
    decoder = Decoder(model, tok, rows)

    def fill() -> None:
        lengths = [16 + (7 * (len(decoder.rows) + i)) % 113 for i in range(decoder.room)]
        decoder.add([Request(prompt, SamplingParams(max_tokens=n, temperature=1.0), on_text=lambda _: None)
                     for n in lengths])

    for _ in range(20):  # warm-up
        fill()
        decoder.step()
    spent = 0.0
    for _ in range(steps):
        fill()  # joins are timed apart: this is the cost of a step
        start = time.thread_time()
        decoder.step()
        spent += time.thread_time() - start
    return spent / steps * 1e6


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--run":
        job = json.loads(sys.argv[2])
        print(json.dumps(measure(job["checkpoint"], job["rows"], job["steps"], job["threads"])))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_serve import random_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--preset", default="speedrun-cpu")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref", default=REFERENCE, help="git commit to measure beside the present code")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = str(args.checkpoint or random_checkpoint(args.preset, tmp))
        ref = tmp / "ref"
        ref.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(ref)], input=archive, check=True)
        best: dict[tuple[str, int], float] = {}
        for _ in range(args.repeats):
            for n in rows:
                for name, code in (("reference", ref), ("present", ROOT)):
                    job = json.dumps({"checkpoint": checkpoint, "rows": n, "steps": args.steps, "threads": args.threads})
                    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run", job], cwd=code,
                                         env={**os.environ, "PYTHONPATH": str(code)}, check=True, capture_output=True,
                                         text=True).stdout
                    us = float(out.splitlines()[-1])
                    best[(name, n)] = min(best.get((name, n), us), us)
    print(f"model: {args.checkpoint or args.preset}, {args.threads} thread(s); CPU us per decode step "
          f"(temperature 1, rows refilled), best of {args.repeats}; reference: git {args.ref}")
    print(f"{'rows':>5}{'reference':>12}{'present':>10}{'ref/row':>10}{'present/row':>13}{'speed-up':>10}")
    for n in rows:
        old, new = best[("reference", n)], best[("present", n)]
        print(f"{n:>5}{old:>12,.0f}{new:>10,.0f}{old / n:>10,.0f}{new / n:>13,.0f}{old / new:>9.2f}x")


if __name__ == "__main__":
    main()
