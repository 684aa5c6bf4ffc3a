// Fused tucker_linear forward over the whole GPU (linear_grid.cuh).
//
// linear_fused.cu gives every block all the factors, which suits factor sets
// that stay in L2 and stream in a few microseconds. For large ones at few rows
// (linear_4096 at batch 1-32: 4.5 M elements, 9 MB in bfloat16) the time is
// the weight stream itself, and it takes every multiprocessor to keep enough
// loads in flight. So each stage here is spread over all the grid's warps, a
// grid-wide barrier (cooperative launch) separates the stages, and the
// rank-sized rows pass between stages through global scratch (L2) in the
// accumulation type: one launch where the cuBLAS chain makes three.
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
// (mma.sync m16n8k16, float accumulators): a task is 16 outputs x 32 rows, the
// weights the A operand and the rows the B operand. Both are read straight from
// global memory, 16 bytes per lane: lane (g, t) holds k = 8t..8t+7 of weight
// rows g and g+8 and of source row g of each 8-row tile, and the two mma steps
// per 32 k take elements 0-3 and 4-7. A and B agree on which k each fragment
// slot holds, which is all a dot product needs, so no shuffle or shared memory
// stages the operands. Scratch rows enter the B operand rounded to the call's
// dtype, as a Sequential chain's layers round their outputs.
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "cuda/common.cuh"
#include "cuda/linear_grid.cuh"

namespace tucker_ops::cuda {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kOuts = 4, kRows = 8;
static_assert(kOuts * kRows == 32, "the warp reduction leaves one sum per lane");
// Tensor-core tasks: 16 outputs x (kTcTiles x 8) rows, 32 k per step.
constexpr int kTcOuts = 16, kTcTiles = 4, kTcRows = 8 * kTcTiles, kTcK = 32;
constexpr int kTcMinRows = kRows + 1;  // at most 8 rows the CUDA-core tasks waste nothing
// Shared memory for the partial sums of a block's warps: one accumulator per
// thread (CUDA cores) or a tensor-core task's 4 x kTcTiles floats per thread.
constexpr int kReduceBytes = 4 * kTcTiles * kThreads * static_cast<int>(sizeof(float));

struct GridStage {
  const void* w;     // (n, K) row-major, the call's dtype
  const void* src;   // (M, K) row-major: the input (call's dtype) or scratch (accumulation type)
  void* dst;         // (M, n) row-major: scratch (accumulation type) or the output (call's dtype)
  const void* bias;  // (n,) or null; the output stage only
  int64_t n, K;
  int wpt;           // warps per task: 1, 2, 4 or 8
  bool src_scratch;  // written by other blocks in this launch: read through L2 only
  bool dst_output;
  bool vec;          // 16-byte loads: K a multiple of the vector, w and src 16-byte aligned
  bool tc;           // tensor-core tasks (float16 / bfloat16 only)
};

struct GridParams {
  int64_t M;
  int stages;
  GridStage stage[3];
};

// Elements of the call's dtype in the 16 bytes a lane reads per step.
template <typename T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));

