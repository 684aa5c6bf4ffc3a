"""Where an eager call's time goes: host time, kernels launched, GPU time per call.

    python benchmarks/profile_eager.py [--cases resnet50_3x3,r50_256@14] [--dtypes float32]
                                       [--batches 1,32] [--calls 20] [--out FILE]

bench_gpu.py's eager table shows calls far slower than their GPU time (run 7:
the op's float32 chain at batch 32 took 0.14-0.18 ms per call against 0.047 ms
of GPU time in graph replays). For each case and implementation (the op, the
Sequential chain, the dense layer, and the op with each path forced, as in
bench_gpu.py) this prints, per call:
- host us: wall time to issue the call (a loop of calls, no synchronisation);
- eager us: CUDA-event time of the same loop (what bench_gpu.py's table shows);
- kernels, kernel us: GPU activities (kernels, memsets, copies) the profiler saw,
  and their summed duration;
- the activities' names, most frequent first.
Forward only, inference mode. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import CASES, FORCED_PATHS, Layer, cuda_event_ms, env_set, grid_applies  # noqa: E402


def summarize_activities(events: Iterable[tuple[str, float]], calls: int, top: int = 4) -> tuple[float, float, str]:
    """(activities per call, their microseconds per call, the `top` most frequent names with
    their counts per call) from (name, duration in us) pairs of `calls` calls."""
    counts: collections.Counter[str] = collections.Counter()
    total_us = 0.0
    for name, us in events:
        counts[name] += 1
        total_us += us
    names = ", ".join(f"{shorten(name)} x{n / calls:g}" for name, n in counts.most_common(top))
    return sum(counts.values()) / calls, total_us / calls, names


def shorten(name: str, width: int = 48) -> str:
    """A kernel's name without template arguments and parameters, at most `width` characters."""
    out, depth = [], 0
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    short = "".join(out).strip().replace("void ", "")
    return short if len(short) <= width else short[: width - 3] + "..."


def gpu_activities(prof: torch.profiler.profile) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU activity the profiler recorded."""
    out = []
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            out.append((evt.name, float(getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0.0))))
    return out


def profile_column(run: Callable[[], object], env: dict[str, str], calls: int, warmup: int) -> dict[str, object]:
    with env_set(env):
        for _ in range(warmup):
            run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            run()
        host_us = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
        eager_us = cuda_event_ms(run, calls) / calls * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                run()
            torch.cuda.synchronize()
    kernels, kernel_us, names = summarize_activities(gpu_activities(prof), calls)
    return {"host_us": host_us, "eager_us": eager_us, "kernels": kernels, "kernel_us": kernel_us, "names": names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="resnet50_3x3,r50_256@14,r50_512@7,linear_4096")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default="", help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_eager.py: no CUDA GPU (torch.cuda.is_available() is False); nothing to profile", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # as bench_gpu.py
    wanted = args.cases.split(",")
    lines = [
        f"- card: {torch.cuda.get_device_name()}; torch {torch.__version__}; command: "
        f"`{' '.join([os.path.basename(sys.executable), *sys.argv])}`",
        "",
        "| case | dtype | batch | impl | host us | eager us | kernels | kernel us | activities per call |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    print("\n".join(lines), flush=True)
    with torch.inference_mode():
        for c in (c for c in CASES if c.name in wanted):
            for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
                layer = Layer(c, dtype)
                impls = layer.impls()
                for batch in (int(b) for b in args.batches.split(",")):
                    x = layer.input(batch)
                    columns = {name: (fn, {}) for name, fn in impls.items()}
                    for name, env in FORCED_PATHS.items():
                        if name != "grid" or grid_applies(c, dtype):
                            columns[name] = (impls["fused"], env)
                    for name, (fn, env) in columns.items():
                        r = profile_column(lambda fn=fn: fn(x), env, args.calls, args.warmup)
                        line = (f"| {c.name} | {str(dtype).removeprefix('torch.')} | {batch} | {name} | "
                                f"{r['host_us']:.1f} | {r['eager_us']:.1f} | {r['kernels']:g} | "
                                f"{r['kernel_us']:.1f} | {r['names']} |")
                        lines.append(line)
                        print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
