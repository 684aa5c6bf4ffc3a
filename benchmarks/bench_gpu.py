"""GPU benchmark: the fused op against the cuDNN Sequential chain and the dense cuDNN layer.

    python benchmarks/bench_gpu.py [--out benchmarks/RESULTS_GPU.md.draft] [--quick]

Every configuration (layer x dtype x batch) is timed with CUDA events: warm-up
calls first, then the median over repetitions of a timed loop, each repetition
timing one loop of every implementation in turn (time_interleaved). Memory bandwidth
(a large device copy) and matmul peak (per dtype) are measured on the spot, so
the fraction of the roofline reported for the fused op is

    bytes / measured bandwidth / time   and   FLOPs / measured peak / time,

where bytes count the input, factors and output once and FLOPs are 2 x the
chain's multiply-adds. The summary table is printed last and written, with the
card, torch version and command, to --out. Forward only, inference mode.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tucker_ops


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "conv" or "linear"
    c_in: int
    c_out: int
    ranks: tuple[int | None, int | None]
    kernel: int = 1
    size: int = 1  # conv input H = W
    stride: int = 1
    padding: int = 0


CASES = (
    # The CPU suite's layers (benchmarks/cases.py).
    Case("thesis_conv1", "conv", 1, 16, (None, 2), 5, 28, padding=2),
    Case("thesis_conv2", "conv", 16, 32, (8, 4), 5, 14),
    Case("thesis_l1", "linear", 800, 120, (40, 200)),
    Case("thesis_l2", "linear", 120, 84, (None, 30)),
    Case("resnet50_3x3", "conv", 256, 256, (64, 64), 3, 14, padding=1),
    Case("vgg_128", "conv", 128, 128, (32, 32), 3, 56, padding=1),
    Case("downsample_s2", "conv", 64, 128, (16, 32), 3, 56, stride=2, padding=1),
    Case("linear_4096", "linear", 4096, 4096, (512, 512)),
    # ResNet-50's 3x3 convolutions at their real sizes, ranks about a quarter of the channels.
    Case("r50_64@56", "conv", 64, 64, (16, 16), 3, 56, padding=1),
    Case("r50_128@28", "conv", 128, 128, (32, 32), 3, 28, padding=1),
    Case("r50_256@14", "conv", 256, 256, (64, 64), 3, 14, padding=1),
    Case("r50_512@7", "conv", 512, 512, (128, 128), 3, 7, padding=1),
)


def out_size(c: Case) -> int:
    return (c.size + 2 * c.padding - c.kernel) // c.stride + 1


def chain_macs(c: Case, batch: int) -> tuple[int, int]:
    """(Tucker chain, dense layer) multiply-adds for one batch."""
    r_in = c.ranks[0] or c.c_in
    r_out = c.ranks[1] or c.c_out
    first = c.c_in * r_in if c.ranks[0] else 0
    last = r_out * c.c_out if c.ranks[1] else 0
    if c.kind == "linear":
        return batch * (first + r_in * r_out + last), batch * c.c_in * c.c_out
    o, k = out_size(c), c.kernel
    chain = first * c.size * c.size + o * o * (r_in * r_out * k * k + last)
    return batch * chain, batch * o * o * c.c_in * c.c_out * k * k


class Layer:
    """One case's factors on the GPU and the three implementations."""

    def __init__(self, c: Case, dtype: torch.dtype) -> None:
        self.case = c
        gen = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            t = torch.randn(*shape, generator=gen) / math.sqrt(max(1, math.prod(shape[1:])))
            return t.to(device="cuda", dtype=dtype)

        r_in = c.ranks[0] or c.c_in
        r_out = c.ranks[1] or c.c_out
        k = (c.kernel, c.kernel) if c.kind == "conv" else ()
        self.first = rand(r_in, c.c_in) if c.ranks[0] else None
        self.core = rand(r_out, r_in, *k)
        self.last = rand(c.c_out, r_out) if c.ranks[1] else None
        self.bias = rand(c.c_out)
        w = self.core.float()
        if c.kind == "conv":
            if self.first is not None:
                w = torch.einsum("orhw,ri->oihw", w, self.first.float())
            if self.last is not None:
                w = torch.einsum("co,oihw->cihw", self.last.float(), w)
        else:
            if self.first is not None:
                w = w @ self.first.float()
            if self.last is not None:
                w = self.last.float() @ w
        self.dense_weight = w.to(dtype)
        self.dtype = dtype

    def input(self, batch: int) -> torch.Tensor:
        c = self.case
        gen = torch.Generator().manual_seed(1)
        shape = (batch, c.c_in, c.size, c.size) if c.kind == "conv" else (batch, c.c_in)
        return torch.randn(*shape, generator=gen).to(device="cuda", dtype=self.dtype)

    def impls(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        c = self.case
        f, g, l, b, w = self.first, self.core, self.last, self.bias, self.dense_weight
        if c.kind == "conv":
            s, p = (c.stride, c.stride), (c.padding, c.padding)

            def sequential(x):
                if f is not None:
                    x = F.conv2d(x, f[:, :, None, None])
                x = F.conv2d(x, g, None if l is not None else b, s, p)
                return F.conv2d(x, l[:, :, None, None], b) if l is not None else x

            return {
                # The public functional op, as TuckerConv2d calls it: its direct call
                # route. Runs 1-10 timed torch.ops.tucker_ops, whose Python layer boxes
                # every argument (benchmarks/RESULTS.md, "Direct calls").
                "fused": lambda x: tucker_ops.tucker_conv2d(x, f, g, l, b, s, p, (1, 1)),
                "sequential": sequential,
                "dense": lambda x: F.conv2d(x, w, b, s, p),
            }

        def sequential_linear(x):
            if f is not None:
                x = F.linear(x, f)
            x = F.linear(x, g, None if l is not None else b)
            return F.linear(x, l, b) if l is not None else x

        return {
            "fused": lambda x: tucker_ops.tucker_linear(x, f, g, l, b),
            "sequential": sequential_linear,
            "dense": lambda x: F.linear(x, w, b),
        }

    def bytes_moved(self, batch: int) -> int:
        c = self.case
        elems = sum(t.numel() for t in (self.first, self.core, self.last, self.bias) if t is not None)
        if c.kind == "conv":
            elems += batch * (c.c_in * c.size * c.size + c.c_out * out_size(c) ** 2)
        else:
            elems += batch * (c.c_in + c.c_out)
        return elems * self.core.element_size()


FORCED_PATHS = {
    "chain": {"TUCKER_OPS_CUDA_FUSED": "0"},
    "kernel": {"TUCKER_OPS_CUDA_FUSED": "1"},
    "block": {"TUCKER_OPS_CUDA_FUSED": "1", "TUCKER_OPS_CUDA_CLUSTER": "0", "TUCKER_OPS_CUDA_TC": "0"},
    # The whole-GPU kernels, where they apply (grid_applies).
    "grid": {"TUCKER_OPS_CUDA_LINEAR_GRID": "1", "TUCKER_OPS_CUDA_CONV_GRID": "1"},
}


def grid_applies(c: Case, dtype: torch.dtype) -> bool:
    """Whether the forced whole-GPU kernel runs on this case (conv_grid.cuh's rule:
    R_in a multiple of one 16-byte run of the dtype); elsewhere its column would
    time another path."""
    if c.kind == "linear":
        return True
    r_in = c.ranks[0] or c.c_in
    return r_in % (16 // torch.empty((), dtype=dtype).element_size()) == 0


@contextlib.contextmanager
def env_set(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` added, restored on exit (the op reads its path switches per call)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def cuda_event_ms(run: Callable[[], object], calls: int) -> float:
    """Milliseconds between CUDA events around `calls` back-to-back calls of run."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


# A column to time: the call, and the environment it runs under.
Column = tuple[Callable[[], object], dict[str, str]]


def time_interleaved(columns: dict[str, Column], reps: int, warmup: int, target_ms: float = 2.0,
                     measure: Callable[[Callable[[], object], int], float] = cuda_event_ms) -> dict[str, float]:
    """Median milliseconds per call of each column.

    Each column first warms up and sizes its loop (calls per sample, about target_ms); then
    every repetition takes one sample of each column in turn. So drift of the machine over
    the run (host load, clocks) reaches every column alike, instead of whichever column was
    being timed while it lasted: eager rows, host-bound, moved by up to 40% between runs.
    Repetition i starts at column i (mod the columns), so no column always follows the same
    one: with a fixed order the op's column, always first (after the forced kernels'), ran
    its cuDNN chain about 5% slower than the same chain forced, which followed cuDNN calls
    (RESULTS_GPU.md, runs 8-10).
    """
    inner = {}
    for name, (run, env) in columns.items():
        with env_set(env):
            for _ in range(warmup):
                run()
            one = measure(run, 1)
        inner[name] = max(1, min(50, int(target_ms / max(one, 1e-3))))
    samples: dict[str, list[float]] = {name: [] for name in columns}
    names = list(columns)
    for rep in range(reps):
        start = rep % len(names)
        for name in names[start:] + names[:start]:
            run, env = columns[name]
            with env_set(env):
                samples[name].append(measure(run, inner[name]) / inner[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def time_ms(fn: Callable[[], object], reps: int, warmup: int, target_ms: float = 2.0) -> float:
    """Median milliseconds per call of fn alone (time_interleaved with one column)."""
    return time_interleaved({"": (fn, {})}, reps, warmup, target_ms)[""]


def measure_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=10, warmup=3, target_ms=10.0)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def measure_peak(dtype: torch.dtype) -> float:
    """FLOP/s of an 8192^3 matmul in dtype (float32 without TF32: the CUDA-core peak)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ms = time_ms(lambda: a @ b, reps=5, warmup=2, target_ms=20.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / (ms * 1e-3)


def graphed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    """fn(x) captured in a CUDA graph (after warm-up on a side stream, as capture
    requires); replaying it costs the GPU time alone, without host overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return graph.replay


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/RESULTS_GPU.md.draft", help="results file (markdown)")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="batches 1,32 and 5 repetitions: a smoke run")
    parser.add_argument("--no-grid", action="store_true",
                        help="leave out the whole-GPU kernels' column (gpu_check.sh, where their smoke run failed)")
    parser.add_argument("--graphs", action="store_true",
                        help="time CUDA-graph replays of each implementation: GPU time without host overhead")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA GPU (torch.cuda.is_available() is False); nothing to measure", file=sys.stderr)
        return 2
    batches = [1, 32] if args.quick else [int(b) for b in args.batches.split(",")]
    reps = 5 if args.quick else args.reps
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    cases = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm during warm-up

    card = torch.cuda.get_device_name()
    bandwidth = measure_bandwidth()
    peaks = {d: measure_peak(d) for d in dtypes}
    print(f"{card}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; matmul peak "
          + ", ".join(f"{str(d).removeprefix('torch.')} {p / 1e12:.1f} TFLOP/s" for d, p in peaks.items()), flush=True)

    rows = []
    with torch.inference_mode():
        for c in cases:
            for dtype in dtypes:
                layer = Layer(c, dtype)
                impls = layer.impls()
                for batch in batches:
                    x = layer.input(batch)
                    outs = {name: fn(x) for name, fn in impls.items()}
                    err = rel_err(outs["fused"], outs["sequential"])
                    del outs
                    def column(fn, env):
                        # Graphs are captured under the column's switches; replays ignore them.
                        with env_set(env):
                            run = graphed(fn, x) if args.graphs else (lambda: fn(x))
                        return run, env

                    columns = {name: column(fn, {}) for name, fn in impls.items()}
                    # The op with each forward path forced: its unfused chain,
                    # its fused kernel, its first fused kernel (CUDA cores, one
                    # block per tile: no tensor cores, no clusters) and, where it
                    # applies, the whole-GPU kernel.
                    for name, env in FORCED_PATHS.items():
                        if name == "grid" and (args.no_grid or not grid_applies(c, dtype)):
                            continue
                        columns[name] = column(impls["fused"], env)
                    times = time_interleaved(columns, reps, args.warmup)
                    del columns
                    chain, dense = chain_macs(c, batch)
                    t = times["fused"] * 1e-3
                    row = {
                        "case": c.name, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                        **{f"{k}_ms": v for k, v in times.items()},
                        "vs_seq": times["sequential"] / times["fused"], "vs_dense": times["dense"] / times["fused"],
                        "flop_ratio": chain / dense,
                        "bw_frac": layer.bytes_moved(batch) / bandwidth / t,
                        "flop_frac": 2 * chain / peaks[dtype] / t,
                        "err": err,
                    }
                    rows.append(row)
                    print(f"{c.name:14s} {row['dtype']:8s} b={batch:<4d} fused {times['fused']:.4f} ms  "
                          f"seq {times['sequential']:.4f} ms  dense {times['dense']:.4f} ms  "
                          f"chain {times['chain']:.4f} ms  kernel {times['kernel']:.4f} ms  block {times['block']:.4f} ms  "
                          + (f"grid {times['grid']:.4f} ms  " if "grid" in times else "")
                          + f"err {err:.1e}", flush=True)
                    del x

    report = render(rows, card, bandwidth, peaks, " ".join([os.path.basename(sys.executable), *sys.argv]),
                    args.graphs)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(report)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)  # every timing, for fitting the op's path rule
    print()
    print(report)
    print(f"(written to {args.out})")
    return 0


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def render(rows: list[dict], card: str, bandwidth: float, peaks: dict, command: str, graphs: bool = False) -> str:
    lines = [
        "# GPU results (draft: generated by benchmarks/bench_gpu.py)",
        "",
        f"- card: {card}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`",
        f"- measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; matmul peak "
        + ", ".join(f"{str(d).removeprefix('torch.')} {p / 1e12:.1f} TFLOP/s" for d, p in peaks.items()),
        "- times: forward, inference mode, median ms per call over CUDA-event-timed loops after warm-up, "
        "the columns of a row sampled in turn (one loop of each per repetition)"
        + ("; each call a CUDA-graph replay (GPU time, no host overhead)" if graphs else
           " (eager calls: host overhead included)"),
        "- vs seq / vs dense: speed-up of the fused op over the cuDNN Sequential chain / the dense cuDNN layer",
        "- fused ms: the op as shipped, called as tucker_ops.tucker_conv2d / tucker_linear (it picks its fused "
        "kernel or its unfused cuDNN/cuBLAS chain per shape); "
        "chain ms / kernel ms: the op with TUCKER_OPS_CUDA_FUSED=0 / =1 forcing one path; "
        "block ms: the fused kernel with TUCKER_OPS_CUDA_CLUSTER=0 TUCKER_OPS_CUDA_TC=0 (CUDA cores, one block per tile: "
        "the design before tensor cores and clusters); "
        "grid ms: the whole-GPU kernel (linear_grid.cu, conv_grid.cu), forced with TUCKER_OPS_CUDA_LINEAR_GRID=1 "
        "TUCKER_OPS_CUDA_CONV_GRID=1; - where it does not apply",
        "- bw / flop: bytes / bandwidth / time and FLOPs / peak / time of the fused op (fraction of the roofline)",
        "",
        "| case | dtype | batch | fused ms | seq ms | dense ms | chain ms | kernel ms | block ms | grid ms | vs seq | vs dense | FLOPs chain/dense | bw | flop | err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        grid = f"{r['grid_ms']:.4f}" if "grid_ms" in r else "-"
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['batch']} | {r['fused_ms']:.4f} | {r['sequential_ms']:.4f} | "
            f"{r['dense_ms']:.4f} | {r['chain_ms']:.4f} | {r['kernel_ms']:.4f} | {r['block_ms']:.4f} | {grid} | "
            f"{r['vs_seq']:.2f}x | {r['vs_dense']:.2f}x | {r['flop_ratio']:.3f} | "
            f"{r['bw_frac']:.2f} | {r['flop_frac']:.3f} | {r['err']:.1e} |"
        )
    lines += ["", "## Targets", ""]
    lines += target_lines(rows, lambda r: r["fused_ms"])
    best = {id(r): best_path(r) for r in rows}
    lines += [
        "",
        "## Targets with the fastest forced path per row",
        "",
        "What a perfect path rule would reach: each row timed on the fastest of the op's forced paths "
        "(chain, kernel, block, grid). Not the shipped op; it says whether a better rule alone would "
        "meet the targets.",
        "",
    ]
    lines += target_lines(rows, lambda r: best[id(r)][1])
    misses = [r for r in rows if best[id(r)][1] < 0.95 * r["fused_ms"]]
    lines += ["", "## Rows where a forced path beats the op's choice by more than 5%", ""]
    if misses:
        lines += ["| case | dtype | batch | fused ms | fastest path | its ms | gain |", "|---|---|---:|---:|---|---:|---:|"]
        for r in misses:
            path, ms = best[id(r)]
            lines.append(f"| {r['case']} | {r['dtype']} | {r['batch']} | {r['fused_ms']:.4f} | {path} | {ms:.4f} | "
                         f"{r['fused_ms'] / ms:.2f}x |")
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


def best_path(r: dict) -> tuple[str, float]:
    """The fastest of the shipped op and its forced paths on row r: (name, ms). A
    failed or absent path (NaN, missing) does not count."""
    times = {"fused": r["fused_ms"], **{c: r[f"{c}_ms"] for c in FORCED_PATHS if f"{c}_ms" in r}}
    finite = {k: v for k, v in times.items() if math.isfinite(v)}
    name = min(finite, key=finite.get)
    return name, finite[name]


def target_lines(rows: list[dict], ms: Callable[[dict], float]) -> list[str]:
    """The three targets of the issue, per dtype, for the op timed at ms(row)."""
    lines = []
    for dtype in sorted({r["dtype"] for r in rows}):
        of_dtype = [r for r in rows if r["dtype"] == dtype]
        vs_seq = {id(r): r["sequential_ms"] / ms(r) for r in of_dtype}
        small = [vs_seq[id(r)] for r in of_dtype if r["batch"] <= 8]
        mid = [r for r in of_dtype if r["batch"] <= 32]
        worst = min(mid, key=lambda r: vs_seq[id(r)]) if mid else None
        slower_than_dense = [
            f"{r['case']}@{r['batch']}" for r in of_dtype if r["flop_ratio"] <= 0.5 and r["dense_ms"] < ms(r)
        ]
        gm = geomean(small)
        lines.append(f"- {dtype}: geomean vs seq at batch <= 8: {gm:.2f}x (target >= 1.5x: {'met' if gm >= 1.5 else 'NOT met'})")
        if worst is not None:
            w = vs_seq[id(worst)]
            lines.append(f"- {dtype}: min vs seq at batch <= 32: {w:.2f}x at {worst['case']}@{worst['batch']} "
                         f"(target >= 1.0x: {'met' if w >= 1.0 else 'NOT met'})")
        lines.append(f"- {dtype}: slower than dense where chain FLOPs <= 1/2 dense: "
                     + (", ".join(slower_than_dense) if slower_than_dense else "none (target met)"))
    return lines


if __name__ == "__main__":
    sys.exit(main())
