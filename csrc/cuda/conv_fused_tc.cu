// Fused tucker_conv2d forward on tensor cores (conv_fused.cuh): float16 and
// bfloat16, and float32 through TF32 where cuDNN may use TF32 (the
// torch.backends.cudnn.allow_tf32 flag nn.Conv2d obeys). Tucker-2 layers with
// R_in, R_out <= 128.
//
// Two launches. The first packs every operand into a workspace, in the layout
// the second's shared memory holds it: the input as zero-padded NHWC (the
// convolution's padding, the tiles' overhang and C_in rounded up to the
// staging chunk), the factors zero-padded to multiples of 16. So the fused
// kernel stages with 16-byte asynchronous copies (cp.async) and no bounds
// checks or per-element index math: the earlier version, which gathered,
// converted and bounds-checked every element between barriers, spent most of
// its time there (benchmarks/RESULTS_GPU.md).
//
// The fused kernel runs one block of 8 warps per (image, 4 x 16 output tile,
// slice of C_out). The tile is 16 pixels wide so that one output row is one
// 16-row operand of the tensor cores: its pixels sit at a fixed stride
// (stride_w positions) in the projected patch, which the fragment loads take
// as their leading dimension, so the core needs no im2col copy. Every stage is
// a warp-level matrix product (WMMA, float accumulators) out of shared memory:
//   1. pj (patch positions x R_in) = patch (positions x C_in) * first^T, C_in
//      in chunks with the matching columns of `first`, the next chunk copied
//      in while the tensor cores work on this one (two buffers, where they fit);
//   2. z (64 pixels x R_out) = sum over taps t of pj shifted by t * core_t^T,
//      the core staged tap by tap (as many taps as fit at once);
//   3. out (64 pixels x C_out slice) = z * last^T + bias, `last` staged 64
//      output channels at a time, then written once through a per-warp tile.
// pj and z are kept in the input dtype (float16 / bfloat16 / float), as the
// Sequential chain's layers keep their outputs; every sum is in float.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include <mma.h>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "cuda/common.cuh"
#include "cuda/conv_fused.cuh"

namespace tucker_ops::cuda {
namespace {

using namespace nvcuda;

constexpr int kRowsOut = 4, kColsOut = 16, kPixels = kRowsOut * kColsOut;
constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kMaxFragsPerWarp = 4;  // accumulator tiles a warp holds: R_out <= 128
constexpr int kMaxRank = 128;
constexpr int kCoChunk = 64;         // output channels per staged slice of `last`
constexpr int kScratchFloats = 256;  // one 16 x 16 float tile per warp
constexpr int kCopyBytes = 16;       // one cp.async
constexpr int64_t kTcSharedMemBudget = 110 * 1024;  // two blocks per sm_80/sm_90 multiprocessor

// Storage type in shared memory, WMMA fragment element type, and the K extent
// of one tensor-core step.
template <typename T>
struct Tc;
template <>
struct Tc<c10::Half> {
  using S = c10::Half;
  using Frag = __half;
  static constexpr int K = 16;
};
template <>
struct Tc<c10::BFloat16> {
  using S = c10::BFloat16;
  using Frag = __nv_bfloat16;
  static constexpr int K = 16;
};
template <>
struct Tc<float> {
  using S = float;
  using Frag = wmma::precision::tf32;
  static constexpr int K = 8;
};

// WMMA fragment loads and float32 accumulator stores out of / into shared
// memory, in PTX's shared-state-space form. For float16 nvcc emits that form
// itself (ptxas then loads with ldmatrix); for bfloat16 and TF32 it emits the
// generic form, even from a pointer into __shared__, which ptxas lowers to one
// generic 32-bit load per register (seen in the SASS of the previous version:
// 4 LD.E per bfloat16 fragment, no LDSM). So those two are written here.
using BfFragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using BfFragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using TfFragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using TfFragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using TfFragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// The fragment's four registers, in the order the generic load_matrix_sync
// writes them (and mma_sync reads them): the instruction's result registers.
template <typename Fragment>
__device__ __forceinline__ void load_shared_fragment(Fragment& f, const void* p, int ldm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(sizeof(f.x) == 4 * sizeof(uint32_t), "four registers per lane");
  uint32_t r[4];
  const unsigned a = shared_address(p);
  if constexpr (std::is_same_v<Fragment, BfFragA>) {
    asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ldm) : "memory");
  } else if constexpr (std::is_same_v<Fragment, BfFragB>) {
    asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ldm) : "memory");
  } else if constexpr (std::is_same_v<Fragment, TfFragA>) {
    asm volatile("wmma.load.a.sync.aligned.row.m16n16k8.shared.tf32 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ldm) : "memory");
  } else {
    static_assert(std::is_same_v<Fragment, TfFragB>, "a bfloat16 or TF32 operand fragment");
    asm volatile("wmma.load.b.sync.aligned.col.m16n16k8.shared.tf32 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ldm) : "memory");
  }
  memcpy(f.x, r, sizeof(r));
#endif
}

// float32 operands are stored rounded to TF32 (tc_operand) where they are
// written, by the packing kernel and by the spills of pj and z, so a fragment
// load takes them as they are: the conversion costs two instructions per
// element (an infinity test and an add), and each element is loaded by every
// warp tile that reads it, in every step. The mma sees the same bits either way.
template <typename T, typename Fragment>
__device__ __forceinline__ void load_operand(Fragment& f, const typename Tc<T>::S* ptr, int ldm) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    wmma::load_matrix_sync(f, reinterpret_cast<const __half*>(ptr), ldm);
  } else {
    load_shared_fragment(f, ptr, ldm);
  }
}

// A value as the kernel stores an mma operand: float32 rounded to TF32.
template <typename S>
__device__ __forceinline__ S tc_operand(S v) {
  if constexpr (std::is_same_v<S, float>) {
    return __uint_as_float(tf32_bits(v));
  } else {
    return v;
  }
}

// An accumulator tile into shared memory, row-major (element (r, c) at
// dst[r * ldm + c]) or column-major (dst[c * ldm + r]), in PTX's shared-state
// form for both products (for TF32 ones nvcc emits the generic form: see
// load_shared_fragment).
template <bool kColMajor, typename Fragment>
__device__ __forceinline__ void store_shared_accumulator(float* dst, const Fragment& acc, int ldm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(sizeof(acc.x) == 8 * sizeof(float), "eight float accumulators per lane");
  const unsigned a = shared_address(dst);
#define TUCKER_OPS_WMMA_STORE(LAYOUT, SHAPE)                                                                     \
  asm volatile("wmma.store.d.sync.aligned." LAYOUT "." SHAPE ".shared.f32 [%0], {%1, %2, %3, %4, %5, %6, %7, %8}, %9;\n" ::"r"(a), \
               "f"(acc.x[0]), "f"(acc.x[1]), "f"(acc.x[2]), "f"(acc.x[3]), "f"(acc.x[4]), "f"(acc.x[5]),         \
               "f"(acc.x[6]), "f"(acc.x[7]), "r"(ldm)                                                            \
               : "memory")
  if constexpr (std::is_same_v<Fragment, TfFragC>) {
    if constexpr (kColMajor) {
      TUCKER_OPS_WMMA_STORE("col", "m16n16k8");
    } else {
      TUCKER_OPS_WMMA_STORE("row", "m16n16k8");
    }
  } else {
    static_assert(std::is_same_v<Fragment, wmma::fragment<wmma::accumulator, 16, 16, 16, float>>,
                  "a float accumulator of a 16 x 16 x 16 or a TF32 product");
    if constexpr (kColMajor) {
      TUCKER_OPS_WMMA_STORE("col", "m16n16k16");
    } else {
      TUCKER_OPS_WMMA_STORE("row", "m16n16k16");
    }
  }
#undef TUCKER_OPS_WMMA_STORE
#endif
}

