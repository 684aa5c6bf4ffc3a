// Fused tucker_conv2d forward on tensor cores (conv_fused.cuh): float16 and
// bfloat16, and float32 through TF32 where cuDNN may use TF32 (the
// torch.backends.cudnn.allow_tf32 flag nn.Conv2d obeys). Tucker-2 layers with
// R_in, R_out <= 128.
//
// One block of 8 warps per (image, 4 x 16 output tile, slice of C_out). The
// tile is 16 pixels wide so that one output row is one 16-row operand of the
// tensor cores: its pixels sit at a fixed stride (stride_w positions) in the
// projected patch, which the fragment loads take as their leading dimension,
// so the core needs no im2col copy. Every stage is a warp-level matrix
// product (WMMA, float accumulators) out of shared memory:
//   1. pj (patch positions x R_in) = patch (positions x C_in) * first^T,
//      C_in staged in chunks with the matching columns of `first`;
//   2. z (64 pixels x R_out) = sum over taps t of pj shifted by t * core_t^T,
//      the core staged tap by tap (as many taps as fit at once);
//   3. out (64 pixels x C_out slice) = z * last^T + bias, `last` staged 64
//      output channels at a time, then written once through a per-warp tile.
// pj and z are kept in the input dtype (float16 / bfloat16 / float), as the
// Sequential chain's layers keep their outputs; every sum is in float.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <mma.h>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>

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
constexpr int64_t kTcSharedMemBudget = 110 * 1024;  // two blocks per sm_80/sm_90 multiprocessor

// Storage type in shared memory, WMMA fragment element type, pointer type the
// fragment loads take, and the K extent of one tensor-core step.
template <typename T>
struct Tc;
template <>
struct Tc<c10::Half> {
  using S = c10::Half;
  using Frag = __half;
  using Load = __half;
  static constexpr int K = 16;
};
template <>
struct Tc<c10::BFloat16> {
  using S = c10::BFloat16;
  using Frag = __nv_bfloat16;
  using Load = __nv_bfloat16;
  static constexpr int K = 16;
};
template <>
struct Tc<float> {
  using S = float;
  using Frag = wmma::precision::tf32;
  using Load = float;
  static constexpr int K = 8;
};

template <typename T, typename Fragment>
__device__ __forceinline__ void load_operand(Fragment& f, const typename Tc<T>::S* ptr, int ldm) {
  wmma::load_matrix_sync(f, reinterpret_cast<const typename Tc<T>::Load*>(ptr), ldm);
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
  }
}

