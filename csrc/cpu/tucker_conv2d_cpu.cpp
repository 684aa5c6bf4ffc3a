// CPU kernels for tucker_ops::tucker_conv2d and its backward.
//
// Per image: project the input to R_in channels once, im2col the projection,
// run the core as one GEMM into R_out channels, expand to C_out with a second
// GEMM (bias folded into it). Images are split into per-thread chunks
// (parallel_chunks.h); GEMMs inside a chunk run on one thread.
// The backward recomputes the projected image and im2col instead of saving them.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/im2col.h"
#include "cpu/parallel_chunks.h"

namespace tucker_ops::cpu {
namespace {

using at::Tensor;

// A 1x1 core with stride 1 and no padding reads the projection as is: its
// im2col would be an identical copy.
bool is_pointwise(const Conv2dSizes& s) {
  return s.kh == 1 && s.kw == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 && s.pad_w == 0;
}

Tensor tucker_conv2d_cpu(
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    const std::optional<Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation) {
  const Conv2dSizes s = check_tucker_conv2d_args(input, first, core, last, bias, stride, padding, dilation, kCpuDtypes);
  // Kernels below call at:: ops on plain data; keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const auto opts = input.options();
  Tensor out = at::empty({s.N, s.C_out, s.H_out, s.W_out}, opts);
  if (s.N == 0) return out;

  const int64_t HW = s.H * s.W, HWo = s.H_out * s.W_out, K = s.R_in * s.kh * s.kw;
  const bool pointwise = is_pointwise(s);
  const Tensor x = input.contiguous();
  const Tensor A = s.has_first ? first->contiguous() : Tensor();
  const Tensor G = core.contiguous().view({s.R_out, K});
  const Tensor B = s.has_last ? last->contiguous() : Tensor();
  const Tensor bias_col = s.has_bias ? bias->contiguous().view({s.C_out, 1}) : Tensor();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tucker_conv2d_cpu", [&] {
    const int64_t chunks = num_chunks(s.N, 1);
    for_each_chunk(chunks, [&](int64_t c) {
      // Scratch for one chunk, reused by all its images.
      Tensor P = s.has_first ? at::empty({s.R_in, HW}, opts) : Tensor();
      Tensor cols = pointwise ? Tensor() : at::empty({K, HWo}, opts);
      Tensor Q = s.has_last ? at::empty({s.R_out, HWo}, opts) : Tensor();
      const auto [begin, end] = chunk_range(c, chunks, s.N);
      for (int64_t n = begin; n < end; ++n) {
        const Tensor xn = x.select(0, n).view({s.C_in, HW});
        Tensor yn = out.select(0, n).view({s.C_out, HWo});
        const Tensor p = s.has_first ? at::mm_out(P, A, xn) : xn;
        if (!pointwise) im2col(p.const_data_ptr<scalar_t>(), s.R_in, s, cols.mutable_data_ptr<scalar_t>());
        const Tensor& col = pointwise ? p : cols;
        const Tensor q = s.has_last ? at::mm_out(Q, G, col) : col;
        const Tensor& expand = s.has_last ? B : G;
        if (s.has_bias) {
          at::addmm_out(yn, bias_col, expand, q);
        } else {
          at::mm_out(yn, expand, q);
        }
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> tucker_conv2d_backward_cpu(
    const Tensor& grad_output,
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    std::array<bool, 5> output_mask) {
  const Conv2dSizes s = check_tucker_conv2d_backward_args(
      grad_output, input, first, core, last, stride, padding, dilation, kCpuDtypes);
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const auto opts = input.options();
  const bool need_input = output_mask[0];
  const bool need_first = output_mask[1] && s.has_first;
  const bool need_core = output_mask[2];
  const bool need_last = output_mask[3] && s.has_last;
  const bool need_bias = output_mask[4];
  // Which intermediates the requested gradients depend on.
  const bool need_cols = need_core || need_last;  // forward recompute: projection and its im2col
  const bool need_back = need_input || need_first;  // gradient w.r.t. the projection
  const bool need_gq = need_core || need_back;  // gradient w.r.t. the core's output

  const int64_t HW = s.H * s.W, HWo = s.H_out * s.W_out, K = s.R_in * s.kh * s.kw;
  const bool pointwise = is_pointwise(s);
  const int64_t chunks = num_chunks(s.N, 1);
  const int64_t acc_chunks = std::max<int64_t>(chunks, 1);

  Tensor grad_input = need_input ? at::empty(input.sizes(), opts) : Tensor();
  Tensor acc_first = need_first ? at::zeros({acc_chunks, s.R_in, s.C_in}, opts) : Tensor();
  Tensor acc_core = need_core ? at::zeros({acc_chunks, s.R_out, K}, opts) : Tensor();
  Tensor acc_last = need_last ? at::zeros({acc_chunks, s.C_out, s.R_out}, opts) : Tensor();
  Tensor acc_bias = need_bias ? at::zeros({acc_chunks, s.C_out}, opts) : Tensor();

  if (s.N > 0 && (need_back || need_cols || need_bias)) {
    const Tensor x = input.contiguous();
    const Tensor gy = grad_output.contiguous();
    const Tensor A = s.has_first ? first->contiguous() : Tensor();
    const Tensor G = core.contiguous().view({s.R_out, K});
    const Tensor B = s.has_last ? last->contiguous() : Tensor();
    const Tensor ones = need_bias ? at::ones({HWo}, opts) : Tensor();

    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tucker_conv2d_backward_cpu", [&] {
      for_each_chunk(chunks, [&](int64_t c) {
        Tensor P = s.has_first && need_cols ? at::empty({s.R_in, HW}, opts) : Tensor();
        Tensor cols = !pointwise && need_cols ? at::empty({K, HWo}, opts) : Tensor();
        Tensor Q = need_last ? at::empty({s.R_out, HWo}, opts) : Tensor();
        Tensor GQ = s.has_last && need_gq ? at::empty({s.R_out, HWo}, opts) : Tensor();
        Tensor Gcols = !pointwise && need_back ? at::empty({K, HWo}, opts) : Tensor();
        Tensor GP = s.has_first && need_back ? at::empty({s.R_in, HW}, opts) : Tensor();
        Tensor g_first = need_first ? acc_first.select(0, c) : Tensor();
        Tensor g_core = need_core ? acc_core.select(0, c) : Tensor();
        Tensor g_last = need_last ? acc_last.select(0, c) : Tensor();
        Tensor g_bias = need_bias ? acc_bias.select(0, c) : Tensor();

        const auto [begin, end] = chunk_range(c, chunks, s.N);
        for (int64_t n = begin; n < end; ++n) {
          const Tensor xn = x.select(0, n).view({s.C_in, HW});
          const Tensor gyn = gy.select(0, n).view({s.C_out, HWo});
          if (need_bias) g_bias.addmv_(gyn, ones);

          Tensor col;
          if (need_cols) {
            const Tensor p = s.has_first ? at::mm_out(P, A, xn) : xn;
            if (!pointwise) im2col(p.const_data_ptr<scalar_t>(), s.R_in, s, cols.mutable_data_ptr<scalar_t>());
            col = pointwise ? p : cols;
          }
          if (need_last) g_last.addmm_(gyn, at::mm_out(Q, G, col).t());
          if (!need_gq) continue;

          const Tensor gq = s.has_last ? at::mm_out(GQ, B.t(), gyn) : gyn;
          if (need_core) g_core.addmm_(gq, col.t());
          if (!need_back) continue;

          // Gradient w.r.t. the projection (R_in, H, W); without first it is
          // the input gradient itself, so it is written in place.
          Tensor gp = s.has_first ? GP : grad_input.select(0, n).view({s.R_in, HW});
          if (pointwise) {
            at::mm_out(gp, G.t(), gq);
          } else {
            at::mm_out(Gcols, G.t(), gq);
            gp.zero_();
            col2im_add(Gcols.const_data_ptr<scalar_t>(), s.R_in, s, gp.mutable_data_ptr<scalar_t>());
          }
          if (need_first) g_first.addmm_(gp, xn.t());
          if (s.has_first && need_input) {
            Tensor gin = grad_input.select(0, n).view({s.C_in, HW});
            at::mm_out(gin, A.t(), gp);
          }
        }
      });
    });
  }

  // Outputs must not alias each other, so each skipped one gets its own (0,).
  auto none = [&] { return at::empty({0}, opts); };
  return {
      need_input ? grad_input : none(),
      need_first ? sum_chunks(acc_first) : none(),
      need_core ? sum_chunks(acc_core).view({s.R_out, s.R_in, s.kh, s.kw}) : none(),
      need_last ? sum_chunks(acc_last) : none(),
      need_bias ? sum_chunks(acc_bias) : none(),
  };
}

}  // namespace
}  // namespace tucker_ops::cpu

TORCH_LIBRARY_IMPL(tucker_ops, CPU, m) {
  m.impl("tucker_conv2d", &tucker_ops::cpu::tucker_conv2d_cpu);
  m.impl("tucker_conv2d_backward", &tucker_ops::cpu::tucker_conv2d_backward_cpu);
}