// v[i] = p[i] converted to F, for i < N. With `vec`, p is 16-byte aligned and
// all N elements exist; otherwise elements at or past `count` read as zero.
// kThroughL2: p is scratch (S == F) written during this launch, which the
// non-coherent and L1 caches may hold stale.
template <typename F, typename S, int N, bool kThroughL2>
__device__ __forceinline__ void load_run(const S* p, bool vec, int64_t count, F (&v)[N]) {
  static_assert(!kThroughL2 || std::is_same_v<S, F>, "scratch holds the accumulation type");
  if (vec) {
    constexpr int kPer = static_cast<int>(16 / sizeof(S));
    static_assert(N % kPer == 0, "whole 16-byte loads");
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      const uint4* q = reinterpret_cast<const uint4*>(p) + c;
      const uint4 raw = kThroughL2 ? __ldcg(q) : __ldg(q);
      S e[kPer];
      memcpy(e, &raw, sizeof(raw));
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[c * kPer + i] = static_cast<F>(e[i]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (i >= count) {
      v[i] = F(0);
    } else if constexpr (kThroughL2) {
      v[i] = __ldcg(p + i);
    } else {
      v[i] = static_cast<F>(p[i]);
    }
  }
}

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

// dst(r, o) = sum_k src(r, k) w(o, k) (+ bias(o)) for every row and output,
// tasks spread over the grid's blocks. `red` holds one sum per thread.
template <typename T, typename S, bool kSrcScratch, bool kDstOutput>
__device__ void run_stage(const GridStage& st, int64_t M, acc_t<T>* red) {
  using F = acc_t<T>;
  constexpr int V = kVec<T>;
  const T* w = static_cast<const T*>(st.w);
  const S* src = static_cast<const S*>(st.src);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wpt = st.wpt, per_block = kWarps / wpt, slot = warp / wpt, part = warp % wpt;
  const int64_t n = st.n, K = st.K;
  const int64_t out_groups = ceil_div(n, kOuts), tasks = out_groups * ceil_div(M, kRows);
  // Parts of whole warp steps: a lane's 16-byte run never straddles two parts.
  const int64_t k_part = round_up(ceil_div(K, wpt), 32 * V);
  const int64_t k_begin = part * k_part, k_end = k_begin + k_part < K ? k_begin + k_part : K;
  // The loop's trip count is the same for every warp of the block (the
  // barriers below need that); a slot past the last task idles.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * per_block; base < tasks;
       base += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t task = base + slot;
    const int64_t o0 = (task % out_groups) * kOuts, r0 = (task / out_groups) * kRows;
    F sum = F(0);
    if (task < tasks) {  // uniform across the warp
      const int rows = static_cast<int>(M - r0 < kRows ? M - r0 : kRows);
      F acc[kOuts * kRows];
#pragma unroll
      for (int e = 0; e < kOuts * kRows; ++e) acc[e] = F(0);
      for (int64_t k = k_begin + lane * V; k < k_end; k += 32 * V) {
        F wv[kOuts][V];
#pragma unroll
        for (int j = 0; j < kOuts; ++j) {
          if (o0 + j < n) {
            load_run<F, T, V, false>(w + (o0 + j) * K + k, st.vec, K - k, wv[j]);
          } else {
#pragma unroll
            for (int i = 0; i < V; ++i) wv[j][i] = F(0);
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r >= rows) break;  // uniform across the warp
          F xv[V];
          load_run<F, S, V, kSrcScratch>(src + (r0 + r) * K + k, st.vec, K - k, xv);
#pragma unroll
          for (int j = 0; j < kOuts; ++j)
#pragma unroll
            for (int i = 0; i < V; ++i) acc[j * kRows + r] += wv[j][i] * xv[i];
        }
      }
      sum = transpose_reduce<16>(acc, lane);
    }
    if (wpt > 1) {
      red[threadIdx.x] = sum;
      __syncthreads();
      if (part == 0) {
        for (int q = 1; q < wpt; ++q) sum += red[threadIdx.x + q * 32];
      }
      __syncthreads();  // red is rewritten by the next task
    }
    const int64_t o = o0 + lane / kRows, row = r0 + lane % kRows;
    if (part == 0 && task < tasks && o < n && row < M) {
      if constexpr (kDstOutput) {
        const F b = st.bias != nullptr ? static_cast<F>(static_cast<const T*>(st.bias)[o]) : F(0);
        static_cast<T*>(st.dst)[row * n + o] = static_cast<T>(sum + b);
      } else {
        static_cast<F*>(st.dst)[row * n + o] = sum;
      }
    }
  }
}

template <typename T>
constexpr bool kHasTensorCores = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// 8 elements at p as the call's 16-bit dtype, packed two per register
// (element 2i in the low half of register i); zeros at or past `count`.
template <typename T, typename S, bool kThroughL2>
__device__ __forceinline__ uint4 load8_packed(const S* p, bool vec, int64_t count) {
  static_assert(kHasTensorCores<T>, "16-bit operands");
  if (count <= 0) return make_uint4(0, 0, 0, 0);
  if constexpr (std::is_same_v<S, T>) {
    if (vec) {
      const uint4* q = reinterpret_cast<const uint4*>(p);
      return kThroughL2 ? __ldcg(q) : __ldg(q);
    }
  }
  float v[8];
  load_run<float, S, 8, kThroughL2>(p, vec, count, v);
  uint32_t r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      memcpy(&r[i], &h, sizeof(h));
    } else {
      const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
      memcpy(&r[i], &h, sizeof(h));
    }
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}

// d += A (16 x 16, row-major fragment a) * B (16 x 8, column-major fragment b).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#endif
}

