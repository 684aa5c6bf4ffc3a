// Fused tucker_linear forward (linear_fused.cuh).
//
// One block of 256 threads per kRows rows of X. When there are few row blocks:
// on sm_90+, a cluster of blocks shares the rows, each rank computing a slice
// of every stage's features and copying the other ranks' slices out of their
// shared memory (distributed shared memory) before the next stage, so nothing
// is recomputed; elsewhere, blocks split the last stage's outputs and each
// recomputes the cheap earlier stages. Every stage is a set of dot products along a
// contiguous dimension: a warp takes kOutsPerWarp output features, reads their
// weight rows once (coalesced) and multiplies them with all kRows source rows
// at once, then shuffle reductions. t1 = X first^T and t2 = t1 core^T live in shared memory
// in the accumulation type; only the final row is written to global memory.
// Meant for the small layers where three GEMM launches cost more than the
// arithmetic (ThesisNet's l1/l2 at small batch); large factors go to the GEMM
// chain, which streams each weight once per output tile instead of per block.
#include <algorithm>

#include <cooperative_groups.h>

#include <ATen/Dispatch.h>

#include "cuda/common.cuh"
#include "cuda/linear_fused.cuh"

namespace tucker_ops::cuda {
namespace {

constexpr int kRows = 8, kThreads = 256, kWarps = kThreads / 32;
// Outputs a warp computes at once: their weight loads are independent, so a
// warp keeps several in flight instead of waiting on one row at a time.
constexpr int kOutsPerWarp = 4;
// Every block streams all factors, so the fused path is for factor sets that
// stay L2-resident and grids of at most a few waves of blocks.
constexpr int64_t kMaxFactorElems = int64_t{1} << 17;
constexpr int64_t kMaxRows = 512;
constexpr int64_t kMaxFactorElemsCaptured = int64_t{1} << 13;
constexpr int kMaxClusterSize = 8;  // the portable limit
constexpr int64_t kMinClusterFactorElems = int64_t{1} << 14;

// dst(r, o, v) with v = sum_k src(r, k) * W[o, k], for r < rows and o in
// [o_begin, o_end). W is (n, K) row-major in T; src/dst are callables (global
// or shared memory).
template <typename T, typename Src, typename Dst>
__device__ __forceinline__ void warp_dots(int rows, int64_t o_begin, int64_t o_end, int64_t K, const T* W, Src src,
                                          Dst dst) {
  using F = acc_t<T>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t o0 = o_begin + warp * kOutsPerWarp; o0 < o_end; o0 += kWarps * kOutsPerWarp) {
    F acc[kOutsPerWarp][kRows];
#pragma unroll
    for (int j = 0; j < kOutsPerWarp; ++j)
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[j][r] = F(0);
    // Unrolled so that a warp has several iterations' loads in flight: the
    // factors stream from L2, and one dependent load at a time left the
    // kernel latency-bound (ThesisNet's l1: 0.024-0.034 ms on an H200).
#pragma unroll 4
    for (int64_t k = lane; k < K; k += 32) {
      F w[kOutsPerWarp], x[kRows];
#pragma unroll
      for (int j = 0; j < kOutsPerWarp; ++j) w[j] = o0 + j < o_end ? static_cast<F>(W[(o0 + j) * K + k]) : F(0);
#pragma unroll
      for (int r = 0; r < kRows; ++r) x[r] = r < rows ? src(r, k) : F(0);
#pragma unroll
      for (int j = 0; j < kOutsPerWarp; ++j)
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[j][r] += w[j] * x[r];
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;  // uniform across the warp
#pragma unroll
      for (int j = 0; j < kOutsPerWarp; ++j) {
        F v = acc[j][r];
#pragma unroll
        for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0 && o0 + j < o_end) dst(r, o0 + j, v);
      }
    }
  }
}

