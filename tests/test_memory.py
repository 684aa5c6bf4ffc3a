"""Memory and size: no RSS growth over 10^4 calls; 64-bit indexing past 2^31 elements; clear errors past 2^63.

The 64-bit cases use inputs of more than 2^31 elements that cost almost no memory:
``torch.empty`` of 8 GiB is only reserved address space, untouched pages read as
the shared zero page, and only the few pixels the test sets are ever written. They
run in a child process with a watchdog that stops it if its RSS grows by more than
1 GiB (a kernel that copied the whole input), so a crash or a runaway allocation
fails the test instead of the machine.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tucker_ops

OPS = torch.ops.tucker_ops


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
def test_ten_thousand_calls_do_not_grow_rss() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    conv = [torch.randn(s, generator=gen, requires_grad=True) for s in ((3, 4), (5, 3, 3, 3), (6, 5), (6,))]
    v = torch.randn(3, 10, generator=gen, requires_grad=True)
    lin = [torch.randn(s, generator=gen, requires_grad=True) for s in ((4, 10), (5, 4), (6, 5), (6,))]

    def calls(n: int) -> None:
        for i in range(n):
            if i % 4 == 0:  # a quarter with autograd (forward + backward ops), the rest inference
                y = tucker_ops.tucker_conv2d(x, *conv, 1, 1, 1).sum() + tucker_ops.tucker_linear(v, *lin).sum()
                y.backward()
            else:
                with torch.no_grad():
                    tucker_ops.tucker_conv2d(x, *conv, 1, 1, 1)
                    tucker_ops.tucker_linear(v, *lin)

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # threads are not what this measures; spinning OpenMP workers only slow it down
    try:
        calls(500)  # warm-up: allocator pools, autograd and dispatcher caches
        gc.collect()
        start = _rss_bytes()
        calls(5_000)  # 10^4 forward calls (both ops) and 2,500 backward calls
        gc.collect()
        growth = _rss_bytes() - start
    finally:
        torch.set_num_threads(before)
    # A leak of one small tensor per call would be 10^4 x (>= 64 B + its metadata) > 2 MiB.
    assert growth < 2 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 10^4 calls"


_CHILD = textwrap.dedent(
    """
    import os, sys, threading, time
    import torch, tucker_ops

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    base = rss()

    def watchdog():
        while True:
            if rss() - base > 2**30:
                print("RSS grew by more than 1 GiB: a kernel materialised the huge input", flush=True)
                os._exit(3)
            time.sleep(0.005)

    threading.Thread(target=watchdog, daemon=True).start()
    case = sys.argv[1]
    if case == "conv":
        # Tucker-1 (no input projection): the core reads only the strided pixels.
        H, W = 2**16, 2**15 + 1  # H*W = 2^31 + 2^16 elements
        x = torch.empty(1, 1, H, W)
        x[0, 0, 0, 0], x[0, 0, 0, W - 1], x[0, 0, H - 1, 0], x[0, 0, H - 1, W - 1] = 1.0, 2.0, 3.0, 4.0
        core = torch.full((1, 1, 1, 1), 2.0, requires_grad=True)
        y = tucker_ops.tucker_conv2d(x, None, core, None, None, (H - 1, W - 1), (0, 0), (1, 1))
        assert y.tolist() == [[[[2.0, 4.0], [6.0, 8.0]]]], y
        (g,) = torch.autograd.grad(y, core, torch.ones_like(y))  # grad_core only: no input-sized buffer
        assert g.item() == 10.0, g
    elif case in ("linear", "linear_backward"):
        M, IN = 2**15 + 1, 2**16  # M*IN = 2^31 + 2^16 elements
        x = torch.empty(M, IN)
        x[0].fill_(0.5)
        x[-1].fill_(1.0)  # the last row starts past element 2^31
        first = torch.ones(1, IN, requires_grad=case == "linear_backward")
        core = torch.ones(1, 1)
        y = tucker_ops.tucker_linear(x, first, core, None, None)
        assert y.shape == (M, 1) and y[0].item() == 0.5 * IN and y[-1].item() == IN, (y[0], y[-1])
        if case == "linear_backward":
            grad = torch.zeros(M, 1)
            grad[-1] = 1.0
            (g,) = torch.autograd.grad(y, first, grad)
            assert torch.equal(g, torch.ones(1, IN)), g
    print("ok", flush=True)
    """
)


def _run_big(case: str) -> None:
    if not os.path.exists("/proc/self/statm"):
        pytest.skip(reason="needs /proc/self/statm (Linux)")
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            if f.read().strip() == "2":
                pytest.skip(reason="strict overcommit (vm.overcommit_memory=2): 8 GiB of address space cannot be reserved")
    except OSError:
        pass
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(tucker_ops.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH")))))
    proc = subprocess.run([sys.executable, "-c", _CHILD, case], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"child exited with {proc.returncode} (negative: killed by a signal)\\nstdout: {proc.stdout[-2000:]}\\n"
        f"stderr: {proc.stderr[-3000:]}"
    )


def test_conv2d_indexes_past_2_31_elements() -> None:
    _run_big("conv")


@pytest.mark.slow  # reads 8 GiB of (zero) pages: ~2 s
def test_linear_indexes_past_2_31_elements() -> None:
    _run_big("linear")


@pytest.mark.slow
def test_linear_backward_indexes_past_2_31_elements() -> None:
    _run_big("linear_backward")


def test_meta_shapes_past_2_31_elements() -> None:
    n = 2**31 // (3 * 64 * 64) + 1  # N*C*H*W just past 2^31
    x = torch.empty(n, 3, 64, 64, device="meta")
    assert x.numel() > 2**31
    core = torch.empty(8, 2, 3, 3, device="meta")
    y = OPS.tucker_conv2d(x, torch.empty(2, 3, device="meta"), core, torch.empty(16, 8, device="meta"), None, [1, 1], [1, 1], [1, 1])
    assert y.shape == (n, 16, 64, 64)
    rows = torch.empty(2**31 // 7 + 1, 7, device="meta")
    assert OPS.tucker_linear(rows, None, torch.empty(5, 7, device="meta"), None, None).shape == (rows.shape[0], 5)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_outputs_past_2_63_elements_raise_before_allocating(device: str) -> None:
    # Expanded (stride-0) arguments: huge shapes, one element of memory each.
    def big(*shape):
        return torch.zeros((1,) * len(shape), device=device).expand(*shape)

    with pytest.raises(ValueError, match=r"tucker_conv2d: expected output \(N, C_out, H_out, W_out\) to have fewer than 2\^63 elements"):
        OPS.tucker_conv2d(big(2**12, 1, 2**12, 2**12), None, big(1, 1, 1, 1), big(2**40, 1), None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match=r"tucker_linear: expected output \(\.\.\., out\) to have fewer than 2\^63 elements"):
        OPS.tucker_linear(big(2**40, 1), None, big(1, 1), big(2**30, 1), None)
