// Fused tucker_conv2d forward on thread-block clusters (sm_90+), see
// conv_fused.cuh.
//
// The single-block kernel (conv_fused.cu) gives one block a whole 8x8 output
// tile, and at small batch splits C_out over blocks that each recompute the
// projection and the core: ResNet-50's 256->256 layer at batch 1 has 4 tiles,
// so 16 blocks, each doing 4.3 M MACs alone on a multiprocessor (0.16 ms on
// an H200). Here a cluster of `cl` blocks shares one tile and nothing is
// recomputed; the intermediates still never leave the chip:
//   1. rank q projects its slice of R_in over the patch (tile plus halo) into
//      its shared memory; cluster barrier; every rank copies the other ranks'
//      slices out of their shared memory (distributed shared memory), so each
//      holds the whole projected patch;
//   2. rank q runs the core for its slice of R_out over all of R_in, into its
//      shared memory; cluster barrier; every rank gathers the whole R_out x 64
//      core output the same way;
//   3. rank q expands its slice of C_out, adds the bias and writes the output.
// A last cluster barrier keeps each block's shared memory alive until the
// other ranks have read it. Sums run in a fixed order: deterministic.
#include <algorithm>
#include <type_traits>

#include <cooperative_groups.h>

#include <ATen/Dispatch.h>

#include "cuda/common.cuh"
#include "cuda/conv_fused.cuh"
#include "cuda/conv_fused_tile.cuh"

namespace tucker_ops::cuda {
namespace {

namespace cg = cooperative_groups;
using namespace fused_tile;

constexpr int kMaxClusterSize = 8;  // the portable limit

struct ClusterPlan {
  int cl;
  int patch_h, patch_w, ps;
  int rin_per, ro_per;  // slice of R_in / R_out per rank
  int64_t co_per;       // slice of C_out per rank
  int ws_rows;          // rin_per rounded up to 4: rows of the staged `first`
  int c_chunk;          // input channels staged per step of the projection (0 without first)
  int r_sub;            // ranks of R_in whose core slice is staged at once
  int64_t tiles_w, tiles_per_image;
  int64_t off_stage, off_z;  // element offsets of the staging area and of the core output
  size_t smem_bytes;
};

// dst[0:n] = src[0:n], src in another rank's shared memory: a few loads in
// flight per thread before their stores (a remote load costs about an L2 hit).
template <typename F>
__device__ __forceinline__ void copy_from_rank(F* dst, const F* src, int n) {
  constexpr int kBatch = 4;
  for (int e0 = threadIdx.x; e0 < n; e0 += kBatch * kThreads) {
    F v[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) v[b] = e0 + b * kThreads < n ? src[e0 + b * kThreads] : F(0);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (e0 + b * kThreads < n) dst[e0 + b * kThreads] = v[b];
    }
  }
}

template <typename T, int RO_PER>
__global__ void __launch_bounds__(kThreads, 2) fused_conv_cluster_kernel(
    Conv2dSizes s, ClusterPlan plan, const T* __restrict__ x, bool nhwc, const T* __restrict__ first,
    const T* __restrict__ core, const T* __restrict__ last, const T* __restrict__ bias, T* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using F = acc_t<T>;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank()), cl = plan.cl;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  F* smem = reinterpret_cast<F*>(smem_raw);
  F* proj = smem;                    // (R_in, ps): the whole projected patch once gathered
  F* stage = smem + plan.off_stage;  // step 1: xs (kc, ps), ws (ws_rows, kc); step 2: core slice
  F* z = smem + plan.off_z;          // (R_out, kTilePixels), with last

