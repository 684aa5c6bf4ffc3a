// Fused tucker_conv2d forward (conv_fused.cuh).
//
// One block of 256 threads per (image, 8x8 output tile, slice of C_out). Each
// stage is a small matrix product out of shared memory, every thread owning a
// register tile so that one shared-memory load feeds several FMAs:
//   1. projection: the tile's input patch (tile plus the dilated-kernel halo)
//      times `first`, C_in staged 16 channels at a time with the matching
//      slice of `first`; a thread owns up to two 4 (rank) x 4 (patch position)
//      tiles. R_in is processed in chunks when patch x R_in does not fit.
//   2. core: R_out x 64 pixels accumulated in registers across all R_in
//      chunks; thread (pixel group, channel group) owns 4 pixels of one tile
//      row x RO_PER channels. The core's slice for a few ranks at a time is
//      staged in shared memory (in the space the projection's staging used).
//   3. expansion: the core's output goes to shared memory; thread owns 4
//      output channels x 4 pixels of the block's C_out slice, reads `last`
//      through the read-only cache, adds the bias and writes the output once.
// When a batch has few tiles, C_out is split over several blocks (each
// recomputes steps 1-2) so that small batches still fill the GPU.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include <ATen/Dispatch.h>

#include "cuda/common.cuh"
#include "cuda/conv_fused.cuh"
#include "cuda/conv_fused_tile.cuh"

namespace tucker_ops::cuda {
namespace {

using namespace fused_tile;

struct FusedPlan {
  int patch_h, patch_w;
  int patch_stride;  // patch rounded up to 4: row stride of the projection and the staged input
  int r_chunk;       // projected channels held at once
  int r_rows;        // r_chunk rounded up to 4: rows allocated for them
  int r_sub;         // ranks whose core slice is staged at once
  int c_chunk;       // input channels staged per step (0 without first)
  int64_t tiles_w, tiles_per_image;
  int64_t co_splits, co_per_split;
  size_t smem_bytes;
};

template <typename T, int RO_PER>
__global__ void __launch_bounds__(kThreads, 2) fused_conv_forward_kernel(
    Conv2dSizes s, FusedPlan plan, const T* __restrict__ x, bool nhwc, const T* __restrict__ first,
    const T* __restrict__ core, const T* __restrict__ last, const T* __restrict__ bias, T* __restrict__ out) {
  using F = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  F* smem = reinterpret_cast<F*>(smem_raw);
  const int patch_w = plan.patch_w, patch = plan.patch_h * plan.patch_w, ps = plan.patch_stride;
  const int kc = plan.c_chunk;
  F* proj = smem;                        // (r_rows, ps)
  F* staging = proj + plan.r_rows * ps;  // stage 1: xs (kc, ps), ws (r_rows, kc); stage 2: core slice
  F* xs = staging;
  F* ws = xs + kc * ps;
  F* core_s = staging;                   // (R_out, r_sub, taps)

  const int64_t n = blockIdx.x / plan.tiles_per_image;
  const int64_t tile = blockIdx.x % plan.tiles_per_image;
  const int64_t oh0 = (tile / plan.tiles_w) * kTileH, ow0 = (tile % plan.tiles_w) * kTileW;
  const int64_t ih0 = oh0 * s.stride_h - s.pad_h, iw0 = ow0 * s.stride_w - s.pad_w;
  const int tid = threadIdx.x, pg = tid % kPixelGroups, og = tid / kPixelGroups;
  const int py = pg / 2, px0 = (pg % 2) * 4;  // this thread's pixels: tile row py, columns px0..px0+3
  const int64_t HW = s.H * s.W;
  const int taps = static_cast<int>(s.kh * s.kw), kw = static_cast<int>(s.kw);
  const int sh = static_cast<int>(s.stride_h), sw = static_cast<int>(s.stride_w);
  const int dh = static_cast<int>(s.dil_h), dw = static_cast<int>(s.dil_w);
  const int R_out = static_cast<int>(s.R_out);
  const T* xn = x + n * s.C_in * HW;

  // Input channel c at patch position q; zero outside the image, which is the
  // projection's zero padding (the projection has no bias).
  auto x_at = [&](int64_t c, int q) -> F {
    const int64_t ih = ih0 + q / patch_w, iw = iw0 + q % patch_w;
    if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return F(0);
    return static_cast<F>(nhwc ? xn[(ih * s.W + iw) * s.C_in + c] : xn[c * HW + ih * s.W + iw]);
  };

  F acc[RO_PER][4];
#pragma unroll
  for (int k = 0; k < RO_PER; ++k)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[k][q] = F(0);

  for (int64_t r0 = 0; r0 < s.R_in; r0 += plan.r_chunk) {
    const int rc = static_cast<int>(r0 + plan.r_chunk < s.R_in ? plan.r_chunk : s.R_in - r0);
    if (first) {
      // 1. proj (rc, patch) = first[r0:r0+rc, :] x patch (C_in, patch).
      project_patch<T>(first, s.C_in, static_cast<int>(r0), rc, patch, ps, kc, plan.r_rows, nhwc, x_at, xs, ws, proj);
    } else {
      for (int e = tid; e < rc * patch; e += kThreads) {
        const int c = nhwc ? e % rc : e / patch, q = nhwc ? e / rc : e % patch;
        proj[c * ps + q] = x_at(r0 + c, q);
      }
    }
    __syncthreads();

    // 2. acc (R_out, this thread's 4 pixels) += core[:, r0:r0+rc] (*) proj.
    for (int rs0 = 0; rs0 < rc; rs0 += plan.r_sub) {
      const int rn = rs0 + plan.r_sub < rc ? plan.r_sub : rc - rs0;
      const int slice = rn * taps;  // core[ro, r0+rs0 : r0+rs0+rn, :, :] is contiguous
      for (int e = tid; e < R_out * slice; e += kThreads) {
        const int ro = e / slice, rem = e % slice;
        core_s[e] = static_cast<F>(core[(ro * s.R_in + r0 + rs0) * taps + rem]);
      }
      __syncthreads();
      for (int r = 0; r < rn; ++r) {
        const F* pr = proj + (rs0 + r) * ps + py * sh * patch_w + px0 * sw;
        core_rank_step<F, RO_PER>(pr, core_s + r * taps, rn * taps, R_out, og, static_cast<int>(s.kh), kw, dh, dw,
                                  patch_w, sw, acc);
      }
      __syncthreads();  // core_s, then proj, are overwritten next
    }
  }

  const int64_t HWo = s.H_out * s.W_out, oh = oh0 + py;
  T* yn = out + n * s.C_out * HWo;
  if (!last) {
#pragma unroll
    for (int k = 0; k < RO_PER; ++k) {
      const int ro = og + kChannelGroups * k;
      if (ro >= R_out || oh >= s.H_out) continue;
      const F b = bias ? static_cast<F>(bias[ro]) : F(0);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t ow = ow0 + px0 + q;
        if (ow < s.W_out) yn[ro * HWo + oh * s.W_out + ow] = static_cast<T>(acc[k][q] + b);
      }
    }
    return;
  }

