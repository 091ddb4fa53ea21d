"""`codefoundry speedrun --recipe nanocode`: a reference run end to end, from the hub to an assistant.

Every stage is the same code as its stand-alone command, and writes into ``--out``::

    1 corpus     the recipe's hub corpus (data.sources, capped by --max-gb) or --source   OUT/corpus/
    2 tokenizer  byte-level BPE of data.vocab_size with the FIM / chat / tool tokens       OUT/tokenizer.json
    3 data       filters, dedup, decontamination, FIM, shards (`data prepare`)             OUT/data/
    4 pretrain   the recipe (`pretrain`; every torchrun rank)                              OUT/pretrain/
    5 sft        CodeAlpaca + Code-Feedback + GSM8K + synthetic tool use (`sft`; every rank) OUT/sft/
    6 eval       HumanEval + MBPP pass@k of the base and the SFT model                     OUT/eval/
    7 agent      the SFT model as a tool-using agent on a small task                       OUT/agent.json
    8 report     every figure, loss plots, stage times and cost                            OUT/report.md

Under torchrun, rank 0 prepares (1-3) while the others wait for its marker; every rank trains
(4-5, DDP/FSDP through the trainer); rank 0 evaluates and reports. A rerun reuses what is done:
downloaded files, the tokenizer, prepared shards (same fingerprint), and the training runs
(resumed from their newest checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codefoundry.errors import UserError

# The SFT mix (our weights: code instructions and code conversations first, maths and tool use
# as smaller shares). Components are replaced by name with --sft-source.
SFT_MIX = {"hub:codealpaca": 1.0, "hub:code-feedback": 1.0, "hub:gsm8k": 0.5, "tools": 0.5}
SFT_DEFAULT_STEPS = 1000
AGENT_TASK = "Create a file hello.py that prints Hello, world! and run it to check."
AGENT_EXPECTED = "Hello, world!"
MARKER = ".prepared.json"  # rank 0 writes it when stages 1-3 are done


@dataclass
class Options:
    out: Path
    recipe: Path
    preset: str | None = None
    overrides: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    max_gb: float | None = None
    hub_mirror: dict[str, str] = field(default_factory=dict)
    vocab_size: int | None = None
    tokenizer_mb: float = 0.0
    val_fraction: float | None = None
    minutes: float | None = None
    sft_sources: list[str] = field(default_factory=list)
    sft_steps: int | None = None
    tool_conversations: int = 500
    bench_data: str | None = None
    eval_limit: int | None = None
    eval_n: int = 10
    eval_temperature: float = 0.8
    eval_max_new_tokens: int = 384
    usd_per_gpu_hour: float = 2.5


def options_from_args(args: argparse.Namespace, recipe: Path) -> Options:
    mirrors = {}
    for item in args.hub_mirror:
        name, sep, folder = item.partition("=")
        if not sep or not name.startswith("hub:"):
            raise UserError(f"--hub-mirror {item!r}: write hub:NAME=FOLDER")
        mirrors[name] = folder
    overrides = [*args.overrides, *([f"data.fim_rate={args.fim_rate}"] if args.fim_rate is not None else [])]
    return Options(Path(args.out), Path(recipe), args.preset, overrides, list(args.source), args.max_gb,
                   mirrors, args.vocab_size, args.tokenizer_mb, args.val_fraction,
                   args.minutes, list(args.sft_source), args.sft_steps, args.tool_conversations, args.bench_data,
                   args.eval_limit, args.eval_n, args.eval_temperature, args.eval_max_new_tokens, args.usd_per_gpu_hour)


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _cli(argv: list[str]) -> None:
    """Run a stage through its own command (the same parsing, distributed set-up and teardown)."""
    from codefoundry.cli import main

    rc = main(argv)
    if rc != 0:
        raise UserError(f"stage `codefoundry {argv[0]}` failed (exit code {rc}); see its message above")


def get_corpus(opt: Options, run: Any, log=print) -> tuple[list[str], list[dict[str, Any]]]:
    """Local sources for the data stage: --source as given, else each hub:NAME downloaded (capped)."""
    from codefoundry.data import hub_corpus

    if opt.sources:
        return list(opt.sources), []
    hub = [s for s in run.data.sources if s.startswith(hub_corpus.HUB_PREFIX)]
    max_gb = opt.max_gb if opt.max_gb is not None else run.data.max_gb
    sources, downloads = [], []
    for spec in run.data.sources:
        if spec not in hub:
            sources.append(spec)  # a path, URL or hf:NAME the readers stream themselves
            continue
        mirror = opt.hub_mirror.get(spec)
        fs = None
        if mirror is not None:
            from fsspec.implementations.local import LocalFileSystem

            fs = LocalFileSystem()
        info = hub_corpus.download(spec, opt.out / "corpus" / spec.removeprefix("hub:"), max_gb / len(hub),
                                   run.data.languages or None, root=mirror, fs=fs, log=log)
        downloads.append(info)
        sources.append(info["folder"])
    return sources, downloads


def prepare_stages(opt: Options, run: Any, timings: dict[str, float]) -> dict[str, Any]:
    """Stages 1-3 (rank 0): corpus, tokenizer, shards."""
    from codefoundry.data.prepare import prepare
    from codefoundry.data.stream import source_texts
    from codefoundry.progress import silence_tqdm
    from codefoundry.tokenizer import CodeTokenizer, train_tokenizer

    silence_tqdm()
    d = run.data
    val_fraction = opt.val_fraction if opt.val_fraction is not None else d.val_fraction
    languages = set(d.languages) or None
    t = time.perf_counter()
    print("[1/8] corpus", flush=True)
    sources, downloads = get_corpus(opt, run)
    timings["corpus"] = time.perf_counter() - t

    t = time.perf_counter()
    vocab = opt.vocab_size or d.vocab_size or run.model.vocab_size
    tok_path = opt.out / "tokenizer.json"
    if tok_path.is_file() and CodeTokenizer.from_file(tok_path).vocab_size == vocab:
        print(f"[2/8] tokenizer: reusing {tok_path}", flush=True)
        tok = CodeTokenizer.from_file(tok_path)
    else:
        print(f"[2/8] tokenizer: byte-level BPE, vocab {vocab:,}", flush=True)
        tok = train_tokenizer(source_texts(sources, int(opt.tokenizer_mb * 1e6), val_fraction, languages), vocab,
                              show_progress=False)
        tok.save(tok_path)
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[3/8] data: filter, dedup, decontaminate, FIM, shards", flush=True)
    local_bytes = sum(p.stat().st_size for s in sources if Path(s).exists()
                      for p in ([Path(s)] if Path(s).is_file() else Path(s).rglob("*")) if p.is_file())
    data = prepare(sources, tok, opt.out / "data", val_fraction, languages, show_progress=True, fim_rate=d.fim_rate,
                   quality_threshold=d.quality_threshold, exact_dedup=d.dedup, near_dedup=d.dedup,
                   decontaminate=d.decontaminate, benchmarks=opt.bench_data, val_by=d.val_by or None,
                   workers=(os.cpu_count() or 1) if local_bytes > 200e6 else 1)
    timings["data"] = time.perf_counter() - t
    return {"sources": sources, "downloads": downloads, "vocab_size": tok.vocab_size, "data": data}


def sft_sources(opt: Options, log=print) -> list[str]:
    """The SFT mix as `sft --data` arguments, with --sft-source replacements and the tool-use file."""
    from codefoundry.post.builders import tool_use_conversations
    from codefoundry.post.cli import write_jsonl

    mix = dict(SFT_MIX)
    extra = []
    for item in opt.sft_sources:
        spec, _, weight = item.rpartition("@") if re.search(r"@[0-9.]+$", item) else (item, "", "")
        name = spec.split("=", 1)[0]
        if name in mix:
            mix.pop(name)
            extra.append((spec, float(weight) if weight else SFT_MIX[name]))
        else:
            extra.append((spec, float(weight) if weight else 1.0))
    out = []
    if "tools" in mix:
        path = opt.out / "sft-data" / "tool_use.jsonl"
        if not path.is_file():
            n = write_jsonl(tool_use_conversations(opt.tool_conversations, seed=0), path)
            log(f"{n} synthetic tool-use conversations -> {path}")
        out.append(f"{path}@{mix.pop('tools')}")
    out += [f"{name}@{w}" for name, w in mix.items()] + [f"{spec}@{w}" for spec, w in extra]
    return out


def wait_for_marker(path: Path, started: float, poll_s: float = 5.0) -> dict[str, Any]:
    """Rank 0's marker written after this launch started (a marker of an earlier run is ignored;
    the ranks of one launch start within seconds of each other, and preparing takes longer)."""
    print(f"waiting for rank 0 to prepare the data ({path})", flush=True)
    while True:
        if path.is_file():
            marker = json.loads(path.read_text())
            if marker.get("written_at", 0) >= started:
                return marker
        time.sleep(poll_s)


def evaluate_checkpoint(opt: Options, checkpoint: str, label: str, device: str) -> dict[str, Any]:
    """HumanEval and MBPP pass@k of one checkpoint (samples and per-task results in OUT/eval/LABEL/)."""
    from codefoundry.eval.codegen import Sampling, evaluate, model_generate
    from codefoundry.infer.load import load_for_inference

    model, tok = load_for_inference(checkpoint, device, dtype="fp32")
    n = opt.eval_n
    sampling = Sampling(n=n, temperature=opt.eval_temperature if n > 1 else 0.0, top_p=0.95,
                        max_new_tokens=opt.eval_max_new_tokens, batch_size=32)
    ks = (1, n) if n > 1 else (1,)
    results = {}
    for bench in ("humaneval", "mbpp"):
        summary = evaluate(bench, model_generate(model, tok, sampling), sampling, opt.out / "eval" / label / f"{bench}.jsonl",
                           data=opt.bench_data, limit=opt.eval_limit, ks=ks, show_progress=False)
        results[bench] = {"tasks": summary["tasks"], **summary["pass_at_k"]}
        print(f"  {label} {bench}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["pass_at_k"].items()), flush=True)
    return results


def agent_demo(checkpoint: str, device: str, max_steps: int = 4) -> dict[str, Any]:
    """The SFT model as an agent on one small task in a scratch folder; success is checked, not assumed."""
    from codefoundry.infer.agent import Agent, ModelPolicy
    from codefoundry.infer.load import load_for_inference
    from codefoundry.infer.tools import Workspace

    model, tok = load_for_inference(checkpoint, device, dtype="fp32")
    with tempfile.TemporaryDirectory(prefix="cf-agent-") as root:
        result = Agent(ModelPolicy(model, tok), Workspace(root, confirm=lambda command: True), max_steps).run(AGENT_TASK)
        script = Path(root) / "hello.py"
        output = ""
        if script.is_file():
            proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=10, cwd=root,
                                  check=False)
            output = proc.stdout.strip()
    return {"task": AGENT_TASK, "stop_reason": result.stop_reason, "tool_calls": result.steps,
            "answer": result.answer, "events": [list(e) for e in result.events], "file_written": script.is_file(),
            "output": output, "success": output == AGENT_EXPECTED}


def write_report(opt: Options, r: dict[str, Any]) -> Path:
    tr, sft, ev = r["pretrain"], r["sft"], r["eval"]
    gpu_hours = r["gpu_hours"]
    lines = ["# codefoundry reference-run report", "",
             f"Recipe `{opt.recipe.stem}`, preset `{r['preset']}` ({tr['params'] / 1e6:.1f}M parameters), "
             f"{r['world_size']} x {r['device']}.", "",
             "## Data", ""]
    for d in r["prepare"]["downloads"]:
        lines.append(f"- {d['corpus']}: {d['files']} of {d['files_available']} files, {d['bytes'] / 1e9:.2f} GB")
    train = r["prepare"]["data"]["train"]
    lines += [f"- sources: {', '.join(map(str, r['prepare']['sources']))}",
              f"- tokenizer: {r['prepare']['vocab_size']:,} tokens (FIM, chat and tool tokens included)",
              f"- train shard: {train['documents']:,} documents, {train['tokens']:,} tokens, "
              f"{train['bytes'] / 1e6:.1f} MB of code", "",
              "## Pretraining", "",
              f"{tr['steps']:,} steps, {tr['tokens']:,} tokens in {tr['elapsed_s'] / 60:.1f} min "
              f"({tr['tok_per_s']:,.0f} tokens/s); final validation loss "
              + (f"{tr['val_loss']:.4f}." if tr.get("val_loss") is not None else "not measured (no validation shard)."),
              "",
              "![pretraining loss](pretrain_loss.png)", "",
              "## SFT", "", "| source | weight | conversations | skipped |", "|---|---|---|---|"]
    for src, info in (sft.get("data") or {}).items():
        lines.append(f"| {src} | {info['weight']:g} | {info['kept']:,} | "
                     f"{', '.join(f'{n} {k}' for k, n in info['skipped'].items()) or '-'} |")
    lines += ["", f"{sft.get('steps', '?')} steps; see ![SFT loss](sft_loss.png)", "",
              "## HumanEval and MBPP", "",
              "| model | benchmark | tasks | " + " | ".join(k for k in ev["base"]["humaneval"] if k != "tasks") + " |",
              "|---|---|---|" + "---|" * (len(ev["base"]["humaneval"]) - 1)]
    for label in ("base", "sft"):
        for bench, res in ev[label].items():
            lines.append(f"| {label} | {bench} | {res['tasks']} | "
                         + " | ".join(f"{v:.3f}" for k, v in res.items() if k != "tasks") + " |")
    ag = r["agent"]
    lines += ["", f"Sampling: n={opt.eval_n}, temperature {opt.eval_temperature if opt.eval_n > 1 else 0}, "
                  f"top-p 0.95, {opt.eval_max_new_tokens} new tokens; programs run in the eval sandbox.", "",
              "## Agent demo", "", f"Task: {ag['task']}", "",
              f"Result: {'success' if ag['success'] else 'failure'} ({ag['stop_reason']}, {ag['tool_calls']} tool "
              f"calls; hello.py written: {ag['file_written']}; its output: {ag['output']!r}).", "", "```"]
    lines += [f"{kind}: {text[:300]}" for kind, text in ag["events"]] + ["```", "",
              "## Time and cost", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:,.1f} |" for k, v in r["timings"].items()]
    lines += ["", f"Total {r['total_s'] / 3600:.2f} h wall-clock on {r['world_size']} x {r['device']}: "
                  f"{gpu_hours:.2f} device-hours"
                  + (f", ${gpu_hours * opt.usd_per_gpu_hour:,.2f} at ${opt.usd_per_gpu_hour:g} per GPU-hour "
                     "(--usd-per-gpu-hour)." if r["device"].startswith("cuda") else " (CPU: no GPU cost)."), ""]
    path = opt.out / "report.md"
    path.write_text("\n".join(lines))
    return path


def full_speedrun(opt: Options) -> dict[str, Any] | None:
    """Run the pipeline; rank 0 returns the results (also OUT/results.json), other ranks None."""
    from codefoundry.recipes import build_run_config

    t_start = time.perf_counter()
    rank, world = _rank()
    run = build_run_config(opt.preset, opt.recipe, opt.overrides)
    opt.out.mkdir(parents=True, exist_ok=True)
    marker_path, started = opt.out / MARKER, time.time()
    timings: dict[str, float] = {}
    if rank == 0:
        prepared = prepare_stages(opt, run, timings)
        tools_and_mix = sft_sources(opt)
        tmp = marker_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"written_at": time.time(), "prepared": prepared, "sft": tools_and_mix}, default=str))
        tmp.replace(marker_path)  # atomic: a waiting rank never reads half a file
    else:
        marker = wait_for_marker(marker_path, started)
        prepared, tools_and_mix = marker["prepared"], marker["sft"]

    t = time.perf_counter()
    print("[4/8] pretrain", flush=True)
    common = [*(["--preset", opt.preset] if opt.preset else [])]
    minutes = [f"train.minutes={opt.minutes}", "train.max_steps=0"] if opt.minutes else []
    _cli(["pretrain", f"--config={opt.recipe}", f"--data={opt.out / 'data'}", f"--out={opt.out / 'pretrain'}",
          "--resume=auto", *common, *opt.overrides, *minutes])
    timings["pretrain"] = time.perf_counter() - t
    pretrain_summary = json.loads((opt.out / "pretrain" / "summary.json").read_text())
    base = pretrain_summary["checkpoint"]

    t = time.perf_counter()
    print("[5/8] sft: " + ", ".join(tools_and_mix), flush=True)
    tc = run.train
    sft_over = [f"train.max_steps={opt.sft_steps or SFT_DEFAULT_STEPS}", f"train.seq_len={tc.seq_len}",
                f"train.batch_size={tc.batch_size}", f"train.device={tc.device}", f"train.dtype={tc.dtype}",
                f"train.compile={tc.compile}", f"train.parallel={tc.parallel}"]
    _cli(["sft", f"--checkpoint={base}", *[f"--data={s}" for s in tools_and_mix], f"--out={opt.out / 'sft'}",
          "--resume=auto", *sft_over])
    timings["sft"] = time.perf_counter() - t
    sft_summary = json.loads((opt.out / "sft" / "summary.json").read_text())
    if rank != 0:
        return None

    t = time.perf_counter()
    print("[6/8] eval: HumanEval + MBPP pass@k, base and SFT", flush=True)
    evals = {"base": evaluate_checkpoint(opt, base, "base", tc.device),
             "sft": evaluate_checkpoint(opt, sft_summary["checkpoint"], "sft", tc.device)}
    timings["eval"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[7/8] agent demo: {AGENT_TASK}", flush=True)
    agent = agent_demo(sft_summary["checkpoint"], tc.device)
    timings["agent"] = time.perf_counter() - t

    print("[8/8] report", flush=True)
    from codefoundry.runtime import resolve_device
    from codefoundry.train.plot import plot_run

    plot_run(opt.out / "pretrain" / "metrics.jsonl", opt.out / "pretrain_loss.png")
    plot_run(opt.out / "sft" / "metrics.jsonl", opt.out / "sft_loss.png")
    total = time.perf_counter() - t_start
    device = resolve_device(tc.device)
    results = {"recipe": str(opt.recipe), "preset": opt.preset or run.preset, "world_size": world,
               "device": torch_device_name(device), "prepare": prepared, "pretrain": pretrain_summary,
               "sft": {**sft_summary, "steps": sft_summary.get("steps", opt.sft_steps or SFT_DEFAULT_STEPS)},
               "eval": evals, "agent": agent, "timings": timings, "total_s": total,
               "gpu_hours": total / 3600 * world}
    (opt.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"report: {write_report(opt, results)}", flush=True)
    return results


def torch_device_name(device: Any) -> str:
    """'cuda (NVIDIA H100 80GB HBM3)' or 'cpu': what the report's cost line is about."""
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
