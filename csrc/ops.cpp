// The op contract: the one place the schemas are written in C++.
// Backends (csrc/cpu, csrc/cuda) add kernels with TORCH_LIBRARY_IMPL, and so
// does csrc/autograd.cpp: the Autograd kernels of the forward ops. Fake (meta)
// kernels, and the double-backward formulas of the *_backward ops, are
// registered from tucker_ops/_ops.py.
//
// The backward ops return (grad_input, grad_first, grad_core, grad_last,
// grad_bias). An entry not requested in output_mask, or whose argument is
// None, is an empty tensor of shape (0,).
//
// Saved intermediates. *_with_intermediates return the forward output plus the
// chain's two rank-sized intermediates: projection = the input through first
// (conv (N, R_in, H, W) in the input's memory format; linear (..., R_in)) and
// core_output = the projection through core, before last and bias (conv (N,
// R_out, H_out, W_out); linear (..., R_out)); each is an empty (0,) tensor
// when its factor (first, last) is None. Input rows no output reads (a
// stride beyond the kernel's reach) are zeros in the conv's projection: the
// backward never reads them. Given to a backward op, they replace
// the recomputation the backward otherwise does; they must be exactly what the
// matching with_intermediates call returned. The Autograd kernels
// (csrc/autograd.cpp) choose between the two per call: CPU only.
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
      "tucker_conv2d_with_intermediates(Tensor input, Tensor? first, Tensor core, Tensor? last, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation) -> (Tensor output, Tensor projection, Tensor core_output)",
      tags);
  m.def(
      "tucker_linear_with_intermediates(Tensor input, Tensor? first, Tensor core, Tensor? last, Tensor? bias) "
      "-> (Tensor output, Tensor projection, Tensor core_output)",
      tags);
  m.def(
      "tucker_conv2d_backward(Tensor grad_output, Tensor input, Tensor? first, Tensor core, Tensor? last, "
      "int[2] stride, int[2] padding, int[2] dilation, bool[5] output_mask, Tensor? projection=None, "
      "Tensor? core_output=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "tucker_linear_backward(Tensor grad_output, Tensor input, Tensor? first, Tensor core, Tensor? last, "
      "bool[5] output_mask, Tensor? projection=None, Tensor? core_output=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  // The keep/recompute setting behind tucker_ops.keep_intermediates (csrc/cpu/
  // intermediates.cpp): set returns the previous value; -1 automatic, 0
  // recompute, 1 keep. Utilities, not part of any model's graph.
  m.def("_set_keep_intermediates(int mode) -> int");
  m.def("_keep_intermediates_mode() -> int");
}