  // 3. out[co, pixels] = last[co, :] q_s + bias for this block's C_out slice.
  F* q_s = smem;  // (R_out, tile pixels)
#pragma unroll
  for (int k = 0; k < RO_PER; ++k) {
    const int ro = og + kChannelGroups * k;
    if (ro < R_out) {
#pragma unroll
      for (int q = 0; q < 4; ++q) q_s[ro * kTilePixels + pg * 4 + q] = acc[k][q];
    }
  }
  __syncthreads();
  const int64_t co_begin = blockIdx.y * plan.co_per_split;
  const int64_t co_end = co_begin + plan.co_per_split < s.C_out ? co_begin + plan.co_per_split : s.C_out;
  expand_tile<T>(q_s, last, bias, R_out, co_begin, co_end, og, pg, yn, HWo, s.W_out, s.H_out, oh, ow0 + px0);
}

// The launch plan, or false when the shape does not fit the kernel.
bool make_plan(const Conv2dSizes& s, int64_t acc_bytes, FusedPlan* plan) {
  if (s.R_out > kChannelGroups * kMaxRoPer) return false;
  const int64_t budget = kSharedMemBudget / acc_bytes;  // in elements
  const int64_t patch_h = (kTileH - 1) * s.stride_h + (s.kh - 1) * s.dil_h + 1;
  const int64_t patch_w = (kTileW - 1) * s.stride_w + (s.kw - 1) * s.dil_w + 1;
  if (patch_h > budget || patch_w > budget || patch_h * patch_w > budget) return false;
  const int64_t patch = patch_h * patch_w, ps = round_up(patch, 4), taps = s.kh * s.kw;
  const int64_t kc = s.has_first ? std::min<int64_t>(kChannelChunk, s.C_in) : 0;
  // Largest rank chunk whose projection tiles the threads can hold and whose
  // buffers fit next to one rank's core slice.
  int64_t r_chunk = s.R_in;
  if (s.has_first) {
    const int64_t nqg = (patch + 3) / 4;
    r_chunk = std::min<int64_t>(r_chunk, 4 * ((kProjTilesPerThread * kThreads) / nqg));
  }
  auto fits = [&](int64_t rc) {
    const int64_t rows = round_up(rc, 4);
    const int64_t stage1 = s.has_first ? kc * ps + rows * kc : 0;
    return rows * ps + std::max(stage1, s.R_out * taps) <= budget;
  };
  while (r_chunk > 0 && !fits(r_chunk)) r_chunk = r_chunk > 4 ? (r_chunk - 1) / 4 * 4 : r_chunk - 1;
  if (r_chunk < 1) return false;
  const int64_t r_rows = round_up(r_chunk, 4);
  const int64_t r_sub = std::min<int64_t>(r_chunk, (budget - r_rows * ps) / (s.R_out * taps));
  if (r_sub < 1) return false;
  const int64_t q_elems = s.has_last ? s.R_out * kTilePixels : 0;
  if (q_elems > budget) return false;
  const int64_t stage1 = s.has_first ? kc * ps + r_rows * kc : 0;
  const int64_t elems = std::max(r_rows * ps + std::max(stage1, s.R_out * r_sub * taps), q_elems);

  const int64_t tiles_h = ceil_div(s.H_out, kTileH), tiles_w = ceil_div(s.W_out, kTileW);
  const int64_t blocks = s.N * tiles_h * tiles_w;
  if (blocks >= (int64_t{1} << 31)) return false;
  // Split C_out over blocks until there are about 256 of them (at least one
  // full expansion pass per block, so the recomputed stages stay a small part).
  int64_t co_splits = 1;
  if (s.has_last && blocks < 256) {
    co_splits = std::clamp<int64_t>(ceil_div(256, blocks), 1, ceil_div(s.C_out, kCoPerPass));
  }
  co_splits = std::min<int64_t>(co_splits, 65535);
  const int64_t co_per_split = ceil_div(s.C_out, co_splits);

  plan->patch_h = static_cast<int>(patch_h);
  plan->patch_w = static_cast<int>(patch_w);
  plan->patch_stride = static_cast<int>(ps);
  plan->r_chunk = static_cast<int>(r_chunk);
  plan->r_rows = static_cast<int>(r_rows);
  plan->r_sub = static_cast<int>(r_sub);
  plan->c_chunk = static_cast<int>(kc);
  plan->tiles_w = tiles_w;
  plan->tiles_per_image = tiles_h * tiles_w;
  plan->co_splits = ceil_div(s.C_out, co_per_split);
  plan->co_per_split = co_per_split;
  plan->smem_bytes = static_cast<size_t>(elems * acc_bytes);
  return true;
}

}  // namespace

