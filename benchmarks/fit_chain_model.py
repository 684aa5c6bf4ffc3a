"""Fit what an eager call of the op's unfused chain costs, and replay the op's path rule.

    python benchmarks/fit_chain_model.py                          # fit on every run's eager rows (gpu_runs/)
    python benchmarks/fit_chain_model.py --replay --prices 24,30  # the targets under each rule
    python benchmarks/fit_chain_model.py --capture                 # the capture rule on runs 8-9's graphs

For eager calls the op runs its unfused cuDNN/cuBLAS chain unless one of its own
kernels is predicted cheaper (fused_conv_preferred, grid_conv_chosen,
grid_linear_chosen in csrc/cuda). It prices the chain per ATen call
(eager_chain_seconds in csrc/cuda/common.cuh: kChainCallSeconds, 24 us, whatever
the call's work). This script fits two models of that cost to the eager rows of
bench_gpu.py (the .json next to its results file), per (layer kind, dtype group):
- flat: seconds = calls * call_seconds (least squares);
- additive: seconds = calls * call_seconds + macs / macs_per_second, the chain's
  multiply-adds at a rate standing for the GPU time its host calls do not hide
  (non-negative least squares).
The column fitted is the op's chain forced ("chain ms"), except for float32
convolutions, where it is the Sequential chain: since stop 24 the op's float32
chain runs its 1x1 stages on cuDNN as nn.Conv2d does (with TF32), which is what
the Sequential column timed; where the op's chain already ran them on cuDNN
(batch 128) the two columns agree (geometric mean 0.985 over runs 5-7).

--replay applies the op's eager rule to each recorded row under each chain cost
(the flat prices given, and the fitted additive model) and reports the issue's
targets for the paths it picks, each timed by that path's forced column of the
same run. The kernels' models are restated from fit_tc_model.py and
fit_grid_model.py; where the tensor-core kernel does not apply, the CUDA-core
kernel's model stands in as its CUDA-graph time in run 6 (its model is fitted to
such times). The float32 chain is timed by the Sequential column (above), so a
float32 row on the chain replays as a tie. What it showed on runs 5-7 is in
RESULTS_GPU.md ("Changes since run 7"), on runs 8-10 in "Runs 8-10".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import CASES, Case, chain_macs, geomean, target_lines  # noqa: E402
from fit_grid_model import CPP_MODEL, ELEMENT_SIZE, elements, nonnegative_fit  # noqa: E402
from fit_tc_model import CPP as TC_CPP, predict as tc_predict, tc_terms  # noqa: E402

RUNS = Path(__file__).resolve().parent / "gpu_runs"
DEFAULT_EAGER = sorted(RUNS.glob("*_eager.json"))
DEFAULT_GRAPHS = RUNS / "2026-11-27_run6_graphs.json"

CPP_CALL_SECONDS = 24e-6  # kChainCallSeconds: every chain call, whatever its work
CPP_REPLAY_CALL_SECONDS = 6e-6  # kChainReplayCallSeconds: the chain's replay floor per call
FUSED_HOST_SECONDS, GRID_HOST_SECONDS = 15e-6, 18e-6  # kFusedHostSeconds, kGridHostSeconds
LINEAR_MAX_FACTOR_ELEMS, LINEAR_MAX_ROWS = 1 << 17, 512  # linear_fused.cu
LINEAR_MAX_FACTOR_ELEMS_CAPTURED = 1 << 13  # linear_fused.cu, under capture (float32 only)


def group(c: Case, dtype: str) -> tuple[str, str]:
    return c.kind, "float32" if dtype == "float32" else "16-bit"


def calls(c: Case) -> int:
    """ATen calls of the chain: the core, plus one per 1x1 stage / factor product."""
    return 1 + bool(c.ranks[0]) + bool(c.ranks[1])


def chain_column(c: Case, dtype: str) -> str:
    """The eager column that times the op's chain (module docstring)."""
    return "sequential_ms" if group(c, dtype) == ("conv", "float32") else "chain_ms"


