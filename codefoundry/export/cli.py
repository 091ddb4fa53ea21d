"""`codefoundry export` (HF transformers directory or GGUF file) and `codefoundry import --from hf`."""

from __future__ import annotations

import argparse

DEFAULT_DTYPE = {"hf": "fp32", "gguf": "f16"}


def run_export(args: argparse.Namespace) -> int:
    dtype = args.dtype or DEFAULT_DTYPE[args.format]
    if args.format == "hf":
        from codefoundry.export.hf import export_hf

        plan = export_hf(args.checkpoint, args.out, dtype)
        print(f"export: transformers {plan.model_type} ({dtype}) -> {args.out}")
    else:
        from codefoundry.export.gguf_export import export_gguf

        summary = export_gguf(args.checkpoint, args.out, dtype)
        note = ""
        if summary.f16_fallbacks:
            note = f"; {summary.f16_fallbacks} tensors kept F16 (width not a multiple of 32)"
        plan = summary.plan
        print(f"export: GGUF {plan.model_type} ({dtype}, {summary.tensors} tensors{note}) -> {summary.path}")
    for line in plan.notes:
        print(f"export: note: {line}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    if args.source_format == "gguf":
        from codefoundry.export.gguf_import import import_gguf as run
    else:
        from codefoundry.export.hf_import import import_hf as run

    result = run(args.dir, args.out, append=not args.no_append)
    for line in result["roles"]:
        print(f"import: {line}")
    added = f"; appended role tokens {result['added_tokens']}" if result["added_tokens"] else ""
    print(f"import: {result['model_type']} (vocab {result['vocab_size']}{added}) -> {result['out']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint to transformers (hf) or llama.cpp (gguf)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--format", required=True, choices=["hf", "gguf"])
    p.add_argument("--out", required=True, help="output directory (hf) or .gguf file (gguf)")
    p.add_argument("--dtype", default=None,
                   help="hf: fp32 (default), bf16, fp16; gguf: f16 (default), bf16, f32, q8_0, q4_0, q4_1")
    p.set_defaults(func=run_export)

    i = subparsers.add_parser("import", help="import a Llama-family transformers checkpoint or GGUF file as ours")
    i.add_argument("--from", dest="source_format", default="hf", choices=["hf", "gguf"],
                   help="hf: llama (incl. llama3 RoPE), mistral, qwen2, qwen3; gguf: llama, qwen2, qwen3 (any "
                        "quantization the gguf package dequantizes)")
    i.add_argument("dir", help="transformers model directory (config.json, weights, tokenizer.json), or a .gguf file")
    i.add_argument("--no-append", action="store_true",
                   help="append no role tokens the model lacks (commands needing them, e.g. FIM, then refuse)")
    i.add_argument("--out", required=True, help="checkpoint directory to write")
    i.set_defaults(func=run_import)
