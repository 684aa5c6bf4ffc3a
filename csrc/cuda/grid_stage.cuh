// The stages of the whole-GPU fused kernels (linear_grid.cu, conv_grid.cu):
// one cooperative launch whose every block takes part in each stage, with a
// grid-wide barrier between stages. A stage is a product
//   dst(r, o) = sum_k src(r, k) w(o, k) (+ bias(o))
// over M rows and n outputs, spread over all the grid's warps; rank-sized
// rows pass between stages through global scratch (L2) in the call's dtype,
// rounded as a Sequential chain's layers round their outputs. Every sum is in
// the accumulation type.
//
// A task is kOuts output features x kRows rows. `wpt` warps of one block split
// its K range, and their partial sums are added in shared memory in a fixed
// order, so results are bitwise repeatable. Each lane reads 16 bytes of each
// of the task's weight rows per step (coalesced across the warp) and
// multiplies them with the same features of every row; its 32 sums are then
// reduced across the warp by recursive halving (31 shuffles), which leaves lane
// l with sum l.
//
// float16 / bfloat16 stages over more than 8 rows run on tensor cores instead
// (mma.sync m16n8k16, float accumulators), and so do float32 ones where torch's
// TF32 switch for the replaced layer allows it (m16n8k8 on TF32): a task is 16
// outputs x 32 rows, the weights the A operand and the rows the B operand.
// Both are read straight from global memory: lane (g, t) holds k = 8t..8t+7
// of weight rows g and g+8 and of source row g of each 8-row tile, and the mma
// steps per 32 k take those 8 elements in order (two steps of 4 in 16-bit,
// four of 2 in TF32). A and B agree on which k each fragment slot holds, which
// is all a dot product needs, so no shuffle or shared memory stages the
// operands. float32 operands are rounded to TF32 as they load. In 16-bit all of
// a step's loads are issued before its mmas (kLoadsAhead).
//
// Where a row's K values come from is the Source policy: DenseSource (row r at
// r * K: the linear's rows, NHWC pixels) or GatherSource (the implicit im2col
// of a convolution over NHWC pixels, K ordered (tap, channel)). Where the sums
// go is the Dest policy: ScratchDest (row-major, the call's dtype) or
// OutputDest (the call's dtype plus bias, rows grouped into images, any
// strides: row-major for the linear, NCHW or NHWC for the conv).
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>

#include <cooperative_groups.h>

#include "cuda/common.cuh"

namespace tucker_ops::cuda::grid {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kOuts = 4, kRows = 8;
static_assert(kOuts * kRows == 32, "the warp reduction leaves one sum per lane");
// Tensor-core tasks: 16 outputs x (kTcTiles x 8) rows, 32 k per step.
constexpr int kTcOuts = 16, kTcTiles = 4, kTcRows = 8 * kTcTiles, kTcK = 32;
constexpr int kTcMinRows = kRows + 1;  // at most 8 rows the CUDA-core tasks waste nothing
// Shared memory for the partial sums of a block's warps: one accumulator per
// thread (CUDA cores) or a tensor-core task's 4 x kTcTiles floats per thread.
constexpr int kReduceBytes = 4 * kTcTiles * kThreads * static_cast<int>(sizeof(float));

// The geometry a GatherSource reads: NHWC pixels of C channels, the
// convolution's output size, kernel width, strides, padding and dilation.
struct GatherGeometry {
  int64_t C, H, W, OH, OW;
  int kw, sh, sw, ph, pw, dh, dw;
};

struct GridStage {
  const void* w;    // (n, K) row-major, the call's dtype
  const void* src;  // DenseSource: (M, K) row-major; GatherSource: (images, H, W, C)
  void* dst;        // ScratchDest: (M, n) row-major; OutputDest: see out_*
  const void* bias;  // (n,) or null; OutputDest only
  int64_t M, n, K;
  int wpt;           // warps per task: 1, 2, 4 or 8
  bool gather;       // GatherSource (else DenseSource)
  bool dst_output;   // OutputDest (else ScratchDest)
  bool vec;          // 16-byte loads: K (gather: C) a multiple of the vector, w and src 16-byte aligned
  bool tc;           // tensor-core tasks (float16 / bfloat16; float32 through TF32)
  GatherGeometry geo;
  // OutputDest: row r is pixel r % out_pixels of image r / out_pixels, and
  // output o of it is at dst[image * s_image + pixel * s_pixel + o * s_out].
  int64_t out_pixels, s_image, s_pixel, s_out;
};

// Elements of the call's dtype in the 16 bytes a lane reads per step.
template <typename T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));