// 16 bytes into 16-byte aligned shared or global memory, as one vector store
// (from a uint4 built in registers, nvcc stored the words one by one). Global:
// evict-first, the output is read by no later step.
template <bool kGlobal>
__device__ __forceinline__ void store16(void* dst, uint4 w) {
  if constexpr (kGlobal) {
    __stcs(reinterpret_cast<uint4*>(dst), w);
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(shared_address(dst)), "r"(w.x), "r"(w.y),
                 "r"(w.z), "r"(w.w)
                 : "memory");
#endif
  }
}

// Two floats as the 32 bits of a pair of 16-bit S, round to nearest even as
// c10's conversions.
template <typename S>
__device__ __forceinline__ uint32_t pack_pair(float a, float b) {
  uint32_t w;
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    memcpy(&w, &h, sizeof(w));
  } else {
    static_assert(std::is_same_v<S, c10::Half>, "a 16-bit storage type");
    const __half2 h = __floats2half2_rn(a, b);
    memcpy(&w, &h, sizeof(w));
  }
  return w;
}

// Eight consecutive values into 16-byte aligned shared (kGlobal false) or
// global memory in the storage type S: one 16-byte store for 16-bit types,
// two for float. `round` rounds float32 to TF32 (an mma operand, tc_operand).
template <bool kGlobal, typename S>
__device__ __forceinline__ void store_eight(S* dst, const float (&v)[8], bool round) {
  if constexpr (std::is_same_v<S, float>) {
    uint32_t w[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = __float_as_uint(round ? tc_operand(v[i]) : v[i]);
    store16<kGlobal>(dst, make_uint4(w[0], w[1], w[2], w[3]));
    store16<kGlobal>(dst + 4, make_uint4(w[4], w[5], w[6], w[7]));
  } else {
    store16<kGlobal>(dst, make_uint4(pack_pair<S>(v[0], v[1]), pack_pair<S>(v[2], v[3]), pack_pair<S>(v[4], v[5]),
                                     pack_pair<S>(v[6], v[7])));
  }
}

// kW (1, 2, 4 or 8) consecutive values into global memory aligned to their
// size, in the storage type S, as one evict-first store (two for eight floats).
template <int kW, typename S>
__device__ __forceinline__ void store_run(S* dst, const float (&v)[kW]) {
  static_assert(kW == 1 || kW == 2 || kW == 4 || kW == 8, "a run of 1, 2, 4 or 8");
  if constexpr (kW == 8) {
    store_eight<true>(dst, v, false);
  } else if constexpr (std::is_same_v<S, float>) {
    if constexpr (kW == 4) {
      __stcs(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
    } else if constexpr (kW == 2) {
      __stcs(reinterpret_cast<float2*>(dst), make_float2(v[0], v[1]));
    } else {
      __stcs(dst, v[0]);
    }
  } else if constexpr (kW == 4) {
    __stcs(reinterpret_cast<uint2*>(dst), make_uint2(pack_pair<S>(v[0], v[1]), pack_pair<S>(v[2], v[3])));
  } else if constexpr (kW == 2) {
    __stcs(reinterpret_cast<unsigned*>(dst), pack_pair<S>(v[0], v[1]));
  } else {
    *dst = static_cast<S>(v[0]);
  }
}

// Eight consecutive floats out of 16-byte aligned shared memory.
__device__ __forceinline__ void load_eight(float (&v)[8], const float* src) {
  const float4 lo = reinterpret_cast<const float4*>(src)[0], hi = reinterpret_cast<const float4*>(src)[1];
  v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}

// 16 bytes global -> shared without a register round trip; both addresses
// 16-byte aligned. The copies a thread issued land at cp_async_wait.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most `Pending` of this thread's committed groups are in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}

struct TcPlan {
  int ph, pw, m_pad;      // patch rows and columns; patch positions rounded up to 16
  int rin_pad, rout_pad;  // ranks rounded up to 16
  int kc;                 // input channels per staged chunk
  int kc_shift;           // log2(kc / elements per 16-byte copy)
  int x_buffers;          // step 1's staging buffers: 2 overlaps the next chunk's copy with this one's math
  int pad;                // elements added to every leading dimension (32 bytes: aligned rows, fewer bank conflicts)
  int taps_chunk;         // core taps staged at once
  bool resident;          // first, core and last stay in shared memory; persistent blocks (fused_conv_tc_kernel)
  int last_buffers;       // step 3's staging buffers for chunks of `last` (streaming): 2 where they fit in `stage`
  int out_run;            // step 3's pixels per lane and store: 8 (W_out a multiple of 8, output 16-byte
                          // aligned), 4, 2 or 1 (TUCKER_OPS_CUDA_TC_NARROW_RUNS), 0 (the element loop)
  int64_t tiles_w, tiles_per_image;
  int64_t co_splits, co_per_split;
  int64_t off_stage, off_scratch;  // byte offsets in shared memory
  size_t smem_bytes;
  // The packed workspace, in elements: input (N, hp, wp, c_pad), first
  // (rin_pad, c_pad), core (taps, rout_pad, rin_pad), last (co_rows, rout_pad).
  int64_t hp, wp, c_pad, co_rows;
  int64_t x_elems, first_elems, core_elems, last_elems;
};

// Packed vector v of the workspace `ws` (layout in TcPlan): 16 bytes, with
// zeros wherever the fused kernel must read zeros (the convolution's padding,
// the tiles' overhang past the image, channels and ranks past the real ones).
// For NCHW input, consecutive v are consecutive pixels, so the reads coalesce
// (the writes do not: pack_tc_operands_tiled_kernel transposes through
// shared memory instead).
template <typename T>
__device__ __forceinline__ void pack_vector(const Conv2dSizes& s, const TcPlan& plan, int64_t v, const T* x,
                                            bool nhwc, const T* first, const T* core, const T* last, T* ws) {
  constexpr int V = kCopyBytes / sizeof(T);
  const int64_t x_vecs = plan.x_elems / V, first_vecs = plan.first_elems / V;
  const int64_t core_vecs = plan.core_elems / V;
  const T zero = static_cast<T>(0.0f);
  alignas(16) T vals[V];
  int64_t dst = v * V;  // the four regions are contiguous and multiples of V
  if (v < x_vecs) {
    const int64_t groups = plan.c_pad / V;
    int64_t n, g, hh, ww;
    if (nhwc) {
      g = v % groups;
      int64_t rest = v / groups;
      ww = rest % plan.wp;
      rest /= plan.wp;
      hh = rest % plan.hp;
      n = rest / plan.hp;
    } else {
      ww = v % plan.wp;
      int64_t rest = v / plan.wp;
      hh = rest % plan.hp;
      rest /= plan.hp;
      g = rest % groups;
      n = rest / groups;
    }
    const int64_t ih = hh - s.pad_h, iw = ww - s.pad_w;
    const bool inside = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const int64_t c = g * V + u;
      vals[u] = inside && c < s.C_in
                    ? x[nhwc ? ((n * s.H + ih) * s.W + iw) * s.C_in + c : ((n * s.C_in + c) * s.H + ih) * s.W + iw]
                    : zero;
    }
    dst = ((n * plan.hp + hh) * plan.wp + ww) * plan.c_pad + g * V;
  } else if (v < x_vecs + first_vecs) {
    const int64_t e = (v - x_vecs) * V, r = e / plan.c_pad, c0 = e % plan.c_pad;
#pragma unroll
    for (int u = 0; u < V; ++u) vals[u] = r < s.R_in && c0 + u < s.C_in ? first[r * s.C_in + c0 + u] : zero;
  } else if (v < x_vecs + first_vecs + core_vecs) {
    const int64_t taps = s.kh * s.kw;
    const int64_t e = (v - x_vecs - first_vecs) * V, r0 = e % plan.rin_pad;
    const int64_t ro = (e / plan.rin_pad) % plan.rout_pad, t = e / (plan.rin_pad * plan.rout_pad);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      vals[u] = ro < s.R_out && r0 + u < s.R_in ? core[(ro * s.R_in + r0 + u) * taps + t] : zero;
    }
  } else {
    const int64_t e = (v - x_vecs - first_vecs - core_vecs) * V, co = e / plan.rout_pad, ro0 = e % plan.rout_pad;
#pragma unroll
    for (int u = 0; u < V; ++u) vals[u] = co < s.C_out && ro0 + u < s.R_out ? last[co * s.R_out + ro0 + u] : zero;
  }
#pragma unroll
  for (int u = 0; u < V; ++u) vals[u] = tc_operand(vals[u]);
  *reinterpret_cast<uint4*>(ws + dst) = *reinterpret_cast<const uint4*>(vals);
}

