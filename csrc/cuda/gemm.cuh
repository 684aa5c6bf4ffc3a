// A general batched GEMM, C[b] (M x N) = A[b] (M x K) * B[b] (K x N), whose
// operands are described by index maps instead of being materialised: plain
// strided matrices (with an optional two-level split of the row or column
// index, so a sum over (image, pixel) is one K loop), the im2col view of an
// NCHW/NHWC tensor, its transpose, and the col2im (transposed convolution)
// view. It is the building block of every unfused stage: the forward fallback
// for shapes the fused kernel does not take, and all of the backward pass.
//
// Accumulation is in acc_t<T>. Large-K, small-output products (weight
// gradients) are split over K into scratch partials that a second kernel sums
// in a fixed order, so results are deterministic: no atomics anywhere.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace tucker_ops::cuda {

enum class OperandKind : int {
  kMatrix,   // strided (optionally two-level) matrix
  kIm2col,   // (b = image, row = (c, i, j), col = output pixel) of src (N, C, H, W)
  kIm2colT,  // (row = (image, output pixel), col = (c, i, j)) of src (N, C, H, W)
  kCol2im,   // (b = image, row = (c, i, j), col = input pixel) of src (N, C, H_out, W_out):
             //   src at the output pixel that tap (i, j) maps to this input pixel, else 0
};

// Convolution geometry of an im2col / col2im operand. src strides are in
// elements; H, W are the conv input's sizes, H_out, W_out the output's.
struct ConvGeometry {
  int64_t C = 0, H = 0, W = 0, H_out = 0, W_out = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t sN = 0, sC = 0, sH = 0, sW = 0;  // strides of src
};

struct Operand {
  const void* ptr = nullptr;
  bool is_acc = false;  // elements are acc_t<T> (scratch) rather than T
  OperandKind kind = OperandKind::kMatrix;
  // kMatrix: element (b, row, col) lives at
  //   b*sb + (row / row_inner)*s_row_outer + (row % row_inner)*s_row
  //        + (col / col_inner)*s_col_outer + (col % col_inner)*s_col
  // where an inner extent of 0 means "no split" (row*s_row).
  int64_t sb = 0;
  int64_t row_inner = 0, s_row_outer = 0, s_row = 0;
  int64_t col_inner = 0, s_col_outer = 0, s_col = 0;
  ConvGeometry g{};
};

// A plain strided matrix (row stride, column stride, batch stride).
inline Operand matrix(const void* ptr, bool is_acc, int64_t s_row, int64_t s_col, int64_t sb = 0) {
  Operand o;
  o.ptr = ptr;
  o.is_acc = is_acc;
  o.s_row = s_row;
  o.s_col = s_col;
  o.sb = sb;
  return o;
}

inline Operand conv_view(OperandKind kind, const void* ptr, bool is_acc, const ConvGeometry& g) {
  Operand o;
  o.ptr = ptr;
  o.is_acc = is_acc;
  o.kind = kind;
  o.g = g;
  return o;
}

enum class BiasMode : int { kNone, kPerRow, kPerCol };

// C[b](m, n) at ptr + b*sb + m*sm + n*sn. bias (dtype T) is added per row or
// per column; with accumulate the product is added to C's current value.
struct Output {
  void* ptr = nullptr;
  bool is_acc = false;
  int64_t sb = 0, sm = 0, sn = 0;
  const void* bias = nullptr;
  BiasMode bias_mode = BiasMode::kNone;
  bool accumulate = false;
};

inline Output output(void* ptr, bool is_acc, int64_t sm, int64_t sn, int64_t sb = 0) {
  Output o;
  o.ptr = ptr;
  o.is_acc = is_acc;
  o.sm = sm;
  o.sn = sn;
  o.sb = sb;
  return o;
}

// Runs the product on the current stream. `like` gives the call's dtype T and
// device (scratch partials are allocated through the caching allocator, so the
// call is CUDA-graph safe). K may be 0 (C becomes bias, or zeros); M or N = 0
// or batch = 0 launches nothing.
void gemm(const at::Tensor& like, int64_t batch, int64_t M, int64_t N, int64_t K, const Operand& A,
          const Operand& B, const Output& C);

// out[c] = sum over i < count of src[c*s_c + (i / inner)*s_outer + (i % inner)*s_inner],
// for c < channels, in the accumulation type, summed in a fixed order. Used for
// bias gradients. src and out have the call's dtype.
void channel_sums(const at::Tensor& like, const void* src, void* out, int64_t channels, int64_t s_c, int64_t count,
                  int64_t inner, int64_t s_outer, int64_t s_inner);

}  // namespace tucker_ops::cuda
