// Fused tucker_conv2d forward over the whole GPU (conv_grid.cuh).
//
// At batch 1-8 a ResNet 14x14 or 7x7 layer has 49-1568 output pixels: a
// handful of conv_fused_tc.cu's 64-pixel tiles, each running its three steps
// one after another on one multiprocessor (resnet50_3x3 at batch 1: 0.063 ms
// of GPU time against cuDNN's dense 0.022 ms, RESULTS_GPU.md). Here every
// stage is a product spread over all the grid's warps (grid_stage.cuh):
//   prep:    the core repacked to (R_out, taps, R_in), so that the k of the
//            implicit im2col runs over channels within a tap; an NCHW input
//            transposed to NHWC scratch;
//   stage 1: P (pixels x R_in) = x (pixels x C_in) first^T (dense rows);
//   stage 2: Q (out pixels x R_out) = im2col(P) core^T (GatherSource);
//   stage 3: out = Q last^T + bias, written NCHW or NHWC (OutputDest);
// with a grid-wide barrier between stages, P and Q in L2 scratch in the
// call's dtype (rounded as a Sequential chain rounds its layers' outputs). Tucker-1 layers drop stage 1 or 3. float32 stages take
// TF32 tensor cores where torch.backends.cudnn.allow_tf32 is set, as nn.Conv2d.
#include <algorithm>
#include <limits>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "cuda/conv_grid.cuh"
#include "cuda/grid_stage.cuh"