  const int patch_w = plan.patch_w, patch = plan.patch_h * plan.patch_w, ps = plan.ps;
  const int64_t tile_id = blockIdx.x / cl;
  const int64_t n = tile_id / plan.tiles_per_image, tile = tile_id % plan.tiles_per_image;
  const int64_t oh0 = (tile / plan.tiles_w) * kTileH, ow0 = (tile % plan.tiles_w) * kTileW;
  const int64_t ih0 = oh0 * s.stride_h - s.pad_h, iw0 = ow0 * s.stride_w - s.pad_w;
  const int tid = threadIdx.x, pg = tid % kPixelGroups, og = tid / kPixelGroups;
  const int py = pg / 2, px0 = (pg % 2) * 4;
  const int64_t HW = s.H * s.W;
  const int taps = static_cast<int>(s.kh * s.kw), kw = static_cast<int>(s.kw);
  const int sh = static_cast<int>(s.stride_h), sw = static_cast<int>(s.stride_w);
  const int dh = static_cast<int>(s.dil_h), dw = static_cast<int>(s.dil_w);
  const int R_in = static_cast<int>(s.R_in), R_out = static_cast<int>(s.R_out);
  const T* xn = x + n * s.C_in * HW;
  auto x_at = [&](int64_t c, int q) -> F {
    const int64_t ih = ih0 + q / patch_w, iw = iw0 + q % patch_w;
    if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return F(0);
    return static_cast<F>(nhwc ? xn[(ih * s.W + iw) * s.C_in + c] : xn[c * HW + ih * s.W + iw]);
  };
  // Rank q's slice [lo, hi) of an extent split in pieces of `per` (may be empty).
  auto slice_lo = [](int q, int per, int extent) { return q * per < extent ? q * per : extent; };

  // 1. This rank's rows of proj = first[rin_lo:rin_hi, :] x patch.
  const int rin_lo = slice_lo(rank, plan.rin_per, R_in), rin_hi = slice_lo(rank + 1, plan.rin_per, R_in);
  const int rn = rin_hi - rin_lo;
  if (first) {
    F* xs = stage;
    project_patch<T>(first, s.C_in, rin_lo, rn, patch, ps, plan.c_chunk, plan.ws_rows, nhwc, x_at, xs,
                     xs + plan.c_chunk * ps, proj + rin_lo * ps);
  } else {
    for (int e = tid; e < rn * patch; e += kThreads) {
      const int c = nhwc ? e % rn : e / patch, q = nhwc ? e / rn : e % patch;
      proj[(rin_lo + c) * ps + q] = x_at(rin_lo + c, q);
    }
  }
  cluster.sync();  // every rank's slice of proj is complete and visible
  for (int i = 1; i < cl; ++i) {
    const int q = (rank + i) % cl;  // staggered, so the ranks do not all read one block at once
    const int lo = slice_lo(q, plan.rin_per, R_in), hi = slice_lo(q + 1, plan.rin_per, R_in);
    copy_from_rank(proj + lo * ps, cluster.map_shared_rank(proj, q) + lo * ps, (hi - lo) * ps);
  }
  __syncthreads();

  // 2. acc (this rank's R_out slice, this thread's 4 pixels) = core (*) proj.
  const int ro_lo = slice_lo(rank, plan.ro_per, R_out), ro_hi = slice_lo(rank + 1, plan.ro_per, R_out);
  const int ro_n = ro_hi - ro_lo;
  F acc[RO_PER][4];
#pragma unroll
  for (int k = 0; k < RO_PER; ++k)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[k][q] = F(0);
  F* core_s = stage;  // (ro_n, rs, taps)
  for (int rs0 = 0; rs0 < R_in; rs0 += plan.r_sub) {
    const int rs = rs0 + plan.r_sub < R_in ? plan.r_sub : R_in - rs0;
    const int slice = rs * taps;  // core[ro, rs0 : rs0+rs, :, :] is contiguous
    for (int e = tid; e < ro_n * slice; e += kThreads) {
      const int ro = e / slice, rem = e % slice;
      core_s[e] = static_cast<F>(core[(static_cast<int64_t>(ro_lo + ro) * R_in + rs0) * taps + rem]);
    }
    __syncthreads();
    for (int r = 0; r < rs; ++r) {
      const F* pr = proj + (rs0 + r) * ps + py * sh * patch_w + px0 * sw;
      core_rank_step<F, RO_PER>(pr, core_s + r * taps, rs * taps, ro_n, og, static_cast<int>(s.kh), kw, dh, dw,
                                patch_w, sw, acc);
    }
    __syncthreads();  // core_s is overwritten next
  }

