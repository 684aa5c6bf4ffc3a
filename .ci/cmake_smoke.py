"""Load the CMake-built library alone; check one call of each op, and its gradients, against the reference.

Usage: python .ci/cmake_smoke.py build-cmake/libtucker_ops.so
"""

import sys

import torch

torch.ops.load_library(sys.argv[1])

from tucker_ops import reference  # noqa: E402  (after the library, so _ops reuses it)
import tucker_ops._ops as ops  # noqa: E402

torch.manual_seed(0)
x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
first, core, last, bias = (torch.randn(3, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64),
                           torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64))
got = torch.ops.tucker_ops.tucker_conv2d(x, first, core, last, bias, [2, 1], [1, 0], [1, 2])
torch.testing.assert_close(got, reference.tucker_conv2d(x, first, core, last, bias, (2, 1), (1, 0), (1, 2)))
xl = torch.randn(3, 4, 10, dtype=torch.float64)
args = (torch.randn(3, 10, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64), None)
torch.testing.assert_close(torch.ops.tucker_ops.tucker_linear(xl, *args), reference.tucker_linear(xl, *args))
# The autograd kernels are C++ too (csrc/autograd.cpp): gradients must flow through this library alone.
leaves = [t.requires_grad_() for t in (x, first, core, last, bias)]
grads = torch.autograd.grad(torch.ops.tucker_ops.tucker_conv2d(*leaves, [2, 1], [1, 0], [1, 2]).sum(), leaves)
want = torch.autograd.grad(reference.tucker_conv2d(*leaves, (2, 1), (1, 0), (1, 2)).sum(), leaves)
for g, w in zip(grads, want):
    torch.testing.assert_close(g, w)
xl.requires_grad_()
torch.testing.assert_close(torch.autograd.grad(torch.ops.tucker_ops.tucker_linear(xl, *args).sum(), xl),
                           torch.autograd.grad(reference.tucker_linear(xl, *args).sum(), xl))
# This library has no Python module (csrc/python/ is the pip build's): the entry points
# must fall back to torch.ops, and still agree.
assert ops._FAST is None
torch.testing.assert_close(ops.tucker_conv2d(x.detach(), first.detach(), core.detach(), last.detach(), bias.detach(),
                                             (2, 1), (1, 0), (1, 2), backend="fused"),
                           reference.tucker_conv2d(x.detach(), first.detach(), core.detach(), last.detach(),
                                                   bias.detach(), (2, 1), (1, 0), (1, 2)))
torch.testing.assert_close(ops.tucker_linear(xl.detach(), *args, backend="fused"), reference.tucker_linear(xl.detach(), *args))
print(f"cmake-check: {sys.argv[1]} loads and agrees with the reference path")
