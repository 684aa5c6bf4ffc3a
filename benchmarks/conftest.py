"""Benchmark configuration: thread count and the machine description stored in the JSON.

    TUCKER_BENCH_THREADS=N   torch (and ONNX Runtime) threads; default: torch's default.
"""

from __future__ import annotations

import os
import platform
import subprocess

import pytest
import torch


def bench_threads() -> int:
    return int(os.environ.get("TUCKER_BENCH_THREADS", torch.get_num_threads()))


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(bench_threads())


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["cpu_model"] = _cpu_model()
    machine_info["logical_cpus"] = os.cpu_count()
    # The vector ISA decides which hand-kernel variants run (and oneDNN's): a VM moved
    # from an AVX-512 host to an AVX2 one runs everything 2-3x slower.
    machine_info["cpu_isa"] = torch.backends.cpu.get_cpu_capability()
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["torch"] = torch.__version__
    try:
        import onnxruntime

        machine_info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        machine_info["onnxruntime"] = None
