"""The CUDA backend is really in the build when setup.py says it built it.

setup.py records its decision in ``tucker_ops/_build_info.py`` (``WITH_CUDA``).
Where CUDA was built, every op must have a CUDA kernel in the dispatcher: a
build that silently dropped csrc/cuda would otherwise pass every CPU test.
These tests need no GPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import tucker_ops._ops  # noqa: F401  (loads the library: registers the ops)

OPS = (
    "tucker_ops::tucker_conv2d",
    "tucker_ops::tucker_linear",
    "tucker_ops::tucker_conv2d_backward",
    "tucker_ops::tucker_linear_backward",
)


def _with_cuda() -> bool:
    try:
        info = importlib.import_module("tucker_ops._build_info")
    except ImportError:
        pytest.skip("tucker_ops/_build_info.py is missing: the extension was not built by setup.py")
    if not info.WITH_CUDA:
        reason = "torch is not a CUDA build" if torch.version.cuda is None else "TUCKER_OPS_CUDA=0 or no nvcc"
        pytest.skip(f"the extension was built without CUDA ({reason}): no CUDA kernels to look for")
    return True


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op: str) -> None:
    _with_cuda()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), (
        f"{op} has no CUDA kernel although setup.py built the extension with CUDA"
    )


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op: str) -> None:
    # The CPU kernels are always built, with or without CUDA.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")