// Packs every operand, one 16-byte vector per thread and step.
template <typename T>
__global__ void __launch_bounds__(256) pack_tc_operands_kernel(
    Conv2dSizes s, TcPlan plan, const T* __restrict__ x, bool nhwc, const T* __restrict__ first,
    const T* __restrict__ core, const T* __restrict__ last, T* __restrict__ ws) {
  constexpr int V = kCopyBytes / sizeof(T);
  const int64_t total = (plan.x_elems + plan.first_elems + plan.core_elems + plan.last_elems) / V;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    pack_vector(s, plan, v, x, nhwc, first, core, last, ws);
  }
}

// The tiled packing of NCHW input: one block per (image, packed row, 32
// packed columns, 64 channels) tile, 256 threads.
constexpr int kPackTilePixels = 32, kPackTileChannels = 64, kPackThreads = 256;

inline int64_t pack_input_tiles(const Conv2dSizes& s, const TcPlan& plan) {
  return s.N * plan.hp * ceil_div(plan.wp, kPackTilePixels) * ceil_div(plan.c_pad, kPackTileChannels);
}

// Packs NCHW input as pack_tc_operands_kernel does, but with both sides
// coalesced: a tile is read channel row by channel row (a warp takes 32
// consecutive pixels of one channel) into shared memory, then written pixel by
// pixel (consecutive threads write consecutive 16-byte vectors of a pixel's
// channels), where the per-vector kernel wrote 16 bytes per pixel at a stride
// of c_pad elements. Index arithmetic in 64 bits once per tile, not per
// vector. Blocks past the input's tiles pack the factors.
template <typename T>
__global__ void __launch_bounds__(kPackThreads) pack_tc_operands_tiled_kernel(
    Conv2dSizes s, TcPlan plan, const T* __restrict__ x, const T* __restrict__ first, const T* __restrict__ core,
    const T* __restrict__ last, T* __restrict__ ws, int64_t input_tiles) {
  constexpr int V = kCopyBytes / sizeof(T);
  const int tid = threadIdx.x;
  if (static_cast<int64_t>(blockIdx.x) >= input_tiles) {
    const int64_t x_vecs = plan.x_elems / V;
    const int64_t factor_vecs = (plan.first_elems + plan.core_elems + plan.last_elems) / V;
    const int64_t stride = (static_cast<int64_t>(gridDim.x) - input_tiles) * kPackThreads;
    for (int64_t v = (static_cast<int64_t>(blockIdx.x) - input_tiles) * kPackThreads + tid; v < factor_vecs;
         v += stride) {
      pack_vector(s, plan, x_vecs + v, x, false, first, core, last, ws);
    }
    return;
  }
  // +1: phase 2 reads a column of the tile (one channel per element of a vector)
  __shared__ T tile[kPackTileChannels][kPackTilePixels + 1];
  const int64_t channel_tiles = ceil_div(plan.c_pad, kPackTileChannels);
  const int64_t column_tiles = ceil_div(plan.wp, kPackTilePixels);
  int64_t rest = blockIdx.x;
  const int64_t c0 = (rest % channel_tiles) * kPackTileChannels;
  rest /= channel_tiles;
  const int64_t ww0 = (rest % column_tiles) * kPackTilePixels;
  rest /= column_tiles;
  const int64_t hh = rest % plan.hp, n = rest / plan.hp;
  const int64_t ih = hh - s.pad_h;
  const T zero = static_cast<T>(0.0f);

  // Phase 1: warp w reads channels c0 + w, c0 + w + 8, ...; lane p pixel ww0 + p.
  const int p = tid % kPackTilePixels;
  const int64_t iw = ww0 + p - s.pad_w;
  const bool inside = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
  const T* row = inside ? x + (n * s.C_in * s.H + ih) * s.W + iw : x;  // the pixel in channel 0
  constexpr int kWarpsPerTile = kPackThreads / kPackTilePixels;
  const int64_t plane = s.H * s.W;
  T loaded[kPackTileChannels / kWarpsPerTile];  // every load issued before the first store
#pragma unroll
  for (int i = 0; i < kPackTileChannels / kWarpsPerTile; ++i) {
    const int64_t channel = c0 + tid / kPackTilePixels + i * kWarpsPerTile;
    loaded[i] = inside && channel < s.C_in ? row[channel * plane] : zero;
  }
#pragma unroll
  for (int i = 0; i < kPackTileChannels / kWarpsPerTile; ++i) tile[tid / kPackTilePixels + i * kWarpsPerTile][p] = loaded[i];
  __syncthreads();

  // Phase 2: the tile's pixels, each as (channels in the tile) / V vectors.
  const int channels = plan.c_pad - c0 < kPackTileChannels ? static_cast<int>(plan.c_pad - c0) : kPackTileChannels;
  const int per_pixel = channels / V;
  T* dst = ws + ((n * plan.hp + hh) * plan.wp + ww0) * plan.c_pad + c0;
  for (int e = tid; e < kPackTilePixels * per_pixel; e += kPackThreads) {
    const int q = e % per_pixel, pixel = e / per_pixel;
    if (ww0 + pixel >= plan.wp) break;  // e only grows
    alignas(16) T vals[V];
#pragma unroll
    for (int u = 0; u < V; ++u) vals[u] = tc_operand(tile[q * V + u][pixel]);
    *reinterpret_cast<uint4*>(dst + pixel * plan.c_pad + q * V) = *reinterpret_cast<const uint4*>(vals);
  }
}

