// CUDA kernels for tucker_ops::tucker_conv2d and its backward.
//
// Forward: the fused kernel (conv_fused.cu) on the shapes where it wins, else
// the unfused chain through ATen (cuDNN core, cuBLAS or cuDNN 1x1 stages);
// beyond 32-bit indexing, three
// index-mapped GEMMs (gemm.cu) through accumulation-type scratch:
//   P = first * X,   Q = core (*) P  (implicit im2col),   Y = last * Q + bias.
// Backward recomputes P and Q, then
//   gQ = last^T gY,  grad_last = sum gY Q^T,  grad_bias = sum gY,
//   grad_core = sum gQ im2col(P)^T,  gP = col2im(core^T gQ),
//   grad_input = first^T gP,  grad_first = sum gP X^T,
// with every sum over (image, pixel) done inside one GEMM's K loop (split and
// summed in a fixed order): deterministic, no atomics.
#include <algorithm>
#include <limits>

#include <ATen/Context.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "layout.h"
#include "cuda/common.cuh"
#include "cuda/conv_fused.cuh"
#include "cuda/conv_grid.cuh"
#include "cuda/gemm.cuh"

namespace tucker_ops::cuda {
namespace {

using at::Tensor;

// Geometry of an (N, C, H, W) tensor, NCHW or NHWC, as the source of the im2col
// views. Strides come from the layout, not from Tensor::strides(): size-1
// dimensions may carry any stride in a tensor that is still "contiguous".
ConvGeometry input_geometry(const Conv2dSizes& s, int64_t C, bool nhwc) {
  ConvGeometry g;
  g.C = C;
  g.H = s.H;
  g.W = s.W;
  g.H_out = s.H_out;
  g.W_out = s.W_out;
  g.kh = s.kh;
  g.kw = s.kw;
  g.sh = s.stride_h;
  g.sw = s.stride_w;
  g.ph = s.pad_h;
  g.pw = s.pad_w;
  g.dh = s.dil_h;
  g.dw = s.dil_w;
  g.sN = C * s.H * s.W;
  g.sC = nhwc ? 1 : s.H * s.W;
  g.sH = nhwc ? s.W * C : s.W;
  g.sW = nhwc ? C : 1;
  return g;
}

// Stride of one pixel (h * W + w) in a tensor of that layout.
int64_t pixel_stride(int64_t C, bool nhwc) {
  return nhwc ? C : 1;
}

struct ConvTensors {
  Tensor x;  // NCHW or NHWC contiguous
  bool nhwc;
  Tensor first, core, last;  // contiguous (first/last undefined when absent)
};

ConvTensors prepare(const Tensor& input, const std::optional<Tensor>& first, const Tensor& core,
                    const std::optional<Tensor>& last, const Conv2dSizes& s) {
  auto [x, nhwc] = input_layout(input);
  return {x, nhwc, s.has_first ? first->contiguous() : Tensor(), core.contiguous(),
          s.has_last ? last->contiguous() : Tensor()};
}

// The fused kernels' operands; `bias` undefined when absent.
ConvPointers conv_pointers(const Conv2dSizes& s, const ConvTensors& t, const Tensor& bias, Tensor& out) {
  return ConvPointers{t.x.const_data_ptr(),
                      t.nhwc,
                      s.has_first ? t.first.const_data_ptr() : nullptr,
                      t.core.const_data_ptr(),
                      s.has_last ? t.last.const_data_ptr() : nullptr,
                      s.has_bias ? bias.const_data_ptr() : nullptr,
                      out.mutable_data_ptr()};
}

// P = first * X: (N, R_in, H, W) in the accumulation type.
Tensor project(const Conv2dSizes& s, const ConvTensors& t) {
  const int64_t HW = s.H * s.W;
  Tensor P = at::empty({s.N, s.R_in, s.H, s.W}, acc_options(t.x));
  gemm(t.x, s.N, s.R_in, HW, s.C_in, matrix(t.first.const_data_ptr(), false, s.C_in, 1),
       matrix(t.x.const_data_ptr(), false, t.nhwc ? 1 : HW, pixel_stride(s.C_in, t.nhwc), s.C_in * HW),
       output(P.mutable_data_ptr(), true, HW, 1, s.R_in * HW));
  return P;
}

// The core's input as an im2col source: P when there is a projection, X otherwise.
Operand core_input_cols(OperandKind kind, const Conv2dSizes& s, const ConvTensors& t, const Tensor& P) {
  if (s.has_first) return conv_view(kind, P.const_data_ptr(), true, input_geometry(s, s.R_in, false));
  return conv_view(kind, t.x.const_data_ptr(), false, input_geometry(s, s.C_in, t.nhwc));
}

// Q = core (*) cols into `out` (N, R_out, H_out, W_out), plus a per-channel bias.
void core_conv(const Conv2dSizes& s, const ConvTensors& t, const Tensor& P, void* out, bool out_is_acc,
               const void* bias) {
  const int64_t HWo = s.H_out * s.W_out, K = s.R_in * s.kh * s.kw;
  Output o = output(out, out_is_acc, HWo, 1, s.R_out * HWo);
  if (bias) {
    o.bias = bias;
    o.bias_mode = BiasMode::kPerRow;
  }
  gemm(t.x, s.N, s.R_out, HWo, K, matrix(t.core.const_data_ptr(), false, K, 1),
       core_input_cols(OperandKind::kIm2col, s, t, P), o);
}

// cuDNN's kernels index with 32 bits; the GEMM chain below with 64.
bool indices_fit_32bit(const Conv2dSizes& s) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  const int64_t in_pixels = s.H * s.W, out_pixels = s.H_out * s.W_out;
  return s.N * std::max(s.C_in, s.R_in) * in_pixels < kMax && s.N * std::max(s.R_out, s.C_out) * out_pixels < kMax;
}

// A 1x1 convolution of h (N, C, H, W), NCHW- or NHWC-contiguous, by w (R, C),
// plus an optional per-channel bias, as one cuBLAS product; the result has
// h's memory format.
Tensor pointwise_blas(const Tensor& h, const Tensor& w, const std::optional<Tensor>& bias) {
  const int64_t N = h.size(0), C = h.size(1), H = h.size(2), W = h.size(3), R = w.size(0);
  if (h.is_contiguous()) {
    const Tensor h3 = h.view({N, C, H * W});
    Tensor y;
    if (N == 1) {
      y = bias ? at::addmm(bias->reshape({R, 1}), w, h3[0]) : at::mm(w, h3[0]);
    } else {
      // The weight's batch stride is 0: cuBLAS reads one copy for every image.
      y = bias ? at::baddbmm(bias->reshape({1, R, 1}).expand({N, R, H * W}), w.expand({N, R, C}), h3)
               : at::bmm(w.expand({N, R, C}), h3);
    }
    return y.view({N, R, H, W});
  }
  const Tensor rows = h.permute({0, 2, 3, 1}).reshape({N * H * W, C});  // a view: NHWC rows
  const Tensor y = bias ? at::addmm(*bias, rows, w.t()) : at::mm(rows, w.t());
  return y.view({N, H, W, R}).permute({0, 3, 1, 2});
}

// A 1x1 stage on cuDNN where nn.Conv2d gets TF32 tensor cores from it
// (float32 with torch.backends.cudnn.allow_tf32), else on cuBLAS (float16,
// bfloat16, float64, or TF32 off: the same arithmetic as cuDNN's).
// Until stop 24 float32 stages below 2^27 multiply-adds went to cuBLAS too,
// for its host time; on the H200 runs 5-7 that chain was slower than the
// Sequential chain it replaces, eager (1.05-1.09x its time, geometric mean per
// batch) and in GPU time at batch 32 (graph replays, 1.14-1.39x), where cuBLAS
// runs float32 without tensor cores (benchmarks/RESULTS_GPU.md).
Tensor pointwise(const Tensor& h, const Tensor& w, const std::optional<Tensor>& bias) {
  const bool packed = h.is_contiguous() || h.is_contiguous(at::MemoryFormat::ChannelsLast);
  const bool tf32_on_cudnn = h.scalar_type() == at::kFloat && at::globalContext().allowTF32CuDNN();
  if (packed && !tf32_on_cudnn) return pointwise_blas(h, w, bias);
  return at::conv2d(h, w.reshape({w.size(0), w.size(1), 1, 1}), bias);
}

// The unfused chain through ATen: the core on cuDNN, the 1x1 stages on cuBLAS
// or cuDNN (pointwise), under the same global settings as torch.nn.Conv2d and
// nn.Linear (TF32, benchmark, deterministic). Several launches, but tensor
// cores, for the shapes the fused kernel does not win.
Tensor chain_forward_aten(const Tensor& input, const std::optional<Tensor>& first, const Tensor& core,
                          const std::optional<Tensor>& last, const std::optional<Tensor>& bias,
                          c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                          const Conv2dSizes& s) {
  // An optional holding an undefined tensor means "absent" too (present()).
  const std::optional<Tensor> no_bias, b = s.has_bias ? bias : no_bias;
  Tensor h = input;
  if (s.has_first) h = pointwise(h, *first, no_bias);
  h = at::conv2d(h, core, s.has_last ? no_bias : b, stride, padding, dilation);
  if (s.has_last) h = pointwise(h, *last, b);
  return h.contiguous(conv_memory_format(input));
}

// The forward: NCHW output from the fused and index-mapped kernels, the
// input's layout from chain_forward_aten and the whole-GPU kernel
// (tucker_conv2d_cuda converts).
Tensor forward_before_layout(
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    const std::optional<Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation) {
  const Conv2dSizes s = check_tucker_conv2d_args(input, first, core, last, bias, stride, padding, dilation, kCudaDtypes);
  const c10::cuda::CUDAGuard guard(input.device());
  if (s.N == 0) return at::empty({s.N, s.C_out, s.H_out, s.W_out}, input.options());
  const FusedMode mode = fused_mode_from_env();
  // One choice per call: which fused kernel, whether the whole-GPU kernel
  // beats it, and whether it beats the chain.
  const FusedConvChoice choice =
      mode == FusedMode::kNever ? FusedConvChoice{} : choose_fused_conv(s, input.scalar_type());
  // One query per call: both path rules differ under graph capture.
  const bool capturing = mode == FusedMode::kAuto && current_stream_is_capturing();
  if (grid_conv_chosen(s, input.scalar_type(), mode, choice, capturing)) {
    // The whole-GPU kernel writes the output in the input's layout directly.
    const at::MemoryFormat format = conv_memory_format(input);
    Tensor out = at::empty({s.N, s.C_out, s.H_out, s.W_out}, input.options().memory_format(format));
    const ConvTensors t = prepare(input, first, core, last, s);
    const Tensor b = s.has_bias ? bias->contiguous() : Tensor();
    grid_conv_forward(t.x, s, conv_pointers(s, t, b, out), format == at::MemoryFormat::ChannelsLast);
    return out;
  }
  const bool fits_32bit = indices_fit_32bit(s);
  const bool try_fused = mode == FusedMode::kAlways || (mode == FusedMode::kAuto && fused_conv_preferred(s, choice, capturing));
  if (!try_fused && fits_32bit) return chain_forward_aten(input, first, core, last, bias, stride, padding, dilation, s);
  Tensor out = at::empty({s.N, s.C_out, s.H_out, s.W_out}, input.options());

  const ConvTensors t = prepare(input, first, core, last, s);
  const Tensor b = s.has_bias ? bias->contiguous() : Tensor();
  const void* bias_ptr = s.has_bias ? b.const_data_ptr() : nullptr;
  if (fused_conv_forward(t.x, s, conv_pointers(s, t, b, out), choice)) return out;
  if (fits_32bit) return chain_forward_aten(input, first, core, last, bias, stride, padding, dilation, s);
  // Beyond 32-bit indexing and outside the fused kernel: the index-mapped GEMMs.

  const Tensor P = s.has_first ? project(s, t) : Tensor();
  if (!s.has_last) {
    core_conv(s, t, P, out.mutable_data_ptr(), false, bias_ptr);
    return out;
  }
  const int64_t HWo = s.H_out * s.W_out;
  Tensor Q = at::empty({s.N, s.R_out, s.H_out, s.W_out}, acc_options(t.x));
  core_conv(s, t, P, Q.mutable_data_ptr(), true, nullptr);
  Output y = output(out.mutable_data_ptr(), false, HWo, 1, s.C_out * HWo);
  y.bias = bias_ptr;
  y.bias_mode = bias_ptr ? BiasMode::kPerRow : BiasMode::kNone;
  gemm(t.x, s.N, s.C_out, HWo, s.R_out, matrix(t.last.const_data_ptr(), false, s.R_out, 1),
       matrix(Q.const_data_ptr(), true, HWo, 1, s.R_out * HWo), y);
  return out;
}

Tensor tucker_conv2d_cuda(
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    const std::optional<Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation) {
  // The output in the input's layout (conv_memory_format), as on the CPU and
  // in the fake kernel. The tile kernels write NCHW, so channels_last costs one
  // conversion here (none after the cuDNN chain or the whole-GPU kernel).
  const Tensor out = forward_before_layout(input, first, core, last, bias, stride, padding, dilation);
  return out.contiguous(conv_memory_format(input));
}

// A (rows x (N*pixels)) view of an (N, rows, pixels) tensor: the column index
// runs over (image, pixel), so a GEMM's K loop sums over the whole batch.
Operand batch_pixels_as_cols(const void* ptr, bool is_acc, int64_t rows, int64_t pixels) {
  Operand o = matrix(ptr, is_acc, pixels, 1);
  o.col_inner = pixels;
  o.s_col_outer = rows * pixels;
  return o;
}

// The transpose: ((N*pixels) x cols) of an (N, cols, pixels) tensor whose pixel
// stride is s_pixel and channel stride s_channel.
Operand batch_pixels_as_rows(const void* ptr, bool is_acc, int64_t pixels, int64_t s_image, int64_t s_pixel,
                             int64_t s_channel) {
  Operand o = matrix(ptr, is_acc, s_pixel, s_channel);
  o.row_inner = pixels;
  o.s_row_outer = s_image;
  return o;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> tucker_conv2d_backward_cuda(
    const Tensor& grad_output,
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    std::array<bool, 5> output_mask,
    const std::optional<Tensor>& projection,
    const std::optional<Tensor>& core_output) {
  // Saved intermediates are checked like on the CPU but not used: the CUDA
  // backward recomputes them (the autograd kernel keeps them on the CPU only).
  const Conv2dSizes s = check_tucker_conv2d_backward_args(
      grad_output, input, first, core, last, stride, padding, dilation, kCudaDtypes, projection, core_output);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options();
  const GradRequest need = grad_request(output_mask, s.has_first, s.has_last);
  const bool need_back = need.input || need.first;  // needs the projection gradient gP
  const int64_t HW = s.H * s.W, HWo = s.H_out * s.W_out, taps = s.kh * s.kw, K = s.R_in * taps;

  const ConvTensors t = prepare(input, first, core, last, s);
  const Tensor gy = grad_output.contiguous();
  Tensor grad_input = need.input ? at::empty({s.N, s.C_in, s.H, s.W}, opts) : Tensor();
  Tensor grad_first = need.first ? at::empty({s.R_in, s.C_in}, opts) : Tensor();
  Tensor grad_core = need.core ? at::empty({s.R_out, s.R_in, s.kh, s.kw}, opts) : Tensor();
  Tensor grad_last = need.last ? at::empty({s.C_out, s.R_out}, opts) : Tensor();
  Tensor grad_bias = need.bias ? at::empty({s.C_out}, opts) : Tensor();

  // Recomputed forward intermediates: P for the core gradient, Q for last's.
  const Tensor P = s.has_first && need.core ? project(s, t) : Tensor();
  if (need.last) {
    const Tensor Pq = s.has_first && !P.defined() ? project(s, t) : P;
    Tensor Q = at::empty({s.N, s.R_out, s.H_out, s.W_out}, acc_options(t.x));
    core_conv(s, t, Pq, Q.mutable_data_ptr(), true, nullptr);
    // grad_last (C_out x R_out) = sum over (n, p) of gY[n, :, p] Q[n, :, p]^T
    gemm(t.x, 1, s.C_out, s.R_out, s.N * HWo, batch_pixels_as_cols(gy.const_data_ptr(), false, s.C_out, HWo),
         batch_pixels_as_rows(Q.const_data_ptr(), true, HWo, s.R_out * HWo, 1, HWo),
         output(grad_last.mutable_data_ptr(), false, s.R_out, 1));
  }
  if (need.bias) {
    channel_sums(t.x, gy.const_data_ptr(), grad_bias.mutable_data_ptr(), s.C_out, HWo, s.N * HWo, HWo,
                 s.C_out * HWo, 1);
  }

  if (need.core || need_back) {
    // gQ (N, R_out, H_out, W_out) = last^T gY, or gY itself without last.
    Tensor gq_buf;
    const void* gq = gy.const_data_ptr();
    bool gq_acc = false;
    if (s.has_last) {
      gq_buf = at::empty({s.N, s.R_out, s.H_out, s.W_out}, acc_options(t.x));
      gemm(t.x, s.N, s.R_out, HWo, s.C_out, matrix(t.last.const_data_ptr(), false, 1, s.R_out),
           matrix(gy.const_data_ptr(), false, HWo, 1, s.C_out * HWo),
           output(gq_buf.mutable_data_ptr(), true, HWo, 1, s.R_out * HWo));
      gq = gq_buf.const_data_ptr();
      gq_acc = true;
    }
    if (need.core) {
      // grad_core (R_out x R_in*kh*kw) = sum over (n, p) of gQ[n, :, p] cols[n, :, p]^T
      gemm(t.x, 1, s.R_out, K, s.N * HWo, batch_pixels_as_cols(gq, gq_acc, s.R_out, HWo),
           core_input_cols(OperandKind::kIm2colT, s, t, P), output(grad_core.mutable_data_ptr(), false, K, 1));
    }
    if (need_back) {
      // gP (N, R_in, H, W) = col2im(core^T gQ): the transposed convolution.
      Tensor gp_buf = s.has_first ? at::empty({s.N, s.R_in, s.H, s.W}, acc_options(t.x)) : Tensor();
      void* gp = s.has_first ? gp_buf.mutable_data_ptr() : grad_input.mutable_data_ptr();
      Operand core_t = matrix(t.core.const_data_ptr(), false, taps, 1);  // (r, (ro, tap)) -> core[ro, r, tap]
      core_t.col_inner = taps;
      core_t.s_col_outer = K;
      ConvGeometry g = input_geometry(s, s.R_out, false);
      g.sN = s.R_out * HWo;  // the source is gQ (N, R_out, H_out, W_out)
      g.sC = HWo;
      g.sH = s.W_out;
      g.sW = 1;
      gemm(t.x, s.N, s.R_in, HW, s.R_out * taps, core_t, conv_view(OperandKind::kCol2im, gq, gq_acc, g),
           output(gp, s.has_first, HW, 1, s.R_in * HW));
      if (s.has_first && need.input) {
        // grad_input (N, C_in, H, W) = first^T gP
        gemm(t.x, s.N, s.C_in, HW, s.R_in, matrix(t.first.const_data_ptr(), false, 1, s.C_in),
             matrix(gp_buf.const_data_ptr(), true, HW, 1, s.R_in * HW),
             output(grad_input.mutable_data_ptr(), false, HW, 1, s.C_in * HW));
      }
      if (need.first) {
        // grad_first (R_in x C_in) = sum over (n, p) of gP[n, :, p] X[n, :, p]^T
        gemm(t.x, 1, s.R_in, s.C_in, s.N * HW, batch_pixels_as_cols(gp_buf.const_data_ptr(), true, s.R_in, HW),
             batch_pixels_as_rows(t.x.const_data_ptr(), false, HW, s.C_in * HW, pixel_stride(s.C_in, t.nhwc),
                                  t.nhwc ? 1 : HW),
             output(grad_first.mutable_data_ptr(), false, s.C_in, 1));
      }
    }
  }

  // The input gradient in the input's layout (conv_memory_format), as the CPU
  // kernel returns it and the fake kernel declares it.
  if (grad_input.defined()) grad_input = grad_input.contiguous(conv_memory_format(input));
  // Each gradient tensor is allocated only when requested: undefined otherwise.
  return backward_result(opts, grad_input, grad_first, grad_core, grad_last, grad_bias);
}

}  // namespace
}  // namespace tucker_ops::cuda

TORCH_LIBRARY_IMPL(tucker_ops, CUDA, m) {
  m.impl("tucker_conv2d", &tucker_ops::cuda::tucker_conv2d_cuda);
  m.impl("tucker_conv2d_backward", &tucker_ops::cuda::tucker_conv2d_backward_cuda);
}