template <typename T>
constexpr bool kIs16Bit = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
// Tensor-core tasks exist for float16 / bfloat16 and, through TF32, float32.
template <typename T>
constexpr bool kHasTensorCores = kIs16Bit<T> || std::is_same_v<T, float>;

// Whether a step issues all its row loads before its first multiply-add (one
// L2 round trip per step) or loads each row or tile just before using it. On
// the H200 (runs 5-9) loading ahead made the 16-bit kernels 4-14% faster and
// the float32 ones 13-22% slower: float32 rows take twice the registers, and
// the kernel's spills grew from 260 to 980 bytes.
template <typename T>
constexpr bool kLoadsAhead = kIs16Bit<T>;

// One element through L2 only: written during this launch, so the
// non-coherent and L1 caches may hold it stale.
template <typename S>
__device__ __forceinline__ S load_through_l2(const S* p) {
  if constexpr (sizeof(S) == 2) {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    S v;
    memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    return __ldcg(p);
  }
}

// The 16 bytes of S elements at p, as raw bits; elements at or past `count`
// read as zero. With `vec`, p is 16-byte aligned and a full run is one load.
template <typename S, bool kThroughL2>
__device__ __forceinline__ uint4 load_raw16(const S* p, bool vec, int64_t count) {
  constexpr int N = static_cast<int>(16 / sizeof(S));
  if (vec && count >= N) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    return kThroughL2 ? __ldcg(q) : __ldg(q);
  }
  S e[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (i >= count) {
      e[i] = static_cast<S>(0.0f);
    } else if constexpr (kThroughL2) {
      e[i] = load_through_l2(p + i);
    } else {
      e[i] = p[i];
    }
  }
  uint4 raw;
  memcpy(&raw, e, sizeof(raw));
  return raw;
}

// v[i] = p[i] converted to F, for i < N (whole 16-byte runs), through
// load_raw16.
template <typename F, typename S, int N, bool kThroughL2>
__device__ __forceinline__ void load_run(const S* p, bool vec, int64_t count, F (&v)[N]) {
  constexpr int kPer = static_cast<int>(16 / sizeof(S));
  static_assert(N % kPer == 0, "whole 16-byte runs");
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    const uint4 bits = load_raw16<S, kThroughL2>(p + c * kPer, vec, count - c * kPer);
    S e[kPer];
    memcpy(e, &bits, sizeof(bits));
#pragma unroll
    for (int i = 0; i < kPer; ++i) v[c * kPer + i] = static_cast<F>(e[i]);
  }
}

// A lane's 8 consecutive k of one operand row, as the mma instructions take
// them: float16 / bfloat16 packed two per register (element 2i in the low half
// of register i), float32 one per register rounded to TF32.
template <typename T>
struct TcFrag {
  static constexpr int kRegs = kIs16Bit<T> ? 4 : 8;
  uint32_t r[kRegs];
};

// The 8 elements at p; zeros at or past `count`. In 16-bit the elements' own
// bits are the packing, little-endian.
template <typename T, typename S, bool kThroughL2>
__device__ __forceinline__ TcFrag<T> load_frag(const S* p, bool vec, int64_t count) {
  static_assert(kHasTensorCores<T> && std::is_same_v<S, T>, "tensor-core operands in the call's dtype");
  TcFrag<T> f{};
  if (count <= 0) return f;
  if constexpr (kIs16Bit<T>) {
    const uint4 bits = load_raw16<S, kThroughL2>(p, vec, count);
    memcpy(f.r, &bits, sizeof(bits));
  } else {
    float v[8];
    load_run<float, S, 8, kThroughL2>(p, vec, count, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) f.r[i] = tf32_bits(v[i]);
  }
  return f;
}

