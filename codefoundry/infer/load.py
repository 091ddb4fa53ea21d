"""The one inference loader: checkpoint -> device -> dtype -> optional int8/int4 weights.

generate, chat, agent, serve, eval (pass@k, bits per byte) all open a model through
:func:`load_for_inference`, and their parsers share :func:`add_load_args`, so a flag such as
``--quantize`` means the same thing everywhere. This module imports torch only when a model is
loaded, so ``codefoundry --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codefoundry.model import Transformer
    from codefoundry.tokenizer import CodeTokenizer

SCHEMES = ("int8", "int4")


def add_load_args(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    """``--checkpoint``, ``--device``, ``--dtype`` and ``--quantize``: how a command opens its model."""
    if checkpoint:
        parser.add_argument("--checkpoint", required=True,
                            help="checkpoint directory (model.safetensors, config.json, tokenizer.json)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, else fp32) | fp32 | bf16 | fp16")
    parser.add_argument("--quantize", default="none", choices=("none", *SCHEMES),
                        help="weight-only quantization applied after loading: block weights int8 per channel or int4 per "
                             "group of 32, output head int8 (CPU: faster decoding; other devices: torchao)")


def load_for_inference(checkpoint: str | Path, device: str = "auto", dtype: str = "auto",
                       quantize: str = "none") -> tuple[Transformer, CodeTokenizer]:
    """Model (eval mode, in ``dtype``, weight-quantized if asked) and tokenizer."""
    from codefoundry.checkpoint import load_model
    from codefoundry.infer.quantize import quantize_model
    from codefoundry.runtime import resolve_device, resolve_dtype

    dev = resolve_device(device)
    model, tokenizer = load_model(checkpoint, dev)
    return quantize_model(model.to(resolve_dtype(dtype, dev)), quantize), tokenizer


def load_from_args(args: argparse.Namespace) -> tuple[Transformer, CodeTokenizer]:
    """:func:`load_for_inference` with the flags :func:`add_load_args` added."""
    return load_for_inference(args.checkpoint, args.device, args.dtype, args.quantize)
