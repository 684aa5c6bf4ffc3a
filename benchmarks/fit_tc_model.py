"""Fit the tensor-core tile kernel's time model to measured GPU times.

    python benchmarks/fit_tc_model.py                          # run 4's column in RESULTS_GPU.md
    python benchmarks/fit_tc_model.py --sweep sweep.md.draft.json  # gpu_cluster_sweep.py --columns tc
    python benchmarks/fit_tc_model.py --sweep benchmarks/gpu_runs/2026-11-28_run9_sweep.json  # the C++ constants

The op weighs conv_fused_tc.cu's kernel against the CUDA-core kernels and the
cuDNN chain with fused_conv_tc_seconds (C++), the sum of
- the packing pass: kPackSeconds + (packed + input bytes) / kPackBytesPerSecond;
- per wave of blocks: rounds x kRoundSeconds + multiply-adds x sharing / rate,
  where rounds count staged chunks (step 1's double-buffered chunks half), the
  rate is kMacsPerSecondPerBlock (TF32: a third of it) and sharing (1-2) is
  how many blocks share a multiprocessor.
The counts come from the kernel's launch plan (make_tc_plan), restated here for
the streaming kernel, which the C++ model prices even where the resident variant
runs (the default where it fits; run 9's sweep, its "tc_resident" column: from 3%
slower to 25% faster).
The packing terms are held at the C++ values; kRoundSeconds and the rate are
fitted by non-negative least squares to the GPU times (CUDA-graph replays) of
the kernel forced, on the rows where it applies. Prints the fitted constants,
the C++ ones, and how far each model's predictions lie from the times.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import CASES, Case, out_size  # noqa: E402
from fit_grid_model import ELEMENT_SIZE, nonnegative_fit  # noqa: E402

# conv_fused_tc.cu's plan constants and model constants.
ROWS_OUT, COLS_OUT, PIXELS = 4, 16, 64
WARPS, MAX_FRAGS_PER_WARP, MAX_RANK, CO_CHUNK, SCRATCH_FLOATS = 8, 4, 128, 64, 256
SHARED_BUDGET = 110 * 1024
CPP = {"pack_seconds": 3e-6, "pack_bytes_per_second": 1.5e12, "round_seconds": 2.88e-6,
       "macs_per_second_per_block": 528e9}
TF32_SLOWDOWN = 3.0  # the C++ divides the rate by 3 for float32
H200_MULTIPROCESSORS = 132


def round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


@dataclass(frozen=True)
class Terms:
    """A row's model terms: seconds = pack + round_terms * round_seconds + mac_terms / rate."""
    pack: float
    round_terms: float
    mac_terms: float


