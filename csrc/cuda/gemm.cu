// The index-mapped batched GEMM of gemm.cuh and the channel sums.
//
// One 64x64 output tile per block, 256 threads, 4x4 outputs per thread, K in
// steps of 16 staged through shared memory in the accumulation type. Operand
// element loads go through load_operand(), a switch on the operand kind that
// is uniform across the grid, so there is no divergence; it keeps one kernel
// per dtype instead of one per operand combination (compile time matters: CI
// builds this on two cores).
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/common.cuh"
#include "cuda/gemm.cuh"

namespace tucker_ops::cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// Value of tap (i, j) of channel c at output pixel (oh, ow) in the im2col view:
// src[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw], zero outside the input.
template <typename T>
__device__ acc_t<T> im2col_value(const Operand& o, int64_t n, int64_t tap, int64_t pixel) {
  const ConvGeometry& g = o.g;
  const int64_t taps = g.kh * g.kw;
  const int64_t c = tap / taps, ij = tap % taps;
  const int64_t ih = (pixel / g.W_out) * g.sh - g.ph + (ij / g.kw) * g.dh;
  const int64_t iw = (pixel % g.W_out) * g.sw - g.pw + (ij % g.kw) * g.dw;
  if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return acc_t<T>(0);
  return load_as_acc<T>(o.ptr, o.is_acc, n * g.sN + c * g.sC + ih * g.sH + iw * g.sW);
}

template <typename T>
__device__ acc_t<T> load_operand(const Operand& o, int64_t b, int64_t row, int64_t col) {
  switch (o.kind) {
    case OperandKind::kMatrix: {
      int64_t off = b * o.sb;
      off += o.row_inner ? (row / o.row_inner) * o.s_row_outer + (row % o.row_inner) * o.s_row : row * o.s_row;
      off += o.col_inner ? (col / o.col_inner) * o.s_col_outer + (col % o.col_inner) * o.s_col : col * o.s_col;
      return load_as_acc<T>(o.ptr, o.is_acc, off);
    }
    case OperandKind::kIm2col:
      return im2col_value<T>(o, b, row, col);
    case OperandKind::kIm2colT: {
      const int64_t pixels = o.g.H_out * o.g.W_out;
      return im2col_value<T>(o, row / pixels, col, row % pixels);
    }
    case OperandKind::kCol2im: {
      // Input pixel (ih, iw) receives tap (i, j) of output pixel (oh, ow) when
      // ih = oh*sh - ph + i*dh, i.e. th = ih + ph - i*dh is a multiple of sh.
      const ConvGeometry& g = o.g;
      const int64_t taps = g.kh * g.kw;
      const int64_t c = row / taps, ij = row % taps;
      const int64_t th = col / g.W + g.ph - (ij / g.kw) * g.dh;
      const int64_t tw = col % g.W + g.pw - (ij % g.kw) * g.dw;
      if (th < 0 || tw < 0 || th % g.sh != 0 || tw % g.sw != 0) return acc_t<T>(0);
      const int64_t oh = th / g.sh, ow = tw / g.sw;
      if (oh >= g.H_out || ow >= g.W_out) return acc_t<T>(0);
      return load_as_acc<T>(o.ptr, o.is_acc, b * g.sN + c * g.sC + oh * g.sH + ow * g.sW);
    }
  }
  return acc_t<T>(0);
}

template <typename T>
__device__ __forceinline__ void epilogue(const Output& C, int64_t b, int64_t m, int64_t n, acc_t<T> v) {
  if (C.bias_mode == BiasMode::kPerRow) v += static_cast<acc_t<T>>(static_cast<const T*>(C.bias)[m]);
  if (C.bias_mode == BiasMode::kPerCol) v += static_cast<acc_t<T>>(static_cast<const T*>(C.bias)[n]);
  const int64_t off = b * C.sb + m * C.sm + n * C.sn;
  if (C.accumulate) v += load_as_acc<T>(C.ptr, C.is_acc, off);
  store_from_acc<T>(C.ptr, C.is_acc, off, v);
}