// run_stage on tensor cores (float16 / bfloat16; the host sets st.tc only
// there, on sm_80+). Lane (g, t) = (lane / 4, lane % 4); see the file comment.
template <typename T, typename S, bool kSrcScratch, bool kDstOutput>
__device__ void run_stage_tc(const GridStage& st, int64_t M, float* red) {
  const T* w = static_cast<const T*>(st.w);
  const S* src = static_cast<const S*>(st.src);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wpt = st.wpt, per_block = kWarps / wpt, slot = warp / wpt, part = warp % wpt;
  const int64_t n = st.n, K = st.K;
  const int64_t out_groups = ceil_div(n, kTcOuts), tasks = out_groups * ceil_div(M, kTcRows);
  const int64_t k_part = round_up(ceil_div(K, wpt), kTcK);
  const int64_t k_begin = part * k_part, k_end = k_begin + k_part < K ? k_begin + k_part : K;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * per_block; base < tasks;
       base += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t task = base + slot;
    const int64_t o0 = (task % out_groups) * kTcOuts, r0 = (task / out_groups) * kTcRows;
    float acc[kTcTiles][4];
#pragma unroll
    for (int j = 0; j < kTcTiles; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
    if (task < tasks) {  // uniform across the warp
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kTcK) {
        const int64_t k = k0 + 8 * t, count = K - k;  // this lane's 8 elements of each row
        const uint4 a_lo = o0 + g < n ? load8_packed<T, T, false>(w + (o0 + g) * K + k, st.vec, count) : zero;
        const uint4 a_hi = o0 + g + 8 < n ? load8_packed<T, T, false>(w + (o0 + g + 8) * K + k, st.vec, count) : zero;
#pragma unroll
        for (int j = 0; j < kTcTiles; ++j) {
          if (r0 + 8 * j >= M) break;  // uniform across the warp
          const int64_t row = r0 + 8 * j + g;
          const uint4 b = row < M ? load8_packed<T, S, kSrcScratch>(src + row * K + k, st.vec, count) : zero;
          mma_m16n8k16<T>(acc[j], a_lo.x, a_hi.x, a_lo.y, a_hi.y, b.x, b.y);
          mma_m16n8k16<T>(acc[j], a_lo.z, a_hi.z, a_lo.w, a_hi.w, b.z, b.w);
        }
      }
    }
    if (wpt > 1) {
      // Slot e of every thread at red[e * kThreads + thread]: consecutive lanes, no bank conflicts.
#pragma unroll
      for (int e = 0; e < 4 * kTcTiles; ++e) red[e * kThreads + threadIdx.x] = acc[e / 4][e % 4];
      __syncthreads();
      if (part == 0) {
        for (int q = 1; q < wpt; ++q)
#pragma unroll
          for (int e = 0; e < 4 * kTcTiles; ++e) acc[e / 4][e % 4] += red[e * kThreads + threadIdx.x + q * 32];
      }
      __syncthreads();  // red is rewritten by the next task
    }
    if (part != 0 || task >= tasks) continue;
    // d0, d1: output o0 + g, rows 2t and 2t + 1 of the tile; d2, d3: output o0 + g + 8.
#pragma unroll
    for (int j = 0; j < kTcTiles; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t o = o0 + g + (i >= 2 ? 8 : 0), row = r0 + 8 * j + 2 * t + (i & 1);
        if (o >= n || row >= M) continue;
        if constexpr (kDstOutput) {
          const float b = st.bias != nullptr ? static_cast<float>(static_cast<const T*>(st.bias)[o]) : 0.0f;
          static_cast<T*>(st.dst)[row * n + o] = static_cast<T>(acc[j][i] + b);
        } else {
          static_cast<float*>(st.dst)[row * n + o] = acc[j][i];
        }
      }
    }
  }
}