struct TcPlan {
  int ph, pw, m_pad;      // patch rows and columns; patch positions rounded up to 16
  int rin_pad, rout_pad;  // ranks rounded up to 16
  int kc;                 // input channels per staged chunk
  int pad;                // elements added to every leading dimension (32 bytes: aligned rows, fewer bank conflicts)
  int taps_chunk;         // core taps staged at once
  int64_t tiles_w, tiles_per_image;
  int64_t co_splits, co_per_split;
  int64_t off_stage, off_scratch;  // byte offsets in shared memory
  size_t smem_bytes;
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) fused_conv_tc_kernel(
    Conv2dSizes s, TcPlan plan, const T* __restrict__ x, bool nhwc, const T* __restrict__ first,
    const T* __restrict__ core, const T* __restrict__ last, const T* __restrict__ bias, T* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using S = typename Tc<T>::S;
  constexpr int K = Tc<T>::K;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, K, typename Tc<T>::Frag, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, K, typename Tc<T>::Frag, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, K, float>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  S* pj = reinterpret_cast<S*>(smem_raw);  // (m_pad, rin_pad); after step 2, z: (kPixels, rout_pad)
  S* stage = reinterpret_cast<S*>(smem_raw + plan.off_stage);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float* scratch = reinterpret_cast<float*>(smem_raw + plan.off_scratch) + warp * kScratchFloats;

  const int64_t n = blockIdx.x / plan.tiles_per_image, tile = blockIdx.x % plan.tiles_per_image;
  const int64_t oh0 = (tile / plan.tiles_w) * kRowsOut, ow0 = (tile % plan.tiles_w) * kColsOut;
  const int64_t ih0 = oh0 * s.stride_h - s.pad_h, iw0 = ow0 * s.stride_w - s.pad_w;
  const int pw = plan.pw, patch = plan.ph * plan.pw, m_pad = plan.m_pad;
  const int rin_pad = plan.rin_pad, rout_pad = plan.rout_pad, kc = plan.kc;
  // Leading dimensions: the staged input, pj / z, the core and `last` slices.
  const int ld_x = kc + plan.pad, ld_p = rin_pad + plan.pad, ld_z = rout_pad + plan.pad;
  const int R_in = static_cast<int>(s.R_in), R_out = static_cast<int>(s.R_out);
  const int sh = static_cast<int>(s.stride_h), sw = static_cast<int>(s.stride_w);
  const int dh = static_cast<int>(s.dil_h), dw = static_cast<int>(s.dil_w), kw = static_cast<int>(s.kw);
  const int taps = static_cast<int>(s.kh * s.kw);
  const int64_t HW = s.H * s.W;
  const T* xn = x + n * s.C_in * HW;

  // A warp's accumulator tile, through its scratch tile, into shared memory in
  // the storage type: dst row r, column c at dst[r * ld + c].
  auto spill = [&](const FragC& acc, S* dst, int ld) {
    wmma::store_matrix_sync(scratch, acc, 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) dst[(e / 16) * ld + e % 16] = static_cast<S>(scratch[e]);
    __syncwarp();
  };

  // 1. pj = patch * first^T. Rows past the patch and ranks past R_in are zero.
  {
    S* xs = stage;                 // (m_pad, ld_x), row-major A
    S* fs = stage + m_pad * ld_x;  // (rin_pad, ld_x): first's rows, a column-major B
    const int n_tiles = rin_pad / 16, tiles = (m_pad / 16) * n_tiles;
    for (int base = 0; base < tiles; base += kWarps * kMaxFragsPerWarp) {
      FragC acc[kMaxFragsPerWarp];
#pragma unroll
      for (int f = 0; f < kMaxFragsPerWarp; ++f) wmma::fill_fragment(acc[f], 0.0f);
      for (int64_t c0 = 0; c0 < s.C_in; c0 += kc) {
        const int cc = static_cast<int>(c0 + kc < s.C_in ? kc : s.C_in - c0);
        // NHWC: consecutive threads read consecutive channels of one pixel;
        // NCHW: consecutive positions of one channel.
        for (int e = tid; e < m_pad * kc; e += kThreads) {
          const int q = nhwc ? e / kc : e % m_pad, c = nhwc ? e % kc : e / m_pad;
          float v = 0.0f;
          if (c < cc && q < patch) {
            const int64_t ih = ih0 + q / pw, iw = iw0 + q % pw;
            if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) {
              v = static_cast<float>(nhwc ? xn[(ih * s.W + iw) * s.C_in + c0 + c] : xn[(c0 + c) * HW + ih * s.W + iw]);
            }
          }
          xs[q * ld_x + c] = static_cast<S>(v);
        }
        for (int e = tid; e < rin_pad * kc; e += kThreads) {
          const int r = e / kc, c = e % kc;
          const float v = r < R_in && c < cc ? static_cast<float>(first[r * s.C_in + c0 + c]) : 0.0f;
          fs[r * ld_x + c] = static_cast<S>(v);
        }
        __syncthreads();
#pragma unroll
        for (int f = 0; f < kMaxFragsPerWarp; ++f) {
          const int t = base + warp + f * kWarps;
          if (t < tiles) {
            const int mt = t / n_tiles, nt = t % n_tiles;
            for (int k0 = 0; k0 < kc; k0 += K) {
              FragA a;
              FragB b;
              load_operand<T>(a, xs + mt * 16 * ld_x + k0, ld_x);
              load_operand<T>(b, fs + nt * 16 * ld_x + k0, ld_x);
              wmma::mma_sync(acc[f], a, b, acc[f]);
            }
          }
        }
        __syncthreads();
      }
#pragma unroll
      for (int f = 0; f < kMaxFragsPerWarp; ++f) {
        const int t = base + warp + f * kWarps;
        if (t < tiles) spill(acc[f], pj + (t / n_tiles) * 16 * ld_p + (t % n_tiles) * 16, ld_p);
      }
    }
  }
  __syncthreads();

  // 2. z = sum over taps of pj (the 16 pixels of output row y at tap (i, j) are
  // patch positions (y*sh + i*dh) * pw + j*dw + px*sw) times core_t^T.
  const int o_tiles = rout_pad / 16, z_tiles = kRowsOut * o_tiles;
  FragC zacc[kMaxFragsPerWarp];