// Copies the other cluster ranks' slices of buf (kRows x width, row-major;
// rank q owns columns [q*per, (q+1)*per)) out of their shared memory.
template <typename F>
__device__ __forceinline__ void gather_columns(F* buf, int rows, int64_t width, int64_t per, int rank, int cl) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  cluster.sync();  // every rank's slice is complete and visible
  for (int64_t e = threadIdx.x; e < rows * width; e += kThreads) {
    const int owner = static_cast<int>((e % width) / per);
    if (owner != rank) buf[e] = cluster.map_shared_rank(buf, owner)[e];
  }
  __syncthreads();
#endif
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fused_linear_forward_kernel(
    LinearSizes s, int64_t out_per_split, int cl, const T* __restrict__ x, const T* __restrict__ first,
    const T* __restrict__ core, const T* __restrict__ last, const T* __restrict__ bias, T* __restrict__ out) {
  using F = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  F* t1 = reinterpret_cast<F*>(smem_raw);  // (kRows, R_in), only with first
  F* t2 = t1 + (first ? kRows * s.R_in : 0);  // (kRows, R_out), only with last

  // Cluster rank (0 without a cluster): this block's slice of every stage.
  int rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cl > 1) rank = static_cast<int>(cooperative_groups::this_cluster().block_rank());
#endif
  auto slice = [&](int64_t extent, int64_t* lo, int64_t* hi) {
    const int64_t per = ceil_div(extent, cl);
    *lo = rank * per < extent ? rank * per : extent;
    *hi = *lo + per < extent ? *lo + per : extent;
    return per;
  };
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / cl) * kRows;
  const int rows = static_cast<int>(s.M - row0 < kRows ? s.M - row0 : kRows);
  const T* xb = x + row0 * s.in;
  T* yb = out + row0 * s.out;
  int64_t o_begin = static_cast<int64_t>(blockIdx.y) * out_per_split;
  int64_t o_end = o_begin + out_per_split < s.out ? o_begin + out_per_split : s.out;
  if (cl > 1) slice(s.out, &o_begin, &o_end);

  auto from_x = [&](int r, int64_t k) -> F { return static_cast<F>(xb[r * s.in + k]); };
  auto from_t1 = [&](int r, int64_t k) -> F { return t1[r * s.R_in + k]; };
  auto from_t2 = [&](int r, int64_t k) -> F { return t2[r * s.R_out + k]; };
  auto to_t1 = [&](int r, int64_t o, F v) { t1[r * s.R_in + o] = v; };
  auto to_t2 = [&](int r, int64_t o, F v) { t2[r * s.R_out + o] = v; };
  auto to_y = [&](int r, int64_t o, F v) {
    yb[r * s.out + o] = static_cast<T>(v + (bias ? static_cast<F>(bias[o]) : F(0)));
  };

  int64_t lo = 0, hi = 0;
  if (first) {
    const int64_t per = slice(s.R_in, &lo, &hi);
    warp_dots<T>(rows, cl > 1 ? lo : 0, cl > 1 ? hi : s.R_in, s.in, first, from_x, to_t1);
    if (cl > 1) {
      gather_columns(t1, rows, s.R_in, per, rank, cl);
    } else {
      __syncthreads();
    }
  }
  if (last) {
    const int64_t per = slice(s.R_out, &lo, &hi);
    if (cl == 1) lo = 0, hi = s.R_out;
    if (first) {
      warp_dots<T>(rows, lo, hi, s.R_in, core, from_t1, to_t2);
    } else {
      warp_dots<T>(rows, lo, hi, s.R_in, core, from_x, to_t2);
    }
    if (cl > 1) {
      gather_columns(t2, rows, s.R_out, per, rank, cl);
    } else {
      __syncthreads();
    }
    warp_dots<T>(rows, o_begin, o_end, s.R_out, last, from_t2, to_y);
  } else if (first) {
    warp_dots<T>(rows, o_begin, o_end, s.R_in, core, from_t1, to_y);
  } else {
    warp_dots<T>(rows, o_begin, o_end, s.R_in, core, from_x, to_y);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The other ranks are done reading this block's shared memory.
  if (cl > 1) cooperative_groups::this_cluster().sync();
#endif
}

}  // namespace