def chain_seconds(c: Case, batch: int, call_seconds: float, macs_per_second: float) -> float:
    return calls(c) * call_seconds + chain_macs(c, batch)[0] / macs_per_second


def load_rows(paths: list[Path]) -> list[dict]:
    """Every row of the given eager .json files, tagged with its file."""
    rows = []
    for path in paths:
        for r in json.loads(path.read_text(encoding="utf-8")):
            rows.append({**r, "run": path.name})
    return rows


def fit(rows: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (kind, dtype group): the flat fit ("flat" seconds per call), the additive
    fit ("call", "rate": multiply-adds/s, inf where the term drops out), and the
    range of the C++ price's predicted / measured times ("lo", "hi")."""
    cases = {c.name: c for c in CASES}
    data: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in rows:
        c = cases[r["case"]]
        t = r.get(chain_column(c, r["dtype"]), math.nan)
        if r["dtype"] not in ELEMENT_SIZE or not math.isfinite(t):
            continue
        data.setdefault(group(c, r["dtype"]), []).append((calls(c), chain_macs(c, r["batch"])[0], t * 1e-3))
    result = {}
    for g, points in sorted(data.items()):
        a = np.array([[n, m] for n, m, _ in points], dtype=float)
        y = np.array([t for *_, t in points])
        flat = float(a[:, 0] @ y / (a[:, 0] @ a[:, 0]))
        coef = nonnegative_fit(a, y)
        ratio = a[:, 0] * CPP_CALL_SECONDS / y
        result[g] = {"flat": flat, "call": float(coef[0]), "rate": 1 / coef[1] if coef[1] > 0 else math.inf,
                     "lo": float(ratio.min()), "hi": float(ratio.max())}
    return result


def grid_applies(c: Case, dtype: str) -> bool:
    """grid_conv_applies / grid_linear_applies on an sm_90 card (the gather takes R_in
    in whole 16-byte runs)."""
    if c.kind == "linear":
        return True
    r_in = c.ranks[0] or c.c_in
    return r_in % (16 // ELEMENT_SIZE[dtype]) == 0


def grid_seconds(c: Case, dtype: str, batch: int) -> float:
    fixed, macs_per_second, bytes_per_second = CPP_MODEL[group(c, dtype)]
    return (fixed + chain_macs(c, batch)[0] / macs_per_second
            + elements(c, batch) * ELEMENT_SIZE[dtype] / bytes_per_second)


def linear_factor_elems(c: Case) -> int:
    """The factor elements fused_linear_applies counts (early stages plus the last)."""
    r_in, r_out = c.ranks[0] or c.c_in, c.ranks[1] or c.c_out
    early = (r_in * c.c_in if c.ranks[0] else 0) + (r_out * r_in if c.ranks[1] else 0)
    return early + c.c_out * (r_out if c.ranks[1] else r_in)


def linear_fused_applies(c: Case, batch: int) -> bool:
    return linear_factor_elems(c) <= LINEAR_MAX_FACTOR_ELEMS and batch <= LINEAR_MAX_ROWS


def linear_fused_captured(c: Case, dtype: str, batch: int) -> bool:
    """fused_linear_applies under capture: tiny factor sets, float32 only."""
    return (linear_fused_applies(c, batch) and linear_factor_elems(c) <= LINEAR_MAX_FACTOR_ELEMS_CAPTURED
            and dtype == "float32")


def fused_prediction(c: Case, dtype: str, batch: int, cuda_core_seconds: float) -> float:
    """The tile kernel's predicted seconds as choose_fused_conv gives them: the tensor-core
    model where it applies, else (here) the CUDA-core kernel's replay time in run 6."""
    terms = tc_terms(c, dtype, batch)
    if terms is None:
        return cuda_core_seconds
    return tc_predict(terms, TC_CPP["round_seconds"], TC_CPP["macs_per_second_per_block"])


def chosen_path(c: Case, dtype: str, batch: int, chain_cost: float, cuda_core_seconds: float) -> str:
    """The op's eager forward path for a row: "chain", "kernel" (a fused tile kernel)
    or "grid" (the whole-GPU kernel), as the C++ rule picks it for this chain cost."""
    if c.kind == "linear":
        if linear_fused_applies(c, batch):
            return "kernel"
        grid = max(GRID_HOST_SECONDS, grid_seconds(c, dtype, batch))
        return "grid" if grid < chain_cost else "chain"
    fused = fused_prediction(c, dtype, batch, cuda_core_seconds)
    fused_cost = max(FUSED_HOST_SECONDS, fused) if math.isfinite(fused) else math.inf
    if grid_applies(c, dtype) and max(GRID_HOST_SECONDS, grid_seconds(c, dtype, batch)) < min(fused_cost, chain_cost):
        return "grid"
    return "kernel" if fused_cost < chain_cost else "chain"


ChainCost = Callable[[Case, str, int], float]


def flat_cost(call_seconds: float) -> ChainCost:
    return lambda c, dtype, batch: calls(c) * call_seconds


def additive_cost(fitted: dict[tuple[str, str], dict[str, float]]) -> ChainCost:
    def cost(c: Case, dtype: str, batch: int) -> float:
        f = fitted[group(c, dtype)]
        return calls(c) * f["call"] + chain_macs(c, batch)[0] / f["rate"]
    return cost


def replay(rows: list[dict], graph_rows: list[dict], chain_cost: ChainCost) -> list[dict]:
    """Rows with fused_ms replaced by the forced column of the path the rule picks
    under chain_cost, and "path" added."""
    cases = {c.name: c for c in CASES}
    kernel_graph = {(r["case"], r["dtype"], r["batch"]): r["kernel_ms"] * 1e-3 for r in graph_rows}
    out = []
    for r in rows:
        c = cases[r["case"]]
        cuda_core = kernel_graph.get((r["case"], r["dtype"], r["batch"]), math.inf)
        path = chosen_path(c, r["dtype"], r["batch"], chain_cost(c, r["dtype"], r["batch"]), cuda_core)
        column = chain_column(c, r["dtype"]) if path == "chain" else f"{path}_ms"
        out.append({**r, "path": path, "fused_ms": r.get(column, math.nan)})
    return out


def replay_capture(graph_rows: list[dict], run6_rows: list[dict], per_call: float,
                   kind: str = "conv") -> dict[str, float]:
    """The capture rules on the rows of a --graphs table of one layer kind: for conv
    rows fused_conv_preferred while capturing (the kernel where predicted below
    per_call seconds per chain call), for linear rows fused_linear_applies'.
    Returns the kernel's picks, their speed-up over the chain (geometric mean and
    least), and the op's speed-up over the Sequential chain over all rows of the kind."""
    cases = {c.name: c for c in CASES}
    cuda_core = {(r["case"], r["dtype"], r["batch"]): r["kernel_ms"] * 1e-3 for r in run6_rows}
    gains, vs_seq = [], []
    for r in graph_rows:
        c = cases[r["case"]]
        if c.kind != kind or r["dtype"] not in ELEMENT_SIZE:
            continue
        if kind == "linear":
            kernel = linear_fused_captured(c, r["dtype"], r["batch"])
        else:
            stand_in = cuda_core.get((r["case"], r["dtype"], r["batch"]), math.inf)
            kernel = fused_prediction(c, r["dtype"], r["batch"], stand_in) < per_call * calls(c)
        if kernel:
            gains.append(r["chain_ms"] / r["kernel_ms"])
        vs_seq.append(r["sequential_ms"] / (r["kernel_ms"] if kernel else r["chain_ms"]))
    return {"picks": len(gains), "gain": geomean(gains), "worst": min(gains, default=math.nan),
            "vs_seq": geomean(vs_seq), "vs_seq_min": min(vs_seq, default=math.nan)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eager_json", nargs="*", type=Path, default=DEFAULT_EAGER,
                        help="the .json next to bench_gpu.py's eager results (default: every run in gpu_runs/)")
    parser.add_argument("--replay", action="store_true", help="the targets under each chain cost")
    parser.add_argument("--prices", default="24,30", help="flat prices per call to replay, in us (default 24,30)")
    parser.add_argument("--graphs", type=Path, default=DEFAULT_GRAPHS,
                        help="a --graphs run's .json: the CUDA-core kernel's GPU times for --replay")
    parser.add_argument("--capture", nargs="*", type=Path, metavar="GRAPHS_JSON",
                        help="replay the capture rule on these --graphs tables instead (default: runs 8-9's)")
    parser.add_argument("--replay-prices", default="", help="--capture: other floors per chain call to replay, in us")
    args = parser.parse_args(argv)
    if args.capture is not None:
        tables = args.capture or sorted(RUNS.glob("2026-11-28_run*_graphs.json"))
        run6 = json.loads(DEFAULT_GRAPHS.read_text(encoding="utf-8"))
        cases = {c.name: c for c in CASES}
        for table in tables:
            rows = json.loads(table.read_text(encoding="utf-8"))
            for n in (2, 3):  # the floor's evidence: the least replay per chain call
                per_call = [r["chain_ms"] / n for r in rows if cases[r["case"]].kind == "conv"
                            and calls(cases[r["case"]]) == n]
                if per_call:
                    print(f"{table.name}, conv chains of {n} calls: least replay {min(per_call) * 1e3:.1f} us per call")
            prices = ["cpp", *(p for p in args.replay_prices.split(",") if p)]
            runs = [("conv", p) for p in prices] + [("linear", "cpp")]
            for kind, price in runs:
                per_call = CPP_REPLAY_CALL_SECONDS if price == "cpp" else float(price) * 1e-6
                r = replay_capture(rows, run6, per_call, kind)
                picks = (f"kernel on {r['picks']} {kind} rows, {r['gain']:.2f}x the chain's replay (geometric "
                         f"mean), {r['worst']:.2f}x at worst" if r["picks"] else f"the chain on every {kind} row")
                rule = (f"floor {per_call * 1e6:.1f} us/call{' (C++)' if price == 'cpp' else ''}" if kind == "conv"
                        else "the C++ rule")
                print(f"{table.name}, {kind}, {rule}: {picks}; {kind} rows vs Sequential {r['vs_seq']:.3f}x "
                      f"(geometric mean), {r['vs_seq_min']:.2f}x at least")
        return 0
    rows = load_rows(args.eager_json)
    fitted = fit(rows)
    for g, f in fitted.items():
        print(f"{g[0]:6s} {g[1]:8s} flat fit {f['flat'] * 1e6:.1f} us/call; additive fit {f['call'] * 1e6:.1f} us/call "
              f"+ {f['rate'] / 1e12:.1f} Tmac/s  |  C++ {CPP_CALL_SECONDS * 1e6:.0f} us/call: predicted / measured "
              f"{f['lo']:.2f}-{f['hi']:.2f}")
    if not args.replay:
        return 0
    graph_rows = json.loads(args.graphs.read_text(encoding="utf-8"))
    rules = {f"flat {p} us/call": flat_cost(float(p) * 1e-6) for p in args.prices.split(",")}
    rules["additive fit"] = additive_cost(fitted)
    cpp = flat_cost(CPP_CALL_SECONDS)
    for run in sorted({r["run"] for r in rows}):
        of_run = [r for r in rows if r["run"] == run]
        baseline = replay(of_run, graph_rows, cpp)
        for name, rule in rules.items():
            replayed = replay(of_run, graph_rows, rule)
            changed = [f"{r['case']}@{r['batch']} {r['dtype']} -> {r['path']}"
                       for r, b in zip(replayed, baseline) if r["path"] != b["path"]]
            print(f"\n{run}, chain cost {name}" + (f" (paths unlike the C++ rule's: {'; '.join(changed)})" if changed else ""))
            print("\n".join(target_lines(replayed, lambda r: r["fused_ms"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
