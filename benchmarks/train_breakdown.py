"""Where a training step's time goes: forward and backward, Sequential against the fused op.

    python benchmarks/train_breakdown.py resnet50_3x3:32 vgg_128:1 linear_4096:32

For each ``case:batch`` (cases.py) it times the forward (recording the graph) and the
backward of ``output.sum()`` separately, for the ``nn.Sequential`` chain and for the fused
op with its intermediates kept and recomputed (TUCKER_OPS_KEEP_INTERMEDIATES=1 / 0), and with
``--cores`` also with the conv core forced direct and Winograd F(2x2, 3x3) / F(4x4, 3x3)
(TUCKER_OPS_CONV_CORE). The variants run interleaved, one step each per round (in
reversed order every other round), and each phase reports its minimum over the rounds,
so a burst of contention on the shared machine hits all of them alike. GFLOP/s
counts the chain's multiply-adds (2 per MAC; the backward counts twice the forward's, the
work both implementations must do), and the last column compares it with one large
``torch.mm`` (2048^3) at the same thread count: the machine's practical GEMM peak.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from cases import CASES, build, macs

# Fused variants: the environment each runs under (read by the ops per call).
FUSED_VARIANTS = {
    "fused kept": {"TUCKER_OPS_KEEP_INTERMEDIATES": "1"},
    "fused recomputed": {"TUCKER_OPS_KEEP_INTERMEDIATES": "0"},
}
CORE_VARIANTS = {
    "fused kept, direct core": {"TUCKER_OPS_KEEP_INTERMEDIATES": "1", "TUCKER_OPS_CONV_CORE": "direct"},
    "fused kept, F(2x2,3x3) core": {"TUCKER_OPS_KEEP_INTERMEDIATES": "1", "TUCKER_OPS_CONV_CORE": "winograd2"},
    "fused kept, F(4x4,3x3) core": {"TUCKER_OPS_KEEP_INTERMEDIATES": "1", "TUCKER_OPS_CONV_CORE": "winograd4"},
}


def _gemm_peak(threads: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def breakdown(name: str, batch: int, rounds: int, cores: bool) -> list[tuple[str, float, float]]:
    layer = build(name)
    x = layer.input(batch).requires_grad_()
    variants = {**FUSED_VARIANTS, **(CORE_VARIANTS if cores else {})}
    fns = {"sequential": (layer.sequential, list(layer.sequential.parameters()), {})}
    fns.update({v: (layer.impls()["fused"], layer.params(), env) for v, env in variants.items()})
    best = {v: [float("inf"), float("inf")] for v in fns}
    names = sorted({k for env in variants.values() for k in env})
    previous = {k: os.environ.get(k) for k in names}
    try:
        for r in range(rounds + 2):  # two warm-up rounds
            # Alternate the order: the first of a round can pay for what the last left behind.
            for variant, (fn, params, env) in list(fns.items())[:: 1 if r % 2 == 0 else -1]:
                for k in names:
                    os.environ.pop(k, None)
                os.environ.update(env)
                x.grad = None
                for p in params:
                    p.grad = None
                start = time.perf_counter()
                loss = fn(x).sum()
                mid = time.perf_counter()
                loss.backward()
                end = time.perf_counter()
                if r >= 2:
                    best[variant][0] = min(best[variant][0], mid - start)
                    best[variant][1] = min(best[variant][1], end - mid)
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [(v, *best[v]) for v in fns]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="case:batch, e.g. resnet50_3x3:32")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cores", action="store_true", help="also force the conv core direct and each Winograd tile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = _gemm_peak(args.threads)
    print(f"threads {args.threads}; torch.mm 2048^3: {peak:.0f} GFLOP/s\n")
    print(
        "| case | implementation | forward | backward | step | forward GFLOP/s | backward GFLOP/s "
        "| of mm peak (fwd / bwd) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.cases:
        name, batch = spec.split(":")
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; one of {', '.join(CASES)}")
        flops = 2 * macs(CASES[name], int(batch))["chain"]
        for variant, fwd, bwd in breakdown(name, int(batch), args.rounds, args.cores):
            gf, gb = flops / fwd / 1e9, 2 * flops / bwd / 1e9
            print(
                f"| {name} b{batch} | {variant} | {fwd * 1e3:.3f} ms | {bwd * 1e3:.3f} ms | {(fwd + bwd) * 1e3:.3f} ms "
                f"| {gf:.0f} | {gb:.0f} | {gf / peak:.0%} / {gb / peak:.0%} |"
            )


if __name__ == "__main__":
    main()
