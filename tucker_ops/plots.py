"""PNG figures for the CLI: latency ratios, training curves, accuracy against size and speed.

matplotlib is optional (``pip install tucker-ops[plot]``): it is imported inside each
function, with the Agg backend so that no display is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_speedups", "plot_training_curves", "plot_tradeoff"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'tucker-ops[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_speedups(labels: Sequence[str], speedups: Mapping[str, Sequence[float]], path: str | os.PathLike[str], *, title: str, baseline: str) -> Path:
    """Grouped bars: for each label (workload or batch), each implementation's speed-up against ``baseline``."""
    plt = _pyplot()
    impls = list(speedups)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.2))
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(xs, speedups[impl], width, label=impl)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in speedups[impl]], fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"speed-up vs {baseline} (x, >1 is faster)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(histories: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str], *, title: str) -> Path:
    """Two panels: per-step training loss (smoothed) and held-out accuracy per epoch, one line per run.

    ``histories`` maps a run's label to ``History.to_dict()``.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, hist in histories.items():
        losses = list(hist["step_losses"])
        if losses:
            ax_loss.plot(range(1, len(losses) + 1), _smooth(losses, 25), label=label, linewidth=1)
        epochs = [e for e in hist["epochs"] if e.get("eval_accuracy") is not None]
        if epochs:
            ax_acc.plot([e["epoch"] for e in epochs], [100 * e["eval_accuracy"] for e in epochs], marker="o", label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (moving mean of 25 steps)")
    ax_loss.set_yscale("log")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_tradeoff(points: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str, latency_key: str = "fused_seconds") -> Path:
    """Accuracy against parameters (left) and against test-set latency (right).

    Each point is a mapping with ``label``, ``params``, ``accuracy`` (in [0, 1]),
    ``latency_key`` (seconds) and optionally ``kind`` (points of one kind share a
    marker and are joined by a line when there are several).
    """
    plt = _pyplot()
    fig, (ax_p, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    kinds: dict[str, list[Mapping[str, Any]]] = {}
    for point in points:
        kinds.setdefault(str(point.get("kind", "model")), []).append(point)
    markers = "o^sDvP*X"
    for k, (kind, group) in enumerate(kinds.items()):
        for ax, key in ((ax_p, "params"), (ax_t, latency_key)):
            pts = sorted((p for p in group if p.get(key) is not None), key=lambda p: p[key])
            if not pts:
                continue
            xs = [p[key] for p in pts]
            ys = [100 * p["accuracy"] for p in pts]
            ax.plot(xs, ys, marker=markers[k % len(markers)], linestyle="-" if len(pts) > 1 else "none", label=kind)
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(str(p["label"]), (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
    ax_p.set_xscale("log")
    ax_p.set_xlabel("parameters")
    ax_t.set_xlabel("seconds for the test set (fused where compressed)")
    for ax in (ax_p, ax_t):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