// Step 3's output for one 16-pixel row of a tile and 16 channels, from
// `scratch` (column-major: scratch[channel * 16 + pixel]) plus bias: kW
// pixels of one channel per lane and store (kW = 8: lane l writes pixels
// 8 (l % 2).. of channel l / 2 as one 16-byte vector), 16 / kW lanes per
// channel row, consecutive lanes on consecutive pixels. W_out is a multiple of
// kW and the tile starts at a multiple of 16, so a lane's kW pixels are all in
// the image or all past it, and their address is aligned to their size.
template <int kW, typename T>
__device__ __forceinline__ void write_output_runs(const float* scratch, int lane, T* yn, const T* bias, int64_t co0,
                                                  int64_t co_end, int64_t oh, int64_t ow0, const Conv2dSizes& s,
                                                  int64_t HWo) {
  constexpr int kLanesPerRow = 16 / kW, kRowsPerStep = 32 / kLanesPerRow;
  const int px = (lane % kLanesPerRow) * kW;
  const int64_t ow = ow0 + px;
  if (oh >= s.H_out || ow >= s.W_out) return;
#pragma unroll
  for (int step = 0; step < 16 / kRowsPerStep; ++step) {
    const int c = step * kRowsPerStep + lane / kLanesPerRow;
    const int64_t co = co0 + c;
    if (co < co_end) {
      const float b = bias ? static_cast<float>(bias[co]) : 0.0f;
      float v[kW];
      if constexpr (kW == 8) {
        load_eight(v, scratch + c * 16 + px);
      } else {
#pragma unroll
        for (int i = 0; i < kW; ++i) v[i] = scratch[c * 16 + px + i];
      }
#pragma unroll
      for (int i = 0; i < kW; ++i) v[i] += b;
      store_run<kW>(yn + co * HWo + oh * s.W_out + ow, v);
    }
  }
}

