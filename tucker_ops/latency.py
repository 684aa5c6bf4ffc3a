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
