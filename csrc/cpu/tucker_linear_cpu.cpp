// CPU kernels for tucker_ops::tucker_linear and its backward.
//
// Input rows (all leading dims flattened) are split into per-thread chunks
// (parallel_chunks.h); each chunk walks its rows in blocks of kRowBlock, so
// the rank-sized intermediates of a block stay in cache and scratch size does
// not grow with the batch. GEMMs inside a chunk run on one thread.
#include <ATen/Functions.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/parallel_chunks.h"

namespace tucker_ops::cpu {
namespace {

using at::Tensor;

constexpr int64_t kRowBlock = 256;
constexpr int64_t kMinRowsPerChunk = 32;

std::vector<int64_t> output_shape(const Tensor& input, int64_t out_features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out_features;
  return shape;
}

Tensor tucker_linear_cpu(
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    const std::optional<Tensor>& bias) {
  const LinearSizes s = check_tucker_linear_args(input, first, core, last, bias, kCpuDtypes);
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const auto opts = input.options();
  Tensor out = at::empty(output_shape(input, s.out), opts);
  if (s.M == 0) return out;

  const Tensor x = input.contiguous().view({s.M, s.in});
  Tensor y = out.view({s.M, s.out});
  const Tensor A_t = s.has_first ? first->contiguous().t() : Tensor();
  const Tensor G_t = core.contiguous().t();
  const Tensor B_t = s.has_last ? last->contiguous().t() : Tensor();
  const Tensor b = s.has_bias ? bias->contiguous() : Tensor();

  const int64_t chunks = num_chunks(s.M, kMinRowsPerChunk);
  for_each_chunk(chunks, [&](int64_t c) {
    const auto [begin, end] = chunk_range(c, chunks, s.M);
    const int64_t block = std::min(kRowBlock, end - begin);
    Tensor P = s.has_first ? at::empty({block, s.R_in}, opts) : Tensor();
    Tensor Q = s.has_last ? at::empty({block, s.R_out}, opts) : Tensor();
    for (int64_t r = begin; r < end; r += block) {
      const int64_t m = std::min(block, end - r);
      const Tensor xb = x.narrow(0, r, m);
      Tensor yb = y.narrow(0, r, m);
      Tensor Pb = s.has_first ? P.narrow(0, 0, m) : Tensor();
      Tensor Qb = s.has_last ? Q.narrow(0, 0, m) : Tensor();
      const Tensor p = s.has_first ? at::mm_out(Pb, xb, A_t) : xb;
      const Tensor q = s.has_last ? at::mm_out(Qb, p, G_t) : p;
      const Tensor& expand_t = s.has_last ? B_t : G_t;
      if (s.has_bias) {
        at::addmm_out(yb, b, q, expand_t);
      } else {
        at::mm_out(yb, q, expand_t);
      }
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> tucker_linear_backward_cpu(
    const Tensor& grad_output,
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    std::array<bool, 5> output_mask) {
  const LinearSizes s = check_tucker_linear_backward_args(grad_output, input, first, core, last, kCpuDtypes);
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const auto opts = input.options();
  const bool need_input = output_mask[0];
  const bool need_first = output_mask[1] && s.has_first;
  const bool need_core = output_mask[2];
  const bool need_last = output_mask[3] && s.has_last;
  const bool need_bias = output_mask[4];
  const bool need_p = need_core || need_last;  // forward recompute of the projection
  const bool need_back = need_input || need_first;  // gradient w.r.t. the projection
  const bool need_gq = need_core || need_back;  // gradient w.r.t. the core's output

  const int64_t chunks = num_chunks(s.M, kMinRowsPerChunk);
  const int64_t acc_chunks = std::max<int64_t>(chunks, 1);
  Tensor grad_input = need_input ? at::empty(input.sizes(), opts) : Tensor();
  Tensor acc_first = need_first ? at::zeros({acc_chunks, s.R_in, s.in}, opts) : Tensor();
  Tensor acc_core = need_core ? at::zeros({acc_chunks, s.R_out, s.R_in}, opts) : Tensor();
  Tensor acc_last = need_last ? at::zeros({acc_chunks, s.out, s.R_out}, opts) : Tensor();
  Tensor acc_bias = need_bias ? at::zeros({acc_chunks, s.out}, opts) : Tensor();

  if (s.M > 0 && (need_p || need_back || need_bias)) {
    const Tensor x = input.contiguous().view({s.M, s.in});
    const Tensor gy = grad_output.contiguous().view({s.M, s.out});
    Tensor gx = need_input ? grad_input.view({s.M, s.in}) : Tensor();
    const Tensor A = s.has_first ? first->contiguous() : Tensor();
    const Tensor G = core.contiguous();
    const Tensor B = s.has_last ? last->contiguous() : Tensor();

    for_each_chunk(chunks, [&](int64_t c) {
      const auto [begin, end] = chunk_range(c, chunks, s.M);
      const int64_t block = std::min(kRowBlock, end - begin);
      Tensor P = s.has_first && need_p ? at::empty({block, s.R_in}, opts) : Tensor();
      Tensor Q = need_last ? at::empty({block, s.R_out}, opts) : Tensor();
      Tensor GQ = s.has_last && need_gq ? at::empty({block, s.R_out}, opts) : Tensor();
      Tensor GP = s.has_first && need_back ? at::empty({block, s.R_in}, opts) : Tensor();
      Tensor g_first = need_first ? acc_first.select(0, c) : Tensor();
      Tensor g_core = need_core ? acc_core.select(0, c) : Tensor();
      Tensor g_last = need_last ? acc_last.select(0, c) : Tensor();
      Tensor g_bias = need_bias ? acc_bias.select(0, c) : Tensor();

      for (int64_t r = begin; r < end; r += block) {
        const int64_t m = std::min(block, end - r);
        const Tensor xb = x.narrow(0, r, m);
        const Tensor gyb = gy.narrow(0, r, m);
        if (need_bias) g_bias.add_(gyb.sum(0));

        Tensor p;
        if (need_p) {
          Tensor Pb = s.has_first ? P.narrow(0, 0, m) : Tensor();
          p = s.has_first ? at::mm_out(Pb, xb, A.t()) : xb;
        }
        if (need_last) {
          Tensor Qb = Q.narrow(0, 0, m);
          g_last.addmm_(gyb.t(), at::mm_out(Qb, p, G.t()));
        }
        if (!need_gq) continue;

        Tensor gq = gyb;
        if (s.has_last) {
          Tensor GQb = GQ.narrow(0, 0, m);
          gq = at::mm_out(GQb, gyb, B);
        }
        if (need_core) g_core.addmm_(gq.t(), p);
        if (!need_back) continue;

        // Without first the projection gradient is the input gradient itself.
        Tensor gp = s.has_first ? GP.narrow(0, 0, m) : gx.narrow(0, r, m);
        at::mm_out(gp, gq, G);
        if (need_first) g_first.addmm_(gp.t(), xb);
        if (s.has_first && need_input) {
          Tensor gxb = gx.narrow(0, r, m);
          at::mm_out(gxb, gp, A);
        }
      }
    });
  }

  // Outputs must not alias each other, so each skipped one gets its own (0,).
  auto none = [&] { return at::empty({0}, opts); };
  return {
      need_input ? grad_input : none(),
      need_first ? sum_chunks(acc_first) : none(),
      need_core ? sum_chunks(acc_core) : none(),
      need_last ? sum_chunks(acc_last) : none(),
      need_bias ? sum_chunks(acc_bias) : none(),
  };
}

}  // namespace
}  // namespace tucker_ops::cpu

TORCH_LIBRARY_IMPL(tucker_ops, CPU, m) {
  m.impl("tucker_linear", &tucker_ops::cpu::tucker_linear_cpu);
  m.impl("tucker_linear_backward", &tucker_ops::cpu::tucker_linear_backward_cpu);
}
