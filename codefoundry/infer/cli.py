"""Using a checkpoint: `generate` (completion, --fim infill, speculative decoding), `chat`
(interactive), `agent` (tool-using coding agent in a directory) and `serve` (HTTP API)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codefoundry.errors import UserError
from codefoundry.infer.load import add_load_args, load_from_args


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"prompt file {path} not found")
        return path.read_text()
    if not sys.stdin.isatty():
        return sys.stdin.read()
    raise UserError("give a prompt: --prompt TEXT, --file PATH, or pipe it on stdin")


def run_speculative(args: argparse.Namespace, model, tokenizer, prompt_ids: list[int]) -> None:
    """Greedy speculative decoding: the model's own MTP heads, or a small draft checkpoint, propose."""
    from codefoundry.infer.decode import TextDeltas
    from codefoundry.infer.speculative import (
        draft_speculative_generate,
        mtp_speculative_generate,
    )

    stop_ids = {tokenizer.eot_id}
    if args.speculative == "mtp":
        ids, stats = mtp_speculative_generate(model, prompt_ids, args.max_new_tokens, stop_ids)
    else:
        if not args.draft_checkpoint:
            raise UserError("--speculative draft needs --draft-checkpoint DIR (a small model with the same tokenizer)")
        from codefoundry.infer.load import load_for_inference

        draft, draft_tok = load_for_inference(args.draft_checkpoint, str(model.embed.weight.device), args.dtype)
        if draft_tok.vocab_size != tokenizer.vocab_size:
            raise UserError("the draft model's tokenizer differs from the target's; use one trained on the same tokenizer")
        ids, stats = draft_speculative_generate(model, draft, prompt_ids, args.max_new_tokens, args.draft_k, stop_ids)
    deltas = TextDeltas(tokenizer, args.stop)
    for t in ids:
        if t in stop_ids or deltas.stopped:
            break
        sys.stdout.write(deltas.add(t))
    sys.stdout.write(deltas.flush() + "\n")
    print(f"[speculative: {stats}]", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    from codefoundry.infer.generate import stream

    model, tokenizer = load_from_args(args)
    if args.fim:
        prompt: str | list[int] = tokenizer.fim_prompt(read_prompt(args), args.suffix or "")
    else:
        prompt = read_prompt(args)
        sys.stdout.write(prompt)
    if args.speculative:
        run_speculative(args, model, tokenizer, prompt if isinstance(prompt, list) else tokenizer.encode(prompt))
        return 0
    for _ in range(args.num_samples):
        for piece in stream(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k,
                            args.top_p, args.stop, args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        args.seed += 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample completions from a checkpoint (streams to stdout)")
    p.add_argument("--prompt", default=None, help="prompt text (else --file or stdin)")
    p.add_argument("--file", default=None, help="read the prompt (the prefix with --fim) from a file")
    p.add_argument("--fim", action="store_true", help="fill in the middle between the prompt and --suffix")
    p.add_argument("--suffix", default=None, help="code after the gap (with --fim)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", choices=["mtp", "draft"], default=None,
                   help="greedy speculative decoding with the model's MTP heads or a --draft-checkpoint")
    p.add_argument("--draft-checkpoint", default=None, help="small draft model for --speculative draft")
    p.add_argument("--draft-k", type=int, default=4, help="tokens the draft proposes per step")
    add_load_args(p)
    p.set_defaults(func=run_generate)

    c = subparsers.add_parser("chat", help="interactive multi-turn chat with a (fine-tuned) checkpoint")
    add_model_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=run_chat)

    a = subparsers.add_parser("agent", help="let the model work in a directory with bash/read/write/edit tools")
    add_model_args(a)
    a.add_argument("task", help="what the agent should do")
    a.add_argument("--workspace", default=".", help="directory the file tools are confined to (default: .)")
    a.add_argument("--yes", action="store_true", help="run commands without asking for confirmation")
    a.add_argument("--max-steps", type=int, default=20, help="tool calls before the agent is stopped")
    a.add_argument("--command-timeout", type=float, default=30.0, help="seconds per command")
    a.add_argument("--sandbox", action=argparse.BooleanOptionalAction, default=None,
                   help="run commands in the sandbox: only the workspace writable, no network, rlimits "
                        "(default: where the host allows it)")
    a.set_defaults(func=run_agent)

    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (+ /infill, a chat page, /metrics) with continuous batching")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", default=None, help="model id reported by the API (default: checkpoint dir name)")
    s.add_argument("--max-batch", type=int, default=8, help="rows decoded together (continuous batching)")
    s.add_argument("--max-concurrent", type=int, default=64,
                   help="generation requests in flight; more get 503 with Retry-After")
    s.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: every core but one, left to the HTTP side)")
    add_load_args(s)
    s.set_defaults(func=run_serve)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The loading flags plus the sampling settings chat and agent share."""
    add_load_args(p)
    p.add_argument("--max-new-tokens", type=int, default=512, help="per reply")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)


def _load(args: argparse.Namespace):
    from codefoundry.infer.engine import SamplingParams

    model, tok = load_from_args(args)
    return model, tok, SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed)


def run_chat(args: argparse.Namespace) -> int:
    from codefoundry.infer.chat import ChatSession, repl

    model, tok, params = _load(args)
    repl(ChatSession(model, tok, params, args.system))
    return 0


def run_agent(args: argparse.Namespace) -> int:
    from codefoundry.infer.agent import Agent, ModelPolicy
    from codefoundry.infer.tools import ToolError, ToolLimits, Workspace

    model, tok, params = _load(args)

    def confirm(command: str) -> bool:
        if args.yes:
            return True
        if not sys.stdin.isatty():
            return False  # nobody to ask: refuse (use --yes to allow)
        return input(f"\nrun `{command}`? [y/N] ").strip().lower() in ("y", "yes")

    def show(kind: str, text: str) -> None:
        if kind != "assistant":  # assistant text was already streamed
            print(f"\n[{kind}] {text}", flush=True)

    try:
        workspace = Workspace(args.workspace, ToolLimits(timeout_s=args.command_timeout), confirm, args.sandbox)
    except ToolError as exc:
        raise UserError(str(exc)) from None
    policy = ModelPolicy(model, tok, params, on_text=lambda d: print(d, end="", flush=True))
    result = Agent(policy, workspace, args.max_steps, show).run(args.task)
    print(f"\n[agent stopped: {result.stop_reason} after {result.steps} tool calls]")
    return 0 if result.stop_reason == "done" else 1


def run_serve(args: argparse.Namespace) -> int:
    try:
        from codefoundry.infer.server import ServerLimits, serve, serving_threads
    except ImportError as exc:
        raise UserError(f"serve needs the 'serve' extra ({exc.name} is missing): pip install 'codefoundry[serve]'") from None
    import torch

    from codefoundry.infer.engine import Engine

    torch.set_num_threads(serving_threads(args.threads))

    model, tok = load_from_args(args)
    name = args.model_name or Path(args.checkpoint).resolve().name
    limits = ServerLimits(max_tokens=min(args.max_tokens, model.cfg.max_seq_len - 1),
                          max_concurrent=args.max_concurrent)
    engine = Engine(model, tok, max_batch=args.max_batch, max_pending=max(256, args.max_concurrent))

    def ready(url: str) -> None:
        print(f"serving {name} on {url}/v1 (completions, chat/completions), {url}/infill, and a page at {url}/",
              flush=True)

    try:
        serve(engine, tok, args.host, args.port, name, limits, args.api_key, on_ready=ready)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({exc.strerror})") from None
    return 0
