// Autograd kernels for tucker_conv2d, tucker_linear and tucker_conv2d_relu_pool,
// one per op at the Autograd key (so every backend, meta included, shares them).
//
// Each is a torch::autograd::Function: forward calls the op again below
// autograd, so the backend kernel (which runs the checks in checks.cpp) does
// the work; backward calls the matching *_backward op for the gradients the
// graph needs. On the CPU, where cpu/intermediates.h says so, forward calls
// the op's *_with_intermediates variant instead and saves the projection and
// core output it returns, and backward hands them to the *_backward op in
// place of its recomputation. A plain backward calls it below autograd too,
// so no Python runs in a training step. With create_graph=True it goes through the dispatcher as
// usual, so the double-backward formula registered for the *_backward ops in
// tucker_ops/_ops.py records the graph.
#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/avg_pool2d_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <c10/core/GradMode.h>
#include <c10/util/ArrayRef.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/intermediates.h"

namespace tucker_ops {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Mask = std::array<bool, 5>;  // (input, first, core, last, bias), the backward ops' output order

using Conv2dFn = Tensor(
    const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const OptTensor&, c10::IntArrayRef,
    c10::IntArrayRef, c10::IntArrayRef);
using Kept = std::tuple<Tensor, Tensor, Tensor>;  // output, projection, core_output
using Conv2dKeptFn = Kept(
    const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const OptTensor&, c10::IntArrayRef,
    c10::IntArrayRef, c10::IntArrayRef);
using Conv2dBackwardFn = Grads(
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, c10::IntArrayRef,
    c10::IntArrayRef, c10::IntArrayRef, Mask, const OptTensor&, const OptTensor&);
using Conv2dReluPoolFn = Tensor(
    const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const OptTensor&, c10::IntArrayRef,
    c10::IntArrayRef, c10::IntArrayRef, int64_t);
using LinearFn = Tensor(const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const OptTensor&);
using LinearKeptFn = Kept(const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const OptTensor&);
using LinearBackwardFn = Grads(
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, Mask, const OptTensor&,
    const OptTensor&);

template <class Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// Handles looked up once (thread-safe statics); the schemas are defined in
// ops.cpp, in this same library.
const c10::TypedOperatorHandle<Conv2dFn>& conv2d_op() {
  static const auto op = find_op<Conv2dFn>("tucker_ops::tucker_conv2d");
  return op;
}

const c10::TypedOperatorHandle<Conv2dKeptFn>& conv2d_kept_op() {
  static const auto op = find_op<Conv2dKeptFn>("tucker_ops::tucker_conv2d_with_intermediates");
  return op;
}

const c10::TypedOperatorHandle<Conv2dReluPoolFn>& conv2d_relu_pool_op() {
  static const auto op = find_op<Conv2dReluPoolFn>("tucker_ops::tucker_conv2d_relu_pool");
  return op;
}

const c10::TypedOperatorHandle<LinearKeptFn>& linear_kept_op() {
  static const auto op = find_op<LinearKeptFn>("tucker_ops::tucker_linear_with_intermediates");
  return op;
}

const c10::TypedOperatorHandle<Conv2dBackwardFn>& conv2d_backward_op() {
  static const auto op = find_op<Conv2dBackwardFn>("tucker_ops::tucker_conv2d_backward");
  return op;
}

const c10::TypedOperatorHandle<LinearFn>& linear_op() {
  static const auto op = find_op<LinearFn>("tucker_ops::tucker_linear");
  return op;
}

const c10::TypedOperatorHandle<LinearBackwardFn>& linear_backward_op() {
  static const auto op = find_op<LinearBackwardFn>("tucker_ops::tucker_linear_backward");
  return op;
}

// Function::apply makes an optional tensor argument a graph input only when it
// holds a tensor, so it must be handed nullopt (not an undefined tensor) for a
// missing one, and its edge index counts only the present tensors before it.
inline OptTensor as_optional(const OptTensor& t) {
  return present(t) ? t : std::nullopt;
}

inline OptTensor as_optional(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// Which gradients to compute, in the backward ops' order. A missing argument
// (first, last, bias: None) has no edge and never needs a gradient.
Mask grad_mask(const AutogradContext* ctx, bool has_first, bool has_last, bool has_bias) {
  const std::array<bool, 5> has = {true, has_first, true, has_last, has_bias};
  Mask mask{};
  size_t edge = 0;
  for (size_t i = 0; i < mask.size(); ++i) {
    if (has[i]) mask[i] = ctx->needs_input_grad(edge++);
  }
  return mask;
}

// Whether a forward may keep the intermediates (the caller checks there are
// any: first or last), and under which mode: only a CPU call that records a
// graph, with concrete sizes (a symbolic trace keeps the recomputing path
// rather than guard on sizes). The caller applies its op's rule in auto mode.
std::optional<cpu::KeepIntermediates> keep_mode(std::initializer_list<OptTensor> tensors) {
  if (!c10::GradMode::is_enabled()) return std::nullopt;
  bool needs_grad = false;
  for (const OptTensor& t : tensors) {
    if (!present(t)) continue;
    if (!t->device().is_cpu() || t->unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return std::nullopt;
    needs_grad = needs_grad || t->requires_grad();
  }
  const cpu::KeepIntermediates mode = cpu::keep_intermediates_mode();
  if (!needs_grad || mode == cpu::KeepIntermediates::kNever) return std::nullopt;
  return mode;
}

bool any(const Mask& mask) {
  for (bool b : mask) {
    if (b) return true;
  }
  return false;
}

// Calls a *_backward op: through autograd when a graph of the gradients is
// being recorded (create_graph=True turns grad mode on inside backward),
// below it otherwise, where the (Python) double-backward formula has nothing
// to do and would only cost time.
template <class Op, class... Args>
Grads call_backward(const Op& op, Args&&... args) {
  if (c10::GradMode::is_enabled()) {
    return op.call(std::forward<Args>(args)...);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// The five gradients into the first entries of an n-argument backward result;
// entries not requested stay undefined (the op returns (0,) tensors for them).
variable_list to_result(Grads&& grads, const Mask& mask, size_t num_args) {
  variable_list result(num_args);
  if (mask[0]) result[0] = std::move(std::get<0>(grads));
  if (mask[1]) result[1] = std::move(std::get<1>(grads));
  if (mask[2]) result[2] = std::move(std::get<2>(grads));
  if (mask[3]) result[3] = std::move(std::get<3>(grads));
  if (mask[4]) result[4] = std::move(std::get<4>(grads));
  return result;
}

// The conv's stride, padding and dilation, kept in the context for backward.
struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
};

void save_conv_args(AutogradContext* ctx, c10::IntArrayRef stride, c10::IntArrayRef padding,
                    c10::IntArrayRef dilation) {
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
}

ConvArgs saved_conv_args(AutogradContext* ctx) {
  return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["dilation"].toIntVector()};
}

}  // namespace

// Outside the anonymous namespace so the graph node reads
// torch::autograd::CppNode<tucker_ops::TuckerConv2dFunction> in profiles.
class TuckerConv2dFunction : public torch::autograd::Function<TuckerConv2dFunction> {
 public:
  static Tensor forward(
      AutogradContext* ctx,
      const Tensor& input,
      const OptTensor& first,
      const Tensor& core,
      const OptTensor& last,
      const OptTensor& bias,
      c10::IntArrayRef stride,
      c10::IntArrayRef padding,
      c10::IntArrayRef dilation,
      bool keep) {
    Tensor output, projection, core_output;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (keep) {
        std::tie(output, projection, core_output) =
            conv2d_kept_op().call(input, first, core, last, bias, stride, padding, dilation);
      } else {
        output = conv2d_op().call(input, first, core, last, bias, stride, padding, dilation);
      }
    }
    // A missing first/last, or intermediate (not kept, or (0,) without its
    // factor), is saved as an undefined tensor and unpacks as one: backward
    // reads their presence from the saved tensors.
    ctx->save_for_backward({input, present(first) ? *first : Tensor(), core, present(last) ? *last : Tensor(),
                            present(first) ? projection : Tensor(), present(last) ? core_output : Tensor()});
    save_conv_args(ctx, stride, padding, dilation);
    ctx->saved_data["has_bias"] = present(bias);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    constexpr size_t kNumArgs = 9;  // input, first, core, last, bias, stride, padding, dilation, keep
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &first = saved[1], &core = saved[2], &last = saved[3];
    const Mask mask = grad_mask(ctx, first.defined(), last.defined(), ctx->saved_data["has_bias"].toBool());
    if (!any(mask)) return variable_list(kNumArgs);
    const ConvArgs args = saved_conv_args(ctx);
    return to_result(
        call_backward(
            conv2d_backward_op(), grad_outputs[0], input, as_optional(first), core, as_optional(last), args.stride,
            args.padding, args.dilation, mask, as_optional(saved[4]), as_optional(saved[5])),
        mask, kNumArgs);
  }
};

// avg_pool2d(relu(conv), pool, pool) in one op. Its forward never writes the
// conv output, so backward recomputes it (on the CPU with the intermediates,
// in the same pass, where the conv would keep them), takes the pool's and the
// ReLU's backward with ATen's own formulas, and hands the result to
// tucker_conv2d_backward. With create_graph=True the recomputation and those
// formulas run through autograd, so a double backward records.
class TuckerConv2dReluPoolFunction : public torch::autograd::Function<TuckerConv2dReluPoolFunction> {
 public:
  static Tensor forward(
      AutogradContext* ctx,
      const Tensor& input,
      const OptTensor& first,
      const Tensor& core,
      const OptTensor& last,
      const OptTensor& bias,
      c10::IntArrayRef stride,
      c10::IntArrayRef padding,
      c10::IntArrayRef dilation,
      int64_t pool) {
    Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      output = conv2d_relu_pool_op().call(input, first, core, last, bias, stride, padding, dilation, pool);
    }
    ctx->save_for_backward({input, present(first) ? *first : Tensor(), core, present(last) ? *last : Tensor(),
                            present(bias) ? *bias : Tensor()});
    save_conv_args(ctx, stride, padding, dilation);
    ctx->saved_data["pool"] = pool;
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    constexpr size_t kNumArgs = 9;  // input, first, core, last, bias, stride, padding, dilation, pool
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &first = saved[1], &core = saved[2], &last = saved[3], &bias = saved[4];
    const Mask mask = grad_mask(ctx, first.defined(), last.defined(), bias.defined());
    if (!any(mask)) return variable_list(kNumArgs);
    const ConvArgs args = saved_conv_args(ctx);
    const int64_t pool = ctx->saved_data["pool"].toInt();
    Tensor y, projection, core_output;
    {
      // Through autograd when a double-backward graph is recorded, below it otherwise.
      const bool graph = c10::GradMode::is_enabled();
      std::optional<at::AutoDispatchBelowADInplaceOrView> below;
      if (!graph) below.emplace();
      const bool keep = !graph && input.device().is_cpu() && (first.defined() || last.defined()) &&
                        cpu::keep_intermediates_mode() != cpu::KeepIntermediates::kNever;
      const OptTensor first_or_none = as_optional(first), last_or_none = as_optional(last);
      const OptTensor bias_or_none = as_optional(bias);
      if (keep) {
        std::tie(y, projection, core_output) = conv2d_kept_op().call(
            input, first_or_none, core, last_or_none, bias_or_none, args.stride, args.padding, args.dilation);
      } else {
        y = conv2d_op().call(input, first_or_none, core, last_or_none, bias_or_none, args.stride, args.padding,
                             args.dilation);
      }
    }
    // Floor mode: conv rows and columns past the last whole window get no gradient.
    const Tensor grad_relu = pool > 1 ? at::avg_pool2d_backward(grad_outputs[0], y, {pool, pool}, {pool, pool},
                                                                {0, 0}, false, true, std::nullopt)
                                      : grad_outputs[0];
    const Tensor grad_y = at::threshold_backward(grad_relu, y, 0);
    return to_result(
        call_backward(
            conv2d_backward_op(), grad_y, input, as_optional(first), core, as_optional(last), args.stride,
            args.padding, args.dilation, mask, as_optional(first.defined() ? projection : Tensor()),
            as_optional(last.defined() ? core_output : Tensor())),
        mask, kNumArgs);
  }
};

