// Argument validation shared by every backend (CPU now, CUDA later).
//
// Each op's kernel calls the matching check_* function first. It rejects every
// malformed call with a Python-visible exception (ValueError for shapes and
// values, TypeError for dtypes, RuntimeError for devices) whose message names
// the argument, what was expected and what was got, and it returns the resolved
// sizes so kernels never re-derive them. All sizes are int64_t.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

namespace tucker_ops {

// The floating dtypes a backend implements. A backend passes its own list, so
// the CUDA backend can accept Half/BFloat16 without touching these checks.
using DtypeList = c10::ArrayRef<c10::ScalarType>;
inline constexpr std::array<c10::ScalarType, 2> kCpuDtypes = {c10::ScalarType::Float, c10::ScalarType::Double};

struct Conv2dSizes {
  int64_t N;      // batch (may be 0)
  int64_t C_in;   // input channels
  int64_t R_in;   // core input channels: first.size(0), or C_in without first
  int64_t R_out;  // core output channels
  int64_t C_out;  // output channels: last.size(0), or R_out without last
  int64_t H, W;
  int64_t kh, kw;
  int64_t H_out, W_out;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dil_h, dil_w;
  bool has_first, has_last, has_bias;
};

struct LinearSizes {
  int64_t M;      // rows: product of input's leading dims (may be 0)
  int64_t in;     // input features
  int64_t R_in;   // core input features: first.size(0), or in without first
  int64_t R_out;  // core output features
  int64_t out;    // output features: last.size(0), or R_out without last
  bool has_first, has_last, has_bias;
};

// An optional tensor counts as present only when it holds a defined tensor,
// the same convention ATen uses for Tensor? arguments.
inline bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// The gradients one backward call computes: output_mask less first/last where
// that factor is absent (a None argument has no gradient). Every backend reads
// the mask through this.
struct GradRequest {
  bool input, first, core, last, bias;
};

inline GradRequest grad_request(const std::array<bool, 5>& output_mask, bool has_first, bool has_last) {
  return {output_mask[0], output_mask[1] && has_first, output_mask[2], output_mask[3] && has_last, output_mask[4]};
}

// The backward ops' result in (input, first, core, last, bias) order. An
// undefined gradient (not requested) becomes a (0,) tensor of its own: the
// outputs must not alias each other.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_result(
    const at::TensorOptions& options, at::Tensor grad_input, at::Tensor grad_first, at::Tensor grad_core,
    at::Tensor grad_last, at::Tensor grad_bias);

// check_tucker_conv2d_args under the name tucker_conv2d_relu_pool, plus pool >= 1.
Conv2dSizes check_tucker_conv2d_relu_pool_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    const std::optional<at::Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t pool,
    DtypeList supported);

Conv2dSizes check_tucker_conv2d_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    const std::optional<at::Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    DtypeList supported_dtypes);

// Checks the forward arguments (without bias), that grad_output has the
// forward output's shape, dtype and device, and that the saved intermediates
// (ops.cpp), where given, have the shapes tucker_conv2d_with_intermediates
// returns them in and are given only with their factor (projection with
// first, core_output with last).
Conv2dSizes check_tucker_conv2d_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    DtypeList supported_dtypes,
    const std::optional<at::Tensor>& projection = std::nullopt,
    const std::optional<at::Tensor>& core_output = std::nullopt);

LinearSizes check_tucker_linear_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    const std::optional<at::Tensor>& bias,
    DtypeList supported_dtypes);

// As check_tucker_conv2d_backward_args: projection (..., R_in) with first,
// core_output (..., R_out) with last, the input's leading dimensions.
LinearSizes check_tucker_linear_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    DtypeList supported_dtypes,
    const std::optional<at::Tensor>& projection = std::nullopt,
    const std::optional<at::Tensor>& core_output = std::nullopt);

}  // namespace tucker_ops