template <typename T, bool kSrcScratch, bool kDstOutput>
__device__ __forceinline__ void run_any_stage(const GridStage& st, int64_t M, unsigned char* red) {
  using F = acc_t<T>;
  using S = std::conditional_t<kSrcScratch, F, T>;
  if constexpr (kHasTensorCores<T>) {
    if (st.tc) {
      run_stage_tc<T, S, kSrcScratch, kDstOutput>(st, M, reinterpret_cast<float*>(red));
      return;
    }
  }
  run_stage<T, S, kSrcScratch, kDstOutput>(st, M, reinterpret_cast<F*>(red));
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) grid_linear_kernel(const __grid_constant__ GridParams p) {
  __shared__ __align__(16) unsigned char red[kReduceBytes];
  static_assert(kThreads * sizeof(acc_t<T>) <= kReduceBytes, "one accumulator per thread fits");
  for (int i = 0; i < p.stages; ++i) {
    // The previous stage's scratch is complete and visible grid-wide.
    if (i > 0) cooperative_groups::this_grid().sync();
    const GridStage& st = p.stage[i];
    if (st.src_scratch) {
      if (st.dst_output) {
        run_any_stage<T, true, true>(st, p.M, red);
      } else {
        run_any_stage<T, true, false>(st, p.M, red);
      }
    } else if (st.dst_output) {
      run_any_stage<T, false, true>(st, p.M, red);
    } else {
      run_any_stage<T, false, false>(st, p.M, red);
    }
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename T>
void launch(const at::Tensor& like, const LinearSizes& s, const LinearPointers& p) {
  using F = acc_t<T>;
  constexpr int64_t kScratchAlign = 16 / sizeof(F);  // t2 starts on a 16-byte boundary
  const int64_t t1_elems = s.has_first ? round_up(s.M * s.R_in, kScratchAlign) : 0;
  const int64_t t2_elems = s.has_last ? s.M * s.R_out : 0;
  const at::Tensor scratch = at::empty({t1_elems + t2_elems}, acc_options(like));
  F* t1 = scratch.mutable_data_ptr<F>();
  F* t2 = t1 + t1_elems;

  // Tensor cores past the 8 rows one CUDA-core task covers (where mma.sync exists).
  const bool tensor_cores = kHasTensorCores<T> && s.M >= kTcMinRows &&
                            cached_device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 8;
  GridParams gp{};
  gp.M = s.M;
  const void* src = p.x;
  bool src_scratch = false;
  int64_t K = s.in;
  auto add_stage = [&](const void* w, int64_t n, void* dst, bool output, const void* bias) {
    GridStage& st = gp.stage[gp.stages++];
    st = GridStage{w, src, dst, bias, n, K, 1, src_scratch, output,
                   K % kVec<T> == 0 && aligned16(w) && aligned16(src), tensor_cores};
    src = dst;
    src_scratch = true;
    K = n;
  };
  if (s.has_first) add_stage(p.first, s.R_in, t1, false, nullptr);
  if (s.has_last) {
    add_stage(p.core, s.R_out, t2, false, nullptr);
    add_stage(p.last, s.out, p.out, true, p.bias);
  } else {
    add_stage(p.core, s.out, p.out, true, p.bias);
  }

  // Every block must be resident at once for the grid barrier: at most the
  // occupancy limit per multiprocessor, and no more blocks than the largest
  // stage has tasks.
  const int per_sm = cached_per_device([](int /*device*/) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, grid_linear_kernel<T>, kThreads, 0));
    return blocks;
  });
  TORCH_CHECK(per_sm > 0, "tucker_linear: the whole-GPU kernel does not fit on a multiprocessor");
  const int64_t sms = cached_device_attribute<cudaDevAttrMultiProcessorCount>();
  auto tasks_of = [&](const GridStage& st) {
    return st.tc ? ceil_div(st.n, kTcOuts) * ceil_div(s.M, kTcRows) : ceil_div(st.n, kOuts) * ceil_div(s.M, kRows);
  };
  int64_t most_tasks = 1;
  for (int i = 0; i < gp.stages; ++i) most_tasks = std::max(most_tasks, tasks_of(gp.stage[i]));
  const int64_t blocks = std::min<int64_t>(per_sm * sms, most_tasks);
  // Stages with fewer tasks than the grid has warps split K over more warps,
  // as long as each warp keeps at least one whole step of it.
  for (int i = 0; i < gp.stages; ++i) {
    GridStage& st = gp.stage[i];
    const int64_t steps = ceil_div(st.K, st.tc ? kTcK : 32 * kVec<T>);
    while (st.wpt < kWarps && tasks_of(st) * st.wpt * 2 <= blocks * kWarps && steps >= st.wpt * 2) st.wpt *= 2;
  }

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
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, grid_linear_kernel<T>, gp));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool grid_linear_forced() {
  const char* v = std::getenv("TUCKER_OPS_CUDA_LINEAR_GRID");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

bool grid_linear_applies(const at::Tensor& /*like*/, const LinearSizes& /*s*/) {
  return grid_linear_forced() && cached_device_attribute<cudaDevAttrCooperativeLaunch>() == 1;
}

void grid_linear_forward(const at::Tensor& like, const LinearSizes& s, const LinearPointers& p) {
  if (s.M == 0 || s.out == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "tucker_linear_cuda_grid",
                                  [&] { launch<scalar_t>(like, s, p); });
}

}  // namespace tucker_ops::cuda