// Sources are read through L2 only (__ldcg): scratch must be, being written
// during the launch, and the input's reuse is across blocks anyway. One load
// kind also keeps the kernels to one instantiation per source.
//
// Rows at r * K of (M, K) row-major storage.
template <typename S>
struct DenseSource {
  using Elem = S;
  struct Task {
    const S* base;  // the task's first row
  };
  struct KPos {
    int64_t k;
  };
  const S* p;
  int64_t K;

  __device__ DenseSource(const GridStage& st, int4* /*table*/) : p(static_cast<const S*>(st.src)), K(st.K) {}
  __device__ Task begin_task(int64_t r0, int /*rows*/, int /*lane*/) const { return {p + r0 * K}; }
  __device__ KPos at(int64_t k) const { return {k}; }
  // The run of task-local row r from kp: its address, and the elements left
  // in the row (<= 0: the run reads as zeros).
  __device__ const S* run(const Task& t, int r, const KPos& kp, int64_t& count) const {
    count = K - kp.k;
    return t.base + r * K + kp.k;
  }
};

// The implicit im2col of a convolution: row r is output pixel r (image, oh,
// ow), and k = tap * C + c reads channel c of input pixel (oh * sh - ph + i *
// dh, ow * sw - pw + j * dw) for tap (i, j), zero outside the image. A run
// never crosses a tap: the host requires C to be a multiple of the run. Each
// warp keeps its task's per-row origins in a shared-memory table.
template <typename S>
struct GatherSource {
  using Elem = S;
  struct Task {
    const int4* rows;  // (image, ih0, iw0, -) per task-local row
  };
  struct KPos {
    int64_t k;
    int64_t c;  // channel
    int di, dj;  // tap offsets, dilation applied
  };
  const S* p;
  int64_t K;
  GatherGeometry g;
  int4* table;  // this warp's kTcRows entries

  __device__ GatherSource(const GridStage& st, int4* warp_table)
      : p(static_cast<const S*>(st.src)), K(st.K), g(st.geo), table(warp_table) {}
  __device__ Task begin_task(int64_t r0, int rows, int lane) const {
    __syncwarp();  // every lane is done with the previous task's table
    for (int i = lane; i < rows; i += 32) {
      const int64_t r = r0 + i, per_image = g.OH * g.OW;
      const int64_t image = r / per_image, pix = r - image * per_image, oh = pix / g.OW, ow = pix - oh * g.OW;
      table[i] = make_int4(static_cast<int>(image), static_cast<int>(oh * g.sh - g.ph),
                           static_cast<int>(ow * g.sw - g.pw), 0);
    }
    __syncwarp();
    return {table};
  }
  // Once per step and lane: 32-bit divisions (K < 2^31, conv_grid.cu checks).
  __device__ KPos at(int64_t k) const {
    const uint32_t kk = static_cast<uint32_t>(k), C = static_cast<uint32_t>(g.C);
    const uint32_t tap = kk / C, c = kk - tap * C;
    const uint32_t i = tap / static_cast<uint32_t>(g.kw), j = tap - i * static_cast<uint32_t>(g.kw);
    return {k, static_cast<int64_t>(c), static_cast<int>(i) * g.dh, static_cast<int>(j) * g.dw};
  }
  __device__ const S* run(const Task& t, int r, const KPos& kp, int64_t& count) const {
    const int4 e = t.rows[r];
    const int ih = e.y + kp.di, iw = e.z + kp.dj;
    const bool inside = kp.k < K && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
    count = inside ? g.C - kp.c : 0;
    return inside ? p + ((static_cast<int64_t>(e.x) * g.H + ih) * g.W + iw) * g.C + kp.c : p;
  }
};

// Sums into (M, n) row-major scratch, rounded to the call's dtype.
template <typename T>
struct ScratchDest {
  T* p;
  int64_t n;
  __device__ explicit ScratchDest(const GridStage& st) : p(static_cast<T*>(st.dst)), n(st.n) {}
  __device__ void store(int64_t row, int64_t o, acc_t<T> v) const { p[row * n + o] = static_cast<T>(v); }
};

