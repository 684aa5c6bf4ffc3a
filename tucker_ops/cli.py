"""The ``tucker-ops`` command: ``demo``, ``compress``, ``bench`` and ``reproduce``.

``tucker-ops demo`` is what ``make demo`` runs: ThesisNet trained briefly on the MNIST
subset shipped with the package, compressed with the thesis ranks, checked against the
reference path, fine-tuned, and timed dense against Sequential chain against fused op.

Mistakes in the command line or its inputs (a bad argument, a missing or malformed
file) print one line naming the argument or file and what was expected, and exit
with status 2; there is no traceback for them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported without a traceback."""


# -- argument types -------------------------------------------------------------------


def _number_type(convert: Callable[[str], float], accept: Callable[[float], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that converts, range-checks, and names what it expected."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number_type(float, lambda v: v > 0, "a positive number")
_fraction = _number_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_unit_interval = _number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights, data order and dropout (default: 0)")


def _apply_common(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def _load_data(data: str | None) -> tuple[Any, Any, str]:
    from .mnist import EMBEDDED_DIR, find_mnist_dir, load_embedded, load_mnist

    if data is None:
        train, test = load_embedded("train"), load_embedded("test")
        return train, test, f"embedded MNIST subset ({EMBEDDED_DIR}; CC BY-SA 3.0, see its README.md)"
    folder = find_mnist_dir(data)  # checks both splits first, so one error lists every missing file
    return load_mnist(folder, "train"), load_mnist(folder, "test"), f"MNIST from {folder}"


# -- demo -----------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._ops import use_reference
    from .compress import compress, to_sequential_model
    from .epilogues import fuse_epilogues
    from .latency import compare_latency, dataset_latency, format_latency_table
    from .models import ThesisNet, thesis_ranks
    from .training import TrainConfig, evaluate, fine_tune, train

    train_split, test_split, source = _load_data(args.data)
    x_train, y_train = train_split.tensors()
    x_test, y_test = test_split.tensors()
    if args.test_limit is not None:
        x_test, y_test = x_test[: args.test_limit], y_test[: args.test_limit]
    print(f"Data: {source}: {len(x_train):,} training and {len(x_test):,} test images.\n")

    dense = ThesisNet()
    recipe = TrainConfig(epochs=args.epochs, batch_size=64, lr=2e-3, seed=args.seed)
    print(f"Training ThesisNet: {recipe.describe(len(x_train))}")
    train(dense, x_train, y_train, recipe, eval_data=(x_test, y_test), desc="train dense")
    dense_acc = evaluate(dense, x_test, y_test)
    print("Net before:")
    print(dense)
    print(f"parameters: {sum(p.numel() for p in dense.parameters()):,}, test accuracy {100 * dense_acc:.2f}%\n")

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*exceeds the .*mode size.*")
        fused, report = compress(dense, ranks=thesis_ranks(), example_input=x_test[:1])
    fused.eval()
    before = evaluate(fused, x_test, y_test)
    print("Net after (as the Sequential chains the thesis printed):")
    print(to_sequential_model(fused))
    print()
    print(report)
    print(
        "\nNote: the thesis table says 59,560 parameters for this structure, which holds 72,360.\n"
        "The thesis's l1 rank 200 exceeds l1's 120 outputs, so 12,800 of its parameters are exact\n"
        "zero padding; 72,360 - 12,800 = 59,560 is the count at the useful rank 120.\n"
    )

    tune = TrainConfig(epochs=args.fine_tune_epochs, batch_size=64, lr=1e-3, seed=args.seed + 1)
    print(f"Fine-tuning the compressed model: {tune.describe(len(x_train))}")
    fine_tune(fused, x_train, y_train, tune, eval_data=(x_test, y_test))
    after = evaluate(fused, x_test, y_test)
    sequential = to_sequential_model(fused).eval()

    x = x_test[: args.check_batch]
    with torch.inference_mode():
        y_fused = fused(x)
        with use_reference():
            y_reference = fused(x)
        y_sequential = sequential(x)
    for name, other in (("reference", y_reference), ("Sequential chain", y_sequential)):
        err = (y_fused - other).abs().max().item()
        scale = other.abs().max().item()
        ok = torch.allclose(y_fused, other, rtol=1e-4, atol=1e-4 * max(scale, 1.0))
        print(f"fused vs {name}: max abs diff {err:.2e} (output scale {scale:.2e}) -> {'OK' if ok else 'MISMATCH'}")
        if not ok:
            print("tucker-ops demo: error: the fused op disagrees with the reference path", file=sys.stderr)
            return 1
    print()

    # Timed as a user would run it: fused ops, with conv -> ReLU -> pool fused too.
    lat = dataset_latency({"dense": dense, "sequential": sequential, "fused": fuse_epilogues(fused).eval()}, x_test, baseline="dense", batch_size=min(1000, len(x_test)), repeats=args.repeats)
    n = len(x_test)
    print(f"Results on the {n:,} test images ({torch.get_num_threads()} threads; time: median of {args.repeats} passes, batch {lat.batch_size}):")
    rows = [
        ("dense ThesisNet", sum(p.numel() for p in dense.parameters()), None, dense_acc, "dense"),
        ("compressed, Sequential chains", sum(p.numel() for p in sequential.parameters()), before, after, "sequential"),
        ("compressed, fused ops", sum(p.numel() for p in fused.parameters()), before, after, "fused"),
    ]
    print(f"| model | params | acc. before fine-tuning | test acc. | time for {n:,} images | vs dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, params, acc0, acc, key in rows:
        acc0_text = "-" if acc0 is None else f"{100 * acc0:.2f}%"
        print(f"| {label} | {params:,} | {acc0_text} | {100 * acc:.2f}% | {lat.median(key):.3f} s | {lat.speedup(key):.2f}x |")
    print()

    inputs = {b: x_test[:b] if b <= len(x_test) else torch.randn(b, 1, 28, 28) for b in args.batches}
    rows_b = compare_latency({"dense": dense, "sequential": sequential, "fused": fused}, inputs, baseline="dense", min_time=args.min_time)
    print(f"Latency per forward call, speed-up against dense (>1 is faster), {torch.get_num_threads()} threads:")
    print(format_latency_table(rows_b))
    print("\nThe full data set and the whole thesis comparison: tucker-ops reproduce --data DIR")
    return 0


# -- compress -------------------------------------------------------------------------


def _cmd_compress(args: argparse.Namespace) -> int:
    from .compress import compress
    from .model_spec import load_model, parse_input_shape, parse_ranks, save_model

    model = load_model(args.model, args.state_dict)
    ranks = parse_ranks(args.ranks) if args.ranks is not None else None
    method = args.method
    if method in ("explicit", "ratio") and ranks is None:
        raise UsageError(f"--method {method} needs --ranks ({'ranks' if method == 'explicit' else 'a fraction in (0, 1]'})")
    if ranks is not None and method in ("vbmf", "energy") and not isinstance(ranks, dict) and args.method_given:
        raise UsageError(f"--ranks {args.ranks!r} chooses the ranks itself; --method {method} applies only without --ranks (or inside a per-layer dict with null entries)")
    if isinstance(ranks, float):
        method = "ratio"
    example = None
    if args.input_shape is not None:
        example = torch.zeros(1, *parse_input_shape(args.input_shape))
    options: dict[str, Any] = {}
    if method == "energy":
        options["energy"] = args.energy
    if method == "vbmf":
        options["weakening"] = args.weakening
    try:
        compressed, report = compress(
            model.eval(),
            ranks=ranks,
            method="vbmf" if method in ("explicit", "ratio") else method,
            include=args.include,
            exclude=args.exclude,
            min_rank=args.min_rank,
            rank_multiple=args.rank_multiple,
            example_input=example,
            progress=None,
            **options,
        )
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    output = Path(args.output)
    save_model(compressed, output)
    report_path = Path(args.report) if args.report else output.with_suffix(".json")
    data = {"model": args.model, "state_dict": args.state_dict, "ranks": args.ranks, "method": method, "output": str(output), **report.to_dict()}
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(data, indent=1, default=list) + "\n")
    print(report)
    print(f"\nwrote {report_path} and {output} (tucker_ops.save: load it with tucker_ops.load(path, <dense model factory>),")
    print(f"or pass it to tucker-ops bench --model {output} when its model class is importable)")
    return 0


# -- bench ----------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    from .compress import compress, to_sequential_model
    from .latency import builtin_layers, compare_latency, compare_named, format_latency_table, format_named_table
    from .model_spec import load_model, parse_input_shape, parse_ranks
    from .modules import TuckerConv2d, TuckerLinear

    impls = ("dense", "sequential", "fused")
    if args.model is None:
        if args.state_dict or args.input_shape or args.ranks:
            raise UsageError("--state-dict, --input-shape and --ranks apply to --model; the built-in layer set has its own")
        workloads: dict[str, tuple[dict[str, nn.Module], torch.Tensor]] = {}
        for spec in builtin_layers(args.batch):
            layer = spec.layer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if isinstance(layer, nn.Conv2d):
                    fused = TuckerConv2d.from_conv(layer, ranks=spec.ranks).eval()
                else:
                    fused = TuckerLinear.from_linear(layer, ranks=spec.ranks).eval()
            label = f"{spec.name} r={spec.ranks[0]},{spec.ranks[1]}"
            workloads[label] = ({"dense": layer, "sequential": fused.to_sequential().eval(), "fused": fused}, torch.randn(spec.input_shape))
        rows = compare_named(workloads, baseline="dense", min_time=args.min_time)
        title = f"Built-in layer set, batch {args.batch}, {torch.get_num_threads()} threads"
        print(f"{title}: median time of dense, speed-up of each implementation against dense (>1 is faster)")
        print(format_named_table(rows))
        labels = [r.name for r in rows]
        speedups = {impl: [r.speedup(impl) for r in rows] for impl in impls}
        data: dict[str, Any] = {"title": title, "rows": [{"name": r.name, "seconds": r.seconds} for r in rows]}
    else:
        if args.input_shape is None:
            raise UsageError("--input-shape is required with --model (one example's shape without the batch, e.g. 1,28,28)")
        shape = parse_input_shape(args.input_shape)
        model = load_model(args.model, args.state_dict).eval()
        has_tucker = any(isinstance(m, (TuckerConv2d, TuckerLinear)) for m in model.modules())
        if has_tucker:
            if args.ranks is not None:
                raise UsageError("--ranks: the model is already compressed (it holds Tucker layers); leave --ranks out")
            fused = model
            dense = _densify(model)
        else:
            ranks = parse_ranks(args.ranks) if args.ranks is not None else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    fused, _ = compress(model, ranks=ranks, method="ratio" if isinstance(ranks, float) else "vbmf", example_input=torch.zeros(1, *shape))
                except (ValueError, TypeError) as err:
                    raise UsageError(str(err)) from None
            dense = model
        fused.eval()
        models = {"dense": dense, "sequential": to_sequential_model(fused).eval(), "fused": fused}
        inputs = {b: torch.randn(b, *shape) for b in args.batches}
        lat_rows = compare_latency(models, inputs, baseline="dense", min_time=args.min_time)
        title = f"{args.model}, {torch.get_num_threads()} threads"
        print(f"{title}: speed-up against dense (>1 is faster)")
        print(format_latency_table(lat_rows))
        labels = [f"batch {r.batch}" for r in lat_rows]
        speedups = {impl: [r.speedup(impl) for r in lat_rows] for impl in impls}
        data = {"title": title, "rows": [{"batch": r.batch, "seconds": r.seconds} for r in lat_rows]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**data, "threads": torch.get_num_threads(), "speedups": dict(zip(labels, zip(*speedups.values())))}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import plot_speedups

        path = plot_speedups(labels, speedups, args.plot, title=title, baseline="dense")
        print(f"wrote {path}")
    return 0


def _densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Tucker layer replaced by the dense layer it computes."""
    import copy

    from .modules import TuckerConv2d, TuckerLinear

    dense = copy.deepcopy(model)
    if isinstance(dense, (TuckerConv2d, TuckerLinear)):
        return dense.to_dense()
    for parent in list(dense.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, (TuckerConv2d, TuckerLinear)):
                setattr(parent, name, child.to_dense())
    return dense.eval()


# -- reproduce ------------------------------------------------------------------------


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .reproduce import FULL, QUICK, run, write_outputs
    from .reproduce_report import projection_table, summary_lines, sweep_table, thesis_table

    train_split, test_split, source = _load_data(args.data)
    recipe = QUICK if args.quick else FULL
    overrides = {
        "dense": args.epochs,
        "fine_tune": args.fine_tune_epochs,
        "sweep_fine_tune": args.sweep_epochs,
    }
    for field, epochs in overrides.items():
        if epochs is not None:
            recipe = replace(recipe, **{field: replace(getattr(recipe, field), epochs=epochs)})
    if args.latency_batch is not None:
        recipe = replace(recipe, latency_batch=args.latency_batch)
    if args.latency_repeats is not None:
        recipe = replace(recipe, latency_repeats=args.latency_repeats)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {str(out)!r} exists and is not a directory")
    print(f"Data: {source}: {len(train_split):,} training and {len(test_split):,} test images.")
    if args.data is None:
        print("Note: without --data this runs on the small embedded subset; the thesis comparison needs the full MNIST.")
    if args.quick:
        print("Quick mode: a few steps of everything, to check the pipeline; the numbers mean nothing.")
    command = "tucker-ops " + " ".join(shlex.quote(a) for a in args.argv)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.partial.json"

    def save_partial(results: dict[str, Any]) -> None:
        partial.write_text(json.dumps({**results, "partial": True}, indent=1, default=list) + "\n")

    results = run(train_split, test_split, recipe, seed=args.seed, command=command, log=lambda line: print(line, flush=True), on_stage=save_partial)
    written = write_outputs(results, out, plots=not args.no_plots)
    partial.unlink(missing_ok=True)
    print()
    print(thesis_table(results))
    print()
    print(sweep_table(results))
    print()
    print(projection_table(results))
    print()
    print("\n".join(summary_lines(results)))
    print()
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


# -- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tucker-ops", description="Tucker-decomposed layers for PyTorch, run by fused kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    demo = sub.add_parser(
        "demo",
        help="train ThesisNet on the embedded MNIST subset, compress, fine-tune, time it",
        description=(
            "Train ThesisNet briefly on MNIST (the subset shipped with the package unless --data is given),\n"
            "compress it with the thesis ranks, check the fused op against the reference path, fine-tune,\n"
            "and print parameters, accuracy and latency for dense, Sequential chains and fused ops."
        ),
        formatter_class=fmt,
    )
    _add_common(demo)
    demo.add_argument("--data", metavar="DIR", default=None, help="folder with the MNIST IDX files (default: the embedded subset)")
    demo.add_argument("--epochs", type=_nonnegative_int, default=2, help="training epochs of the dense net (default: 2)")
    demo.add_argument("--fine-tune-epochs", type=_nonnegative_int, default=1, help="fine-tuning epochs after compression (default: 1)")
    demo.add_argument("--batches", type=_positive_int, nargs="+", default=[1, 64], help="batch sizes of the per-call latency table (default: 1 64)")
    demo.add_argument("--test-limit", metavar="N", type=_positive_int, default=None, help="use only the first N test images (default: all)")
    demo.add_argument("--repeats", type=_positive_int, default=3, help="timed passes over the test set per implementation (default: 3)")
    demo.add_argument("--check-batch", type=_positive_int, default=8, help="images used to compare fused and reference outputs (default: 8)")
    demo.add_argument("--min-time", type=_positive_float, default=0.3, help="seconds of timing per implementation and batch (default: 0.3)")
    demo.set_defaults(func=_cmd_demo)

    comp = sub.add_parser(
        "compress",
        help="compress a saved model; write it and a JSON report",
        description=(
            "Replace a model's Conv2d/Linear layers by fused Tucker layers and write the result.\n\n"
            "MODEL is a tucker_ops.save checkpoint, a file written by torch.save(module), or\n"
            "'package.module:factory' (a callable returning the module, e.g. tucker_ops.models:ThesisNet)\n"
            "plus --state-dict (a state_dict or checkpoint file). The output is written with tucker_ops.save.\n"
            "Ranks: --ranks (explicit, a fraction, 'thesis' or per-layer JSON) or --method vbmf|energy.\n\n"
            "Examples:\n"
            "  tucker-ops compress tucker_ops.models:ThesisNet --state-dict net.pt --ranks thesis -o small.pt\n"
            "  tucker-ops compress model.pt --method energy --energy 0.95 --exclude fc -o small.pt\n"
            "  tucker-ops compress model.pt --ranks 0.3 --input-shape 3,224,224 -o small.pt"
        ),
        formatter_class=fmt,
    )
    _add_common(comp)
    comp.add_argument("model", metavar="MODEL", help="checkpoint or torch.save'd module file, or package.module:factory")
    comp.add_argument("--state-dict", metavar="FILE", default=None, help="state_dict file to load into MODEL")
    comp.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write the compressed model")
    comp.add_argument("--report", metavar="FILE", default=None, help="JSON report path (default: OUTPUT with .json)")
    comp.add_argument(
        "--ranks",
        metavar="SPEC",
        default=None,
        help="'8' or '8,4' (r_in,r_out; 'none' for an undecomposed side), a fraction like 0.3, 'thesis', "
        "a JSON object {layer: [r_in, r_out]} or @file.json",
    )
    comp.add_argument("--method", choices=("vbmf", "energy", "ratio", "explicit"), default=None, help="rank selection without --ranks (default: vbmf)")
    comp.add_argument("--energy", type=_fraction, default=0.9, help="for --method energy: fraction of squared singular values kept (default: 0.9)")
    comp.add_argument("--weakening", type=_unit_interval, default=1.0, help="for --method vbmf: 1 = pure EVBMF, 0 = full rank (default: 1)")
    comp.add_argument("--min-rank", type=_positive_int, default=1, help="lower bound on every rank (default: 1)")
    comp.add_argument("--rank-multiple", type=_positive_int, default=1, help="round ranks up to a multiple of this (default: 1)")
    comp.add_argument("--include", metavar="PATTERN", nargs="+", default=None, help="only these layers (names or fnmatch patterns)")
    comp.add_argument("--exclude", metavar="PATTERN", nargs="+", default=None, help="leave these layers dense")
    comp.add_argument("--input-shape", metavar="SHAPE", default=None, help="one example's shape, e.g. 1,28,28: adds MACs to the report")
    comp.set_defaults(func=_cmd_compress)

    bench = sub.add_parser(
        "bench",
        help="latency table: dense vs Sequential chains vs fused ops",
        description=(
            "Time dense, Sequential-chain and fused implementations and print speed-ups against dense.\n"
            "Without --model: the built-in layer set (thesis layers, ResNet-style convolutions, MLP Linears).\n"
            "With --model: a dense model is compressed (--ranks, or EVBMF); a compressed one is compared\n"
            "with the dense layers it computes."
        ),
        formatter_class=fmt,
    )
    _add_common(bench)
    bench.add_argument("--model", metavar="MODEL", default=None, help="checkpoint or torch.save'd module file, or package.module:factory")
    bench.add_argument("--state-dict", metavar="FILE", default=None, help="state_dict file to load into --model")
    bench.add_argument("--ranks", metavar="SPEC", default=None, help="ranks for a dense --model (as for compress; default: EVBMF)")
    bench.add_argument("--input-shape", metavar="SHAPE", default=None, help="with --model: one example's shape, e.g. 1,28,28")
    bench.add_argument("--batches", type=_positive_int, nargs="+", default=[1, 64], help="with --model: batch sizes (default: 1 64)")
    bench.add_argument("--batch", type=_positive_int, default=16, help="built-in layer set: batch size (default: 16)")
    bench.add_argument("--min-time", type=_positive_float, default=0.2, help="seconds of timing per implementation and workload (default: 0.2)")
    bench.add_argument("--plot", metavar="PNG", default=None, help="draw the speed-ups into this PNG (needs matplotlib)")
    bench.add_argument("--json", metavar="FILE", default=None, help="also write the times as JSON")
    bench.set_defaults(func=_cmd_bench)

    rep = sub.add_parser(
        "reproduce",
        help="the thesis experiments on real MNIST: tables, JSON and plots",
        description=(
            "Train ThesisNet (fixed recipe and seed), compress it with the thesis ranks and with EVBMF ranks,\n"
            "fine-tune both, time the test set dense / Sequential / fused, sweep 6 rank budgets, and run the\n"
            "input-decomposition MLPs. Writes results.json, reproduce.md and PNG plots into --out.\n\n"
            "DIR holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and\n"
            "t10k-labels-idx1-ubyte (each plain or .gz), directly or in torchvision's MNIST/raw layout."
        ),
        formatter_class=fmt,
    )
    _add_common(rep)
    rep.add_argument("--data", metavar="DIR", default=None, help="folder with the MNIST IDX files (default: the small embedded subset)")
    rep.add_argument("--out", metavar="DIR", default="reproduce-out", help="output folder (default: reproduce-out)")
    rep.add_argument("--quick", action="store_true", help="a few steps of everything: checks the pipeline in seconds")
    rep.add_argument("--epochs", type=_nonnegative_int, default=None, help="override the dense training epochs (default: recipe, 6)")
    rep.add_argument("--fine-tune-epochs", type=_nonnegative_int, default=None, help="override the fine-tuning epochs (default: recipe, 10)")
    rep.add_argument("--sweep-epochs", type=_nonnegative_int, default=None, help="override the sweep fine-tuning epochs (default: recipe, 1)")
    rep.add_argument("--latency-batch", type=_positive_int, default=None, help="batch size of the timed test-set passes (default: 1000)")
    rep.add_argument("--latency-repeats", type=_positive_int, default=None, help="timed passes per implementation (default: 5)")
    rep.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    rep.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .mnist import IdxFormatError, MnistFilesNotFound
    from .model_spec import ModelSpecError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    args.method_given = getattr(args, "method", None) is not None
    if getattr(args, "method", "absent") is None:
        args.method = "vbmf"
    _apply_common(args)
    try:
        return args.func(args)
    except (UsageError, ModelSpecError, MnistFilesNotFound, IdxFormatError) as err:
        print(f"tucker-ops {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tucker-ops {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
