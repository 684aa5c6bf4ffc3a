#include "checks.h"

#include <string>

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <c10/util/safe_numerics.h>

namespace tucker_ops {
namespace {

// "torch.float32" rather than ATen's "Float": the name Python users write.
std::string dtype_name(c10::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

std::string dtype_list(DtypeList dtypes) {
  std::string s;
  for (size_t i = 0; i < dtypes.size(); ++i) {
    s += (i ? ", " : "") + dtype_name(dtypes[i]);
  }
  return s;
}

void check_defined(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": expected ", name, " to be a defined tensor, but got an undefined tensor");
}

void check_dim(const char* op, const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(
      t.dim() == dim, op, ": expected ", name, " to be ", dim, "-D ", layout, ", but got a ", t.dim(),
      "-D tensor of shape ", t.sizes());
}

// Weights with a zero-size dimension describe no layer; rejecting them keeps
// every kernel free of empty-GEMM special cases.
void check_no_zero_dims(const char* op, const at::Tensor& t, const char* name, const char* layout) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK_VALUE(
        t.size(d) > 0, op, ": expected ", name, " ", layout, " to have no zero-size dimension, but got shape ",
        t.sizes());
  }
}

void check_input_dtype(const char* op, const at::Tensor& input, DtypeList supported) {
  bool ok = false;
  for (auto t : supported) ok = ok || input.scalar_type() == t;
  TORCH_CHECK_TYPE(
      ok, op, ": expected input to have one of the dtypes ", dtype_list(supported), " (supported on ",
      c10::DeviceTypeName(input.device().type(), /*lower_case=*/true), "), but got ", dtype_name(input.scalar_type()));
}

// Every tensor argument must share input's dtype and device: kernels read all
// of them with one scalar type on one device.
void check_like_input(const char* op, const at::Tensor& input, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == input.scalar_type(), op, ": expected ", name, " to have the same dtype as input (",
      dtype_name(input.scalar_type()), "), but got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(
      t.device() == input.device(), op, ": expected ", name, " to be on the same device as input (", input.device(),
      "), but got ", t.device());
}

void check_pair(const char* op, c10::IntArrayRef v, const char* name, int64_t min_value, const char* bound) {
  TORCH_CHECK_VALUE(
      v.size() == 2, op, ": expected ", name, " to have 2 elements (h, w), but got a list of length ", v.size(),
      ": ", v);
  TORCH_CHECK_VALUE(
      v[0] >= min_value && v[1] >= min_value, op, ": expected every element of ", name, " to be ", bound,
      ", but got ", name, " = ", v);
}

// Output extent of one spatial dimension, in int64 with overflow checks so
// that absurd padding/dilation values raise instead of wrapping around.
int64_t conv_out_size(
    const char* op, const char* dim_name, int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  int64_t two_pad = 0, padded = 0, span = 0;
  bool overflow = c10::mul_overflows(pad, int64_t{2}, &two_pad) || c10::add_overflows(in, two_pad, &padded) ||
      c10::mul_overflows(dil, k - 1, &span);
  TORCH_CHECK_VALUE(
      !overflow, op, ": padding or dilation along ", dim_name, " is too large: input size ", in, ", kernel size ", k,
      ", padding ", pad, ", dilation ", dil, " overflow 64-bit index arithmetic");
  // span + 1 is the dilated kernel extent; numerator < 0 means it does not fit.
  int64_t numerator = padded - span - 1;
  return numerator < 0 ? 0 : numerator / stride + 1;
}

// Padding beyond the dilated kernel extent only adds output rows/columns that
// see nothing but zeros: never useful, almost always a bug (a pixel count
// passed as padding, say). One all-padding border (a 1x1 conv with padding 1)
// is tolerated because real models have it.
void check_padding_extent(const char* op, const char* dim_name, int64_t k, int64_t pad, int64_t dil) {
  const int64_t extent = dil * (k - 1) + 1;  // no overflow: conv_out_size checked dil * (k - 1)
  TORCH_CHECK_VALUE(
      pad <= extent, op, ": expected padding along ", dim_name, " to be at most the dilated kernel extent ",
      "dilation * (k - 1) + 1 = ", extent, " (more padding only adds outputs that see nothing but zeros), but got ",
      "padding ", pad, " with kernel size ", k, " and dilation ", dil);
}

