"""Serving benchmark: throughput and p50/p99 latency at 1, 8 and 32 concurrent clients, for the
present server (FastAPI, continuous batching) beside the former one (the standard library's HTTP
server with static batching, run from git commit 0cf7059 in a temporary directory), on the same
checkpoint in the same run, through the official `openai` client with streaming; and the engines
alone, in process: the continuous :class:`Engine` beside the former static policy (kept only here,
:class:`StaticEngine`, over today's decoder), which isolates the batching policy from the HTTP
stack and from model-code changes. Levels run interleaved and each --repeats times, and the best
run of each is reported, so that a busy machine (other jobs on these 2 cores) distorts less.

Each client sends its requests one after another; request lengths vary (``ignore_eos`` with
max_tokens drawn from --min-tokens..--max-tokens, the same draws for both servers), which is
where a static batch waits for its longest row.

Over HTTP the clients share the machine with the server, so each level also reports where the
CPU went: CPU microseconds per generated token of the server process and of this (client)
process, and stream chunks per token (a server that falls behind joins a stream's pending text
into one chunk). On a busy machine the CPU figures move much less than the wall-clock ones.

    python bench/bench_serve.py                                # tiny random model, CPU
    python bench/bench_serve.py --preset cf-150m --device cuda # a 150M model on GPU
    python bench/bench_serve.py --checkpoint runs/x/checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codefoundry.checkpoint import read_model_config, save_checkpoint
from codefoundry.config import ModelConfig
from codefoundry.data.sources import stdlib_root
from codefoundry.model import Transformer
from codefoundry.presets import get_preset
from codefoundry.tokenizer import train_tokenizer

FORMER = "0cf7059"  # the last commit with the static-batching engine and the http.server server
PROMPT = "def fibonacci(n):\n    "


def random_checkpoint(preset: str, out: Path) -> Path:
    files = ["textwrap.py", "fnmatch.py", "bisect.py", "colorsys.py", "keyword.py"]
    cfg = get_preset(preset)
    tok = train_tokenizer([(stdlib_root() / f).read_text() for f in files], min(cfg.vocab_size, 2048),
                          show_progress=False)
    tok.save(out / "tokenizer.json")
    cfg.vocab_size = max(cfg.vocab_size, tok.vocab_size)
    torch.manual_seed(0)
    return save_checkpoint(out / "checkpoint", Transformer(cfg), out / "tokenizer.json", preset)


def former_checkpoint(checkpoint: Path, code: Path, out: Path) -> Path:
    """The checkpoint as the former code reads it: config keys added since are dropped, which is
    only allowed where they hold their default (so both servers run the same model)."""
    known = json.loads(subprocess.run(
        [sys.executable, "-c", "import dataclasses, json; from codefoundry.config import ModelConfig; "
                               "print(json.dumps([f.name for f in dataclasses.fields(ModelConfig)]))"],
        cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, check=True, capture_output=True, text=True).stdout)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    config = json.loads((checkpoint / "config.json").read_text())
    for key in [k for k in config["model"] if k not in known]:
        if config["model"][key] != defaults.get(key):
            raise SystemExit(f"the former code cannot run this model: model.{key}={config['model'][key]!r}")
        del config["model"][key]
    out.mkdir()
    for f in checkpoint.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def start_server(code: Path, checkpoint: Path, device: str, max_batch: int, max_tokens: int,
                 extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "codefoundry.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
           "--device", device, "--max-batch", str(max_batch), "--max-tokens", str(max_tokens), *(extra or [])]
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=code, env=env)
    line = proc.stdout.readline()
    match = re.search(r"(http://[\w.:]+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, match.group(1) + "/v1"


def stream_one(client, prompt: str, max_tokens: int) -> tuple[float, float, int, int]:
    """(time to first token, total time, completion tokens, chunks with text) of one streamed completion."""
    start = time.perf_counter()
    first, tokens, chunks = None, 0, 0
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=1.0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text:
            chunks += 1
            if first is None:
                first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first or float("nan"), time.perf_counter() - start, tokens, chunks


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` so far; NaN without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_client(url: str):
    import openai

    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
    return lambda prompt, max_tokens: stream_one(client, prompt, max_tokens)


class StaticEngine:
    """The former engine's batching policy, kept only in this bench: after a request arrives, wait
    up to ``max_wait_ms`` for others, decode them together to the end of the longest; a request
    that arrives meanwhile waits for the next batch."""

    def __init__(self, model, tokenizer, max_batch: int, max_wait_ms: float = 5.0) -> None:
        import queue
        import threading

        self.model, self.tokenizer, self.max_batch, self.max_wait = model, tokenizer, max_batch, max_wait_ms / 1000
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, request) -> None:
        self.queue.put(request)

    def _loop(self) -> None:
        import queue

        from codefoundry.infer.engine import run_batch

        while True:
            batch = [self.queue.get()]
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            run_batch(self.model, self.tokenizer, batch)


def engine_client(checkpoint: str, device: str, max_batch: int, static: bool):
    """An engine driven in process the way a client would: the continuous one, or the static policy."""
    from codefoundry.checkpoint import load_model
    from codefoundry.infer.engine import Engine, Request, SamplingParams

    model, tok = load_model(checkpoint, device)
    engine = (StaticEngine if static else Engine)(model, tok, max_batch=max_batch)

    def one(prompt: str, max_tokens: int) -> tuple[float, float, int, int]:
        start, texts = time.perf_counter(), []
        request = Request(tok.encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=1.0),
                          on_text=lambda _: texts.append(time.perf_counter() - start))
        engine.submit(request)
        request.done.wait()
        return (texts or [float("nan")])[0], time.perf_counter() - start, len(request.completion_ids), len(texts)
    return one


def load(call, clients: int, per_client: int, lengths: list[int], server_pid: int | None = None) -> dict[str, float]:
    """``clients`` concurrent clients, each sending ``per_client`` requests in turn through ``call``;
    with ``server_pid``, also the CPU time per token of that process and of this one (the clients)."""
    call(PROMPT, 4)  # warm-up

    def run(c: int) -> list[tuple[float, float, int, int]]:
        return [call(f"# {c}.{i}\n" + PROMPT, lengths[(c * per_client + i) % len(lengths)])
                for i in range(per_client)]

    start, client_cpu = time.perf_counter(), time.process_time()
    server_cpu = process_cpu(server_pid) if server_pid else float("nan")
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(run, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    client_cpu = time.process_time() - client_cpu
    server_cpu = (process_cpu(server_pid) if server_pid else float("nan")) - server_cpu
    tokens = sum(r[2] for r in results)
    latency = sorted(r[1] for r in results)
    return {"tok_s": tokens / wall, "p50": statistics.median(latency),
            "p99": latency[min(len(latency) - 1, round(0.99 * (len(latency) - 1)))],
            "ttft": statistics.median(r[0] for r in results), "requests": len(results),
            "server_us": server_cpu / tokens * 1e6, "client_us": client_cpu / tokens * 1e6,
            "chunks": sum(r[3] for r in results) / tokens}


def engine_level(checkpoint: Path, device: str, clients: int, per_client: int, max_batch: int,
                 lengths: list[int], static: bool) -> dict[str, float]:
    """:func:`load` on an engine in a process of its own (a fresh one per level, like a server)."""
    job = json.dumps({"checkpoint": str(checkpoint), "device": device, "clients": clients, "per_client": per_client,
                      "max_batch": max_batch, "lengths": lengths, "static": static})
    out = subprocess.run([sys.executable, __file__, "--engine-run", job], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--engine-run":
        job = json.loads(sys.argv[2])
        call = engine_client(job["checkpoint"], job["device"], job["max_batch"], job["static"])
        print(json.dumps(load(call, job["clients"], job["per_client"], job["lengths"])))
        os._exit(0)  # the engine thread is a daemon; do not wait for it
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (split over the clients)")
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="runs per (server, level); the best is reported")
    ap.add_argument("--threads", type=int, default=None,
                    help="--threads of the present server (default: its own, every core but one; the former "
                         "server always takes PyTorch's default, every core)")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    rng = random.Random(0)
    lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.requests)]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(args.preset, tmp)
        cfg, _ = read_model_config(checkpoint)
        with torch.device("meta"):
            n_params = Transformer(cfg).num_params()
        former = tmp / "former"
        former.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", FORMER], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(former)], input=archive, check=True)
        checkpoints = {former: former_checkpoint(checkpoint, former, tmp / "former-checkpoint"), ROOT: checkpoint}
        runs: dict[tuple[str, str, int], list[dict[str, float]]] = {}
        for _ in range(args.repeats):
            for clients in levels:
                per_client = max(1, args.requests // clients)
                for name, static in (("static", True), ("continuous", False)):
                    runs.setdefault(("engine", name, clients), []).append(
                        engine_level(checkpoint, args.device, clients, per_client, max(levels), lengths, static))
                for name, code in (("static", former), ("continuous", ROOT)):
                    extra = ["--threads", str(args.threads)] if code == ROOT and args.threads else []
                    proc, url = start_server(code, checkpoints[code], args.device, max(levels), args.max_tokens, extra)
                    try:
                        runs.setdefault(("HTTP", name, clients), []).append(
                            load(http_client(url), clients, per_client, lengths, proc.pid))
                    finally:
                        proc.terminate()
                        proc.wait(timeout=30)
        rows = [(*key, max(results, key=lambda r: r["tok_s"])) for key, results in runs.items()]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"model: {args.checkpoint or args.preset} ({n_params / 1e6:.1f}M params), {device}; max_tokens "
          f"{args.min_tokens}-{args.max_tokens} per request (ignore_eos), temperature 1, max batch {max(levels)}")
    print("engine: in process, static policy (bench copy) vs continuous; HTTP: former server (git "
          f"{FORMER}, static) vs present server (continuous, --threads {args.threads or 'default'})")
    print("CPU us/token: server process / client (this) process, over HTTP only; chunks: stream chunks per token")
    print(f"{'via':<8}{'server':<15}{'clients':>8}{'requests':>9}{'tok/s':>10}{'p50 s':>8}{'p99 s':>8}"
          f"{'TTFT p50 s':>12}{'server us':>11}{'client us':>11}{'chunks':>8}")
    for via, name, clients, r in sorted(rows, key=lambda row: (row[0] != "engine", row[1], row[2])):
        cpu = (f"{r['server_us']:>11.0f}{r['client_us']:>11.0f}" if via == "HTTP" else f"{'-':>11}{'-':>11}")
        print(f"{via:<8}{name:<15}{clients:>8}{r['requests']:>9}{r['tok_s']:>10,.1f}{r['p50']:>8.2f}{r['p99']:>8.2f}"
              f"{r['ttft']:>12.3f}{cpu}{r['chunks']:>8.2f}")
    by = {(v, n, c): r for v, n, c, r in rows}
    for via in ("engine", "HTTP"):
        for clients in levels:
            old, new = by[(via, "static", clients)], by[(via, "continuous", clients)]
            cpu = (f", server CPU per token x{new['server_us'] / old['server_us']:.2f}" if via == "HTTP" else "")
            print(f"{via} {clients} clients: continuous/static throughput x{new['tok_s'] / old['tok_s']:.2f}, "
                  f"p50 latency x{new['p50'] / old['p50']:.2f}{cpu}")


if __name__ == "__main__":
    main()
