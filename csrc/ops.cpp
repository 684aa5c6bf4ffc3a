// The op contract: the one place the schemas are written in C++.
// Backends (csrc/cpu, csrc/cuda) add kernels with TORCH_LIBRARY_IMPL, and so
// does csrc/autograd.cpp: the Autograd kernels of the forward ops. Fake (meta)
// kernels, and the double-backward formulas of the *_backward ops, are
// registered from tucker_ops/_ops.py.
//
// The backward ops return (grad_input, grad_first, grad_core, grad_last,
// grad_bias). An entry not requested in output_mask, or whose argument is
// None, is an empty tensor of shape (0,).
#include <torch/library.h>

TORCH_LIBRARY(tucker_ops, m) {
  // pt2_compliant: the ops have fake kernels and autograd kernels (C++ for the
  // forward ops, register_autograd for the backward ones), so torch.compile /
  // torch.export may trace through them.
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def(
      "tucker_conv2d(Tensor input, Tensor? first, Tensor core, Tensor? last, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor",
      tags);
  m.def("tucker_linear(Tensor input, Tensor? first, Tensor core, Tensor? last, Tensor? bias) -> Tensor", tags);
  // avg_pool2d(relu(tucker_conv2d(...)), pool, pool): the CPU kernel pools each
  // output tile in cache (tucker_ops/_epilogue_op.py has the rest).
  m.def(
      "tucker_conv2d_relu_pool(Tensor input, Tensor? first, Tensor core, Tensor? last, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int pool) -> Tensor",
      tags);
  m.def(
      "tucker_conv2d_backward(Tensor grad_output, Tensor input, Tensor? first, Tensor core, Tensor? last, "
      "int[2] stride, int[2] padding, int[2] dilation, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "tucker_linear_backward(Tensor grad_output, Tensor input, Tensor? first, Tensor core, Tensor? last, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
}
