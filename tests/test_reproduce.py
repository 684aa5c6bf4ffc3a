"""Training loops and a ``tucker-ops reproduce --quick`` smoke run on the embedded MNIST subset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tucker_ops import cli
from tucker_ops.reproduce import QUICK, THESIS
from tucker_ops.training import TrainConfig, evaluate, train


def _blobs(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    return centers[y] + 0.5 * torch.randn(n, 2, generator=g), y


def test_train_learns_and_records_history() -> None:
    x, y = _blobs()
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    before = evaluate(model, x, y)
    config = TrainConfig(epochs=3, batch_size=32, lr=0.05)
    hist = train(model, x, y, config, eval_data=(x, y), progress=False)
    assert hist.steps == config.steps(len(x)) == 24
    assert [e.epoch for e in hist.epochs] == [1, 2, 3]
    assert hist.epochs[-1].eval_accuracy == evaluate(model, x, y) > max(before, 0.95)
    assert hist.epochs[-1].train_loss < hist.epochs[0].train_loss
    assert not model.training
    assert "3 epoch(s) of 256 images = 24 steps" in hist.to_dict()["budget"]


def test_train_is_deterministic_for_a_seed() -> None:
    x, y = _blobs()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = nn.Linear(2, 3)
        runs.append(train(model, x, y, TrainConfig(epochs=1, batch_size=16, seed=5), progress=False).step_losses)
    assert runs[0] == runs[1]


def test_max_steps_caps_training() -> None:
    x, y = _blobs()
    config = TrainConfig(epochs=5, batch_size=32, max_steps=7)
    hist = train(nn.Linear(2, 3), x, y, config, progress=False)
    assert hist.steps == 7 and len(hist.epochs) == 1
    assert "capped at max_steps=7" in config.describe(len(x))


def test_bad_training_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr > 0"):
        TrainConfig(lr=0)
    x, y = _blobs(10)
    with pytest.raises(ValueError, match="9 labels for 10 images"):
        train(nn.Linear(2, 3), x, y[:9], TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="9 labels for 10 images"):
        evaluate(nn.Linear(2, 3), x, y[:9])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reproduce")
    assert cli.main(["reproduce", "--quick", "--out", str(out), "--threads", "1"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_reproduce_writes_everything(quick_run: tuple[Path, dict]) -> None:
    out, results = quick_run
    for name in ("results.json", "reproduce.md", "training_curves.png", "fine_tuning_curves.png", "accuracy_tradeoff.png", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    assert results["data"]["n_train"] == 10_000  # the embedded subset
    assert results["data"]["n_test"] == QUICK.max_test
    assert results["command"].startswith("tucker-ops reproduce --quick")
    assert results["environment"]["torch_threads"] == 1


def test_quick_reproduce_models_and_budgets(quick_run: tuple[Path, dict]) -> None:
    _, results = quick_run
    models = results["models"]
    assert set(models) == {"dense", "thesis_ranks", "evbmf"}  # the quick recipe has no dense control
    assert models["dense"]["params"] == 120_382
    assert models["thesis_ranks"]["params"] == 72_360
    assert models["thesis_ranks"]["useful_params"] == THESIS["decomposed"]["params"] == 59_560
    assert models["dense"]["training_steps_total"] == QUICK.dense.max_steps
    assert models["thesis_ranks"]["training_steps_total"] == QUICK.dense.max_steps + QUICK.fine_tune.max_steps
    assert len(models["thesis_ranks"]["training_budget"]) == 2
    for entry in models.values():
        assert 0.0 <= entry["accuracy"] <= 1.0
    layers = {layer["name"]: layer["ranks"] for layer in models["thesis_ranks"]["compression"]["layers"] if layer["compressed"]}
    assert layers == {"conv1": [None, 2], "conv2": [8, 4], "l1": [40, 200], "l2": [None, 30]}


def test_quick_reproduce_latency_sweep_projection(quick_run: tuple[Path, dict]) -> None:
    _, results = quick_run
    lat = results["latency"]
    assert set(lat["seconds"]) == {"dense", "thesis_ranks/sequential", "thesis_ranks/fused", "evbmf/sequential", "evbmf/fused"}
    assert lat["speedup_vs_baseline"]["dense"] == 1.0
    assert [row["budget"] for row in results["sweep"]] == list(QUICK.sweep_budgets)
    params = [row["params"] for row in results["sweep"]]
    assert params == sorted(params) and params[-1] < 120_382
    runs = results["projection"]["runs"]
    assert {k: v["inputs"] for k, v in runs.items()} == {"full": 784, "15": 15, "100": 100, "200": 200}
    assert {k: v["params"] for k, v in runs.items()} == {"full": 15_910, "15": 530, "100": 2_230, "200": 4_230}
    assert runs["15"]["relative_error"] > runs["200"]["relative_error"] > 0


def test_quick_reproduce_markdown(quick_run: tuple[Path, dict]) -> None:
    out, results = quick_run
    text = (out / "reproduce.md").read_text()
    for needle in ("98.277", "98.227", "1.807", "1.945", "120,382", "59,560", "3,145", "15,910", "Rank sweep", "![latency.png](latency.png)"):
        assert needle in text, needle
    assert results["command"] in text
    assert "not the full 10,000-image test set" in text