namespace tucker_ops::cuda {
namespace {

using namespace grid;

constexpr int kTile = 32;  // the input transposes 32 channels x 32 pixels per block step

struct ConvGridParams {
  // The core (R_out, R_in, taps) to core_packed (R_out, taps, R_in), call's dtype.
  const void* core;
  void* core_packed;
  int64_t R_out, R_in, taps;
  // An NCHW input (N, C, pixels) to xt (N * pixels, C); xt null: the input is
  // NHWC and read in place.
  const void* x;
  void* xt;
  int64_t N, C, pixels;
  bool sync_after_prep;  // the first stage reads what prep writes
  int stages;
  GridStage stage[3];
};

template <typename T>
__device__ void repack_core(const ConvGridParams& p) {
  const T* core = static_cast<const T*>(p.core);
  T* packed = static_cast<T*>(p.core_packed);
  const int64_t total = p.R_out * p.taps * p.R_in;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = e % p.R_in, tap = (e / p.R_in) % p.taps, ro = e / (p.R_in * p.taps);
    packed[e] = core[(ro * p.R_in + r) * p.taps + tap];
  }
}

// Through a shared-memory tile, so that both the reads (along pixels) and the
// writes (along channels) coalesce.
template <typename T>
__device__ void transpose_input(const ConvGridParams& p, T* tile) {
  constexpr int kLd = kTile + 1;  // fewer bank conflicts on the column reads
  const T* x = static_cast<const T*>(p.x);
  T* xt = static_cast<T*>(p.xt);
  const int64_t c_tiles = ceil_div(p.C, kTile), p_tiles = ceil_div(p.pixels, kTile);
  const int64_t tiles = p.N * c_tiles * p_tiles;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  constexpr int kRowsPerPass = kThreads / kTile;
  for (int64_t tile_id = blockIdx.x; tile_id < tiles; tile_id += gridDim.x) {  // uniform per block
    const int64_t n = tile_id / (c_tiles * p_tiles), rest = tile_id % (c_tiles * p_tiles);
    const int64_t c0 = (rest / p_tiles) * kTile, p0 = (rest % p_tiles) * kTile;
    for (int i = ty; i < kTile; i += kRowsPerPass) {
      const int64_t c = c0 + i, pix = p0 + tx;
      tile[i * kLd + tx] = c < p.C && pix < p.pixels ? x[(n * p.C + c) * p.pixels + pix] : T(0);
    }
    __syncthreads();
    for (int i = ty; i < kTile; i += kRowsPerPass) {
      const int64_t pix = p0 + i, c = c0 + tx;
      if (c < p.C && pix < p.pixels) xt[(n * p.pixels + pix) * p.C + c] = tile[tx * kLd + i];
    }
    __syncthreads();  // the tile is refilled next step
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) grid_conv_kernel(const __grid_constant__ ConvGridParams p) {
  __shared__ __align__(16) unsigned char red[kReduceBytes];
  __shared__ int4 tables[kWarps][kTcRows];
  static_assert(kTile * (kTile + 1) * sizeof(T) <= kReduceBytes, "the transpose tile fits");
  int4* table = tables[threadIdx.x / 32];
  repack_core<T>(p);
  if (p.xt != nullptr) transpose_input<T>(p, reinterpret_cast<T*>(red));
  for (int i = 0; i < p.stages; ++i) {
    // What the previous stage (or prep) wrote is complete and visible grid-wide.
    if (i > 0 || p.sync_after_prep) cooperative_groups::this_grid().sync();
    const GridStage& st = p.stage[i];
    if (st.gather) {  // the core: its weights were repacked in this launch
      if (st.dst_output) {
        run_any_stage<T, GatherSource<T>, OutputDest<T>, true>(st, red, table);
      } else {
        run_any_stage<T, GatherSource<T>, ScratchDest<T>, true>(st, red, table);
      }
    } else if (st.dst_output) {  // `last`, from Q
      run_any_stage<T, DenseSource<T>, OutputDest<T>, false>(st, red, table);
    } else {  // `first`, from the input (NHWC, or transposed to it in prep)
      run_any_stage<T, DenseSource<T>, ScratchDest<T>, false>(st, red, table);
    }
  }
}

// Carves 16-byte-aligned pieces out of one buffer of T.
template <typename T>
struct ScratchLayout {
  int64_t elements = 0;
  int64_t add(int64_t count) {
    const int64_t at = elements;
    elements = round_up(elements + count, 16 / static_cast<int64_t>(sizeof(T)));
    return at;
  }
};

template <typename T>
void launch(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p, bool out_nhwc) {
  const int64_t taps = s.kh * s.kw, pixels = s.H * s.W, out_pixels = s.H_out * s.W_out;
  const int64_t in_rows = s.N * pixels, out_rows = s.N * out_pixels;
  const bool transpose = !p.nhwc;
  ScratchLayout<T> layout;
  const int64_t at_core = layout.add(s.R_out * taps * s.R_in);
  const int64_t at_xt = transpose ? layout.add(in_rows * s.C_in) : -1;
  const int64_t at_p = s.has_first ? layout.add(in_rows * s.R_in) : -1;
  const int64_t at_q = s.has_last ? layout.add(out_rows * s.R_out) : -1;
  const at::Tensor scratch = at::empty({layout.elements}, like.options());
  T* base = scratch.mutable_data_ptr<T>();

  ConvGridParams gp{};
  gp.core = p.core;
  gp.core_packed = base + at_core;
  gp.R_out = s.R_out;
  gp.R_in = s.R_in;
  gp.taps = taps;
  gp.x = p.x;
  gp.xt = transpose ? base + at_xt : nullptr;
  gp.N = s.N;
  gp.C = s.C_in;
  gp.pixels = pixels;
  gp.sync_after_prep = transpose || !s.has_first;

  // The input as the first stage's dense rows or the core's gather source.
  const void* src = transpose ? gp.xt : p.x;
  // A gather stage is the core's: its weights are the core repacked in this
  // launch (the kernel reads them through L2).
  auto add_stage = [&](const void* w, int64_t M, int64_t n, int64_t K, void* dst, bool output, bool gather) {
    GridStage& st = gp.stage[gp.stages++];
    st.w = w;
    st.src = src;
    st.dst = dst;
    st.bias = output ? p.bias : nullptr;
    st.M = M;
    st.n = n;
    st.K = K;
    st.gather = gather;
    st.dst_output = output;
    // A gather's runs stay within one pixel's channels (grid_conv_applies), so
    // aligned rows are all it needs for 16-byte loads.
    const int64_t run_of = gather ? s.R_in : K;
    st.vec = run_of % kVec<T> == 0 && aligned16(w) && aligned16(src);
    // float32 on TF32 tensor cores where nn.Conv2d's cuDNN would use them; a
    // gather's tensor-core runs are 8 channels.
    st.tc = use_tensor_cores<T>(M, at::globalContext().allowTF32CuDNN()) && (!gather || s.R_in % 8 == 0);
    st.geo = GatherGeometry{s.R_in,
                            s.H,
                            s.W,
                            s.H_out,
                            s.W_out,
                            static_cast<int>(s.kw),
                            static_cast<int>(s.stride_h),
                            static_cast<int>(s.stride_w),
                            static_cast<int>(s.pad_h),
                            static_cast<int>(s.pad_w),
                            static_cast<int>(s.dil_h),
                            static_cast<int>(s.dil_w)};
    st.out_pixels = out_pixels;
    st.s_image = s.C_out * out_pixels;
    st.s_pixel = out_nhwc ? s.C_out : 1;
    st.s_out = out_nhwc ? 1 : out_pixels;
    src = dst;
  };
  if (s.has_first) add_stage(p.first, in_rows, s.R_in, s.C_in, base + at_p, false, false);
  if (s.has_last) {
    add_stage(gp.core_packed, out_rows, s.R_out, taps * s.R_in, base + at_q, false, true);
    add_stage(p.last, out_rows, s.C_out, s.R_out, p.out, true, false);
  } else {
    add_stage(gp.core_packed, out_rows, s.R_out, taps * s.R_in, p.out, true, true);
  }

  const int per_sm = blocks_per_sm<grid_conv_kernel<T>>("tucker_conv2d");
  const int64_t transpose_tiles = transpose ? s.N * ceil_div(s.C_in, kTile) * ceil_div(pixels, kTile) : 0;
  const int64_t blocks = plan_grid<T>(gp.stage, gp.stages, transpose_tiles, per_sm);
  launch_cooperative(grid_conv_kernel<T>, blocks, gp);
}

// Predicted GPU time of the kernel in seconds: a fixed cost (the cooperative
// launch, the repack, the grid barriers) plus its multiply-adds and bytes at
// rates fitted by least squares to bench_gpu.py's CUDA-graph replays on an
// H200, NCHW inputs, Tucker-2 (benchmarks/RESULTS_GPU.md: within 0.64-1.45x
// of the times of two runs). Infinity in the dtypes it was not measured in.
double grid_conv_seconds(const Conv2dSizes& s, c10::ScalarType dtype) {
  double macs_per_second = 0.0, bytes_per_second = 0.0;
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    macs_per_second = 15e12, bytes_per_second = 0.7e12;
  } else if (dtype == at::kFloat && at::globalContext().allowTF32CuDNN()) {
    macs_per_second = 10.5e12, bytes_per_second = 1.42e12;
  } else {
    return std::numeric_limits<double>::infinity();
  }
  const double in_pixels = static_cast<double>(s.N) * s.H * s.W;
  const double out_pixels = static_cast<double>(s.N) * s.H_out * s.W_out;
  const double macs = (s.has_first ? in_pixels * s.C_in * s.R_in : 0.0) +
                      out_pixels * s.R_out * s.R_in * s.kh * s.kw + (s.has_last ? out_pixels * s.C_out * s.R_out : 0.0);
  // The input twice (the NCHW transposition reads it), each projection
  // written and read back, the output and the factors once.
  const double elems = 2.0 * in_pixels * s.C_in + out_pixels * s.C_out +
                       (s.has_first ? 2.0 * in_pixels * s.R_in + static_cast<double>(s.R_in) * s.C_in : 0.0) +
                       (s.has_last ? 2.0 * out_pixels * s.R_out + static_cast<double>(s.C_out) * s.R_out : 0.0) +
                       static_cast<double>(s.R_out) * s.R_in * s.kh * s.kw;
  constexpr double kFixedSeconds = 24e-6;
  return kFixedSeconds + macs / macs_per_second +
         elems * static_cast<double>(c10::elementSize(dtype)) / bytes_per_second;
}

}  // namespace