bool fused_linear_applies(const at::Tensor& like, const LinearSizes& s) {
  const int64_t early = (s.has_first ? s.R_in * s.in : 0) + (s.has_last ? s.R_out * s.R_in : 0);
  const int64_t final_stage = s.out * (s.has_last ? s.R_out : s.R_in);
  if (fused_mode_from_env() != FusedMode::kAlways) {
    if (early + final_stage > kMaxFactorElems || s.M > kMaxRows) return false;
    // In a CUDA graph the three cuBLAS kernels replay without host cost and
    // beat this kernel unless the factors are tiny, and in float16 / bfloat16
    // even then: in runs 5-9's graph tables thesis_l2 (6 K factor elements)
    // took 1.2-2.3x the chain's replay time in bfloat16 at every batch; in
    // float32 1.2x at batch 1-8 and 0.55x at 32-128 (RESULTS_GPU.md).
    const bool half = like.scalar_type() == at::kHalf || like.scalar_type() == at::kBFloat16;
    if ((half || early + final_stage > kMaxFactorElemsCaptured) && current_stream_is_capturing()) return false;
  }
  const int64_t acc_bytes = c10::elementSize(at::toOpMathType(like.scalar_type()));
  const int64_t smem = kRows * ((s.has_first ? s.R_in : 0) + (s.has_last ? s.R_out : 0)) * acc_bytes;
  return smem <= kSharedMemBudget;
}

bool fused_linear_forward(const at::Tensor& like, const LinearSizes& s, const LinearPointers& p) {
  if (!fused_linear_applies(like, s)) return false;
  if (s.M == 0 || s.out == 0) return true;
  const int64_t early = (s.has_first ? s.R_in * s.in : 0) + (s.has_last ? s.R_out * s.R_in : 0);
  const int64_t final_stage = s.out * (s.has_last ? s.R_out : s.R_in);
  const int64_t acc_bytes = c10::elementSize(at::toOpMathType(like.scalar_type()));
  const int64_t smem = kRows * ((s.has_first ? s.R_in : 0) + (s.has_last ? s.R_out : 0)) * acc_bytes;

  // Few row blocks: on sm_90+ a cluster of blocks shares each row block;
  // elsewhere the last stage's outputs are split over blocks while the
  // recomputed earlier stages stay a small part of each block's work.
  const int64_t row_blocks = ceil_div(s.M, kRows);
  // Only a forced call (TUCKER_OPS_CUDA_FUSED=1) gets here with that many rows:
  // grid.x holds row blocks times the cluster size, below 2^31.
  constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
  if (row_blocks * kMaxClusterSize > kMaxGridX) return false;
  const int forced = cluster_size_from_env();
  int cl = 1;
  if (cached_device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9) {
    // Clusters pay for their barriers once the factors take more than a few
    // microseconds to stream (ThesisNet's l1 at batch 1 on an H200: 0.010 ms
    // clustered against 0.021 ms; its l2, 6 K elements: 0.015 against 0.009).
    const bool worth_it = row_blocks <= 32 && early + final_stage >= kMinClusterFactorElems;
    cl = forced >= 0 ? std::max(forced, 1) : worth_it ? kMaxClusterSize : 1;
  }
  int64_t splits = 1;
  if (cl == 1 && row_blocks < 64 && final_stage > 4 * early) {
    splits = std::max<int64_t>(1, std::min<int64_t>(ceil_div(s.out, kOutsPerWarp * kWarps), ceil_div(64, row_blocks)));
  }
  const int64_t out_per_split = ceil_div(s.out, splits);
  splits = ceil_div(s.out, out_per_split);

  const ClusterLaunch launch(dim3(static_cast<unsigned>(row_blocks * cl), static_cast<unsigned>(splits)), kThreads,
                             static_cast<size_t>(smem), cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "tucker_linear_cuda_fused", [&] {
    using T = scalar_t;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, fused_linear_forward_kernel<T>, s, out_per_split, cl,
                                      static_cast<const T*>(p.x), static_cast<const T*>(p.first),
                                      static_cast<const T*>(p.core), static_cast<const T*>(p.last),
                                      static_cast<const T*>(p.bias), static_cast<T*>(p.out)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

}  // namespace tucker_ops::cuda