bool current_stream_is_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

FusedMode switch_from_env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return FusedMode::kAuto;
  if (std::strcmp(v, "0") == 0) return FusedMode::kNever;
  if (std::strcmp(v, "1") == 0) return FusedMode::kAlways;
  return FusedMode::kAuto;
}

FusedMode fused_mode_from_env() { return switch_from_env("TUCKER_OPS_CUDA_FUSED"); }

namespace {

// Predicted GPU time of the CUDA-core kernels (cluster or single block) in
// seconds, launch excluded; infinity where neither takes the shape. A model
// fitted to them on an H200 (the sweep in benchmarks/RESULTS_GPU.md): waves
// of two blocks per multiprocessor, each wave a fixed cost (the staging round
// trips) plus one block's multiply-adds at one block's rate.
double cuda_core_seconds(const Conv2dSizes& s, double sms) {
  constexpr double kBlockSeconds = 8e-6, kMacsPerSecondPerBlock = 14e9;
  const int cl = fused_conv_cluster_size(s, 4);
  FusedPlan plan{};
  if (cl < 2 && !make_plan(s, 4, &plan)) return std::numeric_limits<double>::infinity();
  const double patch = static_cast<double>((kTileH - 1) * s.stride_h + (s.kh - 1) * s.dil_h + 1) *
                       static_cast<double>((kTileW - 1) * s.stride_w + (s.kw - 1) * s.dil_w + 1);
  const double tiles = static_cast<double>(s.N) * ceil_div(s.H_out, kTileH) * ceil_div(s.W_out, kTileW);
  // Per block: the projection of its ranks over the patch, the core for its
  // output ranks (all 16 channel groups busy, or idle ones still cost time),
  // the expansion of its output channels. Cluster blocks split all three;
  // single blocks split only the expansion (co_splits), recomputing the rest.
  const double ranks_in = cl >= 2 ? static_cast<double>(ceil_div(s.R_in, cl)) : static_cast<double>(s.R_in);
  const double ranks_out = cl >= 2 ? static_cast<double>(std::max<int64_t>(ceil_div(s.R_out, cl), kChannelGroups))
                                   : static_cast<double>(s.R_out);
  const double co = cl >= 2 ? static_cast<double>(ceil_div(s.C_out, cl)) : static_cast<double>(plan.co_per_split);
  const double per_block = (s.has_first ? ranks_in * s.C_in * patch : 0.0) +
                           ranks_out * s.R_in * s.kh * s.kw * kTilePixels +
                           (s.has_last ? co * s.R_out * kTilePixels : 0.0);
  const double blocks = tiles * (cl >= 2 ? cl : plan.co_splits);
  const double waves = std::ceil(blocks / (2 * sms));
  return waves * (kBlockSeconds + per_block / kMacsPerSecondPerBlock);
}

}  // namespace

