"""Latency measurement shared by the CLI and the benchmark summaries.

The machines this runs on are shared and noisy, so results are reported as
ratios of medians taken in one run, never as lone absolute times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def median_latency(fn: Callable[[], object], *, min_time: float = 0.2, min_repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds, over at least ``min_repeats`` calls and ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class LatencyRow:
    """Median latency of each implementation for one input batch, and ratios to ``baseline``."""

    batch: int
    seconds: dict[str, float]
    baseline: str

    def speedup(self, name: str) -> float:
        """How many times faster ``name`` runs than the baseline (>1 means faster)."""
        return self.seconds[self.baseline] / self.seconds[name]


@torch.inference_mode()
def compare_latency(
    models: Mapping[str, nn.Module],
    inputs: Mapping[int, Tensor],
    *,
    baseline: str,
    min_time: float = 0.2,
) -> list[LatencyRow]:
    """Time each model's forward on each input, interleaved so drift hits all alike.

    Args:
        models: implementation name -> module (put in eval mode by the caller).
        inputs: batch size -> input tensor of that batch size.
        baseline: key of ``models`` the ratios are taken against.
    """
    if baseline not in models:
        raise ValueError(f"baseline must be one of {sorted(models)}, got {baseline!r}")
    rows = []
    for batch, x in inputs.items():
        seconds = {name: median_latency(lambda m=m: m(x), min_time=min_time) for name, m in models.items()}
        rows.append(LatencyRow(batch=batch, seconds=seconds, baseline=baseline))
    return rows


def format_latency_table(rows: list[LatencyRow]) -> str:
    """Markdown table of speed-ups against the baseline (dense = 1.00x)."""
    if not rows:
        return ""
    names = list(rows[0].seconds)
    header = "| batch | " + " | ".join(f"{n} (x vs {rows[0].baseline})" for n in names) + " |"
    sep = "|---:|" + "---:|" * len(names)
    lines = [header, sep]
    for row in rows:
        lines.append(f"| {row.batch} | " + " | ".join(f"{row.speedup(n):.2f}x" for n in names) + " |")
    return "\n".join(lines)


# -- whole data sets ----------------------------------------------------------------


@dataclass(frozen=True)
class DatasetLatency:
    """Wall time of each implementation to classify a whole data set, over ``repeats`` passes.

    ``seconds[name]`` holds one time per pass; passes of the implementations are
    interleaved so machine drift hits all of them alike.
    """

    n_images: int
    batch_size: int
    threads: int
    seconds: dict[str, list[float]]
    baseline: str

    def mean(self, name: str) -> float:
        return statistics.fmean(self.seconds[name])

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def speedup(self, name: str) -> float:
        """Baseline median / ``name`` median (>1 means ``name`` is faster)."""
        return self.median(self.baseline) / self.median(name)

    def to_dict(self) -> dict[str, object]:
        return {
            "n_images": self.n_images,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "baseline": self.baseline,
            "seconds": self.seconds,
            "mean_seconds": {n: self.mean(n) for n in self.seconds},
            "median_seconds": {n: self.median(n) for n in self.seconds},
            "speedup_vs_baseline": {n: self.speedup(n) for n in self.seconds},
        }


@torch.inference_mode()
def dataset_latency(
    models: Mapping[str, nn.Module],
    images: Tensor,
    *,
    baseline: str,
    batch_size: int = 1000,
    repeats: int = 5,
    warmup: int = 1,
    progress: bool | None = None,
) -> DatasetLatency:
    """Time a full inference pass over ``images`` (N, ...) in batches of ``batch_size``, per model.

    This is the thesis's "mean time for 10,000 test images": the same measure, taken
    for every implementation in one run, and reported with its ratios.
    """
    from tqdm import tqdm

    if baseline not in models:
        raise ValueError(f"baseline must be one of {sorted(models)}, got {baseline!r}")
    if repeats < 1:
        raise ValueError(f"dataset_latency: expected repeats >= 1, but got {repeats}")
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]

    def run(model: nn.Module) -> None:
        for chunk in chunks:
            model(chunk)

    for model in models.values():
        for _ in range(warmup):
            run(model)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    bar = tqdm(total=repeats * len(models), desc="time test set", unit="pass", disable=None if progress is None else not progress, leave=False)
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            run(model)
            seconds[name].append(time.perf_counter() - t0)
            bar.update(1)
    bar.close()
    return DatasetLatency(len(images), batch_size, torch.get_num_threads(), seconds, baseline)


# -- the built-in layer set ---------------------------------------------------------


@dataclass(frozen=True)
class BenchLayer:
    """One layer of the built-in benchmark set: a dense layer, its Tucker ranks and an input shape."""

    name: str
    layer: nn.Module
    ranks: tuple[int | None, int | None]
    input_shape: tuple[int, ...]


def builtin_layers(batch: int = 16) -> list[BenchLayer]:
    """Representative layers: the thesis's own, ResNet-style 3x3 convolutions, and MLP Linears.

    Shapes are per batch of ``batch`` images (Linear: ``batch`` rows); ranks are
    about a quarter of the channels, as Kim et al. (2016) choose for such layers.
    Weights come from torch's global generator (seed it first).
    """
    specs: list[tuple[str, nn.Module, tuple[int | None, int | None], tuple[int, ...]]] = [
        ("thesis conv1 1->16 5x5 @28", nn.Conv2d(1, 16, 5, padding=2), (None, 2), (batch, 1, 28, 28)),
        ("thesis conv2 16->32 5x5 @14", nn.Conv2d(16, 32, 5), (8, 4), (batch, 16, 14, 14)),
        ("conv 64->64 3x3 @56", nn.Conv2d(64, 64, 3, padding=1), (16, 16), (batch, 64, 56, 56)),
        ("conv 128->128 3x3 @28", nn.Conv2d(128, 128, 3, padding=1), (32, 32), (batch, 128, 28, 28)),
        ("conv 256->256 3x3 @14", nn.Conv2d(256, 256, 3, padding=1), (64, 64), (batch, 256, 14, 14)),
        ("conv 128->256 3x3 s2 @28", nn.Conv2d(128, 256, 3, stride=2, padding=1), (32, 64), (batch, 128, 28, 28)),
        ("thesis l1 800->120", nn.Linear(800, 120), (40, 120), (batch, 800)),
        ("linear 1024->1024", nn.Linear(1024, 1024), (128, 128), (batch, 1024)),
        ("linear 4096->4096", nn.Linear(4096, 4096), (256, 256), (batch, 4096)),
    ]
    return [BenchLayer(name, layer.eval(), ranks, shape) for name, layer, ranks, shape in specs]


@dataclass(frozen=True)
class NamedLatencyRow:
    """Median latency of each implementation for one named workload."""

    name: str
    seconds: dict[str, float]
    baseline: str

    def speedup(self, impl: str) -> float:
        return self.seconds[self.baseline] / self.seconds[impl]


@torch.inference_mode()
def compare_named(
    workloads: Mapping[str, tuple[Mapping[str, nn.Module], Tensor]],
    *,
    baseline: str,
    min_time: float = 0.2,
    progress: bool | None = None,
) -> list[NamedLatencyRow]:
    """Like :func:`compare_latency`, for workloads that each bring their own models and input."""
    from tqdm import tqdm

    rows = []
    for name, (models, x) in tqdm(workloads.items(), desc="bench", unit="workload", disable=None if progress is None else not progress):
        if baseline not in models:
            raise ValueError(f"baseline must be one of {sorted(models)}, got {baseline!r}")
        seconds = {impl: median_latency(lambda m=m: m(x), min_time=min_time) for impl, m in models.items()}
        rows.append(NamedLatencyRow(name=name, seconds=seconds, baseline=baseline))
    return rows


def format_named_table(rows: list[NamedLatencyRow]) -> str:
    """Markdown table: per workload the baseline's median time and every implementation's speed-up."""
    if not rows:
        return ""
    impls = list(rows[0].seconds)
    base = rows[0].baseline
    header = f"| workload | {base} (ms) | " + " | ".join(f"{n} (x vs {base})" for n in impls) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(impls)]
    for row in rows:
        cells = " | ".join(f"{row.speedup(n):.2f}x" for n in impls)
        lines.append(f"| {row.name} | {1e3 * row.seconds[base]:.3f} | {cells} |")
    return "\n".join(lines)