def tc_terms(c: Case, dtype: str, batch: int, multiprocessors: int = H200_MULTIPROCESSORS) -> Terms | None:
    """make_tc_plan and fused_conv_tc_seconds' counts; None where the kernel does not apply."""
    if c.kind != "conv" or not (c.ranks[0] and c.ranks[1]) or max(c.ranks) > MAX_RANK:
        return None
    eb = ELEMENT_SIZE[dtype]
    r_in, r_out, k, s, dil = c.ranks[0], c.ranks[1], c.kernel, c.stride, 1
    h_out = out_size(c)
    ph = (ROWS_OUT - 1) * s + (k - 1) * dil + 1
    pw = (COLS_OUT - 1) * s + (k - 1) * dil + 1
    m_pad, rin_pad, rout_pad = round_up(ph * pw, 16), round_up(r_in, 16), round_up(r_out, 16)
    pad = 32 // eb
    ld_p, ld_z = rin_pad + pad, rout_pad + pad
    pj = round_up(max(m_pad * ld_p, PIXELS * ld_z) * eb, 128)
    avail = SHARED_BUDGET - pj - WARPS * SCRATCH_FLOATS * 4
    if avail <= 0:
        return None
    kc = buffers = 0
    for b in (2, 1):
        for cc in (64, 32, 16):
            if kc == 0 and b * (m_pad + rin_pad) * (cc + pad) * eb <= avail and (b == 1 or cc >= 32):
                kc, buffers = cc, b
    taps = k * k
    taps_chunk = min(taps, avail // (rout_pad * ld_p * eb))
    if kc == 0 or taps_chunk < 1 or CO_CHUNK * ld_z * eb > avail:
        return None
    tiles_h, tiles_w = math.ceil(h_out / ROWS_OUT), math.ceil(h_out / COLS_OUT)
    blocks = batch * tiles_h * tiles_w
    co_splits = 1
    if blocks < multiprocessors:
        co_splits = min(max(math.ceil(multiprocessors / max(blocks, 1)), 1), math.ceil(c.c_out / CO_CHUNK))
    co_per_split = round_up(math.ceil(c.c_out / co_splits), 16)
    co_splits = math.ceil(c.c_out / co_per_split)
    hp = (tiles_h * ROWS_OUT - 1) * s + (k - 1) * dil + 1
    wp = (tiles_w * COLS_OUT - 1) * s + (k - 1) * dil + 1
    c_pad = round_up(c.c_in, kc)
    packed_bytes = batch * hp * wp * c_pad * eb
    input_bytes = batch * c.c_in * c.size * c.size * eb
    pack = CPP["pack_seconds"] + (packed_bytes + input_bytes) / CPP["pack_bytes_per_second"]
    groups = math.ceil((m_pad // 16) * (rin_pad // 16) / (WARPS * MAX_FRAGS_PER_WARP))
    chunks = c_pad / kc
    rounds = (groups * (1 + chunks / 2 if buffers == 2 else chunks) + math.ceil(taps / taps_chunk)
              + math.ceil(co_per_split / CO_CHUNK))
    macs = m_pad * c_pad * rin_pad + PIXELS * rout_pad * rin_pad * taps + PIXELS * co_per_split * rout_pad
    all_blocks = batch * tiles_h * tiles_w * co_splits
    waves = math.ceil(all_blocks / (2 * multiprocessors))
    sharing = min(max(all_blocks / multiprocessors, 1.0), 2.0)
    slowdown = TF32_SLOWDOWN if dtype == "float32" else 1.0
    return Terms(pack, waves * rounds, waves * macs * sharing * slowdown)


def predict(t: Terms, round_seconds: float, macs_per_second_per_block: float) -> float:
    return t.pack + t.round_terms * round_seconds + t.mac_terms / macs_per_second_per_block


def rows_from_results(path: Path, column: str) -> list[dict]:
    """(case, dtype, batch, seconds) of a markdown table in `path` with `column`."""
    rows, header = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if header is None:
            if line.startswith("| case | dtype | batch |") and column in cells:
                header = cells
            continue
        if not line.startswith("|"):
            break
        if cells[0].startswith("---"):
            continue
        rows.append({"case": cells[0], "dtype": cells[1], "batch": int(cells[2]),
                     "seconds": float(cells[header.index(column)]) * 1e-3})
    if not rows:
        raise SystemExit(f"fit_tc_model.py: no table with a '{column}' column in {path}")
    return rows


def rows_from_sweep(path: Path) -> list[dict]:
    """(case, dtype, batch, seconds) of gpu_cluster_sweep.py's json, its "tc" column."""
    return [{"case": r["case"], "dtype": r["dtype"], "batch": r["batch"], "seconds": r["tc"] * 1e-3}
            for r in json.loads(path.read_text(encoding="utf-8")) if "tc" in r]


def fit(rows: list[dict]) -> tuple[float, float, list[tuple[dict, Terms]]]:
    """(round_seconds, macs_per_second_per_block, the rows used with their terms)."""
    cases = {c.name: c for c in CASES}
    used = []
    for r in rows:
        c = cases.get(r["case"])
        t = tc_terms(c, r["dtype"], r["batch"]) if c is not None else None
        if t is not None:
            used.append((r, t))
    if len(used) < 2:
        raise SystemExit("fit_tc_model.py: fewer than two rows where the tensor-core kernel applies")
    # Relative residuals: weight each row by 1 / its time, so small layers count as much as big ones.
    a = np.array([[t.round_terms / r["seconds"], t.mac_terms / r["seconds"]] for r, t in used])
    b = np.array([(r["seconds"] - t.pack) / r["seconds"] for r, t in used])
    round_seconds, inverse_rate = nonnegative_fit(a, b)
    return round_seconds, 1.0 / inverse_rate if inverse_rate > 0 else math.inf, used


def ratio_range(used: list[tuple[dict, Terms]], round_seconds: float, rate: float) -> tuple[float, float]:
    ratios = [predict(t, round_seconds, rate) / r["seconds"] for r, t in used]
    return min(ratios), max(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS_GPU.md")
    parser.add_argument("--column", default="packed + cp.async", help="the column of --results to fit")
    parser.add_argument("--sweep", type=Path, help="gpu_cluster_sweep.py's json instead of --results")
    args = parser.parse_args(argv)
    rows = rows_from_sweep(args.sweep) if args.sweep else rows_from_results(args.results, args.column)
    round_seconds, rate, used = fit(rows)
    print(f"{len(used)} rows where the tensor-core kernel applies (of {len(rows)})")
    print(f"fitted: kRoundSeconds = {round_seconds * 1e6:.2f} us, kMacsPerSecondPerBlock = {rate / 1e9:.0f} G/s")
    print(f"C++:    kRoundSeconds = {CPP['round_seconds'] * 1e6:.2f} us, "
          f"kMacsPerSecondPerBlock = {CPP['macs_per_second_per_block'] / 1e9:.0f} G/s")
    # Each dtype on its own (the C++ ties float32's rate to a third of 16-bit's).
    for dtype in sorted({r["dtype"] for r, _ in used}):
        subset = [r for r, _ in used if r["dtype"] == dtype]
        if len(subset) >= 2:
            rs, mr, _ = fit(subset)
            print(f"  {dtype} alone: kRoundSeconds = {rs * 1e6:.2f} us, kMacsPerSecondPerBlock = {mr / 1e9:.0f} G/s"
                  + (f" (float32's own rate: {mr / TF32_SLOWDOWN / 1e9:.0f} G/s)" if dtype == "float32" else ""))
    for name, (rs, mr) in {"fitted": (round_seconds, rate),
                           "C++": (CPP["round_seconds"], CPP["macs_per_second_per_block"])}.items():
        for dtype in sorted({r["dtype"] for r, _ in used}):
            subset = [(r, t) for r, t in used if r["dtype"] == dtype]
            lo, hi = ratio_range(subset, rs, mr)
            print(f"  {name} model / measured, {dtype}: {lo:.2f}-{hi:.2f}x")
    # The packing pass's share of the kernel (its held term against the measured time).
    large = [t.pack / r["seconds"] for r, t in used if r["batch"] >= 32]
    if large:
        print(f"  packing term / measured, batch >= 32: {min(large):.2f}-{max(large):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
