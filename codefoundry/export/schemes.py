"""The weight-only quantization schemes, torch-free so command-line parsers can offer them
without importing torch (``codefoundry --help`` stays fast)."""

from __future__ import annotations

import argparse

SCHEMES = ("int8", "int4")


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--quantize`` flag generate / eval / serve share (applied by ``export.quantize.quantize_model``)."""
    parser.add_argument("--quantize", default="none", choices=("none", *SCHEMES),
                        help="weight-only quantization applied after loading (int8 per channel, int4 per group of 32)")