// One block per work item (streaming) or persistent blocks over all items
// (kResident). A work item is one (image, output tile, slice of C_out).
// Streaming: `stage` holds, in turn, step 1's buffers (an input chunk and the
// matching columns of `first`), core taps, and slices of `last`, each copied
// when needed: three or more global round trips per item, each behind a
// barrier. Resident (TcPlan::resident, where everything fits): the block
// copies first, the core and last into shared memory once, `stage` holds
// step 1's input buffers only, and the next item's first input chunk is
// copied while this item's steps 2-3 run, so an item waits on no global load
// of its own once the pipeline is full.
template <typename T, bool kResident>
__global__ void __launch_bounds__(kThreads, 2) fused_conv_tc_kernel(
    Conv2dSizes s, TcPlan plan, const T* __restrict__ ws, const T* __restrict__ bias, T* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using S = typename Tc<T>::S;
  constexpr int K = Tc<T>::K;
  constexpr int V = kCopyBytes / sizeof(S);
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, K, typename Tc<T>::Frag, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, K, typename Tc<T>::Frag, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, K, float>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  S* pj = reinterpret_cast<S*>(smem_raw);  // (m_pad, rin_pad); after step 2, z: (kPixels, rout_pad)
  S* stage = reinterpret_cast<S*>(smem_raw + plan.off_stage);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float* scratch = reinterpret_cast<float*>(smem_raw + plan.off_scratch) + warp * kScratchFloats;

  const int pw = plan.pw, patch = plan.ph * plan.pw, m_pad = plan.m_pad;
  const int rin_pad = plan.rin_pad, rout_pad = plan.rout_pad, kc = plan.kc;
  // Leading dimensions: the staged input, pj / z, the core and `last` slices,
  // and the resident `first` (all of C_in).
  const int ld_x = kc + plan.pad, ld_p = rin_pad + plan.pad, ld_z = rout_pad + plan.pad;
  const int ld_f = kResident ? static_cast<int>(plan.c_pad) + plan.pad : ld_x;
  const int sh = static_cast<int>(s.stride_h), sw = static_cast<int>(s.stride_w);
  const int dh = static_cast<int>(s.dil_h), dw = static_cast<int>(s.dil_w), kw = static_cast<int>(s.kw);
  const int taps = static_cast<int>(s.kh * s.kw);
  const S* fg = reinterpret_cast<const S*>(ws) + plan.x_elems;
  const S* cg = fg + plan.first_elems;
  const S* lg = cg + plan.core_elems;
  // One step-1 buffer: the input chunk (m_pad, ld_x), then (streaming) first's
  // matching columns (rin_pad, ld_x). Resident: first (rin_pad, ld_f), the core
  // (taps, rout_pad, ld_p) and last (co_rows, ld_z) follow the buffers.
  const int buf_elems = (kResident ? m_pad : m_pad + rin_pad) * ld_x;
  S* first_s = stage + plan.x_buffers * buf_elems;
  S* core_s = first_s + rin_pad * ld_f;
  S* last_s = core_s + taps * rout_pad * ld_p;

  const int64_t tiles = s.N * plan.tiles_per_image;
  const int64_t items = kResident ? tiles * plan.co_splits : 1;
  const int64_t first_item = kResident ? static_cast<int64_t>(blockIdx.x) : 0;
  const int64_t item_stride = kResident ? static_cast<int64_t>(gridDim.x) : 1;
  // The item's tile and C_out slice; streaming blocks take theirs from the grid.
  auto tile_of = [&](int64_t item) { return kResident ? item / plan.co_splits : static_cast<int64_t>(blockIdx.x); };
  auto split_of = [&](int64_t item) { return kResident ? item % plan.co_splits : static_cast<int64_t>(blockIdx.y); };
  // The packed operands (pack_tc_operands_kernel); a tile's patch starts at
  // packed row oh0 * sh, column ow0 * sw (the padding is in the packing).
  auto patch_of = [&](int64_t t) {
    const int64_t n = t / plan.tiles_per_image, tile = t % plan.tiles_per_image;
    const int64_t oh0 = (tile / plan.tiles_w) * kRowsOut, ow0 = (tile % plan.tiles_w) * kColsOut;
    return reinterpret_cast<const S*>(ws) + ((n * plan.hp + oh0 * sh) * plan.wp + ow0 * sw) * plan.c_pad;
  };

  // A warp's accumulator tile, through its scratch tile, into shared memory in
  // the storage type: dst row r, column c at dst[r * ld + c]. Lane l moves
  // columns 8 (l % 2).. of row l / 2: vector loads and stores (dst and ld are
  // 16-byte multiples: pj / z columns of 16, leading dimensions padded by 32 bytes).
  auto spill = [&](const FragC& acc, S* dst, int ld) {
    store_shared_accumulator<false>(scratch, acc, 16);
    __syncwarp();
    float v[8];
    load_eight(v, scratch + (lane / 2) * 16 + (lane % 2) * 8);
    store_eight<false>(dst + (lane / 2) * ld + (lane % 2) * 8, v, true);
    __syncwarp();
  };
  // Copies `rows` rows of `row_elems` elements (a multiple of V) from global
  // src (row stride src_ld) into shared dst (row stride dst_ld).
  auto copy_rows = [&](S* dst, int dst_ld, const S* src, int64_t src_ld, int rows, int row_elems) {
    const int per_row = row_elems / V;
    for (int v = tid; v < rows * per_row; v += kThreads) {
      const int r = v / per_row, u = v - r * per_row;
      cp_async16(dst + r * dst_ld + u * V, src + r * src_ld + u * V);
    }
  };
  const int per_pos = 1 << plan.kc_shift;  // 16-byte copies per patch position and chunk
  // Queues the copies of input channels c0.. of the patch at xg (streaming:
  // and of first's matching columns) into buffer b, as one group.
  auto stage_chunk = [&](const S* xg, int64_t c0, int b) {
    S* xs = stage + b * buf_elems;
    for (int v = tid; v < patch * per_pos; v += kThreads) {
      const int q = v >> plan.kc_shift, u = v & (per_pos - 1), r = q / pw, j = q - r * pw;
      cp_async16(xs + q * ld_x + u * V, xg + static_cast<int64_t>(r * plan.wp + j) * plan.c_pad + c0 + u * V);
    }
    if constexpr (!kResident) copy_rows(xs + m_pad * ld_x, ld_x, fg + c0, plan.c_pad, rin_pad, kc);
    cp_async_commit();
  };

  // The patch rows past its positions are never copied: zero them once.
  for (int b = 0; b < plan.x_buffers; ++b) {
    S* xs = stage + b * buf_elems;
    for (int e = tid; e < (m_pad - patch) * kc; e += kThreads) xs[(patch + e / kc) * ld_x + e % kc] = static_cast<S>(0.0f);
  }
  if (first_item < items) {
    if constexpr (kResident) {
      copy_rows(first_s, ld_f, fg, plan.c_pad, rin_pad, static_cast<int>(plan.c_pad));
      copy_rows(core_s, ld_p, cg, rin_pad, taps * rout_pad, rin_pad);
      copy_rows(last_s, ld_z, lg, rout_pad, static_cast<int>(plan.co_rows), rout_pad);
    }
    stage_chunk(patch_of(tile_of(first_item)), 0, 0);  // one group with the weights
  }

  const int chunks = static_cast<int>(plan.c_pad / kc);
  const int n_tiles = rin_pad / 16, tiles1 = (m_pad / 16) * n_tiles;
  const int groups = (tiles1 + kWarps * kMaxFragsPerWarp - 1) / (kWarps * kMaxFragsPerWarp);
  const int o_tiles = rout_pad / 16, z_tiles = kRowsOut * o_tiles;
  const int64_t HWo = s.H_out * s.W_out;
  int buf = 0;  // the buffer of the chunk the pipeline consumes next
  for (int64_t item = first_item; item < items; item += item_stride) {
    const int64_t t = tile_of(item), n = t / plan.tiles_per_image, tile = t % plan.tiles_per_image;
    const int64_t oh0 = (tile / plan.tiles_w) * kRowsOut, ow0 = (tile % plan.tiles_w) * kColsOut;
    const S* xg = patch_of(t);
    const S* next_xg = kResident && item + item_stride < items ? patch_of(tile_of(item + item_stride)) : nullptr;

    // 1. pj = patch * first^T, C_in in chunks, in groups of at most
    // kWarps x kMaxFragsPerWarp accumulator tiles. The chunks form one stream
    // (group by group, then the next item's first chunk), each copied while
    // the one before it is multiplied (two buffers, where they fit). Rows past
    // the patch and ranks past R_in are zero.
    for (int g = 0; g < groups; ++g) {
      FragC acc[kMaxFragsPerWarp];
#pragma unroll
      for (int f = 0; f < kMaxFragsPerWarp; ++f) wmma::fill_fragment(acc[f], 0.0f);
      for (int ch = 0; ch < chunks; ++ch) {
        const int q = g * chunks + ch;
        const S* nx = q + 1 < groups * chunks ? xg : next_xg;
        const int64_t nc0 = q + 1 < groups * chunks ? static_cast<int64_t>((q + 1) % chunks) * kc : 0;
        if (plan.x_buffers == 2 && nx != nullptr) {
          stage_chunk(nx, nc0, buf ^ 1);
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();
        const S* xs = stage + buf * buf_elems;
        const S* fs = kResident ? first_s + static_cast<int64_t>(ch) * kc : xs + m_pad * ld_x;
        const int ld_b = kResident ? ld_f : ld_x;
#pragma unroll
        for (int f = 0; f < kMaxFragsPerWarp; ++f) {
          const int tt = g * kWarps * kMaxFragsPerWarp + warp + f * kWarps;
          if (tt < tiles1) {
            const int mt = tt / n_tiles, nt = tt % n_tiles;
            for (int k0 = 0; k0 < kc; k0 += K) {
              FragA a;
              FragB bf;
              load_operand<T>(a, xs + mt * 16 * ld_x + k0, ld_x);
              load_operand<T>(bf, fs + nt * 16 * ld_b + k0, ld_b);
              wmma::mma_sync(acc[f], a, bf, acc[f]);
            }
          }
        }
        __syncthreads();  // buffer `buf` is refilled next (one buffer) or two chunks on
        if (nx != nullptr) {
          if (plan.x_buffers == 2) {
            buf ^= 1;
          } else {
            stage_chunk(nx, nc0, 0);
          }
        }
      }
#pragma unroll
      for (int f = 0; f < kMaxFragsPerWarp; ++f) {
        const int tt = g * kWarps * kMaxFragsPerWarp + warp + f * kWarps;
        if (tt < tiles1) spill(acc[f], pj + (tt / n_tiles) * 16 * ld_p + (tt % n_tiles) * 16, ld_p);
      }
    }
    __syncthreads();

    // 2. z = sum over taps of pj (the 16 pixels of output row y at tap (i, j) are
    // patch positions (y*sh + i*dh) * pw + j*dw + px*sw) times core_t^T. With
    // R_out <= 16 there are 4 tiles for 8 warps: warps w and w + 4 then share
    // tile w, taking alternate taps, and w adds w + 4's sums (tap_parts 2).
    FragC zacc[kMaxFragsPerWarp];
#pragma unroll
    for (int f = 0; f < kMaxFragsPerWarp; ++f) wmma::fill_fragment(zacc[f], 0.0f);
    const int tap_parts = 2 * z_tiles <= kWarps ? 2 : 1, tap_part = tap_parts == 2 ? warp / z_tiles : 0;
    const int taps_chunk = kResident ? taps : plan.taps_chunk;
    for (int t0 = 0; t0 < taps; t0 += taps_chunk) {
      const int tn = t0 + taps_chunk < taps ? taps_chunk : taps - t0;
      S* cs = kResident ? core_s : stage;  // (taps, rout_pad, ld_p): per tap a column-major B
      if constexpr (!kResident) {
        copy_rows(cs, ld_p, cg + static_cast<int64_t>(t0) * rout_pad * rin_pad, rin_pad, tn * rout_pad, rin_pad);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
      }
#pragma unroll
      for (int f = 0; f < kMaxFragsPerWarp; ++f) {
        const int zt = tap_parts == 2 ? (f == 0 ? warp % z_tiles : z_tiles) : warp + f * kWarps;
        if (zt < z_tiles) {
          const int y = zt / o_tiles, ot = zt % o_tiles;
          // Tap (i, j) walked with counters: at ranks of 16 (one product per
          // tap) a division and remainder per tap were about half the loop.
          int i = (t0 + tap_part) / kw, j = t0 + tap_part - i * kw;
          for (int tl = tap_part; tl < tn; tl += tap_parts) {
            const S* a_rows = pj + ((y * sh + i * dh) * pw + j * dw) * ld_p;
            const S* b_cols = cs + (tl * rout_pad + ot * 16) * ld_p;
            for (int k0 = 0; k0 < rin_pad; k0 += K) {
              FragA a;
              FragB b;
              load_operand<T>(a, a_rows + k0, sw * ld_p);
              load_operand<T>(b, b_cols + k0, ld_p);
              wmma::mma_sync(zacc[f], a, b, zacc[f]);
            }
            for (j += tap_parts; j >= kw; j -= kw) ++i;
          }
        }
      }
      __syncthreads();  // cs is restaged next; after the last chunk, pj becomes z
    }
    if (tap_parts == 2) {
      // Same fragment type, so lane l of both warps holds the same elements:
      // they pass register by register through the second warp's scratch.
      constexpr int kFragFloats = sizeof(zacc[0].x) / sizeof(float);
      static_assert(kFragFloats * 32 <= kScratchFloats, "a fragment fits a scratch tile");
      if (tap_part == 1) {
#pragma unroll
        for (int e = 0; e < kFragFloats; ++e) scratch[e * 32 + lane] = zacc[0].x[e];
      }
      __syncthreads();
      if (tap_part == 0) {
        const float* other = scratch + z_tiles * kScratchFloats;  // warp + z_tiles's tile
#pragma unroll
        for (int e = 0; e < kFragFloats; ++e) zacc[0].x[e] += other[e * 32 + lane];
      }
    }
    S* zs = pj;  // (kPixels, ld_z), row-major A
#pragma unroll
    for (int f = 0; f < kMaxFragsPerWarp; ++f) {
      const int zt = warp + f * kWarps;
      if (zt < z_tiles) spill(zacc[f], zs + (zt / o_tiles) * 16 * ld_z + (zt % o_tiles) * 16, ld_z);
    }
    __syncthreads();

    // 3. out = z * last^T + bias for this item's slice of C_out, kCoChunk
    // output channels at a time. `last` is packed with kCoChunk zero rows past
    // C_out, so every chunk reads whole. Streaming: each chunk of `last` is
    // copied while the one before it is multiplied, where two fit in `stage`.
    T* yn = out + n * s.C_out * HWo;
    const int64_t co_begin = split_of(item) * plan.co_per_split;
    const int64_t co_end = co_begin + plan.co_per_split < s.C_out ? co_begin + plan.co_per_split : s.C_out;
    const int slice_elems = kCoChunk * ld_z;
    auto stage_slice = [&](int64_t cb, int b) {
      copy_rows(stage + b * slice_elems, ld_z, lg + cb * rout_pad, rout_pad, kCoChunk, rout_pad);
      cp_async_commit();
    };
    if constexpr (!kResident) stage_slice(co_begin, 0);
    for (int64_t cb = co_begin, si = 0; cb < co_end; cb += kCoChunk, ++si) {
      const bool more = cb + kCoChunk < co_end;
      const int lb = plan.last_buffers == 2 ? static_cast<int>(si & 1) : 0;
      // (kCoChunk, ld_z): last's rows, a column-major B
      const S* ls = kResident ? last_s + cb * ld_z : stage + lb * slice_elems;
      if constexpr (!kResident) {
        if (plan.last_buffers == 2 && more) {
          stage_slice(cb + kCoChunk, lb ^ 1);
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();
      }
      // 16 tiles (4 output rows x 4 groups of 16 channels), two per warp.
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        const int yt = warp + f * kWarps, y = yt / 4, ct = yt % 4;
        FragC acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int k0 = 0; k0 < rout_pad; k0 += K) {
          FragA a;
          FragB b;
          load_operand<T>(a, zs + y * 16 * ld_z + k0, ld_z);
          load_operand<T>(b, ls + ct * 16 * ld_z + k0, ld_z);
          wmma::mma_sync(acc, a, b, acc);
        }
        const int64_t oh = oh0 + y;
        if (plan.out_run > 0) {
          store_shared_accumulator<true>(scratch, acc, 16);  // scratch[channel * 16 + pixel]
          __syncwarp();
          const int64_t co0 = cb + ct * 16;
          if (plan.out_run == 8) {
            write_output_runs<8>(scratch, lane, yn, bias, co0, co_end, oh, ow0, s, HWo);
          } else if (plan.out_run == 4) {
            write_output_runs<4>(scratch, lane, yn, bias, co0, co_end, oh, ow0, s, HWo);
          } else if (plan.out_run == 2) {
            write_output_runs<2>(scratch, lane, yn, bias, co0, co_end, oh, ow0, s, HWo);
          } else {
            write_output_runs<1>(scratch, lane, yn, bias, co0, co_end, oh, ow0, s, HWo);
          }
        } else {
          store_shared_accumulator<false>(scratch, acc, 16);
          __syncwarp();
          // Lanes take consecutive pixels of one channel: contiguous stores.
          for (int e = lane; e < 256; e += 32) {
            const int px = e % 16, c = e / 16;
            const int64_t co = cb + ct * 16 + c, ow = ow0 + px;
            if (co < co_end && oh < s.H_out && ow < s.W_out) {
              const float b = bias ? static_cast<float>(bias[co]) : 0.0f;
              yn[co * HWo + oh * s.W_out + ow] = static_cast<T>(scratch[px * 16 + c] + b);
            }
          }
        }
        __syncwarp();
      }
      // Streaming: this chunk's buffer is refilled next (one buffer) or two
      // chunks on. Resident: z is overwritten by the next item's step 1 only
      // after that item's first barrier.
      if constexpr (!kResident) {
        __syncthreads();
        if (plan.last_buffers == 1 && more) stage_slice(cb + kCoChunk, 0);
      }
    }
  }
  cp_async_wait<0>();  // nothing left in flight at exit
#endif
}

