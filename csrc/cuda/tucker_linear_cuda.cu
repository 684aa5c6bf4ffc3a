// CUDA kernels for tucker_ops::tucker_linear and its backward. The forward
// runs the fused kernel (linear_fused.cu) for small factor sets and few rows,
// the whole-GPU kernel (linear_grid.cu) where TUCKER_OPS_CUDA_LINEAR_GRID=1
// asks for it, else three cuBLAS products (ATen's mm/addmm):
//   forward:  t1 = X first^T,  t2 = t1 core^T,  Y = t2 last^T + bias
// The backward is a chain of the index-mapped GEMM (gemm.cu) with rank-sized
// intermediates kept in the accumulation type:
//   backward: gt2 = gY last,  grad_last = gY^T t2,  grad_bias = sum gY,
//             grad_core = gt2^T t1,  gt1 = gt2 core,
//             grad_input = gt1 first,  grad_first = gt1^T X
// Transposes are index maps, never copies. Sums over rows are GEMM K loops
// (split and summed in a fixed order): deterministic.
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "cuda/linear_fused.cuh"
#include "cuda/linear_grid.cuh"

namespace tucker_ops::cuda {
namespace {

using at::Tensor;

std::vector<int64_t> output_shape(const Tensor& input, int64_t out) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out;
  return shape;
}

// X W^T for a row-major (rows x k) X and an (n x k) weight W: the Linear product.
void times_weight_t(const Tensor& like, int64_t rows, int64_t n, int64_t k, const void* x, bool x_acc,
                    const void* w, Output out) {
  gemm(like, 1, rows, n, k, matrix(x, x_acc, k, 1), matrix(w, false, 1, k), out);
}

// t1 (M, R_in) = X first^T in the accumulation type.
Tensor first_stage(const LinearSizes& s, const Tensor& x, const Tensor& first) {
  Tensor t1 = at::empty({s.M, s.R_in}, acc_options(x));
  times_weight_t(x, s.M, s.R_in, s.in, x.const_data_ptr(), false, first.const_data_ptr(),
                 output(t1.mutable_data_ptr(), true, s.R_in, 1));
  return t1;
}

// The core's input: t1, or X without first. Null when t1 was not computed
// (a backward that needs neither the core's nor last's gradient).
std::pair<const void*, bool> core_input(const LinearSizes& s, const Tensor& x, const Tensor& t1) {
  if (!s.has_first) return {x.const_data_ptr(), false};
  return {t1.defined() ? t1.const_data_ptr() : nullptr, true};
}

Tensor tucker_linear_cuda(
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    const std::optional<Tensor>& bias) {
  const LinearSizes s = check_tucker_linear_args(input, first, core, last, bias, kCudaDtypes);
  const c10::cuda::CUDAGuard guard(input.device());
  const std::vector<int64_t> shape = output_shape(input, s.out);
  if (s.M == 0) return at::empty(shape, input.options());
  const Tensor x = input.contiguous();
  const Tensor A = s.has_first ? first->contiguous() : Tensor();
  const Tensor G = core.contiguous();
  const Tensor B = s.has_last ? last->contiguous() : Tensor();
  const Tensor b = s.has_bias ? bias->contiguous() : Tensor();

  const FusedMode mode = fused_mode_from_env();
  if (mode != FusedMode::kNever) {
    const bool fused = fused_linear_applies(x, s);
    const bool grid = grid_linear_chosen(x, s, mode, fused);
    if (grid || fused) {
      Tensor out = at::empty(shape, input.options());
      const LinearPointers ptrs{x.const_data_ptr(), s.has_first ? A.const_data_ptr() : nullptr, G.const_data_ptr(),
                                s.has_last ? B.const_data_ptr() : nullptr, s.has_bias ? b.const_data_ptr() : nullptr,
                                out.mutable_data_ptr()};
      if (grid) {
        grid_linear_forward(x, s, ptrs);
        return out;
      }
      if (fused_linear_forward(x, s, ptrs)) return out;
    }
  }
  // cuBLAS: each weight is streamed once per output tile, with tensor cores
  // where torch.backends.cuda.matmul allows them, as torch.nn.Linear.
  Tensor h = x.reshape({s.M, s.in});
  if (s.has_first) h = at::mm(h, A.t());
  if (!s.has_last) {
    h = s.has_bias ? at::addmm(b, h, G.t()) : at::mm(h, G.t());
  } else {
    h = at::mm(h, G.t());
    h = s.has_bias ? at::addmm(b, h, B.t()) : at::mm(h, B.t());
  }
  return h.view(shape);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> tucker_linear_backward_cuda(
    const Tensor& grad_output,
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    std::array<bool, 5> output_mask,
    const std::optional<Tensor>& projection,
    const std::optional<Tensor>& core_output) {
  // Saved intermediates: checked, not used (see tucker_conv2d_backward_cuda).
  const LinearSizes s = check_tucker_linear_backward_args(grad_output, input, first, core, last, kCudaDtypes,
                                                          projection, core_output);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options();
  const GradRequest need = grad_request(output_mask, s.has_first, s.has_last);
  const bool need_back = need.input || need.first;  // needs gt1

  const Tensor x = input.contiguous();
  const Tensor gy = grad_output.contiguous();
  const Tensor A = s.has_first ? first->contiguous() : Tensor();
  const Tensor G = core.contiguous();
  const Tensor B = s.has_last ? last->contiguous() : Tensor();
  Tensor grad_input = need.input ? at::empty(input.sizes(), opts) : Tensor();
  Tensor grad_first = need.first ? at::empty({s.R_in, s.in}, opts) : Tensor();
  Tensor grad_core = need.core ? at::empty({s.R_out, s.R_in}, opts) : Tensor();
  Tensor grad_last = need.last ? at::empty({s.out, s.R_out}, opts) : Tensor();
  Tensor grad_bias = need.bias ? at::empty({s.out}, opts) : Tensor();

  const Tensor t1 = s.has_first && (need.core || need.last) ? first_stage(s, x, A) : Tensor();
  const auto [core_in, core_in_acc] = core_input(s, x, t1);
  if (need.last) {
    Tensor t2 = at::empty({s.M, s.R_out}, acc_options(x));
    times_weight_t(x, s.M, s.R_out, s.R_in, core_in, core_in_acc, G.const_data_ptr(),
                   output(t2.mutable_data_ptr(), true, s.R_out, 1));
    // grad_last (out x R_out) = gY^T t2
    gemm(x, 1, s.out, s.R_out, s.M, matrix(gy.const_data_ptr(), false, 1, s.out),
         matrix(t2.const_data_ptr(), true, s.R_out, 1), output(grad_last.mutable_data_ptr(), false, s.R_out, 1));
  }
  if (need.bias) {
    channel_sums(x, gy.const_data_ptr(), grad_bias.mutable_data_ptr(), s.out, 1, s.M, s.M, 0, s.out);
  }
  if (need.core || need_back) {
    // gt2 (M x R_out) = gY last, or gY itself without last.
    Tensor gt2_buf;
    const void* gt2 = gy.const_data_ptr();
    bool gt2_acc = false;
    if (s.has_last) {
      gt2_buf = at::empty({s.M, s.R_out}, acc_options(x));
      gemm(x, 1, s.M, s.R_out, s.out, matrix(gy.const_data_ptr(), false, s.out, 1),
           matrix(B.const_data_ptr(), false, s.R_out, 1), output(gt2_buf.mutable_data_ptr(), true, s.R_out, 1));
      gt2 = gt2_buf.const_data_ptr();
      gt2_acc = true;
    }
    if (need.core) {
      // grad_core (R_out x R_in) = gt2^T t1 (t1 = X without first)
      gemm(x, 1, s.R_out, s.R_in, s.M, matrix(gt2, gt2_acc, 1, s.R_out), matrix(core_in, core_in_acc, s.R_in, 1),
           output(grad_core.mutable_data_ptr(), false, s.R_in, 1));
    }
    if (need_back) {
      // gt1 (M x R_in) = gt2 core; it is grad_input itself without first.
      Tensor gt1_buf = s.has_first ? at::empty({s.M, s.R_in}, acc_options(x)) : Tensor();
      void* gt1 = s.has_first ? gt1_buf.mutable_data_ptr() : grad_input.mutable_data_ptr();
      gemm(x, 1, s.M, s.R_in, s.R_out, matrix(gt2, gt2_acc, s.R_out, 1), matrix(G.const_data_ptr(), false, s.R_in, 1),
           output(gt1, s.has_first, s.R_in, 1));
      if (s.has_first && need.input) {
        // grad_input (M x in) = gt1 first
        gemm(x, 1, s.M, s.in, s.R_in, matrix(gt1_buf.const_data_ptr(), true, s.R_in, 1),
             matrix(A.const_data_ptr(), false, s.in, 1), output(grad_input.mutable_data_ptr(), false, s.in, 1));
      }
      if (need.first) {
        // grad_first (R_in x in) = gt1^T X
        gemm(x, 1, s.R_in, s.in, s.M, matrix(gt1_buf.const_data_ptr(), true, 1, s.R_in),
             matrix(x.const_data_ptr(), false, s.in, 1), output(grad_first.mutable_data_ptr(), false, s.in, 1));
      }
    }
  }

  // Each gradient tensor is allocated only when requested: undefined otherwise.
  return backward_result(opts, grad_input, grad_first, grad_core, grad_last, grad_bias);
}

}  // namespace
}  // namespace tucker_ops::cuda

TORCH_LIBRARY_IMPL(tucker_ops, CUDA, m) {
  m.impl("tucker_linear", &tucker_ops::cuda::tucker_linear_cuda);
  m.impl("tucker_linear_backward", &tucker_ops::cuda::tucker_linear_backward_cuda);
}
