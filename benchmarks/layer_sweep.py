"""Fused op against the ``nn.Sequential`` chain on typical ResNet layers beyond the benchmark set.

    python benchmarks/layer_sweep.py                 # batches 1, 8, 32
    python benchmarks/layer_sweep.py --batches 8 --rounds 20 --only r18_512 k5_64
    python benchmarks/layer_sweep.py --channels-last --grad dense --only resnet50_3x3 vgg_128 downsample_s2

ResNet-18's 3x3 layers at their real sizes (stride 1, and the stride-2 downsamples) with
ranks a quarter of the channels, a ResNet-50 1x1 layer, a 5x5 layer and a 3x3 layer at
half ranks: the shapes a user compressing a torchvision model meets, where the suite
(``make bench``) covers a few. For each layer and batch the two implementations alternate,
one forward (no grad) and one training step (forward + backward of ``output.sum()``) per
round (which runs first alternating), and each reports its minimum over the rounds: a
burst of contention on a shared machine hits both alike. Prints a markdown table of Sequential time / fused time (> 1:
fused faster). Ratios at batch 32 move by 10-30% between runs on the shared 2-core
machine; rerun with more rounds before trusting one. ``--only`` also takes the suite's
conv layers (cases.py); ``--channels-last`` feeds channels_last input to both, the chain
converted with ``.to(memory_format=torch.channels_last)``. The training step backpropagates
``output.sum()`` as the suite does (an expanded gradient, which each side's backward first
makes dense), or with ``--grad dense`` a fixed dense gradient in the layout of each side's
output, as the next layer of a network hands it back (channels_last in a channels_last
network).
"""

from __future__ import annotations

import argparse
import time

import torch

from cases import CASES, ConvCase, build

LAYERS = (
    ConvCase("r18_64", 64, 64, 3, 56, (16, 16), padding=1),
    ConvCase("r18_128", 128, 128, 3, 28, (32, 32), padding=1),
    ConvCase("r18_256", 256, 256, 3, 14, (64, 64), padding=1),
    ConvCase("r18_512", 512, 512, 3, 7, (128, 128), padding=1),
    ConvCase("r18_down_128", 64, 128, 3, 56, (16, 32), stride=2, padding=1),
    ConvCase("r18_down_256", 128, 256, 3, 28, (32, 64), stride=2, padding=1),
    ConvCase("r18_down_512", 256, 512, 3, 14, (64, 128), stride=2, padding=1),
    ConvCase("r50_1x1", 256, 64, 1, 56, (64, 16)),
    ConvCase("k5_64", 64, 64, 5, 28, (32, 32), padding=2),
    ConvCase("half_ranks_128", 128, 128, 3, 28, (64, 64), padding=1),
)


def _sweep(name: str, batch: int, rounds: int, channels_last: bool, dense_grad: bool) -> tuple[float, float, float, float]:
    layer = build(name)
    x = layer.input(batch)
    sequential = layer.sequential
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        sequential = sequential.to(memory_format=torch.channels_last)
    x.requires_grad_()
    impls = {
        "sequential": (sequential, list(sequential.parameters())),
        "fused": (layer.impls()["fused"], layer.params()),
    }
    with torch.no_grad():
        # Each side's gradient in the layout of its own output (torch.randn_like keeps it).
        grads = {key: torch.randn_like(fn(x)) for key, (fn, _) in impls.items()} if dense_grad else {}
    best = {k: [float("inf"), float("inf")] for k in impls}
    for r in range(rounds + 2):  # the first two rounds warm up
        # Alternate which runs first: the second of a pair can find the first's memory in
        # the allocator and its data in cache.
        for key, (fn, params) in list(impls.items())[:: 1 if r % 2 == 0 else -1]:
            with torch.no_grad():
                start = time.perf_counter()
                fn(x)
                forward = time.perf_counter() - start
            x.grad = None
            for p in params:
                p.grad = None
            start = time.perf_counter()
            if dense_grad:
                fn(x).backward(grads[key])
            else:
                fn(x).sum().backward()
            step = time.perf_counter() - start
            best[key] = [min(best[key][0], forward), min(best[key][1], step)]
    seq, fused = best["sequential"], best["fused"]
    return seq[0] / fused[0], seq[1] / fused[1], fused[0], fused[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=10)
    conv_cases = [c.name for c in CASES.values() if isinstance(c, ConvCase)]
    parser.add_argument(
        "--only", nargs="+", choices=[c.name for c in LAYERS] + conv_cases, help="a subset, or suite conv layers"
    )
    parser.add_argument("--channels-last", action="store_true", help="channels_last input and chain")
    parser.add_argument(
        "--grad", choices=["sum", "dense"], default="sum", help="backward of output.sum(), or of a dense gradient"
    )
    args = parser.parse_args()
    for case in LAYERS:
        CASES[case.name] = case
    layout = "channels_last" if args.channels_last else "NCHW"
    grad = "dense gradient" if args.grad == "dense" else "output.sum()"
    print(f"threads {torch.get_num_threads()}, {args.rounds} rounds, {layout}, {grad}; Sequential time / fused time\n")
    print("| layer | batch | forward | training step | fused forward | fused step |")
    print("|---|---|---|---|---|---|")
    for name in args.only or [c.name for c in LAYERS]:
        for batch in args.batches:
            fwd, step, fused_fwd, fused_step = _sweep(name, batch, args.rounds, args.channels_last, args.grad == "dense")
            print(
                f"| {name} | {batch} | {fwd:.2f}x | {step:.2f}x | {fused_fwd * 1e3:.3f} ms | {fused_step * 1e3:.3f} ms |",
                flush=True,
            )


if __name__ == "__main__":
    main()
