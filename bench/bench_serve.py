"""Serving benchmark: decode tokens/s at batch 1, aggregate tokens/s with N concurrent
requests, and time to first token.

Two views: the engine alone (in process, no HTTP), and the real server (`codefoundry serve`
in its own process) driven over 127.0.0.1 by the official `openai` client with streaming.

    python bench/bench_serve.py                                # tiny random model, CPU
    python bench/bench_serve.py --preset cf-150m --device cuda # a 150M model on GPU
    python bench/bench_serve.py --checkpoint runs/x/checkpoint

Without --checkpoint the model is randomly initialised (speed does not depend on the
weights). Requests use ``ignore_eos`` so every one runs the full --max-tokens.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codefoundry.checkpoint import load_model, read_model_config, save_checkpoint  # noqa: E402
from codefoundry.data.sources import stdlib_root  # noqa: E402
from codefoundry.infer.engine import Request, SamplingParams, run_batch  # noqa: E402
from codefoundry.model import Transformer  # noqa: E402
from codefoundry.presets import get_preset  # noqa: E402
from codefoundry.runtime import resolve_device, resolve_dtype  # noqa: E402
from codefoundry.tokenizer import train_tokenizer  # noqa: E402

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


def engine_figures(checkpoint: Path, device: str, max_tokens: int, concurrency: int,
                   repeats: int) -> tuple[float, float]:
    """Median (batch-1 tok/s, batch-N aggregate tok/s) of run_batch alone (no stop tokens)."""
    dev = resolve_device(device)
    model, tok = load_model(checkpoint, dev)
    model = model.to(resolve_dtype("auto", dev))

    def rate(n: int) -> float:
        reqs = [Request(tok.encode(f"# {i}\n" + PROMPT), SamplingParams(max_tokens=max_tokens, temperature=1.0))
                for i in range(n)]
        start = time.perf_counter()
        run_batch(model, tok, reqs)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return sum(len(r.completion_ids) for r in reqs) / (time.perf_counter() - start)

    rate(1)  # warm-up
    return (statistics.median(rate(1) for _ in range(repeats)),
            statistics.median(rate(concurrency) for _ in range(repeats)))


def stream_one(client, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one streamed completion."""
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=1.0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first or float("nan"), time.perf_counter() - start, tokens


def start_server(checkpoint: Path, device: str, concurrency: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "codefoundry.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
           "--device", device, "--max-batch", str(concurrency), "--max-tokens", str(max_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    line = proc.stdout.readline()
    match = re.search(r"(http://\S+/v1)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, match.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import openai

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(args.preset, Path(tmp))
        cfg, _ = read_model_config(checkpoint)
        with torch.device("meta"):
            n_params, context = Transformer(cfg).num_params(), cfg.max_seq_len
        max_tokens = min(args.max_tokens, context - 32)
        single_engine, many_engine = engine_figures(checkpoint, args.device, max_tokens, args.concurrency,
                                                       args.repeats)

        proc, url = start_server(checkpoint, args.device, args.concurrency, max_tokens)
        try:
            client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
            stream_one(client, PROMPT, 8)  # warm-up
            single = [stream_one(client, PROMPT, max_tokens) for _ in range(args.repeats)]
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                many = list(pool.map(lambda i: stream_one(client, f"# {i}\n" + PROMPT, max_tokens),
                                     range(args.concurrency)))
            wall = time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model: {args.checkpoint or args.preset} ({n_params / 1e6:.1f}M params), {name}, "
          f"{max_tokens} new tokens per request, sampling at temperature 1")
    print(f"engine only   batch 1: {single_engine:,.1f} tok/s | {args.concurrency} requests batched: "
          f"{many_engine:,.1f} tok/s aggregate")
    print(f"HTTP server   batch 1: decode {statistics.median((s[2] - 1) / (s[1] - s[0]) for s in single):,.1f} tok/s, "
          f"time to first token {statistics.median(s[0] for s in single) * 1000:,.0f} ms (median of {args.repeats})")
    print(f"HTTP server   {args.concurrency} concurrent: aggregate {sum(m[2] for m in many) / wall:,.1f} tok/s, "
          f"time to first token median {statistics.median(m[0] for m in many) * 1000:,.0f} ms, "
          f"max {max(m[0] for m in many) * 1000:,.0f} ms")


if __name__ == "__main__":
    main()