// Sums plus bias, rounded to the call's dtype, at the stage's output strides.
template <typename T>
struct OutputDest {
  T* p;
  const T* bias;
  int64_t pixels, s_image, s_pixel, s_out;
  __device__ explicit OutputDest(const GridStage& st)
      : p(static_cast<T*>(st.dst)), bias(static_cast<const T*>(st.bias)), pixels(st.out_pixels),
        s_image(st.s_image), s_pixel(st.s_pixel), s_out(st.s_out) {}
  __device__ void store(int64_t row, int64_t o, acc_t<T> v) const {
    const acc_t<T> b = bias != nullptr ? static_cast<acc_t<T>>(bias[o]) : acc_t<T>(0);
    p[row_offset(row) + o * s_out] = static_cast<T>(v + b);
  }
  __device__ int64_t row_offset(int64_t row) const {
    if (s_image == 0) return row * s_pixel;  // one image: the linear's rows
    if (row <= INT32_MAX && pixels <= INT32_MAX) {  // a 32-bit division is a few instructions
      const uint32_t image = static_cast<uint32_t>(row) / static_cast<uint32_t>(pixels);
      return image * s_image + (row - static_cast<int64_t>(image) * pixels) * s_pixel;
    }
    const int64_t image = row / pixels;
    return image * s_image + (row - image * pixels) * s_pixel;
  }
};

// Lane l returns the sum over the warp's lanes of their v[l]. Each halving
// step keeps one half of the values and adds the partner lane's copy of it;
// compile-time halves, so every index is a constant and v stays in registers.
template <int kHalf, typename F>
__device__ __forceinline__ F transpose_reduce(F (&v)[32], int lane) {
  const bool upper = (lane & kHalf) != 0;
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const F send = upper ? v[i] : v[i + kHalf];
    const F keep = upper ? v[i + kHalf] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kHalf);
  }
  if constexpr (kHalf > 1) {
    return transpose_reduce<kHalf / 2>(v, lane);
  } else {
    return v[0];
  }
}

// The loop over a stage's tasks shared by both task kinds: the block's warps
// take `per_block` tasks at a time, `wpt` warps to a task. The trip count is
// the same for every warp of the block (the barriers in the reduction need
// that); a slot past the last task idles. body(task) runs for every slot.
template <typename Body>
__device__ __forceinline__ void for_each_task(int64_t tasks, int per_block, int slot, Body body) {
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * per_block; base < tasks;
       base += static_cast<int64_t>(gridDim.x) * per_block) {
    body(base + slot);
  }
}

// K range of warp `part` of a task's wpt warps: parts of whole steps, so a
// lane's run never straddles two parts.
__device__ __forceinline__ void k_range(int64_t K, int wpt, int part, int64_t step, int64_t& begin, int64_t& end) {
  const int64_t k_part = round_up(ceil_div(K, wpt), step);
  begin = part * k_part;
  end = begin + k_part < K ? begin + k_part : K;
}

// Adds the partial sums acc[0..N) of the wpt warps of each task into part 0's
// lanes, in a fixed order. Slot e of every thread at red[e * kThreads +
// thread]: consecutive lanes, no bank conflicts.
template <int N, typename F>
__device__ __forceinline__ void reduce_parts(F (&acc)[N], int wpt, int part, F* red) {
  if (wpt == 1) return;
#pragma unroll
  for (int e = 0; e < N; ++e) red[e * kThreads + threadIdx.x] = acc[e];
  __syncthreads();
  if (part == 0) {
    for (int q = 1; q < wpt; ++q)
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] += red[e * kThreads + threadIdx.x + q * 32];
  }
  __syncthreads();  // red is rewritten by the next task
}

