"""Cost and fidelity of `codefoundry import --from hf` on real model shapes.

    python bench/bench_import.py                       # smollm-135m and qwen2.5-0.5b shapes
    python bench/bench_import.py --shapes smollm-135m --new-tokens 64

Each shape is built with transformers at random init (no download: the shapes are those of
SmolLM-135M and Qwen2.5-0.5B), saved with ``save_pretrained`` beside a small tokenizer of ours,
then imported by the CLI in a fresh process, which is timed and whose peak resident memory is
read from the kernel (``wait4``). Fidelity: greedy continuations of the same prompt by
transformers (``generate``, fp32) and by our decoder on the imported weights; the figure is the
number of leading tokens that agree (and how many positions agree overall).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codefoundry.checkpoint import load_model  # noqa: E402
from codefoundry.data.sources import stdlib_root  # noqa: E402
from codefoundry.infer.generate import generate_tokens  # noqa: E402
from codefoundry.tokenizer import train_tokenizer  # noqa: E402

SHAPES = {  # name -> (transformers config class, its arguments)
    "smollm-135m": ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
PROMPT = (stdlib_root() / "json" / "decoder.py").read_text()[:600]


def build(name: str, out: Path, tokenizer_json: Path) -> int:
    """Save a randomly initialised model of this shape; returns its parameter count."""
    import transformers

    config_cls, kwargs = SHAPES[name]
    torch.manual_seed(0)
    model_cls = getattr(transformers, config_cls.replace("Config", "ForCausalLM"))
    model = model_cls(getattr(transformers, config_cls)(**kwargs))
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return sum(p.numel() for p in model.parameters())


def timed_import(src: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of the import CLI in its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "codefoundry.cli", "import", "--from", "hf", str(src),
                             "--out", str(out)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"import of {src} failed ({proc.returncode})")
    return time.perf_counter() - start, usage.ru_maxrss / 1024 ** 2


@torch.no_grad()
def greedy_agreement(src: Path, ckpt: Path, n: int) -> tuple[int, int]:
    """(leading tokens equal, positions equal) between transformers' and our greedy continuations."""
    import transformers

    model, tok = load_model(ckpt)
    ids = tok.encode(PROMPT)
    ours = [int(t) for t in generate_tokens(model, [ids], n)]
    del model
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)[0, len(ids):].tolist()
    lead = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return lead, sum(a == b for a, b in zip(ours, theirs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    texts = [(stdlib_root() / f).read_text() for f in ("textwrap.py", "fnmatch.py", "bisect.py", "colorsys.py")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_tokenizer(texts, 2048, show_progress=False).save(tmp / "tokenizer.json")
        print(f"{'shape':14s} {'params':>8s} {'import s':>9s} {'peak GB':>8s} {'greedy agree':>13s}")
        for name in args.shapes:
            params = build(name, tmp / name, tmp / "tokenizer.json")
            seconds, peak = timed_import(tmp / name, tmp / f"{name}-ckpt")
            lead, same = greedy_agreement(tmp / name, tmp / f"{name}-ckpt", args.new_tokens)
            print(f"{name:14s} {params / 1e6:7.0f}M {seconds:9.1f} {peak:8.2f} "
                  f"{f'{lead}/{args.new_tokens} ({same} pos)':>13s}", flush=True)


if __name__ == "__main__":
    main()
