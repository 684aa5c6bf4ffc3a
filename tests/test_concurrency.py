"""Concurrent calls and determinism: threads get the serial results bit for bit.

The kernels keep their scratch per call and chunk work by the thread count only,
so 8 Python threads calling both ops at once, on mixed shapes, must reproduce the
serial results exactly; repeated runs at a fixed thread count are bitwise equal;
and 1 vs 2 intra-op threads agree to float32 rounding (1e-6 relative).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import torch

import tucker_ops

THREADS = 8


def _cases(dtype: torch.dtype = torch.float32) -> list[Callable[[], list[torch.Tensor]]]:
    """Calls of both ops, forward and backward, over mixed shapes; each returns its result tensors."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(shape, generator=gen, dtype=dtype)

    cases = []
    conv_shapes = [
        # N, C_in, H, W, R_in, R_out, C_out, k, stride, padding, dilation
        (3, 5, 12, 10, 3, 4, 7, 3, 1, 1, 1),
        (1, 8, 9, 9, None, 5, 6, 3, 2, 0, 1),
        (4, 6, 7, 11, 2, 3, None, (3, 2), 1, (2, 1), 2),
        (5, 16, 6, 6, 8, 4, 16, 1, 1, 0, 1),
        (2, 3, 15, 14, 4, 6, 8, 5, 2, 2, 1),
    ]
    for n, c_in, h, w, r_in, r_out, c_out, k, s, p, d in conv_shapes:
        kh, kw = (k, k) if isinstance(k, int) else k
        x = t(n, c_in, h, w)
        if n % 2:  # mix memory formats too
            x = x.contiguous(memory_format=torch.channels_last)
        first = t(r_in, c_in) if r_in else None
        core = t(r_out, r_in or c_in, kh, kw)
        last = t(c_out, r_out) if c_out else None
        bias = t(c_out or r_out)
        out = tucker_ops.tucker_conv2d(x, first, core, last, bias, s, p, d)
        grad = t(*out.shape)

        def conv_call(x=x, first=first, core=core, last=last, bias=bias, s=s, p=p, d=d, grad=grad):
            leaves = [v.detach().requires_grad_() for v in (x, first, core, last, bias) if v is not None]
            it = iter(leaves)
            args = [next(it) if v is not None else None for v in (x, first, core, last, bias)]
            y = tucker_ops.tucker_conv2d(*args, s, p, d)
            return [y.detach(), *torch.autograd.grad(y, leaves, grad)]

        cases.append(conv_call)
    for lead, fin, r_in, r_out, fout in [((17,), 40, 8, 6, 30), ((3, 5), 12, None, 4, 9), ((64,), 33, 5, 7, None), ((1,), 8, 3, 3, 8)]:
        x = t(*lead, fin)
        first = t(r_in, fin) if r_in else None
        core = t(r_out, r_in or fin)
        last = t(fout, r_out) if fout else None
        bias = t(fout or r_out)
        grad = t(*lead, fout or r_out)

        def linear_call(x=x, first=first, core=core, last=last, bias=bias, grad=grad):
            leaves = [v.detach().requires_grad_() for v in (x, first, core, last, bias) if v is not None]
            it = iter(leaves)
            args = [next(it) if v is not None else None for v in (x, first, core, last, bias)]
            y = tucker_ops.tucker_linear(*args)
            return [y.detach(), *torch.autograd.grad(y, leaves, grad)]

        cases.append(linear_call)
    return cases


def _with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_eight_threads_get_exactly_the_serial_results() -> None:
    cases = _cases()
    serial = [case() for case in cases]
    barrier = threading.Barrier(THREADS)
    failures: list[str] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        order = [i for i in range(len(cases)) for _ in range(4)]
        random.Random(seed).shuffle(order)
        barrier.wait()  # start together
        for i in order:
            got = cases[i]()
            if not all(torch.equal(a, b) for a, b in zip(got, serial[i])):
                with lock:
                    failures.append(f"thread {seed}, case {i}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, f"results differ from the serial run: {failures}"


def test_bitwise_identical_run_to_run_at_fixed_thread_count() -> None:
    for threads in (1, 2):
        runs = [_with_threads(threads, lambda: [case() for case in _cases()]) for _ in range(3)]
        for run in runs[1:]:
            for got, want in zip(run, runs[0]):
                assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_thread_counts_agree_within_float32_rounding() -> None:
    one = _with_threads(1, lambda: [case() for case in _cases()])
    two = _with_threads(2, lambda: [case() for case in _cases()])
    four = _with_threads(4, lambda: [case() for case in _cases()])
    for results in (two, four):
        for case_a, case_b in zip(results, one):
            for a, b in zip(case_a, case_b):
                scale = b.abs().max().clamp_min(1e-30)
                assert ((a - b).abs().max() / scale).item() <= 1e-6
