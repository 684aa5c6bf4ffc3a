"""The ``tucker-ops`` command.

``tucker-ops demo`` is what ``make demo`` runs: the thesis network, compressed with
the thesis ranks, printed before and after, checked against the reference path, and
timed dense against Sequential chain against fused op.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

import torch


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported without a traceback."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _apply_common(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .compress import compress, to_sequential_model
    from .latency import compare_latency, format_latency_table
    from .models import ThesisNet, thesis_ranks
    from ._ops import use_reference

    dense = ThesisNet().eval()
    print("Net before:")
    print(dense)
    print(f"parameters: {sum(p.numel() for p in dense.parameters()):,}\n")

    example = torch.randn(1, 1, 28, 28)
    with warnings.catch_warnings():
        # The thesis's l1 rank 200 exceeds its 120 outputs; the note below explains it.
        warnings.filterwarnings("ignore", message=r".*exceeds the output mode size.*")
        fused, report = compress(dense, ranks=thesis_ranks(), example_input=example)
    fused.eval()
    sequential = to_sequential_model(fused).eval()
    print("Net after (as the Sequential chains the thesis printed):")
    print(sequential)
    print()
    print(report)
    print(
        "\nNote: the thesis table says 59,560 parameters for this structure, which holds 72,360.\n"
        "The thesis's l1 rank 200 exceeds l1's 120 outputs, so 12,800 of its parameters are exact\n"
        "zero padding; 72,360 - 12,800 = 59,560 is the count at the useful rank 120.\n"
    )

    x = torch.randn(args.check_batch, 1, 28, 28)
    with torch.inference_mode():
        y_fused = fused(x)
        with use_reference():
            y_reference = fused(x)
        y_sequential = sequential(x)
    for name, other in (("reference", y_reference), ("Sequential chain", y_sequential)):
        err = (y_fused - other).abs().max().item()
        scale = other.abs().max().item()
        ok = torch.allclose(y_fused, other, rtol=1e-4, atol=1e-5)
        print(f"fused vs {name}: max abs diff {err:.2e} (output scale {scale:.2e}) -> {'OK' if ok else 'MISMATCH'}")
        if not ok:
            print("error: the fused op disagrees with the reference path", file=sys.stderr)
            return 1
    print()

    inputs = {b: torch.randn(b, 1, 28, 28) for b in args.batches}
    rows = compare_latency(
        {"dense": dense, "sequential": sequential, "fused": fused},
        inputs,
        baseline="dense",
        min_time=args.min_time,
    )
    print(f"Latency, ThesisNet forward, speed-up against dense (>1 is faster), {torch.get_num_threads()} threads:")
    print(format_latency_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tucker-ops", description="Tucker-decomposed layers for PyTorch, run by fused kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="compress the thesis network, check it, and time it", description=_cmd_demo.__doc__ or __doc__)
    _add_common(demo)
    demo.add_argument("--batches", type=_positive_int, nargs="+", default=[1, 64], help="batch sizes to time (default: 1 64)")
    demo.add_argument("--check-batch", type=_positive_int, default=8, help="batch used to compare fused and reference outputs")
    demo.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per implementation and batch")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _apply_common(args)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"tucker-ops {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
