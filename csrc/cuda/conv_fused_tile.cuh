// The 8x8 output tile both fused conv forward kernels work on (conv_fused.cu:
// one block per tile; conv_fused_cluster.cu: a cluster of blocks per tile),
// and the register-tiled steps they share.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace tucker_ops::cuda::fused_tile {

constexpr int kTileH = 8, kTileW = 8, kTilePixels = kTileH * kTileW, kThreads = 256;
constexpr int kPixelGroups = kTilePixels / 4;            // 16 groups of 4 pixels (half a tile row each)
constexpr int kChannelGroups = kThreads / kPixelGroups;  // 16
constexpr int kMaxRoPer = 8;                             // core output channels per thread <= kMaxRoPer
constexpr int kChannelChunk = 16;                        // C_in staged per step of the projection
constexpr int kProjTilesPerThread = 2;                   // 4x4 projection tiles a thread owns
constexpr int kCoPerPass = 4 * kChannelGroups;           // output channels of one expansion pass
// Dynamic shared memory of one cluster block: the whole projected patch and
// core output live there (an opt-in above 48 KiB; two blocks still fit on an
// sm_90 multiprocessor).
constexpr int64_t kClusterSharedMemBudget = 96 * 1024;

// pacc (4 ranks x 4 patch positions) += ws[rg*4 .. rg*4+3, 0:cc] x xs[0:cc, qg*4 .. qg*4+3]:
// one 4x4 register tile of the projection over a staged chunk of input channels.
// xs is (kc, ps), ws is (rows, kc), both in shared memory.
template <typename F>
__device__ __forceinline__ void project_tile(const F* xs, const F* ws, int ps, int kc, int cc, int rg, int qg,
                                             F (&pacc)[4][4]) {
  for (int c = 0; c < cc; ++c) {
    F xv[4], wv[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) xv[q] = xs[c * ps + qg * 4 + q];
#pragma unroll
    for (int k = 0; k < 4; ++k) wv[k] = ws[(rg * 4 + k) * kc + c];
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int q = 0; q < 4; ++q) pacc[k][q] += wv[k] * xv[q];
  }
}

// Rows r_lo .. r_lo+rn-1 of the projected patch: dst (rn rows of stride ps) =
// first[r_lo : r_lo+rn, :] x patch (C_in x patch positions). C_in is staged kc
// channels at a time into xs (kc, ps) and ws (ws_rows >= rn rounded up to 4,
// kc); x_at(c, q) reads input channel c at patch position q, zero outside the
// image (the projection's zero padding: it has no bias). Each thread owns up
// to kProjTilesPerThread register tiles of 4 ranks x 4 positions per pass.
template <typename T, typename XAt>
__device__ __forceinline__ void project_patch(const T* __restrict__ first, int64_t C_in, int r_lo, int rn, int patch,
                                              int ps, int kc, int ws_rows, bool nhwc, XAt x_at, acc_t<T>* xs,
                                              acc_t<T>* ws, acc_t<T>* dst) {
  using F = acc_t<T>;
  const int tid = static_cast<int>(threadIdx.x);
  const int nqg = (patch + 3) / 4, ntiles = ((rn + 3) / 4) * nqg;
  for (int base = 0; base < ntiles; base += kProjTilesPerThread * kThreads) {
    F pacc[kProjTilesPerThread][4][4];
#pragma unroll
    for (int t = 0; t < kProjTilesPerThread; ++t)
#pragma unroll
      for (int k = 0; k < 4; ++k)
#pragma unroll
        for (int q = 0; q < 4; ++q) pacc[t][k][q] = F(0);
    for (int64_t c0 = 0; c0 < C_in; c0 += kc) {
      const int cc = static_cast<int>(c0 + kc < C_in ? kc : C_in - c0);
      // NHWC: consecutive threads read consecutive channels of one pixel.
      for (int e = tid; e < cc * patch; e += kThreads) {
        const int c = nhwc ? e % cc : e / patch, q = nhwc ? e / cc : e % patch;
        xs[c * ps + q] = x_at(c0 + c, q);
      }
      // Rows rn..ws_rows-1 and columns cc..kc-1 are zero: tiles read them.
      for (int e = tid; e < ws_rows * kc; e += kThreads) {
        const int r = e / kc, c = e % kc;
        ws[e] = r < rn && c < cc ? static_cast<F>(first[(r_lo + r) * C_in + c0 + c]) : F(0);
      }
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kProjTilesPerThread; ++t) {
        const int m = base + tid + t * kThreads;
        if (m < ntiles) project_tile<F>(xs, ws, ps, kc, cc, m / nqg, m % nqg, pacc[t]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int t = 0; t < kProjTilesPerThread; ++t) {
      const int m = base + tid + t * kThreads;
      if (m < ntiles) {
        const int rg = m / nqg, qg = m % nqg;
#pragma unroll
        for (int k = 0; k < 4; ++k)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (rg * 4 + k < rn && qg * 4 + q < patch) dst[(rg * 4 + k) * ps + qg * 4 + q] = pacc[t][k][q];
          }
      }
    }
  }
}