class TuckerLinearFunction : public torch::autograd::Function<TuckerLinearFunction> {
 public:
  static Tensor forward(
      AutogradContext* ctx,
      const Tensor& input,
      const OptTensor& first,
      const Tensor& core,
      const OptTensor& last,
      const OptTensor& bias,
      bool keep) {
    Tensor output, projection, core_output;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (keep) {
        std::tie(output, projection, core_output) = linear_kept_op().call(input, first, core, last, bias);
      } else {
        output = linear_op().call(input, first, core, last, bias);
      }
    }
    ctx->save_for_backward({input, present(first) ? *first : Tensor(), core, present(last) ? *last : Tensor(),
                            present(first) ? projection : Tensor(), present(last) ? core_output : Tensor()});
    ctx->saved_data["has_bias"] = present(bias);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    constexpr size_t kNumArgs = 6;  // input, first, core, last, bias, keep
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &first = saved[1], &core = saved[2], &last = saved[3];
    const Mask mask = grad_mask(ctx, first.defined(), last.defined(), ctx->saved_data["has_bias"].toBool());
    if (!any(mask)) return variable_list(kNumArgs);
    return to_result(
        call_backward(
            linear_backward_op(), grad_outputs[0], input, as_optional(first), core, as_optional(last), mask,
            as_optional(saved[4]), as_optional(saved[5])),
        mask, kNumArgs);
  }
};

