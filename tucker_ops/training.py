"""Training, fine-tuning and evaluation loops for in-memory classification data, with tqdm bars.

The data sets here (MNIST and its subset) fit in memory as tensors, so batches are
slices of one shuffled index instead of a DataLoader: less overhead per step on a
small CPU, and the order depends only on the seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["EpochRecord", "History", "TrainConfig", "accuracy", "batches", "evaluate", "fine_tune", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe: Adam with cosine learning-rate decay to ``lr * final_lr_fraction``.

    Attributes:
        epochs: full passes over the training data (an int >= 0).
        batch_size: examples per step.
        lr: peak learning rate of Adam.
        weight_decay: L2 penalty of Adam (coupled, as ``torch.optim.Adam`` applies it).
        final_lr_fraction: the cosine schedule ends at ``lr * final_lr_fraction``.
        max_steps: stop after this many steps in total (None: run every epoch in full);
            used by quick smoke runs.
        seed: seeds the shuffling order (the model's own randomness, e.g. dropout,
            follows torch's global generator, which the caller seeds).
    """

    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    final_lr_fraction: float = 0.01
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"TrainConfig: expected epochs >= 0, but got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"TrainConfig: expected batch_size >= 1, but got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: expected lr > 0, but got {self.lr}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"TrainConfig: expected max_steps >= 0 or None, but got {self.max_steps}")

    def steps(self, n_examples: int) -> int:
        """Optimizer steps this recipe takes on ``n_examples`` training examples."""
        total = self.epochs * math.ceil(n_examples / self.batch_size)
        return total if self.max_steps is None else min(total, self.max_steps)

    def describe(self, n_examples: int) -> str:
        """One line for reports: optimizer, schedule, epochs, steps and examples seen."""
        steps = self.steps(n_examples)
        text = (
            f"Adam lr {self.lr:g} (cosine to {self.lr * self.final_lr_fraction:g}), batch {self.batch_size}, "
            f"{self.epochs} epoch(s) of {n_examples:,} images = {steps:,} steps"
        )
        if self.weight_decay:
            text += f", weight decay {self.weight_decay:g}"
        if self.max_steps is not None and steps < self.epochs * math.ceil(n_examples / self.batch_size):
            text += f" (capped at max_steps={self.max_steps})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochRecord:
    """One epoch: mean training loss and accuracy, held-out accuracy, wall time."""

    epoch: int
    steps: int
    train_loss: float
    train_accuracy: float
    eval_accuracy: float | None
    seconds: float


@dataclass
class History:
    """What a :func:`train` call did: the recipe, per-epoch records and per-step losses."""

    config: TrainConfig
    n_examples: int
    epochs: list[EpochRecord] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.step_losses)

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "budget": self.config.describe(self.n_examples),
            "n_examples": self.n_examples,
            "steps": self.steps,
            "seconds": self.seconds,
            "epochs": [asdict(e) for e in self.epochs],
            "step_losses": self.step_losses,
        }


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Index tensors covering ``range(n)`` in batches; shuffled when ``generator`` is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (run in eval mode, mode restored) on ``images`` (N, ...) and ``labels`` (N,)."""
    if len(images) != len(labels):
        raise ValueError(f"evaluate: expected as many labels as images, but got {len(labels)} labels for {len(images)} images")
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for index in batches(len(images), batch_size):
            correct += int((model(images[index]).argmax(1) == labels[index]).sum())
    finally:
        model.train(was_training)
    return correct / max(len(images), 1)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows of ``logits`` (N, classes) whose argmax equals ``labels`` (N,)."""
    return float((logits.argmax(1) == labels).float().mean())


def train(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: TrainConfig,
    *,
    eval_data: tuple[Tensor, Tensor] | None = None,
    desc: str = "train",
    progress: bool | None = None,
) -> History:
    """Train ``model`` in place with cross-entropy on ``images`` (N, ...) and ``labels`` (N,).

    Args:
        eval_data: ``(images, labels)`` evaluated after every epoch (held-out accuracy
            in the history and the bar).
        desc: label of the tqdm bar.
        progress: show the bar: None = only on a terminal.

    Returns:
        The :class:`History`; the model is left in eval mode.
    """
    if len(images) != len(labels):
        raise ValueError(f"train: expected as many labels as images, but got {len(labels)} labels for {len(images)} images")
    history = History(config=config, n_examples=len(images))
    total_steps = config.steps(len(images))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine(step, total_steps, config.final_lr_fraction))
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=None if progress is None else not progress, dynamic_ncols=True)
    try:
        for epoch in range(1, config.epochs + 1):
            if history.steps >= total_steps:
                break
            model.train()
            start = time.perf_counter()
            loss_sum, correct, seen, steps = 0.0, 0, 0, 0
            for index in batches(len(images), config.batch_size, generator):
                if history.steps >= total_steps:
                    break
                x, y = images[index], labels[index]
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                value = float(loss.detach())
                history.step_losses.append(value)
                loss_sum += value * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
                steps += 1
                bar.update(1)
                if steps % 20 == 0:
                    bar.set_postfix(epoch=epoch, loss=f"{value:.3f}", refresh=False)
            seconds = time.perf_counter() - start
            held_out = evaluate(model, *eval_data) if eval_data is not None else None
            record = EpochRecord(epoch, steps, loss_sum / max(seen, 1), correct / max(seen, 1), held_out, seconds)
            history.epochs.append(record)
            postfix = {"epoch": epoch, "loss": f"{record.train_loss:.3f}"}
            if held_out is not None:
                postfix["test_acc"] = f"{100 * held_out:.2f}%"
            bar.set_postfix(postfix)
    finally:
        bar.close()
        model.eval()
    return history


def fine_tune(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: TrainConfig,
    *,
    eval_data: tuple[Tensor, Tensor] | None = None,
    desc: str = "fine-tune",
    progress: bool | None = None,
) -> History:
    """:func:`train` under another name and bar label: fine-tuning is training a compressed model further."""
    return train(model, images, labels, config, eval_data=eval_data, desc=desc, progress=progress)


def _cosine(step: int, total: int, final_fraction: float) -> float:
    if total <= 1:
        return 1.0
    progress = min(step / (total - 1), 1.0)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