// acc (RO_PER channels x 4 pixels) += core x proj over every tap, for one rank
// r of R_in: pr points at proj's row r at this thread's first pixel, core_r at
// the staged core's (channel 0, rank r, tap 0); channel ro's taps start at
// core_r + ro * core_row. Thread channel group og owns channels og + 16k < ro_n.
template <typename F, int RO_PER>
__device__ __forceinline__ void core_rank_step(const F* pr, const F* core_r, int core_row, int ro_n, int og, int kh,
                                               int kw, int dh, int dw, int patch_w, int sw, F (&acc)[RO_PER][4]) {
  for (int i = 0; i < kh; ++i) {
    for (int j = 0; j < kw; ++j) {
      const F* p = pr + i * dh * patch_w + j * dw;
      F pv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) pv[q] = p[q * sw];
      const int tap = i * kw + j;
#pragma unroll
      for (int k = 0; k < RO_PER; ++k) {
        const int ro = og + kChannelGroups * k;
        const F c = ro < ro_n ? core_r[ro * core_row + tap] : F(0);
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[k][q] += c * pv[q];
      }
    }
  }
}

// The expansion of one tile: out[co, pixels] = last[co, :] z + bias for co in
// [co_begin, co_end). z is the core output (R_out, kTilePixels) in shared
// memory; thread (og, pg) owns 4 output channels x the 4 pixels of pixel group
// pg (tile row oh, columns ow0 .. ow0+3) per pass of kCoPerPass channels.
template <typename T>
__device__ __forceinline__ void expand_tile(const acc_t<T>* z, const T* __restrict__ last, const T* __restrict__ bias,
                                            int R_out, int64_t co_begin, int64_t co_end, int og, int pg, T* yn,
                                            int64_t HWo, int64_t W_out, int64_t H_out, int64_t oh, int64_t ow0) {
  using F = acc_t<T>;
  for (int64_t cb = co_begin + og * 4; cb < co_end; cb += kCoPerPass) {
    F y[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const F b = bias && cb + i < co_end ? static_cast<F>(bias[cb + i]) : F(0);
#pragma unroll
      for (int q = 0; q < 4; ++q) y[i][q] = b;
    }
#pragma unroll 4
    for (int ro = 0; ro < R_out; ++ro) {
      F qv[4], lv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) qv[q] = z[ro * kTilePixels + pg * 4 + q];
#pragma unroll
      for (int i = 0; i < 4; ++i) lv[i] = cb + i < co_end ? static_cast<F>(last[(cb + i) * R_out + ro]) : F(0);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) y[i][q] += lv[i] * qv[q];
    }
    if (oh >= H_out) continue;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (cb + i >= co_end) continue;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t ow = ow0 + q;
        if (ow < W_out) yn[(cb + i) * HWo + oh * W_out + ow] = static_cast<T>(y[i][q]);
      }
    }
  }
}

}  // namespace tucker_ops::cuda::fused_tile
