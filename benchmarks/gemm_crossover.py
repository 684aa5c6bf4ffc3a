"""Where gemm_nn's hand kernel beats the BLAS: the measurement behind ``nn_uses_blas`` in
csrc/cpu/gemm.cpp (the AVX-512 kernel where the CPU has AVX-512, else the AVX2 one).

Compiles a small extension that includes gemm.cpp (torch.utils.cpp_extension, a C++
compiler and ninja; a minute the first time), then times, on one thread, the hand kernels
against the single-threaded sgemm/dgemm call gemm_nn / gemm_nt would make, for the products the
CPU kernels run (conv stages per pixel block, linear stages per row block, weight
gradients with A transposed), each the best of repeated calls on warm data. Prints one
line per shape and the range of hand / BLAS time ratios. "hand" is the form gemm_nn /
gemm_nt picks (gemm.cpp, packs); the last two columns force each: in place (gemm_nt: the
dot-product form) and packed (where N is a multiple of the vector width)::

    python benchmarks/gemm_crossover.py
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [  # (M, N, K)
    *itertools.product((8, 16, 32, 64, 128), (32, 128, 512), (32, 128, 512, 1024)),
    (64, 196, 256), (576, 196, 64), (256, 196, 64), (64, 784, 576), (576, 784, 64),
    (256, 3136, 32), (32, 3136, 288), (288, 3136, 32), (512, 256, 512), (1024, 512, 256),
    (16, 512, 4096), (2048, 512, 32), (256, 64, 2048),
    # the linear stages both ways round: x W^T (rows x out x in; form nt) against W X^T
    # (out x rows x in; form nn): linear_4096 and thesis_l1 / thesis_l2 at 16 and 32 rows
    (32, 512, 4096), (512, 32, 4096), (32, 4096, 512), (4096, 32, 512),
    *((r, o, i) for r in (16, 32) for o, i in ((40, 800), (200, 40), (120, 200), (30, 120), (84, 30))),
    *((o, r, i) for r in (16, 32) for o, i in ((40, 800), (200, 40), (120, 200), (30, 120), (84, 30))),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float64", action="store_true", help="double instead of float")
    parser.add_argument(
        "--forms", nargs="+", choices=("nn", "nn_at", "nt"), default=["nn", "nn_at", "nt"],
        help="gemm_nn with A row-major / stored transposed, gemm_nt (A * B^T)",
    )  # fmt: skip
    parser.add_argument(
        "--shapes", nargs="+", metavar="M,N,K", help="these products instead of the built-in list"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    ext = cpp_extension.load(
        "tucker_gemm_crossover",
        [os.path.join(HERE, "gemm_crossover.cpp")],
        extra_include_paths=[os.path.join(HERE, "..", "csrc")],
        extra_cflags=["-O3"],
    )
    dtype = "float64" if args.float64 else "float32"
    print(f"{platform.processor() or platform.machine()}, {ext.isa()} hand kernel, 1 thread, {dtype}, "
          f"torch {torch.__version__}")
    print("| form | M | N | K | hand | BLAS | hand / BLAS | hand GFLOP/s | in place / BLAS | packed / BLAS |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for form in args.forms:
        ratios = []
        shapes = [tuple(int(v) for v in x.split(",")) for x in args.shapes] if args.shapes else SHAPES
        for m, n, k in shapes:
            reps = max(5, min(2000, int(2e7 / (m * n * k))))
            hand, blas, in_place, packed = ext.time_gemm(form, m, n, k, args.float64, reps)
            ratios.append(hand / blas)
            print(
                f"| {form} | {m} | {n} | {k} | {hand / 1e3:.1f} us | {blas / 1e3:.1f} us | {hand / blas:.2f} "
                f"| {2 * m * n * k / hand:.0f} | {in_place / blas:.2f} | {packed / blas:.2f} |"
            )
        print(f"{form}: hand / BLAS min {min(ratios):.2f}, max {max(ratios):.2f}, "
              f"hand faster in {sum(r < 1 for r in ratios)} of {len(ratios)}")  # fmt: skip


if __name__ == "__main__":
    main()