int cluster_size_from_env() {
  const char* v = std::getenv("TUCKER_OPS_CUDA_CLUSTER");
  if (v == nullptr) return -1;
  for (const int cl : {0, 2, 4, 8}) {
    if (v[0] == static_cast<char>('0' + cl) && v[1] == '\0') return cl;
  }
  return -1;
}

FusedConvChoice choose_fused_conv(const Conv2dSizes& s, c10::ScalarType dtype) {
  // Computed once per shape and settings (ShapeMemo): the key holds all the
  // choice reads besides the shape (the device's multiprocessors and compute
  // capability, the cluster and tensor-core switches, cuDNN's TF32 flag).
  thread_local ShapeMemo<FusedConvChoice, 22> memo;
  const auto key = conv_shape_key<4>(s, {static_cast<int64_t>(dtype), c10::cuda::current_device(),
                                         fused_conv_tc_settings(), cluster_size_from_env()});
  return memo.get(key, [&]() -> FusedConvChoice {
    const double sms = cached_device_attribute<cudaDevAttrMultiProcessorCount>();
    const double cuda_cores = cuda_core_seconds(s, sms);
    const double tensor_cores = fused_conv_tc_seconds(s, dtype, sms);
    if (std::isfinite(tensor_cores) && (fused_conv_tc_forced() || tensor_cores <= cuda_cores)) {
      return {FusedConvKernel::kTensorCores, tensor_cores};
    }
    if (std::isfinite(cuda_cores)) return {FusedConvKernel::kCudaCores, cuda_cores};
    return {FusedConvKernel::kNone, std::numeric_limits<double>::infinity()};
  });
}

bool fused_conv_preferred(const Conv2dSizes& s, const FusedConvChoice& choice, bool capturing) {
  if (choice.kernel == FusedConvKernel::kNone) return false;
  // Under graph capture only GPU time counts: the kernel where its predicted
  // time is below the least a replay of the chain costs. Replayed on runs 8-9's
  // CUDA-graph tables (benchmarks/fit_chain_model.py --capture) this takes the
  // kernel on 16 conv rows, 1.23-1.27x faster than the chain there (geometric
  // mean), 0.92x at worst (thesis_conv2 in bfloat16 at batch 8); the rule before
  // (predicted under 2 us, set from run 6's slower kernels) took none.
  if (capturing) return choice.seconds < replay_chain_floor_seconds(s.has_first, s.has_last);
  // Eager, the chain's host time per call against the kernel's GPU time.
  return std::max(kFusedHostSeconds, choice.seconds) < eager_chain_seconds(s.has_first, s.has_last);
}

bool fused_conv_forward(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p,
                        const FusedConvChoice& choice) {
  if (choice.kernel == FusedConvKernel::kNone) return false;
  if (choice.kernel == FusedConvKernel::kTensorCores && fused_conv_forward_tc(like, s, p)) return true;
  const int64_t acc_bytes = c10::elementSize(at::toOpMathType(like.scalar_type()));
  const int cl = fused_conv_cluster_size(s, acc_bytes);
  if (cl >= 2 && fused_conv_forward_cluster(like, s, p, cl)) return true;
  FusedPlan plan{};
  if (!make_plan(s, acc_bytes, &plan)) return false;
  if (s.N == 0) return true;
  const dim3 grid(static_cast<unsigned>(s.N * plan.tiles_per_image), static_cast<unsigned>(plan.co_splits));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "tucker_conv2d_cuda_fused", [&] {
    using T = scalar_t;
    // The accumulator array sized to R_out: few predicated-off FMAs.
    auto kernel = s.R_out <= kChannelGroups     ? fused_conv_forward_kernel<T, 1>
                  : s.R_out <= 2 * kChannelGroups ? fused_conv_forward_kernel<T, 2>
                  : s.R_out <= 4 * kChannelGroups ? fused_conv_forward_kernel<T, 4>
                                                  : fused_conv_forward_kernel<T, kMaxRoPer>;
    kernel<<<grid, kThreads, plan.smem_bytes, stream>>>(
        s, plan, static_cast<const T*>(p.x), p.nhwc, static_cast<const T*>(p.first), static_cast<const T*>(p.core),
        static_cast<const T*>(p.last), static_cast<const T*>(p.bias), static_cast<T*>(p.out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

}  // namespace tucker_ops::cuda