// Every size the kernels derive must fit int64 (they index with int64_t
// throughout); reject the call before anything is allocated otherwise.
int64_t checked_numel(const char* op, const char* name, const char* layout, c10::IntArrayRef sizes) {
  int64_t numel = 1;
  bool overflow = false;
  for (int64_t s : sizes) overflow = overflow || c10::mul_overflows(numel, s, &numel);
  TORCH_CHECK_VALUE(
      !overflow, op, ": expected ", name, " ", layout, " to have fewer than 2^63 elements (64-bit indexing), ",
      "but got sizes ", sizes);
  return numel;
}

struct Factors {
  int64_t C_in, R_in, R_out, C_out;
  bool has_first, has_last, has_bias;
};

// Rank/channel consistency between input, first, core, last and bias. The
// layout strings differ between conv and linear; the chain rule does not.
Factors check_factors(
    const char* op,
    int64_t C_in,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    const std::optional<at::Tensor>& bias,
    const char* channels,
    const char* channels_src,
    const char* out_channels) {
  Factors f{C_in, C_in, core.size(0), core.size(0), present(first), present(last), present(bias)};
  if (f.has_first) {
    TORCH_CHECK_VALUE(
        first->size(1) == C_in, op, ": expected first to have shape (R_in, ", channels, ") with ", channels, " = ",
        C_in, " (", channels_src, "), but got first of shape ", first->sizes());
    f.R_in = first->size(0);
    TORCH_CHECK_VALUE(
        core.size(1) == f.R_in, op, ": expected core.size(1) to equal R_in = ", f.R_in,
        " (first.size(0)), but got core of shape ", core.sizes());
  } else {
    TORCH_CHECK_VALUE(
        core.size(1) == C_in, op, ": expected core.size(1) to equal ", channels, " = ", C_in,
        " (", channels_src, "; first is None), but got core of shape ", core.sizes());
  }
  if (f.has_last) {
    TORCH_CHECK_VALUE(
        last->size(1) == f.R_out, op, ": expected last to have shape (", out_channels,
        ", R_out) with R_out = ", f.R_out,
        " (core.size(0)), but got last of shape ", last->sizes());
    f.C_out = last->size(0);
  }
  if (f.has_bias) {
    TORCH_CHECK_VALUE(
        bias->dim() == 1 && bias->size(0) == f.C_out, op, ": expected bias to have shape (", f.C_out, ",) (",
        f.has_last ? "last.size(0)" : "core.size(0); last is None", "), but got bias of shape ", bias->sizes());
  }
  return f;
}

// Shared by both ops: definedness, dtypes and devices of every tensor argument.
void check_tensors_common(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    const std::optional<at::Tensor>& bias,
    DtypeList supported) {
  check_defined(op, input, "input");
  check_defined(op, core, "core");
  check_input_dtype(op, input, supported);
  if (present(first)) check_like_input(op, input, *first, "first");
  check_like_input(op, input, core, "core");
  if (present(last)) check_like_input(op, input, *last, "last");
  if (present(bias)) check_like_input(op, input, *bias, "bias");
}

void check_grad_output(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input, c10::IntArrayRef expected) {
  check_defined(op, grad_output, "grad_output");
  check_like_input(op, input, grad_output, "grad_output");
  TORCH_CHECK_VALUE(
      grad_output.sizes() == expected, op, ": expected grad_output to have the forward output's shape ", expected,
      ", but got grad_output of shape ", grad_output.sizes());
}

// A saved intermediate (ops.cpp): only with its factor, like input in dtype
// and device, of the shape the with_intermediates op returns.
void check_intermediate(
    const char* op, const at::Tensor& input, const std::optional<at::Tensor>& t, const char* name,
    bool has_factor, const char* factor, c10::IntArrayRef expected) {
  if (!present(t)) return;
  TORCH_CHECK_VALUE(
      has_factor, op, ": expected ", name, " to be None when ", factor, " is None (there is no ", name,
      " to save then), but got a tensor of shape ", t->sizes());
  check_like_input(op, input, *t, name);
  TORCH_CHECK_VALUE(
      t->sizes() == expected, op, ": expected ", name, " to have the shape ", expected,
      " that the forward's with_intermediates call returns, but got ", name, " of shape ", t->sizes());
}