// grid.x: output tiles; grid.y strides over (batch x K splits). With
// partial != nullptr (batch == 1), split s writes its raw sums to
// partial[s][M][N] and reduce_splits_kernel finishes the job.
template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_kernel(
    int64_t batch, int64_t M, int64_t N, int64_t K, int64_t k_per_split, int64_t splits, Operand A, Operand B,
    Output C, acc_t<T>* partial, bool a_k_fast, bool b_n_fast) {
  using F = acc_t<T>;
  __shared__ F As[kBK][kBM + 1];
  __shared__ F Bs[kBK][kBN + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t tiles_n = (N + kBN - 1) / kBN;
  const int64_t m0 = (static_cast<int64_t>(blockIdx.x) / tiles_n) * kBM;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) % tiles_n) * kBN;

  for (int64_t z = blockIdx.y; z < batch * splits; z += gridDim.y) {
    const int64_t b = z / splits, split = z % splits;
    const int64_t k_begin = split * k_per_split;
    const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;
    F acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = F(0);

    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
      // Consecutive threads walk the operand's unit-stride index where it has
      // one, so that global loads coalesce.
#pragma unroll
      for (int t = 0; t < (kBM * kBK) / kThreads; ++t) {
        const int e = tid + t * kThreads;
        const int mm = a_k_fast ? e / kBK : e % kBM;
        const int kk = a_k_fast ? e % kBK : e / kBM;
        const int64_t m = m0 + mm, k = k0 + kk;
        As[kk][mm] = (m < M && k < k_end) ? load_operand<T>(A, b, m, k) : F(0);
      }
#pragma unroll
      for (int t = 0; t < (kBN * kBK) / kThreads; ++t) {
        const int e = tid + t * kThreads;
        const int nn = b_n_fast ? e % kBN : e / kBK;
        const int kk = b_n_fast ? e / kBN : e % kBK;
        const int64_t n = n0 + nn, k = k0 + kk;
        Bs[kk][nn] = (n < N && k < k_end) ? load_operand<T>(B, b, k, n) : F(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        F a[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * bv[j];
      }
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      if (m >= M) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx + 16 * j;
        if (n >= N) continue;
        if (partial) {
          partial[(split * M + m) * N + n] = acc[i][j];
        } else {
          epilogue<T>(C, b, m, n, acc[i][j]);
        }
      }
    }
  }
}

template <typename T>
__global__ void reduce_splits_kernel(const acc_t<T>* partial, int64_t splits, int64_t M, int64_t N, Output C) {
  const int64_t total = M * N;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t<T> v = 0;
    for (int64_t s = 0; s < splits; ++s) v += partial[s * total + idx];
    epilogue<T>(C, 0, idx / N, idx % N, v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) channel_sums_kernel(
    const T* src, T* out, int64_t s_c, int64_t count, int64_t inner, int64_t s_outer, int64_t s_inner) {
  using F = acc_t<T>;
  __shared__ F partial[kThreads];
  const int64_t c = blockIdx.x;
  F acc = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    acc += static_cast<F>(src[c * s_c + (i / inner) * s_outer + (i % inner) * s_inner]);
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[c] = static_cast<T>(partial[0]);
}

// The unit-stride index of a matrix operand, if any: loads walk it.
bool col_is_fast(const Operand& o) {
  if (o.kind != OperandKind::kMatrix) return o.kind != OperandKind::kIm2colT;
  return o.s_col == 1 || o.s_row != 1;
}

}  // namespace

void gemm(const at::Tensor& like, int64_t batch, int64_t M, int64_t N, int64_t K, const Operand& A,
          const Operand& B, const Output& C) {
  if (batch == 0 || M == 0 || N == 0) return;
  const int64_t tiles = ceil_div(M, kBM) * ceil_div(N, kBN);
  TORCH_CHECK(tiles < (int64_t{1} << 31), "tucker_ops CUDA gemm: output of ", M, " x ", N, " is too large");
  // Few output tiles and a long K (weight gradients summed over every pixel of
  // the batch): split K so that the GPU fills, then sum the splits in order.
  int64_t splits = 1;
  if (batch == 1 && tiles < 128 && K >= 2048) {
    splits = std::min<int64_t>({ceil_div(256, tiles), ceil_div(K, 1024), 64});
  }
  int64_t k_per_split = ceil_div(ceil_div(std::max<int64_t>(K, 1), splits), kBK) * kBK;
  splits = std::max<int64_t>(1, ceil_div(K, k_per_split));

  const bool a_k_fast = col_is_fast(A);
  const bool b_n_fast = col_is_fast(B);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min(batch * splits, kMaxGridY)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "tucker_ops_cuda_gemm", [&] {
    using F = acc_t<scalar_t>;
    if (splits == 1) {
      gemm_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          batch, M, N, K, k_per_split, 1, A, B, C, nullptr, a_k_fast, b_n_fast);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor partial = at::empty({splits, M, N}, acc_options(like));
    gemm_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        1, M, N, K, k_per_split, splits, A, B, C, partial.mutable_data_ptr<F>(), a_k_fast, b_n_fast);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t blocks = std::min<int64_t>(ceil_div(M * N, kThreads), 4096);
    reduce_splits_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        partial.const_data_ptr<F>(), splits, M, N, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void channel_sums(const at::Tensor& like, const void* src, void* out, int64_t channels, int64_t s_c, int64_t count,
                  int64_t inner, int64_t s_outer, int64_t s_inner) {
  if (channels == 0) return;
  TORCH_CHECK(channels < (int64_t{1} << 31), "tucker_ops CUDA channel_sums: too many channels: ", channels);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "tucker_ops_cuda_channel_sums", [&] {
    channel_sums_kernel<scalar_t><<<static_cast<unsigned>(channels), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(src), static_cast<scalar_t*>(out), s_c, count, std::max<int64_t>(inner, 1),
        s_outer, s_inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace tucker_ops::cuda
