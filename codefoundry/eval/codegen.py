"""Model-driven evaluation: prompts -> completions -> the same scoring as ``eval score``.

Generation is a parameter (:data:`Generate`), so the pipeline runs the same with a real
checkpoint (:func:`model_generate`, batched KV-cache decoding) or with a stand-in in tests.
Completions are cut at the benchmark's stop sequences as the reference harnesses do
(HumanEval: the Codex stops; MBPP: ``[DONE]``; infilling: end-of-text, first line only for
single-line infilling) and written in the official samples format before scoring.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from codefoundry.errors import UserError
from codefoundry.eval.benchmarks import Benchmark, Problem, get_benchmark, load_problems
from codefoundry.eval.score import DEFAULT_KS, check_samples, score_samples, summarize, write_atomic
from codefoundry.progress import Progress
from codefoundry.sandbox.runner import Sandbox, SandboxLimits

# A prompt is text to continue, or (prefix, suffix) to infill between.
Prompt = str | tuple[str, str]
# (prompts, stop strings, seed) -> one completion text per prompt.
Generate = Callable[[list[Prompt], list[str], int], list[str]]


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. Temperature 0 is greedy (then one sample per task is enough)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise UserError("--n, --batch-size and --max-new-tokens must be at least 1")
        if self.n > 1 and self.temperature <= 0:
            raise UserError("--n > 1 needs --temperature > 0 (greedy samples would all be identical)")


def model_generate(model: Any, tokenizer: Any, sampling: Sampling) -> Generate:
    """A :data:`Generate` backed by ``complete_batch``; infilling prompts use the model's FIM tokens."""
    from codefoundry.infer.generate import complete_batch

    def generate(prompts: list[Prompt], stop: list[str], seed: int) -> list[str]:
        encoded = [tokenizer.fim_prompt(*p) if isinstance(p, tuple) else p for p in prompts]
        return complete_batch(model, tokenizer, encoded, sampling.max_new_tokens, temperature=sampling.temperature,
                              top_p=sampling.top_p, stop=stop, seed=seed, batch_size=sampling.batch_size)

    return generate


def prompt_for(bench: Benchmark, problem: Problem) -> Prompt:
    return (problem.prompt, problem.suffix or "") if bench.infilling else problem.prompt


def postprocess(bench: Benchmark, text: str) -> str:
    """Cut at the first stop sequence, then add the benchmark's terminator."""
    cut = min((i for i in (text.find(s) for s in bench.stop) if i >= 0), default=len(text))
    return text[:cut] + bench.terminator


def generate_samples(bench: Benchmark, problems: list[Problem], generate: Generate, sampling: Sampling,
                     show_progress: bool = True) -> list[dict]:
    """``sampling.n`` samples per problem, in problem order, as {task_id, completion}."""
    requests = [p for p in problems for _ in range(sampling.n)]
    # Batches of similar prompt length waste less on padding.
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
    samples: list[dict] = [{} for _ in requests]
    progress = Progress(f"generate {bench.name}", total=len(requests), unit="sample", enabled=show_progress)
    for lo in range(0, len(order), sampling.batch_size):
        batch = order[lo:lo + sampling.batch_size]
        texts = generate([prompt_for(bench, requests[i]) for i in batch], list(bench.stop), sampling.seed + lo)
        for i, text in zip(batch, texts, strict=True):
            samples[i] = {"task_id": requests[i].task_id, "completion": postprocess(bench, text)}
        progress.update(len(batch))
    progress.close()
    return samples


def evaluate(benchmark: str, generate: Generate, sampling: Sampling, output: str | Path, *,
             data: str | Path | None = None, limit: int | None = None, ks: tuple[int, ...] = DEFAULT_KS,
             workers: int | None = None, timeout: float | None = None, show_progress: bool = True) -> dict:
    """Generate samples to ``<output>.samples.jsonl``, score them to ``output``; return the summary.

    Results of an earlier run at ``output`` are replaced: they belong to other samples.
    (``eval score`` is the resumable path for samples that already exist.)
    """
    bench = get_benchmark(benchmark)
    problems = load_problems(benchmark, data, limit)
    samples = generate_samples(bench, problems, generate, sampling, show_progress)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    samples_path = output.with_suffix(".samples.jsonl")
    write_atomic(samples_path, "".join(json.dumps(s) + "\n" for s in samples))
    output.unlink(missing_ok=True)
    return score_samples(benchmark, samples_path, output, data=data, limit=limit, ks=ks, workers=workers,
                         timeout=timeout, show_progress=show_progress, extra={"sampling": asdict(sampling)})


def quick_humaneval(model: Any, tokenizer: Any, limit: int = 20, max_new_tokens: int = 256,
                    data: str | Path | None = None, workers: int | None = None,
                    generate: Generate | None = None, benchmark: str = "humaneval") -> dict[str, float]:
    """Greedy pass@1 on the first ``limit`` tasks of HumanEval (or ``benchmark``, e.g. MBPP), for
    periodic evals during training.

    Writes no files; the model is put in eval mode and returned to its previous mode.
    """
    bench = get_benchmark(benchmark)
    problems = load_problems(benchmark, data, limit)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        samples = generate_samples(bench, problems, generate or model_generate(model, tokenizer, sampling), sampling,
                                   show_progress=False)
    finally:
        model.train(was_training)
    with Sandbox(SandboxLimits(timeout=bench.timeout), workers) as sandbox:
        records = list(check_samples({p.task_id: p for p in problems}, enumerate(samples), sandbox))
    summary = summarize(bench.name, records, len(problems), ks=(1,))
    return {f"{benchmark}/pass@1": summary["pass_at_k"]["pass@1"], f"{benchmark}/tasks": float(summary["tasks"])}