Conv2dSizes conv2d_args(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    const std::optional<at::Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    DtypeList supported) {
  check_tensors_common(op, input, first, core, last, bias, supported);

  check_dim(op, input, "input", 4, "(N, C_in, H, W)");
  if (present(first)) check_dim(op, *first, "first", 2, "(R_in, C_in)");
  check_dim(op, core, "core", 4, "(R_out, R_in, kh, kw)");
  if (present(last)) check_dim(op, *last, "last", 2, "(C_out, R_out)");
  if (present(bias)) check_dim(op, *bias, "bias", 1, "(C_out,)");

  TORCH_CHECK_VALUE(
      input.size(1) > 0 && input.size(2) > 0 && input.size(3) > 0, op,
      ": expected input (N, C_in, H, W) to have non-zero C_in, H and W (only N may be 0), but got shape ",
      input.sizes());
  if (present(first)) check_no_zero_dims(op, *first, "first", "(R_in, C_in)");
  check_no_zero_dims(op, core, "core", "(R_out, R_in, kh, kw)");
  if (present(last)) check_no_zero_dims(op, *last, "last", "(C_out, R_out)");

  Factors f = check_factors(op, input.size(1), first, core, last, bias, "C_in", "input.size(1)", "C_out");

  check_pair(op, stride, "stride", 1, ">= 1");
  check_pair(op, padding, "padding", 0, ">= 0");
  check_pair(op, dilation, "dilation", 1, ">= 1");

  Conv2dSizes s{};
  s.N = input.size(0);
  s.C_in = f.C_in;
  s.R_in = f.R_in;
  s.R_out = f.R_out;
  s.C_out = f.C_out;
  s.H = input.size(2);
  s.W = input.size(3);
  s.kh = core.size(2);
  s.kw = core.size(3);
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dil_h = dilation[0];
  s.dil_w = dilation[1];
  s.has_first = f.has_first;
  s.has_last = f.has_last;
  s.has_bias = f.has_bias;
  s.H_out = conv_out_size(op, "H", s.H, s.kh, s.stride_h, s.pad_h, s.dil_h);
  s.W_out = conv_out_size(op, "W", s.W, s.kw, s.stride_w, s.pad_w, s.dil_w);
  TORCH_CHECK_VALUE(
      s.H_out >= 1 && s.W_out >= 1, op, ": kernel (kh, kw) = (", s.kh, ", ", s.kw, ") with dilation ", dilation,
      " does not fit the padded input (H + 2*pad_h, W + 2*pad_w) = (", s.H + 2 * s.pad_h, ", ", s.W + 2 * s.pad_w,
      "); expected an output size (H_out, W_out) of at least (1, 1), but got (", s.H_out, ", ", s.W_out, ")");
  check_padding_extent(op, "H", s.kh, s.pad_h, s.dil_h);
  check_padding_extent(op, "W", s.kw, s.pad_w, s.dil_w);
  const std::array<int64_t, 4> out_sizes = {s.N, s.C_out, s.H_out, s.W_out};
  checked_numel(op, "output", "(N, C_out, H_out, W_out)", out_sizes);
  return s;
}

LinearSizes linear_args(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    const std::optional<at::Tensor>& bias,
    DtypeList supported) {
  check_tensors_common(op, input, first, core, last, bias, supported);

  TORCH_CHECK_VALUE(
      input.dim() >= 1, op, ": expected input to be at least 1-D (..., in), but got a 0-D tensor (a scalar)");
  if (present(first)) check_dim(op, *first, "first", 2, "(R_in, in)");
  check_dim(op, core, "core", 2, "(R_out, R_in)");
  if (present(last)) check_dim(op, *last, "last", 2, "(out, R_out)");
  if (present(bias)) check_dim(op, *bias, "bias", 1, "(out,)");

  TORCH_CHECK_VALUE(
      input.size(-1) > 0, op,
      ": expected input (..., in) to have non-zero in (only leading dimensions may be 0), but got shape ",
      input.sizes());
  if (present(first)) check_no_zero_dims(op, *first, "first", "(R_in, in)");
  check_no_zero_dims(op, core, "core", "(R_out, R_in)");
  if (present(last)) check_no_zero_dims(op, *last, "last", "(out, R_out)");

  Factors f = check_factors(op, input.size(-1), first, core, last, bias, "in", "input.size(-1)", "out");

  LinearSizes s{};
  // numel / in cannot overflow and is 0 exactly when a leading dim is 0.
  s.M = input.numel() / input.size(-1);
  const std::array<int64_t, 2> out_sizes = {s.M, f.C_out};
  checked_numel(op, "output", "(..., out)", out_sizes);
  s.in = f.C_in;
  s.R_in = f.R_in;
  s.R_out = f.R_out;
  s.out = f.C_out;
  s.has_first = f.has_first;
  s.has_last = f.has_last;
  s.has_bias = f.has_bias;
  return s;
}

}  // namespace