#pragma unroll
  for (int f = 0; f < kMaxFragsPerWarp; ++f) wmma::fill_fragment(zacc[f], 0.0f);
  S* cs = stage;  // (taps_chunk, rout_pad, ld_p): per tap a column-major B
  for (int t0 = 0; t0 < taps; t0 += plan.taps_chunk) {
    const int tn = t0 + plan.taps_chunk < taps ? plan.taps_chunk : taps - t0;
    for (int e = tid; e < tn * rout_pad * rin_pad; e += kThreads) {
      const int r = e % rin_pad, ro = (e / rin_pad) % rout_pad, t = e / (rin_pad * rout_pad);
      const float v = r < R_in && ro < R_out
                          ? static_cast<float>(core[(static_cast<int64_t>(ro) * R_in + r) * taps + t0 + t])
                          : 0.0f;
      cs[(t * rout_pad + ro) * ld_p + r] = static_cast<S>(v);
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < kMaxFragsPerWarp; ++f) {
      const int zt = warp + f * kWarps;
      if (zt < z_tiles) {
        const int y = zt / o_tiles, ot = zt % o_tiles;
        for (int t = 0; t < tn; ++t) {
          const int tap = t0 + t, i = tap / kw, j = tap % kw;
          const S* a_rows = pj + ((y * sh + i * dh) * pw + j * dw) * ld_p;
          const S* b_cols = cs + (t * rout_pad + ot * 16) * ld_p;
          for (int k0 = 0; k0 < rin_pad; k0 += K) {
            FragA a;
            FragB b;
            load_operand<T>(a, a_rows + k0, sw * ld_p);
            load_operand<T>(b, b_cols + k0, ld_p);
            wmma::mma_sync(zacc[f], a, b, zacc[f]);
          }
        }
      }
    }
    __syncthreads();  // cs is restaged next; after the last chunk, pj becomes z
  }
  S* zs = pj;  // (kPixels, ld_z), row-major A
#pragma unroll
  for (int f = 0; f < kMaxFragsPerWarp; ++f) {
    const int zt = warp + f * kWarps;
    if (zt < z_tiles) spill(zacc[f], zs + (zt / o_tiles) * 16 * ld_z + (zt % o_tiles) * 16, ld_z);
  }
  __syncthreads();

  // 3. out = z * last^T + bias for this block's slice of C_out.
  const int64_t HWo = s.H_out * s.W_out;
  T* yn = out + n * s.C_out * HWo;
  const int64_t co_begin = blockIdx.y * plan.co_per_split;
  const int64_t co_end = co_begin + plan.co_per_split < s.C_out ? co_begin + plan.co_per_split : s.C_out;
  S* ls = stage;  // (kCoChunk, ld_z): last's rows, a column-major B
  for (int64_t cb = co_begin; cb < co_end; cb += kCoChunk) {
    for (int e = tid; e < kCoChunk * rout_pad; e += kThreads) {
      const int co = e / rout_pad, ro = e % rout_pad;
      const float v = cb + co < co_end && ro < R_out ? static_cast<float>(last[(cb + co) * R_out + ro]) : 0.0f;
      ls[co * ld_z + ro] = static_cast<S>(v);
    }
    __syncthreads();
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
      wmma::store_matrix_sync(scratch, acc, 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t oh = oh0 + y;
      // Lanes take consecutive pixels of one channel: contiguous stores.
      for (int e = lane; e < 256; e += 32) {
        const int px = e % 16, c = e / 16;
        const int64_t co = cb + ct * 16 + c, ow = ow0 + px;
        if (co < co_end && oh < s.H_out && ow < s.W_out) {
          const float b = bias ? static_cast<float>(bias[co]) : 0.0f;
          yn[co * HWo + oh * s.W_out + ow] = static_cast<T>(scratch[px * 16 + c] + b);
        }
      }
      __syncwarp();
    }
    __syncthreads();  // ls is restaged next
  }