// Trial switches, "1" to turn on: variants compiled here but not yet timed on
// a GPU, each the default once it is faster there (the GPU tests compare each
// with the default bit for bit).
// TUCKER_OPS_CUDA_TC_TILED_PACK: NCHW input packed by
// pack_tc_operands_tiled_kernel instead of the per-vector kernel.
bool tc_tiled_pack() { return switch_from_env("TUCKER_OPS_CUDA_TC_TILED_PACK") == FusedMode::kAlways; }
// TUCKER_OPS_CUDA_TC_NARROW_RUNS: where W_out is not a multiple of 8, step 3
// stores 4, 2 or 1 pixels per lane (write_output_runs) instead of the element
// loop.
bool tc_narrow_runs() { return switch_from_env("TUCKER_OPS_CUDA_TC_NARROW_RUNS") == FusedMode::kAlways; }

// The launch plan, or false when the shape does not fit the kernel. With
// `resident`, the resident variant wherever its shared memory fits.
bool make_tc_plan(const Conv2dSizes& s, int64_t elem_bytes, bool resident, TcPlan* plan) {
  if (!s.has_first || !s.has_last || s.R_in > kMaxRank || s.R_out > kMaxRank) return false;
  const int64_t ph = (kRowsOut - 1) * s.stride_h + (s.kh - 1) * s.dil_h + 1;
  const int64_t pw = (kColsOut - 1) * s.stride_w + (s.kw - 1) * s.dil_w + 1;
  const int64_t m_pad = round_up(ph * pw, 16), rin_pad = round_up(s.R_in, 16), rout_pad = round_up(s.R_out, 16);
  const int64_t pad = 32 / elem_bytes, ld_p = rin_pad + pad, ld_z = rout_pad + pad;
  const int64_t pj = round_up(std::max(m_pad * ld_p, kPixels * ld_z) * elem_bytes, 128);
  const int64_t scratch = kWarps * kScratchFloats * 4;
  const int64_t avail = kTcSharedMemBudget - pj - scratch;
  if (avail <= 0) return false;
  // The widest C_in chunk that double-buffers, else the widest that fits once.
  auto stage1_bytes = [&](int64_t c) { return (m_pad + rin_pad) * (c + pad) * elem_bytes; };
  int64_t kc = 0, buffers = 0;
  for (const int64_t b : {2, 1}) {
    for (const int64_t c : {64, 32, 16}) {
      if (kc == 0 && b * stage1_bytes(c) <= avail && (b == 1 || c >= 32)) {
        kc = c;
        buffers = b;
      }
    }
  }
  const int64_t per_tap = rout_pad * ld_p * elem_bytes, taps = s.kh * s.kw;
  int64_t taps_chunk = std::min<int64_t>(taps, avail / per_tap);
  if (kc == 0 || taps_chunk < 1 || kCoChunk * ld_z * elem_bytes > avail) return false;
  int64_t stage = round_up(
      std::max({buffers * stage1_bytes(kc), taps_chunk * per_tap, kCoChunk * ld_z * elem_bytes}), 128);
  const int64_t co_rows = round_up(s.C_out, 16) + kCoChunk;
  // Resident: step 1's input buffers, then all of first (C_in padded to the
  // chunk), the core and last, within the same budget (two blocks per
  // multiprocessor). Its chunk is the narrowest that is at least as wide as
  // the streaming plan's or as C_in (no wider than C_in needs: that would copy
  // zeros), with as many buffers; where that does not fit, the streaming
  // kernel runs: narrower chunks or one buffer cost more rounds than resident
  // factors save (downsample_s2 in bfloat16 fitted only 16-channel chunks and
  // ran 3-12% slower than streaming: benchmarks/RESULTS_GPU.md, run 8).
  bool is_resident = false;
  if (resident) {
    const int64_t core_bytes = taps * per_tap, last_bytes = co_rows * ld_z * elem_bytes;
    const int64_t need = std::min(kc, round_up(s.C_in, 16));
    const int64_t c = need <= 16 ? 16 : need <= 32 ? 32 : 64;
    for (const int64_t b : {int64_t{2}, int64_t{1}}) {
      const int64_t bytes = b * m_pad * (c + pad) * elem_bytes + rin_pad * (round_up(s.C_in, c) + pad) * elem_bytes +
                            core_bytes + last_bytes;
      if (!is_resident && b >= buffers && bytes <= avail) {
        is_resident = true;
        kc = c;
        buffers = b;
        taps_chunk = taps;
        stage = round_up(bytes, 128);
      }
    }
  }

  const int64_t tiles_h = ceil_div(s.H_out, kRowsOut), tiles_w = ceil_div(s.W_out, kColsOut);
  const int64_t blocks = s.N * tiles_h * tiles_w;
  if (blocks >= (int64_t{1} << 31)) return false;
  // Few tiles: split C_out over blocks (each recomputes steps 1-2) until the
  // grid covers the multiprocessors once.
  const int64_t sms = cached_device_attribute<cudaDevAttrMultiProcessorCount>();
  int64_t co_splits = 1;
  if (blocks < sms) co_splits = std::clamp<int64_t>(ceil_div(sms, std::max<int64_t>(blocks, 1)), 1, ceil_div(s.C_out, kCoChunk));
  const int64_t co_per_split = round_up(ceil_div(s.C_out, co_splits), 16);

  const int64_t per_copy = kCopyBytes / elem_bytes;
  int kc_shift = 0;
  while ((int64_t{1} << kc_shift) * per_copy < kc) ++kc_shift;
  plan->ph = static_cast<int>(ph);
  plan->pw = static_cast<int>(pw);
  plan->m_pad = static_cast<int>(m_pad);
  plan->rin_pad = static_cast<int>(rin_pad);
  plan->rout_pad = static_cast<int>(rout_pad);
  plan->kc = static_cast<int>(kc);
  plan->kc_shift = kc_shift;
  plan->x_buffers = static_cast<int>(buffers);
  plan->pad = static_cast<int>(pad);
  plan->taps_chunk = static_cast<int>(taps_chunk);
  plan->resident = is_resident;
  plan->last_buffers = 2 * kCoChunk * ld_z * elem_bytes <= stage ? 2 : 1;
  // launch_tc also checks the output's alignment.
  plan->out_run = s.W_out % 8 == 0 ? 8 : !tc_narrow_runs() ? 0 : s.W_out % 4 == 0 ? 4 : s.W_out % 2 == 0 ? 2 : 1;
  plan->tiles_w = tiles_w;
  plan->tiles_per_image = tiles_h * tiles_w;
  plan->co_per_split = co_per_split;
  plan->co_splits = ceil_div(s.C_out, co_per_split);
  plan->off_stage = pj;
  plan->off_scratch = pj + stage;
  plan->smem_bytes = static_cast<size_t>(pj + stage + scratch);
  // The packed input covers every patch of every tile, overhang included.
  plan->hp = (tiles_h * kRowsOut - 1) * s.stride_h + (s.kh - 1) * s.dil_h + 1;
  plan->wp = (tiles_w * kColsOut - 1) * s.stride_w + (s.kw - 1) * s.dil_w + 1;
  plan->c_pad = round_up(s.C_in, kc);
  plan->co_rows = co_rows;
  plan->x_elems = s.N * plan->hp * plan->wp * plan->c_pad;
  plan->first_elems = rin_pad * plan->c_pad;
  plan->core_elems = taps * rout_pad * rin_pad;
  plan->last_elems = plan->co_rows * rout_pad;
  return true;
}

