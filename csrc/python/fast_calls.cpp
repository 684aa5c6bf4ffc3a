// Direct Python entry points for tucker_conv2d, tucker_linear and
// tucker_conv2d_relu_pool, which tucker_ops/_ops.py and _epilogue_op.py call in
// eager mode instead of torch.ops.tucker_ops.*.
//
// Both routes end in the same dispatcher call, so every dispatch key still
// runs (autograd, autocast, tracing, Python modes such as FakeTensorMode).
// The torch.ops route is boxed: it converts each Python argument to an IValue
// against the schema and unboxes them again, several microseconds a call on
// this project's benchmark machine, more than a small layer's arithmetic
// (benchmarks/notes.md). Here pybind11 converts the arguments to their C++
// types once and the typed handle calls the op.
//
// Built into the setup.py extension only (it needs libtorch_python); the
// CMake library has no Python module and _ops.py then keeps torch.ops.
#include <optional>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

using Conv2dSignature = Tensor(const Tensor&, const OptionalTensor&, const Tensor&, const OptionalTensor&,
                               const OptionalTensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef);
using LinearSignature =
    Tensor(const Tensor&, const OptionalTensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&);
using Conv2dReluPoolSignature = Tensor(const Tensor&, const OptionalTensor&, const Tensor&, const OptionalTensor&,
                                       const OptionalTensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                       int64_t);

Tensor tucker_conv2d(const Tensor& input, const OptionalTensor& first, const Tensor& core, const OptionalTensor& last,
                     const OptionalTensor& bias, const std::vector<int64_t>& stride,
                     const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("tucker_ops::tucker_conv2d", "").typed<Conv2dSignature>();
  return op.call(input, first, core, last, bias, stride, padding, dilation);
}

Tensor tucker_linear(const Tensor& input, const OptionalTensor& first, const Tensor& core, const OptionalTensor& last,
                     const OptionalTensor& bias) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("tucker_ops::tucker_linear", "").typed<LinearSignature>();
  return op.call(input, first, core, last, bias);
}

// Its autograd and CUDA kernels are registered from Python (_epilogue_op.py);
// the dispatcher takes the GIL back for those.
Tensor tucker_conv2d_relu_pool(const Tensor& input, const OptionalTensor& first, const Tensor& core,
                               const OptionalTensor& last, const OptionalTensor& bias,
                               const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                               const std::vector<int64_t>& dilation, int64_t pool) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tucker_ops::tucker_conv2d_relu_pool", "")
                             .typed<Conv2dReluPoolSignature>();
  return op.call(input, first, core, last, bias, stride, padding, dilation, pool);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tucker_ops' compiled kernels; the ops live in torch.ops.tucker_ops";
  // Errors come back as the exceptions torch.ops raises (ValueError, ...);
  // the GIL is released while the op runs, as torch's own bindings do.
  m.def("tucker_conv2d", torch::wrap_pybind_function_no_gil(tucker_conv2d));
  m.def("tucker_linear", torch::wrap_pybind_function_no_gil(tucker_linear));
  m.def("tucker_conv2d_relu_pool", torch::wrap_pybind_function_no_gil(tucker_conv2d_relu_pool));
}