  const int64_t HWo = s.H_out * s.W_out, oh = oh0 + py;
  T* yn = out + n * s.C_out * HWo;
  if (!last) {
#pragma unroll
    for (int k = 0; k < RO_PER; ++k) {
      const int ro = ro_lo + og + kChannelGroups * k;
      if (ro >= ro_hi || oh >= s.H_out) continue;
      const F b = bias ? static_cast<F>(bias[ro]) : F(0);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t ow = ow0 + px0 + q;
        if (ow < s.W_out) yn[ro * HWo + oh * s.W_out + ow] = static_cast<T>(acc[k][q] + b);
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < RO_PER; ++k) {
      const int ro = og + kChannelGroups * k;
      if (ro < ro_n) {
#pragma unroll
        for (int q = 0; q < 4; ++q) z[(ro_lo + ro) * kTilePixels + pg * 4 + q] = acc[k][q];
      }
    }
    cluster.sync();  // every rank's rows of z are complete and visible
    for (int i = 1; i < cl; ++i) {
      const int q = (rank + i) % cl;
      const int lo = slice_lo(q, plan.ro_per, R_out), hi = slice_lo(q + 1, plan.ro_per, R_out);
      copy_from_rank(z + lo * kTilePixels, cluster.map_shared_rank(z, q) + lo * kTilePixels, (hi - lo) * kTilePixels);
    }
    __syncthreads();
    // 3. out[co, pixels] = last[co, :] z + bias for this rank's C_out slice.
    const int64_t co_begin = rank * plan.co_per < s.C_out ? rank * plan.co_per : s.C_out;
    const int64_t co_end = co_begin + plan.co_per < s.C_out ? co_begin + plan.co_per : s.C_out;
    expand_tile<T>(z, last, bias, R_out, co_begin, co_end, og, pg, yn, HWo, s.W_out, s.H_out, oh, ow0 + px0);
  }
  cluster.sync();  // the other ranks are done reading this block's shared memory
#endif
}

// The launch plan for cluster size cl, or false when the shape does not fit.
bool make_cluster_plan(const Conv2dSizes& s, int cl, int64_t acc_bytes, ClusterPlan* plan) {
  if (cl < 2 || cl > kMaxClusterSize) return false;
  const int64_t budget = kClusterSharedMemBudget / acc_bytes;  // in elements
  const int64_t patch_h = (kTileH - 1) * s.stride_h + (s.kh - 1) * s.dil_h + 1;
  const int64_t patch_w = (kTileW - 1) * s.stride_w + (s.kw - 1) * s.dil_w + 1;
  if (patch_h > budget || patch_w > budget || patch_h * patch_w > budget) return false;
  const int64_t patch = patch_h * patch_w, ps = round_up(patch, 4), taps = s.kh * s.kw;
  const int64_t rin_per = ceil_div(s.R_in, cl), ro_per = ceil_div(s.R_out, cl);
  if (ro_per > kChannelGroups * kMaxRoPer) return false;
  const int64_t ws_rows = round_up(rin_per, 4);
  const int64_t kc = s.has_first ? std::min<int64_t>(kChannelChunk, s.C_in) : 0;
  const int64_t proj = s.R_in * ps, z = s.has_last ? s.R_out * kTilePixels : 0;
  const int64_t stage1 = s.has_first ? kc * ps + ws_rows * kc : 0;
  if (proj + z + std::max<int64_t>(stage1, ro_per * taps) > budget) return false;
  const int64_t r_sub = std::min<int64_t>(s.R_in, (budget - proj - z) / (ro_per * taps));
  const int64_t stage = std::max(stage1, ro_per * r_sub * taps);
  const int64_t tiles_h = ceil_div(s.H_out, kTileH), tiles_w = ceil_div(s.W_out, kTileW);
  if (s.N * tiles_h * tiles_w * cl >= (int64_t{1} << 31)) return false;

  plan->cl = cl;
  plan->patch_h = static_cast<int>(patch_h);
  plan->patch_w = static_cast<int>(patch_w);
  plan->ps = static_cast<int>(ps);
  plan->rin_per = static_cast<int>(rin_per);
  plan->ro_per = static_cast<int>(ro_per);
  plan->co_per = ceil_div(s.C_out, cl);
  plan->ws_rows = static_cast<int>(ws_rows);
  plan->c_chunk = static_cast<int>(kc);
  plan->r_sub = static_cast<int>(r_sub);
  plan->tiles_w = tiles_w;
  plan->tiles_per_image = tiles_h * tiles_w;
  plan->off_stage = proj;
  plan->off_z = proj + stage;
  plan->smem_bytes = static_cast<size_t>((proj + stage + z) * acc_bytes);
  return true;
}

}  // namespace