template <typename T>
void launch_tc(const at::Tensor& like, const Conv2dSizes& s, const TcPlan& plan, const ConvPointers& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t elems = plan.x_elems + plan.first_elems + plan.core_elems + plan.last_elems;
  // On the caching allocator and the current stream: graph-capture safe.
  const at::Tensor ws = at::empty({elems}, like.options());
  T* wsp = static_cast<T*>(ws.mutable_data_ptr());
  const int64_t per_vector = kCopyBytes / static_cast<int64_t>(sizeof(T));
  const int64_t sms = cached_device_attribute<cudaDevAttrMultiProcessorCount>();
  const T* x = static_cast<const T*>(p.x);
  const T *first = static_cast<const T*>(p.first), *core = static_cast<const T*>(p.core);
  const T* last = static_cast<const T*>(p.last);
  const int64_t input_tiles = p.nhwc || !tc_tiled_pack() ? 0 : pack_input_tiles(s, plan);
  const int64_t factor_vectors = (plan.first_elems + plan.core_elems + plan.last_elems) / per_vector;
  const int64_t factor_blocks = std::clamp<int64_t>(ceil_div(factor_vectors, kPackThreads), 1, sms * 4);
  if (input_tiles > 0 && input_tiles + factor_blocks <= std::numeric_limits<int32_t>::max()) {
    pack_tc_operands_tiled_kernel<T><<<static_cast<unsigned>(input_tiles + factor_blocks), kPackThreads, 0, stream>>>(
        s, plan, x, first, core, last, wsp, input_tiles);
  } else {
    const unsigned pack_blocks = static_cast<unsigned>(std::clamp<int64_t>(ceil_div(elems / per_vector, 256), 1, sms * 16));
    pack_tc_operands_kernel<T><<<pack_blocks, 256, 0, stream>>>(s, plan, x, p.nhwc, first, core, last, wsp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  TcPlan run = plan;
  // Runs narrow to what the output's alignment allows; the element loop takes
  // over from 8 (the default) and where the runs are off.
  while (run.out_run > 1 && reinterpret_cast<uintptr_t>(out) % (run.out_run * sizeof(T)) != 0) {
    run.out_run = run.out_run == 8 && !tc_narrow_runs() ? 0 : run.out_run / 2;
  }
  if (plan.resident) {
    // Two blocks per multiprocessor (the budget and __launch_bounds__), each
    // looping over items.
    const int64_t items = s.N * plan.tiles_per_image * plan.co_splits;
    allow_dynamic_shared_memory<fused_conv_tc_kernel<T, true>>(plan.smem_bytes);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(items, 2 * sms));
    fused_conv_tc_kernel<T, true><<<blocks, kThreads, plan.smem_bytes, stream>>>(s, run, wsp, bias, out);
  } else {
    allow_dynamic_shared_memory<fused_conv_tc_kernel<T, false>>(plan.smem_bytes);
    const dim3 grid(static_cast<unsigned>(s.N * plan.tiles_per_image), static_cast<unsigned>(plan.co_splits));
    fused_conv_tc_kernel<T, false><<<grid, kThreads, plan.smem_bytes, stream>>>(s, run, wsp, bias, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// TUCKER_OPS_CUDA_TC: "0" never runs the tensor-core kernel, "1" runs it on
// every call it applies to (tests compare it with the CUDA-core kernels on the
// same shapes), unset lets the op choose.
FusedMode tc_switch() { return switch_from_env("TUCKER_OPS_CUDA_TC"); }

// TUCKER_OPS_CUDA_TC_RESIDENT: "0" always runs the streaming variant; unset or
// "1" the resident one wherever it fits with the streaming plan's chunks
// (make_tc_plan). On runs 8-9's sweeps it ran from 3% slower to 25% faster
// than the streaming kernel on the shapes it now takes (benchmarks/RESULTS_GPU.md).
bool tc_resident() { return switch_from_env("TUCKER_OPS_CUDA_TC_RESIDENT") != FusedMode::kNever; }

// The dtype, the switch and the device allow the kernel (the shape aside):
// TF32 for float32 only where cuDNN may use it, as nn.Conv2d.
bool tc_enabled(c10::ScalarType dtype) {
  const bool tc_dtype = dtype == at::kHalf || dtype == at::kBFloat16 ||
                        (dtype == at::kFloat && at::globalContext().allowTF32CuDNN());
  return tc_dtype && tc_switch() != FusedMode::kNever && cached_device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 8;
}

}  // namespace

bool fused_conv_tc_forced() { return tc_switch() == FusedMode::kAlways; }

int64_t fused_conv_tc_settings() {
  return static_cast<int64_t>(tc_switch()) * 2 + (at::globalContext().allowTF32CuDNN() ? 1 : 0);
}

double fused_conv_tc_seconds(const Conv2dSizes& s, c10::ScalarType dtype, double multiprocessors) {
  TcPlan plan{};
  const int64_t elem_bytes = dtype == at::kFloat ? 4 : 2;
  // The streaming kernel's plan, which the model describes: where the resident
  // variant runs instead (tc_resident) it took from 3% more to 25% less time
  // (run 9's sweep), so there the model mostly errs on the chain's side.
  if (!tc_enabled(dtype) || !make_tc_plan(s, elem_bytes, false, &plan)) {
    return std::numeric_limits<double>::infinity();
  }
  // The packing pass: a launch, then its bytes read and written at a fraction
  // of the copy bandwidth. Per block of the fused kernel: a fixed cost per
  // staged chunk (step 1's double-buffered chunks count half), then its
  // multiply-adds at one block's rate, halved when two blocks share a
  // multiprocessor (TF32: a third of the rate). Fitted by least squares to the
  // streaming ("tensor cores") column of run 9's H200 sweep
  // (benchmarks/gpu_runs/2026-11-28_run9_sweep.json): within 0.79-1.24x of its
  // bfloat16 times, 0.67-1.19x of its float32 ones. benchmarks/fit_tc_model.py
  // restates this model and make_tc_plan's streaming counts to refit it: keep
  // them in step.
  constexpr double kPackSeconds = 3e-6, kPackBytesPerSecond = 1.5e12;
  constexpr double kRoundSeconds = 2.88e-6, kMacsPerSecondPerBlock = 528e9;
  const double rate = dtype == at::kFloat ? kMacsPerSecondPerBlock / 3 : kMacsPerSecondPerBlock;
  const double packed_bytes = static_cast<double>(plan.x_elems) * elem_bytes;
  const double input_bytes = static_cast<double>(s.N) * s.C_in * s.H * s.W * elem_bytes;
  const double pack = kPackSeconds + (packed_bytes + input_bytes) / kPackBytesPerSecond;
  const double groups = std::ceil(static_cast<double>(plan.m_pad / 16) * (plan.rin_pad / 16) / (kWarps * kMaxFragsPerWarp));
  const double chunks = static_cast<double>(plan.c_pad / plan.kc);
  const double rounds = groups * (plan.x_buffers == 2 ? 1 + chunks / 2 : chunks) +
                        std::ceil(static_cast<double>(s.kh * s.kw) / plan.taps_chunk) +
                        std::ceil(static_cast<double>(plan.co_per_split) / kCoChunk);
  const double macs = static_cast<double>(plan.m_pad) * plan.c_pad * plan.rin_pad +
                      static_cast<double>(kPixels) * plan.rout_pad * plan.rin_pad * s.kh * s.kw +
                      static_cast<double>(kPixels) * plan.co_per_split * plan.rout_pad;
  const double blocks = static_cast<double>(s.N) * plan.tiles_per_image * plan.co_splits;
  const double waves = std::ceil(blocks / (2 * multiprocessors));
  const double sharing = std::clamp(blocks / multiprocessors, 1.0, 2.0);
  return pack + waves * (rounds * kRoundSeconds + macs * sharing / rate);
}

bool fused_conv_forward_tc(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p) {
  TcPlan plan{};
  if (!tc_enabled(like.scalar_type()) ||
      !make_tc_plan(s, like.scalar_type() == at::kFloat ? 4 : 2, tc_resident(), &plan)) {
    return false;
  }
  if (s.N == 0) return true;
  AT_DISPATCH_SWITCH(like.scalar_type(), "tucker_conv2d_cuda_tc",
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch_tc<scalar_t>(like, s, plan, p); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { launch_tc<scalar_t>(like, s, plan, p); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { launch_tc<scalar_t>(like, s, plan, p); }));
  return true;
}

}  // namespace tucker_ops::cuda
