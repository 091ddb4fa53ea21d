"""`codefoundry eval ...` (placeholder wiring until the benchmark commands land)."""

from codefoundry.eval import bpb


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint")
    sub = p.add_subparsers(dest="eval_command", metavar="BENCHMARK", required=True)
    bpb.register(sub)