int fused_conv_cluster_size(const Conv2dSizes& s, int64_t acc_bytes) {
  if (cached_device_attribute<cudaDevAttrComputeCapabilityMajor>() < 9) return 1;
  ClusterPlan plan{};
  const int forced = cluster_size_from_env();
  if (forced >= 0) return forced >= 2 && make_cluster_plan(s, forced, acc_bytes, &plan) ? forced : 1;
  // Slices of R_out of at least 16 ranks keep all 16 channel groups of the
  // core step busy. Clusters pay only where the tiles alone leave the GPU
  // idle: a cluster block costs more than its share of a tile (each rank
  // stages the whole input patch, then the gathers and barriers), so the grid
  // stops at two blocks per multiprocessor (the H200 sweep in RESULTS_GPU.md).
  const int64_t tiles = s.N * ceil_div(s.H_out, kTileH) * ceil_div(s.W_out, kTileW);
  const int64_t max_blocks = 2 * static_cast<int64_t>(cached_device_attribute<cudaDevAttrMultiProcessorCount>());
  int cl = 1;
  while (cl < kMaxClusterSize && s.R_out / (2 * cl) >= kChannelGroups && tiles * 2 * cl <= max_blocks) cl *= 2;
  if (cl < 2) return 1;
  return make_cluster_plan(s, cl, acc_bytes, &plan) ? cl : 1;
}

bool fused_conv_forward_cluster(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p, int cl) {
  ClusterPlan plan{};
  const int64_t acc_bytes = c10::elementSize(at::toOpMathType(like.scalar_type()));
  if (!make_cluster_plan(s, cl, acc_bytes, &plan)) return false;
  if (s.N == 0) return true;
  const ClusterLaunch launch(dim3(static_cast<unsigned>(s.N * plan.tiles_per_image * cl)), kThreads, plan.smem_bytes,
                             cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "tucker_conv2d_cuda_cluster", [&] {
    using T = scalar_t;
    const int ro_per = plan.ro_per;
    auto run = [&](auto ro_per_tag) {
      constexpr auto kKernel = fused_conv_cluster_kernel<T, decltype(ro_per_tag)::value>;
      allow_dynamic_shared_memory<kKernel>(plan.smem_bytes);
      C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, kKernel, s, plan, static_cast<const T*>(p.x), p.nhwc,
                                        static_cast<const T*>(p.first), static_cast<const T*>(p.core),
                                        static_cast<const T*>(p.last), static_cast<const T*>(p.bias),
                                        static_cast<T*>(p.out)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (ro_per <= kChannelGroups) {
      run(std::integral_constant<int, 1>{});
    } else if (ro_per <= 2 * kChannelGroups) {
      run(std::integral_constant<int, 2>{});
    } else if (ro_per <= 4 * kChannelGroups) {
      run(std::integral_constant<int, 4>{});
    } else {
      run(std::integral_constant<int, kMaxRoPer>{});
    }
  });
  return true;
}

}  // namespace tucker_ops::cuda