// The stage on CUDA cores: kOuts x kRows tasks.
template <typename T, typename Src, typename Dst, bool kWThroughL2>
__device__ void run_stage(const GridStage& st, unsigned char* red_bytes, int4* table) {
  using F = acc_t<T>;
  using S = typename Src::Elem;
  constexpr int V = kVec<T>;
  const Src src(st, table);
  const Dst dst(st);
  F* red = reinterpret_cast<F*>(red_bytes);
  const T* w = static_cast<const T*>(st.w);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wpt = st.wpt, per_block = kWarps / wpt, slot = warp / wpt, part = warp % wpt;
  const int64_t M = st.M, n = st.n, K = st.K;
  const int64_t out_groups = ceil_div(n, kOuts), tasks = out_groups * ceil_div(M, kRows);
  int64_t k_begin, k_end;
  k_range(K, wpt, part, 32 * V, k_begin, k_end);
  for_each_task(tasks, per_block, slot, [&](int64_t task) {
    const int64_t o0 = (task % out_groups) * kOuts, r0 = (task / out_groups) * kRows;
    F sum[1] = {F(0)};
    if (task < tasks) {  // uniform across the warp
      const int rows = static_cast<int>(M - r0 < kRows ? M - r0 : kRows);
      const typename Src::Task rows_of = src.begin_task(r0, rows, lane);
      F acc[kOuts * kRows];
#pragma unroll
      for (int e = 0; e < kOuts * kRows; ++e) acc[e] = F(0);
      for (int64_t k = k_begin + lane * V; k < k_end; k += 32 * V) {
        F wv[kOuts][V];
#pragma unroll
        for (int j = 0; j < kOuts; ++j) {
          if (o0 + j < n) {
            load_run<F, T, V, kWThroughL2>(w + (o0 + j) * K + k, st.vec, K - k, wv[j]);
          } else {
#pragma unroll
            for (int i = 0; i < V; ++i) wv[j][i] = F(0);
          }
        }
        const typename Src::KPos kp = src.at(k);
        // With kLoadsAhead every row's 16 bytes are loaded before the first
        // multiply-add, as in the tensor-core stage.
        uint4 raw[kLoadsAhead<T> ? kRows : 1];
        if constexpr (kLoadsAhead<T>) {
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            raw[r] = make_uint4(0, 0, 0, 0);
            if (r < rows) {
              int64_t count;
              const S* p = src.run(rows_of, r, kp, count);
              raw[r] = load_raw16<S, true>(p, st.vec, count);
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r >= rows) break;  // uniform across the warp
          if constexpr (!kLoadsAhead<T>) {
            int64_t count;
            const S* p = src.run(rows_of, r, kp, count);
            raw[0] = load_raw16<S, true>(p, st.vec, count);
          }
          S xs[V];
          memcpy(xs, &raw[kLoadsAhead<T> ? r : 0], sizeof(xs));
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const F xv = static_cast<F>(xs[i]);
#pragma unroll
            for (int j = 0; j < kOuts; ++j) acc[j * kRows + r] += wv[j][i] * xv;
          }
        }
      }
      sum[0] = transpose_reduce<16>(acc, lane);
    }
    reduce_parts(sum, wpt, part, red);
    const int64_t o = o0 + lane / kRows, row = r0 + lane % kRows;
    if (part == 0 && task < tasks && o < n && row < M) dst.store(row, o, sum[0]);
  });
}

// One mma.sync step d += a b; shape and operand type name the instruction.
#define TUCKER_OPS_MMA_STEP(SHAPE, TYPE, d, a0, a1, a2, a3, b0, b1)                                    \
  asm volatile("mma.sync.aligned." SHAPE ".row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
               "{%8,%9}, {%0,%1,%2,%3};\n"                                                             \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                          \
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))

// d (16 x 8 floats) += A (16 outputs x 32 k) B (32 k x 8 rows), lane (g, t)
// holding k = 8t..8t+7 of A's rows g (lo) and g + 8 (hi) and of B's column g:
// two m16n8k16 steps (float16 / bfloat16) or four m16n8k8 steps (TF32), each
// taking the same slots of A and B, so every product pairs equal k.
template <typename T>
__device__ __forceinline__ void mma_k32(float* d, const TcFrag<T>& lo, const TcFrag<T>& hi, const TcFrag<T>& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // Step s takes fragment registers 2s and 2s + 1: 16-bit registers hold two k each.
  constexpr int kSteps = kIs16Bit<T> ? 2 : 4;
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const uint32_t a0 = lo.r[2 * s], a1 = hi.r[2 * s], a2 = lo.r[2 * s + 1], a3 = hi.r[2 * s + 1];
    const uint32_t b0 = b.r[2 * s], b1 = b.r[2 * s + 1];
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      TUCKER_OPS_MMA_STEP("m16n8k16", "bf16", d, a0, a1, a2, a3, b0, b1);
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      TUCKER_OPS_MMA_STEP("m16n8k16", "f16", d, a0, a1, a2, a3, b0, b1);
    } else {
      TUCKER_OPS_MMA_STEP("m16n8k8", "tf32", d, a0, a1, a2, a3, b0, b1);
    }
  }