namespace {

Tensor tucker_conv2d_autograd(
    const Tensor& input,
    const OptTensor& first,
    const Tensor& core,
    const OptTensor& last,
    const OptTensor& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation) {
  // Decided here, not in forward: Function::apply runs forward with grad mode
  // off. Convs keep whenever they may (measured faster at every benchmark
  // shape: benchmarks/notes.md). No validation here: the kernel called next
  // checks, under the plain op's name either way.
  const bool keep =
      (present(first) || present(last)) && keep_mode({input, first, core, last, bias}).has_value();
  return TuckerConv2dFunction::apply(
      input, as_optional(first), core, as_optional(last), as_optional(bias), stride, padding, dilation, keep);
}

Tensor tucker_linear_autograd(
    const Tensor& input, const OptTensor& first, const Tensor& core, const OptTensor& last, const OptTensor& bias) {
  bool keep = false;
  const auto mode = present(first) || present(last) ? keep_mode({input, first, core, last, bias}) : std::nullopt;
  if (mode) {
    // Rows from the input's shape alone (the kernel validates); a shape too
    // malformed to count them keeps nothing, and the plain op raises.
    const int64_t rows = input.dim() >= 1 && input.size(-1) > 0 ? input.numel() / input.size(-1) : 0;
    keep = *mode == cpu::KeepIntermediates::kAlways || cpu::linear_keeps_intermediates(rows);
  }
  return TuckerLinearFunction::apply(input, as_optional(first), core, as_optional(last), as_optional(bias), keep);
}

Tensor tucker_conv2d_relu_pool_autograd(
    const Tensor& input,
    const OptTensor& first,
    const Tensor& core,
    const OptTensor& last,
    const OptTensor& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t pool) {
  return TuckerConv2dReluPoolFunction::apply(
      input, as_optional(first), core, as_optional(last), as_optional(bias), stride, padding, dilation, pool);
}

}  // namespace
}  // namespace tucker_ops

TORCH_LIBRARY_IMPL(tucker_ops, Autograd, m) {
  m.impl("tucker_conv2d", TORCH_FN(tucker_ops::tucker_conv2d_autograd));
  m.impl("tucker_linear", TORCH_FN(tucker_ops::tucker_linear_autograd));
  m.impl("tucker_conv2d_relu_pool", TORCH_FN(tucker_ops::tucker_conv2d_relu_pool_autograd));
}
