"""The ``tucker-ops`` command: help, argument errors without tracebacks, compress, bench, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tucker_ops
from tucker_ops import cli
from tucker_ops.models import ThesisNet
from tucker_ops.modules import TuckerConv2d, TuckerLinear

COMMANDS = ("demo", "compress", "bench", "reproduce")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse errors and --help
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert f"usage: tucker-ops {command}" in out
    assert "--threads" in out and "--seed" in out


def test_console_script_help_in_a_subprocess() -> None:
    done = subprocess.run([sys.executable, "-m", "tucker_ops.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in COMMANDS:
        assert command in done.stdout


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["demo", "--threads", "0"], "--threads: expected a positive integer, got 0"),
        (["bench", "--min-time", "-1"], "--min-time: expected a positive number"),
        (["reproduce", "--epochs", "x"], "--epochs: expected an integer >= 0"),
        (["compress", "m.pt"], "the following arguments are required: -o/--output"),
        (["compress", "m.pt", "-o", "x.pt", "--energy", "1.5"], "--energy: expected a number in (0, 1]"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_argument_errors(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err


def test_missing_mnist_files_are_listed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    code, _, err = run_cli(capsys, "reproduce", "--quick", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2
    assert err.startswith("tucker-ops reproduce: error: MNIST files missing")
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in err
    assert "Traceback" not in err


def test_bad_idx_file_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for split in tucker_ops.mnist.MNIST_FILES.values():
        for name in split:
            (tmp_path / name).write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01")  # says 3 items, holds 1
    code, _, err = run_cli(capsys, "demo", "--data", str(tmp_path))
    assert code == 2
    assert "truncated" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["compress", "nope.pt", "-o", "x.pt"], "model: file 'nope.pt' not found"),
        (["compress", "no_such_pkg.mod:Net", "-o", "x.pt"], "cannot import module 'no_such_pkg.mod'"),
        (["compress", "tucker_ops.models:Nope", "-o", "x.pt"], "has no attribute 'Nope'"),
        (["compress", "tucker_ops.models:thesis_ranks", "-o", "x.pt"], "to return an nn.Module, but got a dict"),
        (["compress", "tucker_ops.models:ThesisNet", "-o", "x.pt", "--ranks", "abc"], "--ranks: expected an int"),
        (["compress", "tucker_ops.models:ThesisNet", "-o", "x.pt", "--ranks", "1.5"], "(0, 1], but got 1.5"),
        (["compress", "tucker_ops.models:ThesisNet", "-o", "x.pt", "--ranks", "{\"conv9\": 3}"], "conv9"),
        (["compress", "tucker_ops.models:ThesisNet", "-o", "x.pt", "--method", "explicit"], "--method explicit needs --ranks"),
        (["compress", "tucker_ops.models:ThesisNet", "-o", "x.pt", "--state-dict", "missing.pt"], "--state-dict: file 'missing.pt' not found"),
        (["compress", "tucker_ops.models:ThesisNet", "-o", "x.pt", "--input-shape", "1,a"], "--input-shape: expected sizes like"),
        (["bench", "--model", "tucker_ops.models:ThesisNet"], "--input-shape is required with --model"),
        (["bench", "--ranks", "4"], "apply to --model"),
    ],
)
def test_model_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], needle: str) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert needle in err
    assert err.startswith(f"tucker-ops {argv[0]}: error:")
    assert "Traceback" not in err


def test_state_dict_given_as_model_is_explained(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(ThesisNet().state_dict(), path)
    code, _, err = run_cli(capsys, "compress", str(path), "-o", str(tmp_path / "x.pt"))
    assert code == 2
    assert "holds a state_dict, not a module" in err and "--state-dict" in err


def _tucker_ranks(model: torch.nn.Module) -> dict[str, tuple]:
    return {n: m.ranks for n, m in model.named_modules() if isinstance(m, (TuckerConv2d, TuckerLinear))}


def test_compress_factory_and_state_dict(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = ThesisNet().eval()
    torch.save(dense.state_dict(), tmp_path / "net.pt")
    out = tmp_path / "small.pt"
    code, stdout, err = run_cli(
        capsys, "compress", "tucker_ops.models:ThesisNet", "--state-dict", str(tmp_path / "net.pt"),
        "--ranks", "thesis", "--input-shape", "1,28,28", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "parameters (whole model): 120,382 -> 72,360" in stdout
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["params_after"] == 72_360 and report["macs_before"] > report["macs_after"]
    loaded = tucker_ops.load(out, ThesisNet).eval()
    assert _tucker_ranks(loaded) == {"conv1": (None, 2), "conv2": (8, 4), "l1": (40, 200), "l2": (None, 30)}
    # The written factors are the decomposition of the given weights, at the reported error.
    layer = next(layer for layer in report["layers"] if layer["name"] == "conv2")
    dense_w = dense.conv2.weight.detach()
    rel = float((loaded.conv2.to_dense().weight.detach() - dense_w).norm() / dense_w.norm())
    assert rel == pytest.approx(layer["reconstruction_error"], rel=1e-4, abs=1e-6)
    assert torch.equal(loaded.l_out.weight, dense.l_out.weight)


def test_compress_saved_module_with_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(ThesisNet(), tmp_path / "whole.pt")
    out = tmp_path / "c.pt"
    code, stdout, err = run_cli(
        capsys, "compress", str(tmp_path / "whole.pt"), "--ranks", "8,4", "--include", "conv2",
        "--report", str(tmp_path / "r.json"), "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    compressed = {layer["name"]: layer["ranks"] for layer in report["layers"] if layer["compressed"]}
    assert compressed == {"conv2": [8, 4]}
    # The checkpoint names its class, so the CLI reads it back without a factory.
    code, stdout, err = run_cli(capsys, "bench", "--model", str(out), "--input-shape", "1,28,28", "--batches", "2", "--min-time", "0.01")
    assert code == 0, err
    assert "| 2 |" in stdout


def test_bench_model_with_plot_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, stdout, err = run_cli(
        capsys, "bench", "--model", "tucker_ops.models:ThesisNet", "--ranks", '{"conv2": [8, 4]}', "--input-shape", "1,28,28",
        "--batches", "1", "3", "--min-time", "0.01", "--plot", str(tmp_path / "b.png"), "--json", str(tmp_path / "b.json"),
        "--threads", "1", "--seed", "3",
    )  # fmt: skip
    assert code == 0, err
    assert "fused (x vs dense)" in stdout and "sequential (x vs dense)" in stdout
    assert (tmp_path / "b.png").stat().st_size > 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert [row["batch"] for row in data["rows"]] == [1, 3] and data["threads"] == 1
    assert set(data["rows"][0]["seconds"]) == {"dense", "sequential", "fused"}


def test_demo_runs_on_the_embedded_data(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run_cli(
        capsys, "demo", "--epochs", "0", "--fine-tune-epochs", "0", "--test-limit", "300", "--repeats", "1", "--batches", "1",
        "--min-time", "0.01", "--threads", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "embedded MNIST subset" in stdout and "10,000 training and 300 test images" in stdout
    assert "fused vs reference" in stdout and "MISMATCH" not in stdout
    for row in ("| dense ThesisNet | 120,382 |", "| compressed, Sequential chains | 72,360 |", "| compressed, fused ops | 72,360 |"):
        assert row in stdout