Conv2dSizes check_tucker_conv2d_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    const std::optional<at::Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    DtypeList supported) {
  return conv2d_args("tucker_conv2d", input, first, core, last, bias, stride, padding, dilation, supported);
}

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
    DtypeList supported) {
  constexpr const char* op = "tucker_conv2d_relu_pool";
  TORCH_CHECK_VALUE(pool >= 1, op,
                    ": expected pool to be an int >= 1 (the average pool's window and stride; 1 means ReLU only), "
                    "but got ", pool);
  const Conv2dSizes s = conv2d_args(op, input, first, core, last, bias, stride, padding, dilation, supported);
  TORCH_CHECK_VALUE(s.H_out >= pool && s.W_out >= pool, op, ": expected the conv output (H_out, W_out) = (",
                    s.H_out, ", ", s.W_out, ") to be at least pool x pool = ", pool, " x ", pool,
                    " (the pooled output would be empty)");
  return s;
}

Conv2dSizes check_tucker_conv2d_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    DtypeList supported,
    const std::optional<at::Tensor>& projection,
    const std::optional<at::Tensor>& core_output) {
  constexpr const char* op = "tucker_conv2d_backward";
  Conv2dSizes s = conv2d_args(op, input, first, core, last, std::nullopt, stride, padding, dilation, supported);
  std::array<int64_t, 4> expected = {s.N, s.C_out, s.H_out, s.W_out};
  check_grad_output(op, grad_output, input, expected);
  const std::array<int64_t, 4> projection_shape = {s.N, s.R_in, s.H, s.W};
  const std::array<int64_t, 4> core_output_shape = {s.N, s.R_out, s.H_out, s.W_out};
  check_intermediate(op, input, projection, "projection", s.has_first, "first", projection_shape);
  check_intermediate(op, input, core_output, "core_output", s.has_last, "last", core_output_shape);
  return s;
}

LinearSizes check_tucker_linear_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    const std::optional<at::Tensor>& bias,
    DtypeList supported) {
  return linear_args("tucker_linear", input, first, core, last, bias, supported);
}

LinearSizes check_tucker_linear_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& first,
    const at::Tensor& core,
    const std::optional<at::Tensor>& last,
    DtypeList supported,
    const std::optional<at::Tensor>& projection,
    const std::optional<at::Tensor>& core_output) {
  constexpr const char* op = "tucker_linear_backward";
  LinearSizes s = linear_args(op, input, first, core, last, std::nullopt, supported);
  std::vector<int64_t> expected(input.sizes().begin(), input.sizes().end());
  expected.back() = s.out;
  check_grad_output(op, grad_output, input, expected);
  expected.back() = s.R_in;
  check_intermediate(op, input, projection, "projection", s.has_first, "first", expected);
  expected.back() = s.R_out;
  check_intermediate(op, input, core_output, "core_output", s.has_last, "last", expected);
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_result(
    const at::TensorOptions& options, at::Tensor grad_input, at::Tensor grad_first, at::Tensor grad_core,
    at::Tensor grad_last, at::Tensor grad_bias) {
  auto or_empty = [&](at::Tensor& t) { return t.defined() ? std::move(t) : at::empty({0}, options); };
  return {or_empty(grad_input), or_empty(grad_first), or_empty(grad_core), or_empty(grad_last), or_empty(grad_bias)};
}

}  // namespace tucker_ops
