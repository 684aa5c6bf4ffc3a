"""Compressing a VGG-16-sized model: wall time, peak memory, and randomized-vs-exact SVD error.

Run as a script (each measurement in this fresh process, so peak RSS is its own):

    .venv/bin/python benchmarks/bench_compress_big.py compress            # VGG-16, 138M params, vbmf
    .venv/bin/python benchmarks/bench_compress_big.py compress --scale 8  # channels / 8 (the CI test)
    .venv/bin/python benchmarks/bench_compress_big.py svd-error           # exact vs randomized SVD

``compress`` prints one JSON object: seconds in ``compress()``, model bytes, peak RSS
(``VmHWM`` from /proc/self/status) minus the RSS before the model was built, their
ratio, the machine's load average and the number of compressed layers.
tests/test_big_models.py runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch
from torch import nn

# VGG-16 ("configuration D", Simonyan & Zisserman 2015): 3x3 convs, "M" = 2x2 max pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(scale: int = 1, num_classes: int = 1000, device: str | torch.device | None = None) -> nn.Sequential:
    """VGG-16's exact layer shapes (138,357,544 parameters at scale 1) with random weights.

    ``scale`` divides every channel and hidden width (fc inputs stay 7x7 x channels),
    for a quick model of the same structure.
    """
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            c_out = int(v) // scale
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, device=device), nn.ReLU(inplace=True)]
            c_in = c_out
    hidden = 4096 // scale
    layers += [
        nn.AdaptiveAvgPool2d(7), nn.Flatten(),
        nn.Linear(c_in * 49, hidden, device=device), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(hidden, hidden, device=device), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(hidden, num_classes // scale, device=device),
    ]  # fmt: skip
    return nn.Sequential(*layers)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_compress(scale: int, method: str, svd: str, progress: bool) -> dict:
    import tucker_ops

    # Warm up first (tensorly/NumPy imports, LAPACK and thread-pool buffers), so the
    # baseline holds the fixed costs and the peak measures what scales with the model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tucker_ops.compress(vgg16(64), method=method, progress=False, decompose_options={"svd": svd})
    torch.manual_seed(0)
    base_kib = _status_kib("VmRSS")
    model = vgg16(scale)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EVBMF finds no signal in random weights: one warning per side
        compressed, report = tucker_ops.compress(
            model, method=method, progress=progress, decompose_options={"svd": svd}
        )
    seconds = time.perf_counter() - start
    peak_bytes = (_status_kib("VmHWM") - base_kib) * 1024
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "scale": scale,
        "method": method,
        "svd": svd,
        "params": n_params,
        "model_bytes": model_bytes,
        "seconds": round(seconds, 2),
        "peak_rss_over_baseline_bytes": peak_bytes,
        "peak_over_model": round(peak_bytes / model_bytes, 3),
        "layers_compressed": len(report.compressed),
        "layers": len(report.layers),
        "params_after": report.params_after,
        "loadavg": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
    }


def _decaying(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A matrix with singular values ~ 1/i (trained layers decay; random init does not)."""
    m, n = shape
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    return (u * s) @ v.T


def measure_svd_error() -> list[dict]:
    """Relative reconstruction error of exact and randomized SVD on VGG-16-shaped layers."""
    from tucker_ops.decompose import decompose_conv2d, decompose_linear

    gen = torch.Generator().manual_seed(0)
    cases: list[tuple[str, torch.Tensor, tuple[int | None, int | None]]] = []
    fc6 = nn.Linear(25088, 4096).weight.detach()
    fc7 = nn.Linear(4096, 4096).weight.detach()
    fc8 = nn.Linear(4096, 1000).weight.detach()
    for r in (64, 256):
        cases.append((f"fc6 4096x25088 random init, ranks (None, {r})", fc6, (None, r)))
    for r in (64, 512):
        cases.append((f"fc7 4096x4096 random init, ranks (None, {r})", fc7, (None, r)))
        cases.append((f"fc7 4096x4096 1/i spectrum, ranks (None, {r})", _decaying((4096, 4096), gen), (None, r)))
    cases.append(("fc8 1000x4096 random init, ranks (None, 128)", fc8, (None, 128)))
    cases.append(("fc8 1000x4096 random init, ranks (128, 128)", fc8, (128, 128)))
    conv = nn.Conv2d(512, 512, 3).weight.detach()
    cases.append(("conv 512x512x3x3 random init, ranks (128, 128)", conv, (128, 128)))
    rows = []
    for label, weight, ranks in cases:
        fn = decompose_conv2d if weight.dim() == 4 else decompose_linear
        row = {"layer": label}
        for svd in ("exact", "randomized"):
            start = time.perf_counter()
            row[svd] = fn(weight, ranks, svd=svd).relative_error
            row[f"{svd}_s"] = round(time.perf_counter() - start, 2)
        row["added"] = row["randomized"] - row["exact"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compress", help="time and peak memory of compress() on VGG-16")
    c.add_argument("--scale", type=int, default=1, help="divide every width by this (default 1: the real VGG-16)")
    c.add_argument("--method", default="vbmf", help="rank selection method (default vbmf)")
    c.add_argument("--svd", default="auto", choices=("auto", "exact", "randomized"))
    c.add_argument("--progress", action="store_true", help="show the tqdm bar (on stderr)")
    c.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    sub.add_parser("svd-error", help="exact vs randomized SVD reconstruction error on VGG-16 shapes")
    args = parser.parse_args(argv)
    if args.what == "compress":
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure_compress(args.scale, args.method, args.svd, args.progress)))
    else:
        measure_svd_error()
    return 0


if __name__ == "__main__":
    sys.exit(main())