#endif
}

#undef TUCKER_OPS_MMA_STEP

// The stage on tensor cores (the host sets st.tc only for kHasTensorCores
// dtypes, on sm_80+). Lane (g, t) = (lane / 4, lane % 4); see the file comment.
// A gather source needs C to be a multiple of 8 here: a lane's 8 k stay in one
// tap.
template <typename T, typename Src, typename Dst, bool kWThroughL2>
__device__ void run_stage_tc(const GridStage& st, unsigned char* red_bytes, int4* table) {
  using S = typename Src::Elem;
  const Src src(st, table);
  const Dst dst(st);
  float* red = reinterpret_cast<float*>(red_bytes);
  const T* w = static_cast<const T*>(st.w);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wpt = st.wpt, per_block = kWarps / wpt, slot = warp / wpt, part = warp % wpt;
  const int64_t M = st.M, n = st.n, K = st.K;
  const int64_t out_groups = ceil_div(n, kTcOuts), tasks = out_groups * ceil_div(M, kTcRows);
  int64_t k_begin, k_end;
  k_range(K, wpt, part, kTcK, k_begin, k_end);
  for_each_task(tasks, per_block, slot, [&](int64_t task) {
    const int64_t o0 = (task % out_groups) * kTcOuts, r0 = (task / out_groups) * kTcRows;
    float acc[4 * kTcTiles];  // tile j's fragment at acc[4j .. 4j+3]
#pragma unroll
    for (int e = 0; e < 4 * kTcTiles; ++e) acc[e] = 0.0f;
    if (task < tasks) {  // uniform across the warp
      const int rows = static_cast<int>(M - r0 < kTcRows ? M - r0 : kTcRows);
      const typename Src::Task rows_of = src.begin_task(r0, rows, lane);
      // With kLoadsAhead every load of a step is issued before its first mma,
      // so a step waits for one L2 round trip. (Loaded per tile, each consumed
      // at once, behind the tile's bounds check, the loads are not hoisted: a
      // step waits for up to five.)
      const bool lo_in = o0 + g < n, hi_in = o0 + g + 8 < n;
      const T* w_lo = w + (lo_in ? o0 + g : 0) * K;
      const T* w_hi = w + (hi_in ? o0 + g + 8 : 0) * K;
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kTcK) {
        const int64_t k = k0 + 8 * t, count = K - k;  // this lane's 8 elements of each row
        const TcFrag<T> a_lo = lo_in ? load_frag<T, T, kWThroughL2>(w_lo + k, st.vec, count) : TcFrag<T>{};
        const TcFrag<T> a_hi = hi_in ? load_frag<T, T, kWThroughL2>(w_hi + k, st.vec, count) : TcFrag<T>{};
        const typename Src::KPos kp = src.at(k);
        auto load_tile = [&](int j) {
          const int r = 8 * j + g;
          TcFrag<T> b{};
          if (r < rows) {
            int64_t left;
            const S* p = src.run(rows_of, r, kp, left);
            b = load_frag<T, S, true>(p, st.vec, left);
          }
          return b;
        };
        TcFrag<T> b[kLoadsAhead<T> ? kTcTiles : 1];
        if constexpr (kLoadsAhead<T>) {
#pragma unroll
          for (int j = 0; j < kTcTiles; ++j) b[j] = load_tile(j);
        }
#pragma unroll
        for (int j = 0; j < kTcTiles; ++j) {
          if (8 * j >= rows) break;  // uniform across the warp
          if constexpr (!kLoadsAhead<T>) b[0] = load_tile(j);
          mma_k32<T>(acc + 4 * j, a_lo, a_hi, b[kLoadsAhead<T> ? j : 0]);
        }
      }
    }
    reduce_parts(acc, wpt, part, red);
    if (part != 0 || task >= tasks) return;
    // d0, d1: output o0 + g, rows 2t and 2t + 1 of the tile; d2, d3: output o0 + g + 8.
#pragma unroll
    for (int j = 0; j < kTcTiles; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t o = o0 + g + (i >= 2 ? 8 : 0), row = r0 + 8 * j + 2 * t + (i & 1);
        if (o < n && row < M) dst.store(row, o, acc[4 * j + i]);
      }
    }
  });
}

