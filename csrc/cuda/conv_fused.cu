// Fused tucker_conv2d forward (conv_fused.cuh).
//
// One block of 256 threads per (image, 8x8 output tile, slice of C_out):
//   1. the tile's input patch (tile plus the dilated-kernel halo) is projected
//      to R_in channels in shared memory, C_in staged in chunks of 16 together
//      with the matching slice of `first`; R_in itself is processed in chunks
//      when patch x R_in does not fit;
//   2. the kh x kw core runs from the projection into R_out accumulators held
//      in registers: thread (pixel p, group g) owns channels g, g+4, g+8, ...;
//   3. the accumulators go to shared memory and `last` expands them to the
//      block's C_out slice (each warp reads one row of `last`: a broadcast),
//      plus bias, written once to the output.
// When a batch has few tiles, C_out is split over several blocks (each
// recomputes steps 1-2) so that small batches still fill the GPU.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <ATen/Dispatch.h>

#include "cuda/common.cuh"
#include "cuda/conv_fused.cuh"

namespace tucker_ops::cuda {
namespace {

constexpr int kTileH = 8, kTileW = 8, kTilePixels = kTileH * kTileW, kThreads = 256;
constexpr int kGroups = kThreads / kTilePixels;  // threads per output pixel
constexpr int kMaxQReg = 32;                     // R_out <= kGroups * kMaxQReg
constexpr int kChannelChunk = 16;                // C_in staged per step of the projection

// Device-side min (std::min is host-only without --expt-relaxed-constexpr,
// which the CMake route does not pass).
__device__ __forceinline__ int64_t dmin(int64_t a, int64_t b) {
  return a < b ? a : b;
}

struct FusedPlan {
  int patch_h, patch_w;
  int r_chunk;   // projected channels held at once
  int c_chunk;   // input channels staged per step (0 without first)
  int64_t tiles_w, tiles_per_image;
  int64_t co_splits, co_per_split;
  size_t smem_bytes;
};

template <typename T, int QREG>
__global__ void __launch_bounds__(kThreads) fused_conv_forward_kernel(
    Conv2dSizes s, FusedPlan plan, const T* __restrict__ x, bool nhwc, const T* __restrict__ first,
    const T* __restrict__ core, const T* __restrict__ last, const T* __restrict__ bias, T* __restrict__ out) {
  using F = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  F* smem = reinterpret_cast<F*>(smem_raw);
  const int patch_w = plan.patch_w, patch = plan.patch_h * plan.patch_w;
  const int r_chunk = plan.r_chunk, c_chunk = plan.c_chunk;
  F* proj = smem;                         // (r_chunk, patch)
  F* xs = proj + r_chunk * patch;         // (c_chunk, patch)
  F* ws = xs + c_chunk * patch;           // (r_chunk, c_chunk)

  const int64_t n = blockIdx.x / plan.tiles_per_image;
  const int64_t tile = blockIdx.x % plan.tiles_per_image;
  const int64_t oh0 = (tile / plan.tiles_w) * kTileH, ow0 = (tile % plan.tiles_w) * kTileW;
  const int64_t ih0 = oh0 * s.stride_h - s.pad_h, iw0 = ow0 * s.stride_w - s.pad_w;
  const int tid = threadIdx.x, px = tid % kTilePixels, grp = tid / kTilePixels;
  const int py = px / kTileW, pxw = px % kTileW;
  const int64_t HW = s.H * s.W, taps = s.kh * s.kw;
  const T* xn = x + n * s.C_in * HW;

  // Input channel c at patch position q; zero outside the image, which is the
  // projection's zero padding (the projection has no bias).
  auto x_at = [&](int64_t c, int q) -> F {
    const int64_t ih = ih0 + q / patch_w, iw = iw0 + q % patch_w;
    if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return F(0);
    return static_cast<F>(nhwc ? xn[(ih * s.W + iw) * s.C_in + c] : xn[c * HW + ih * s.W + iw]);
  };

  F acc[QREG];
#pragma unroll
  for (int j = 0; j < QREG; ++j) acc[j] = F(0);

  for (int64_t r0 = 0; r0 < s.R_in; r0 += r_chunk) {
    const int rc = static_cast<int>(dmin(r_chunk, s.R_in - r0));
    if (first) {
      for (int e = tid; e < rc * patch; e += kThreads) proj[e] = F(0);
      for (int64_t c0 = 0; c0 < s.C_in; c0 += c_chunk) {
        const int cc = static_cast<int>(dmin(c_chunk, s.C_in - c0));
        // NHWC: consecutive threads read consecutive channels of one pixel.
        for (int e = tid; e < cc * patch; e += kThreads) {
          const int c = nhwc ? e % cc : e / patch, q = nhwc ? e / cc : e % patch;
          xs[c * patch + q] = x_at(c0 + c, q);
        }
        for (int e = tid; e < rc * cc; e += kThreads) {
          const int r = e / cc, c = e % cc;
          ws[r * c_chunk + c] = static_cast<F>(first[(r0 + r) * s.C_in + c0 + c]);
        }
        __syncthreads();
        for (int e = tid; e < rc * patch; e += kThreads) {
          const int r = e / patch, q = e % patch;
          F v = F(0);
          for (int c = 0; c < cc; ++c) v += ws[r * c_chunk + c] * xs[c * patch + q];
          proj[e] += v;
        }
        __syncthreads();
      }
    } else {
      for (int e = tid; e < rc * patch; e += kThreads) {
        const int c = nhwc ? e % rc : e / patch, q = nhwc ? e / rc : e % patch;
        proj[c * patch + q] = x_at(r0 + c, q);
      }
      __syncthreads();
    }

    for (int r = 0; r < rc; ++r) {
      for (int64_t i = 0; i < s.kh; ++i) {
        for (int64_t j = 0; j < s.kw; ++j) {
          const F p = proj[r * patch + (py * s.stride_h + i * s.dil_h) * patch_w + pxw * s.stride_w + j * s.dil_w];
          const T* g = core + (r0 + r) * taps + i * s.kw + j;  // + ro * R_in * taps
#pragma unroll
          for (int jj = 0; jj < QREG; ++jj) {
            const int64_t ro = grp + kGroups * jj;
            if (ro < s.R_out) acc[jj] += static_cast<F>(g[ro * s.R_in * taps]) * p;
          }
        }
      }
    }
    __syncthreads();  // proj is overwritten by the next chunk (or by q_s below)
  }

  const int64_t oh = oh0 + py, ow = ow0 + pxw, HWo = s.H_out * s.W_out;
  const bool valid = oh < s.H_out && ow < s.W_out;
  T* yn = out + n * s.C_out * HWo + oh * s.W_out + ow;
  if (!last) {
#pragma unroll
    for (int jj = 0; jj < QREG; ++jj) {
      const int64_t ro = grp + kGroups * jj;
      if (valid && ro < s.R_out) yn[ro * HWo] = static_cast<T>(acc[jj] + (bias ? static_cast<F>(bias[ro]) : F(0)));
    }
    return;
  }
  F* q_s = smem;  // (R_out, tile pixels)
#pragma unroll
  for (int jj = 0; jj < QREG; ++jj) {
    const int64_t ro = grp + kGroups * jj;
    if (ro < s.R_out) q_s[ro * kTilePixels + px] = acc[jj];
  }
  __syncthreads();
  if (!valid) return;
  const int64_t co_begin = blockIdx.y * plan.co_per_split;
  const int64_t co_end = dmin(s.C_out, co_begin + plan.co_per_split);
  for (int64_t co = co_begin + grp; co < co_end; co += kGroups) {
    F v = bias ? static_cast<F>(bias[co]) : F(0);
    const T* l = last + co * s.R_out;
    for (int64_t ro = 0; ro < s.R_out; ++ro) v += static_cast<F>(l[ro]) * q_s[ro * kTilePixels + px];
    yn[co * HWo] = static_cast<T>(v);
  }
}

bool fused_disabled_by_env() {
  const char* v = std::getenv("TUCKER_OPS_CUDA_FUSED");
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// The launch plan, or false when the shape does not fit the kernel.
bool make_plan(const Conv2dSizes& s, int64_t acc_bytes, FusedPlan* plan) {
  if (s.R_out > kGroups * kMaxQReg) return false;
  const int64_t budget = kSharedMemBudget / acc_bytes;  // in elements
  const int64_t patch_h = (kTileH - 1) * s.stride_h + (s.kh - 1) * s.dil_h + 1;
  const int64_t patch_w = (kTileW - 1) * s.stride_w + (s.kw - 1) * s.dil_w + 1;
  if (patch_h > budget || patch_w > budget || patch_h * patch_w > budget) return false;
  const int64_t patch = patch_h * patch_w;
  int64_t c_chunk = 0, r_chunk = 0;
  if (s.has_first) {
    c_chunk = std::min<int64_t>(kChannelChunk, s.C_in);
    r_chunk = std::min<int64_t>(s.R_in, (budget - c_chunk * patch) / (patch + c_chunk));
  } else {
    r_chunk = std::min<int64_t>(s.C_in, budget / patch);
  }
  if (r_chunk < 1) return false;
  const int64_t q_elems = s.has_last ? s.R_out * kTilePixels : 0;
  if (q_elems > budget) return false;
  const int64_t elems = std::max(r_chunk * patch + c_chunk * patch + r_chunk * c_chunk, q_elems);

  const int64_t tiles_h = ceil_div(s.H_out, kTileH), tiles_w = ceil_div(s.W_out, kTileW);
  const int64_t blocks = s.N * tiles_h * tiles_w;
  if (blocks >= (int64_t{1} << 31)) return false;
  // Split C_out over blocks until there are about 256 of them (at least 16
  // output channels per block, so the recomputed projection stays a small part).
  int64_t co_splits = 1;
  if (s.has_last && blocks < 256) co_splits = std::clamp<int64_t>(ceil_div(256, blocks), 1, ceil_div(s.C_out, 16));
  co_splits = std::min<int64_t>(co_splits, 65535);
  const int64_t co_per_split = ceil_div(s.C_out, co_splits);

  plan->patch_h = static_cast<int>(patch_h);
  plan->patch_w = static_cast<int>(patch_w);
  plan->r_chunk = static_cast<int>(r_chunk);
  plan->c_chunk = static_cast<int>(c_chunk);
  plan->tiles_w = tiles_w;
  plan->tiles_per_image = tiles_h * tiles_w;
  plan->co_splits = ceil_div(s.C_out, co_per_split);
  plan->co_per_split = co_per_split;
  plan->smem_bytes = static_cast<size_t>(elems * acc_bytes);
  return true;
}

}  // namespace

bool fused_conv_forward(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p) {
  if (fused_disabled_by_env()) return false;
  FusedPlan plan{};
  const int64_t acc_bytes = c10::elementSize(at::toOpMathType(like.scalar_type()));
  if (!make_plan(s, acc_bytes, &plan)) return false;
  if (s.N == 0) return true;
  const dim3 grid(static_cast<unsigned>(s.N * plan.tiles_per_image), static_cast<unsigned>(plan.co_splits));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "tucker_conv2d_cuda_fused", [&] {
    using T = scalar_t;
    // Small R_out gets a short accumulator array: no predicated-off FMAs.
    auto kernel = s.R_out <= kGroups * 8 ? fused_conv_forward_kernel<T, 8> : fused_conv_forward_kernel<T, kMaxQReg>;
    kernel<<<grid, kThreads, plan.smem_bytes, stream>>>(
        s, plan, static_cast<const T*>(p.x), p.nhwc, static_cast<const T*>(p.first), static_cast<const T*>(p.core),
        static_cast<const T*>(p.last), static_cast<const T*>(p.bias), static_cast<T*>(p.out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

}  // namespace tucker_ops::cuda