#endif
}

int64_t round_up(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

bool make_tc_plan(const Conv2dSizes& s, int64_t elem_bytes, TcPlan* plan) {
  if (!s.has_first || !s.has_last || s.R_in > kMaxRank || s.R_out > kMaxRank) return false;
  const int64_t ph = (kRowsOut - 1) * s.stride_h + (s.kh - 1) * s.dil_h + 1;
  const int64_t pw = (kColsOut - 1) * s.stride_w + (s.kw - 1) * s.dil_w + 1;
  const int64_t m_pad = round_up(ph * pw, 16), rin_pad = round_up(s.R_in, 16), rout_pad = round_up(s.R_out, 16);
  const int64_t pad = 32 / elem_bytes, ld_p = rin_pad + pad, ld_z = rout_pad + pad;
  const int64_t pj = round_up(std::max(m_pad * ld_p, kPixels * ld_z) * elem_bytes, 128);
  const int64_t scratch = kWarps * kScratchFloats * 4;
  const int64_t avail = kTcSharedMemBudget - pj - scratch;
  if (avail <= 0) return false;
  int64_t kc = 0;
  for (const int64_t c : {64, 32, 16}) {
    if ((m_pad + rin_pad) * (c + pad) * elem_bytes <= avail) {
      kc = c;
      break;
    }
  }
  const int64_t per_tap = rout_pad * ld_p * elem_bytes, taps = s.kh * s.kw;
  const int64_t taps_chunk = std::min<int64_t>(taps, avail / per_tap);
  if (kc == 0 || taps_chunk < 1 || kCoChunk * ld_z * elem_bytes > avail) return false;
  const int64_t stage = round_up(
      std::max({(m_pad + rin_pad) * (kc + pad) * elem_bytes, taps_chunk * per_tap, kCoChunk * ld_z * elem_bytes}), 128);

  const int64_t tiles_h = ceil_div(s.H_out, kRowsOut), tiles_w = ceil_div(s.W_out, kColsOut);
  const int64_t blocks = s.N * tiles_h * tiles_w;
  if (blocks >= (int64_t{1} << 31)) return false;
  // Few tiles: split C_out over blocks (each recomputes steps 1-2) until the
  // grid covers the multiprocessors once.
  const int64_t sms = cached_device_attribute<cudaDevAttrMultiProcessorCount>();
  int64_t co_splits = 1;
  if (blocks < sms) co_splits = std::clamp<int64_t>(ceil_div(sms, std::max<int64_t>(blocks, 1)), 1, ceil_div(s.C_out, kCoChunk));
  const int64_t co_per_split = round_up(ceil_div(s.C_out, co_splits), 16);

  plan->ph = static_cast<int>(ph);
  plan->pw = static_cast<int>(pw);
  plan->m_pad = static_cast<int>(m_pad);
  plan->rin_pad = static_cast<int>(rin_pad);
  plan->rout_pad = static_cast<int>(rout_pad);
  plan->kc = static_cast<int>(kc);
  plan->pad = static_cast<int>(pad);
  plan->taps_chunk = static_cast<int>(taps_chunk);
  plan->tiles_w = tiles_w;
  plan->tiles_per_image = tiles_h * tiles_w;
  plan->co_per_split = co_per_split;
  plan->co_splits = ceil_div(s.C_out, co_per_split);
  plan->off_stage = pj;
  plan->off_scratch = pj + stage;
  plan->smem_bytes = static_cast<size_t>(pj + stage + scratch);
  return true;
}

template <typename T>
void launch_tc(dim3 grid, cudaStream_t stream, const Conv2dSizes& s, const TcPlan& plan, const ConvPointers& p) {
  auto kernel = fused_conv_tc_kernel<T>;
  if (plan.smem_bytes > static_cast<size_t>(kSharedMemBudget)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(plan.smem_bytes)));
  }
  kernel<<<grid, kThreads, plan.smem_bytes, stream>>>(
      s, plan, static_cast<const T*>(p.x), p.nhwc, static_cast<const T*>(p.first), static_cast<const T*>(p.core),
      static_cast<const T*>(p.last), static_cast<const T*>(p.bias), static_cast<T*>(p.out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// TUCKER_OPS_CUDA_TC: "0" never runs the tensor-core kernel, "1" runs it on
// every call it applies to (tests compare it with the CUDA-core kernels on the
// same shapes), unset lets the op choose.
const char* tc_env() {
  return std::getenv("TUCKER_OPS_CUDA_TC");
}

}  // namespace

bool fused_conv_tc_applies(const Conv2dSizes& s, c10::ScalarType dtype) {
  const bool tc_dtype = dtype == at::kHalf || dtype == at::kBFloat16 ||
                        (dtype == at::kFloat && at::globalContext().allowTF32CuDNN());
  const char* env = tc_env();
  if (!tc_dtype || (env != nullptr && std::strcmp(env, "0") == 0) || cached_device_attribute<cudaDevAttrComputeCapabilityMajor>() < 8) {
    return false;
  }
  TcPlan plan{};
  return make_tc_plan(s, dtype == at::kFloat ? 4 : 2, &plan);
}

bool fused_conv_tc_forced() {
  const char* env = tc_env();
  return env != nullptr && std::strcmp(env, "1") == 0;
}

double fused_conv_tc_seconds(const Conv2dSizes& s, c10::ScalarType dtype, double multiprocessors) {
  TcPlan plan{};
  if (!make_tc_plan(s, dtype == at::kFloat ? 4 : 2, &plan)) return 1.0;
  // Per block: a fixed cost (the staging round trips of its steps), then its
  // multiply-adds at one block's rate, halved when two blocks share a
  // multiprocessor (TF32: 1.3 times slower). Fitted to the "tensor cores"
  // column of the H200 sweep in RESULTS_GPU.md.
  constexpr double kBlockSeconds = 18e-6, kMacsPerSecondPerBlock = 56e9;
  const double rate = dtype == at::kFloat ? kMacsPerSecondPerBlock / 1.3 : kMacsPerSecondPerBlock;
  const double macs = static_cast<double>(plan.m_pad) * s.C_in * plan.rin_pad +
                      static_cast<double>(kPixels) * plan.rout_pad * plan.rin_pad * s.kh * s.kw +
                      static_cast<double>(kPixels) * plan.co_per_split * plan.rout_pad;
  const double blocks = static_cast<double>(s.N) * plan.tiles_per_image * plan.co_splits;
  const double waves = std::ceil(blocks / (2 * multiprocessors));
  const double sharing = std::clamp(blocks / multiprocessors, 1.0, 2.0);
  return waves * (kBlockSeconds + macs * sharing / rate);
}

bool fused_conv_forward_tc(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p) {
  if (!fused_conv_tc_applies(s, like.scalar_type())) return false;
  TcPlan plan{};
  if (!make_tc_plan(s, like.scalar_type() == at::kFloat ? 4 : 2, &plan)) return false;
  if (s.N == 0) return true;
  const dim3 grid(static_cast<unsigned>(s.N * plan.tiles_per_image), static_cast<unsigned>(plan.co_splits));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(like.scalar_type(), "tucker_conv2d_cuda_tc",
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch_tc<scalar_t>(grid, stream, s, plan, p); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { launch_tc<scalar_t>(grid, stream, s, plan, p); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { launch_tc<scalar_t>(grid, stream, s, plan, p); }));
  return true;
}

}  // namespace tucker_ops::cuda