bool grid_conv_applies(const Conv2dSizes& s, c10::ScalarType dtype) {
  const int64_t run = 16 / static_cast<int64_t>(c10::elementSize(dtype));
  // The gather keeps row origins, tap offsets and its k in 32 bits.
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max() / 2;
  const bool small_geometry = s.N <= kMax && s.H + s.pad_h <= kMax && s.W + s.pad_w <= kMax &&
                              s.H_out * s.stride_h <= kMax && s.W_out * s.stride_w <= kMax &&
                              s.kh * s.dil_h <= kMax && s.kw * s.dil_w <= kMax && s.kh * s.kw * s.R_in <= kMax;
  return s.R_in % run == 0 && small_geometry && grid::cooperative_launch_supported();
}

bool grid_conv_chosen(const Conv2dSizes& s, c10::ScalarType dtype, FusedMode mode, const FusedConvChoice& fused,
                      bool capturing) {
  if (mode == FusedMode::kNever) return false;
  // Whether it applies and its time model, once per shape, dtype and device (ShapeMemo).
  struct Model {
    bool applies;
    double seconds;
  };
  thread_local ShapeMemo<Model, 20> memo;
  const auto key = conv_shape_key<2>(s, {static_cast<int64_t>(dtype), c10::cuda::current_device()});
  const Model model = memo.get(key, [&] {
    const bool applies = grid_conv_applies(s, dtype);
    return Model{applies, applies ? grid_conv_seconds(s, dtype) : std::numeric_limits<double>::infinity()};
  });
  if (!model.applies) return false;
  const FusedMode grid = switch_from_env("TUCKER_OPS_CUDA_CONV_GRID");
  if (grid != FusedMode::kAuto) return grid == FusedMode::kAlways;
  if (mode == FusedMode::kAlways || capturing) return false;
  const double fused_cost = fused.kernel == FusedConvKernel::kNone ? std::numeric_limits<double>::infinity()
                                                                   : std::max(kFusedHostSeconds, fused.seconds);
  return std::max(kGridHostSeconds, model.seconds) < std::min(fused_cost, eager_chain_seconds(s.has_first, s.has_last));
}

void grid_conv_forward(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p, bool out_nhwc) {
  if (s.N == 0 || s.C_out == 0 || s.H_out == 0 || s.W_out == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "tucker_conv2d_cuda_grid",
                                  [&] { launch<scalar_t>(like, s, p, out_nhwc); });
}

}  // namespace tucker_ops::cuda