// The stage on the task kind the host chose (st.tc).
template <typename T, typename Src, typename Dst, bool kWThroughL2>
__device__ __forceinline__ void run_any_stage(const GridStage& st, unsigned char* red, int4* table) {
  if constexpr (kHasTensorCores<T>) {
    if (st.tc) {
      run_stage_tc<T, Src, Dst, kWThroughL2>(st, red, table);
      return;
    }
  }
  run_stage<T, Src, Dst, kWThroughL2>(st, red, table);
}

// Host side --------------------------------------------------------------

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Whether tensor cores take stages over M rows: float16 / bfloat16, and
// float32 where the caller's TF32 switch allows it (torch's, as for the layers
// it replaces), past the 8 rows one CUDA-core task covers, where mma.sync
// exists.
template <typename T>
bool use_tensor_cores(int64_t M, bool tf32_allowed) {
  const bool dtype = kIs16Bit<T> || (std::is_same_v<T, float> && tf32_allowed);
  return dtype && M >= kTcMinRows && cached_device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 8;
}

inline int64_t tasks_of(const GridStage& st) {
  return st.tc ? ceil_div(st.n, kTcOuts) * ceil_div(st.M, kTcRows) : ceil_div(st.n, kOuts) * ceil_div(st.M, kRows);
}

// Grid size for stages[0..count) and `extra_work` items of other per-block
// work (0: none), and each stage's warps per task. Every block must be
// resident at once for the grid barrier: at most `per_sm` blocks per
// multiprocessor (the kernel's occupancy), and no more blocks than the
// largest stage has tasks. Stages with fewer tasks than the grid has warps
// split K over more warps, as long as each warp keeps at least one whole step.
template <typename T>
int64_t plan_grid(GridStage* stages, int count, int64_t extra_work, int per_sm) {
  const int64_t sms = cached_device_attribute<cudaDevAttrMultiProcessorCount>();
  int64_t most = std::max<int64_t>(1, extra_work);
  for (int i = 0; i < count; ++i) most = std::max(most, tasks_of(stages[i]));
  const int64_t blocks = std::min<int64_t>(static_cast<int64_t>(per_sm) * sms, most);
  for (int i = 0; i < count; ++i) {
    GridStage& st = stages[i];
    st.wpt = 1;
    const int64_t steps = ceil_div(st.K, st.tc ? kTcK : 32 * kVec<T>);
    while (st.wpt < kWarps && tasks_of(st) * st.wpt * 2 <= blocks * kWarps && steps >= st.wpt * 2) st.wpt *= 2;
  }
  return blocks;
}

// Blocks of kKernel (kThreads threads, static shared memory only) that fit
// on one multiprocessor, asked once per device and kernel (each
// instantiation has its own cache).
template <auto kKernel>
int blocks_per_sm(const char* op) {
  const int per_sm = cached_per_device([](int /*device*/) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kKernel, kThreads, 0));
    return blocks;
  });
  TORCH_CHECK(per_sm > 0, op, ": the whole-GPU kernel does not fit on a multiprocessor");
  return per_sm;
}

// A cooperative launch of `blocks` blocks on the current stream.
template <typename Kernel, typename Params>
void launch_cooperative(Kernel kernel, int64_t blocks, const Params& params) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = 0;
  config.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1]{};
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, params));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether the current device can launch cooperative kernels.
inline bool cooperative_launch_supported() {
  return cached_device_attribute<cudaDevAttrCooperativeLaunch>() == 1;
}

}  // namespace tucker_ops::cuda::grid
