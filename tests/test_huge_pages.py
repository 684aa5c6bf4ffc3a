"""Large tensors the CPU kernels allocate ask for transparent huge pages (csrc/cpu/fresh_tensors.h).

Where Linux offers THP per mapping ("madvise" mode, or "always"), the memory of every output,
gradient and kept intermediate of at least 4 MiB that has no page in memory yet is advised
MADV_HUGEPAGE before it is first touched: /proc/self/smaps then shows the mapping holding its
interior THP-eligible. The tensors here are over 32 MiB, which glibc always maps fresh (smaller
ones it may serve from pages it already holds, which are not advised). With
TUCKER_OPS_HUGE_PAGES=0 (read at load, so in a fresh interpreter) nothing is advised. Results
do not depend on it (every other test runs with it on).
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from test_ops_fused_paths import run_check_in_subprocess

import tucker_ops  # noqa: F401  (loads the ops)

OPS = torch.ops.tucker_ops
THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
MODE = THP.read_text().split("[")[1].split("]")[0] if THP.exists() else None

pytestmark = pytest.mark.skipif(
    MODE not in ("madvise", "always") or not os.path.exists("/proc/self/smaps"),
    reason=f"needs Linux transparent huge pages in madvise or always mode (here: {MODE})",
)


def thp_eligible(address: int) -> bool:
    """THPeligible of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "THPeligible:":
            return line.split()[1] == "1"
    raise AssertionError(f"no mapping holds {address:#x}")


def interior(t: torch.Tensor) -> int:
    """An address inside t's memory at least one 2 MiB page from either end."""
    assert t.untyped_storage().nbytes() >= 6 << 20
    return t.data_ptr() + (t.untyped_storage().nbytes() // 2 // 4096) * 4096


def conv_call() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 40, 64, 64, generator=gen, requires_grad=True)  # 40 MiB
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in ((8, 40), (8, 8, 3, 3), (48, 8), (48,))]
    y = OPS.tucker_conv2d(x, *params, (1, 1), (1, 1), (1, 1))  # 64 x 48 x 64 x 64: 48 MiB
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return y, gx


def test_conv_output_and_input_gradient_are_eligible() -> None:
    y, gx = conv_call()
    assert thp_eligible(interior(y)) and thp_eligible(interior(gx))


def test_linear_output_and_weight_gradient_are_eligible() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4096, generator=gen, requires_grad=True)
    first, core, last = (torch.randn(s, generator=gen, requires_grad=True) for s in ((2560, 4096), (64, 2560), (4096, 64)))
    y = OPS.tucker_linear(x.repeat(80, 1), first, core, last, None)  # 2560 x 4096: 40 MiB
    assert thp_eligible(interior(y))
    (grad_first,) = torch.autograd.grad(OPS.tucker_linear(x, first, core, last, None).sum(), (first,))  # 40 MiB
    assert thp_eligible(interior(grad_first))


@pytest.mark.skipif(MODE != "madvise", reason="in 'always' mode every mapping is eligible")
def test_turned_off_by_the_environment() -> None:
    run_check_in_subprocess(
        "import torch, test_huge_pages as t\n"
        "y, gx = t.conv_call()\n"
        "assert not t.thp_eligible(t.interior(y)) and not t.thp_eligible(t.interior(gx))\n"
        "print('ok')\n",
        {"TUCKER_OPS_HUGE_PAGES": "0"},
    )
