// Fused tucker_linear forward over the whole GPU (linear_grid.cuh).
//
// linear_fused.cu gives every block all the factors, which suits factor sets
// that stay in L2 and stream in a few microseconds. For large ones at few rows
// (linear_4096 at batch 1-32: 4.5 M elements, 9 MB in bfloat16) the time is
// the weight stream itself, and it takes every multiprocessor to keep enough
// loads in flight. So each stage is spread over all the grid's warps
// (grid_stage.cuh): one launch where the cuBLAS chain makes three.
#include <algorithm>
#include <limits>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "cuda/grid_stage.cuh"
#include "cuda/linear_grid.cuh"

namespace tucker_ops::cuda {
namespace {

using namespace grid;

struct GridParams {
  int stages;
  GridStage stage[3];
};

// Stage i reads the input (dense rows of the call's dtype) or the previous
// stage's scratch, and writes scratch or the output.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) grid_linear_kernel(const __grid_constant__ GridParams p) {
  __shared__ __align__(16) unsigned char red[kReduceBytes];
  static_assert(kThreads * sizeof(acc_t<T>) <= kReduceBytes, "one accumulator per thread fits");
  for (int i = 0; i < p.stages; ++i) {
    // The previous stage's scratch is complete and visible grid-wide.
    if (i > 0) cooperative_groups::this_grid().sync();
    const GridStage& st = p.stage[i];
    if (st.dst_output) {
      run_any_stage<T, DenseSource<T>, OutputDest<T>, false>(st, red, nullptr);
    } else {
      run_any_stage<T, DenseSource<T>, ScratchDest<T>, false>(st, red, nullptr);
    }
  }
}

template <typename T>
void launch(const at::Tensor& like, const LinearSizes& s, const LinearPointers& p) {
  constexpr int64_t kScratchAlign = 16 / sizeof(T);  // t2 starts on a 16-byte boundary
  const int64_t t1_elems = s.has_first ? round_up(s.M * s.R_in, kScratchAlign) : 0;
  const int64_t t2_elems = s.has_last ? s.M * s.R_out : 0;
  const at::Tensor scratch = at::empty({t1_elems + t2_elems}, like.options());
  T* t1 = scratch.mutable_data_ptr<T>();
  T* t2 = t1 + t1_elems;

  // float32 on TF32 tensor cores where nn.Linear's cuBLAS would use them.
  const bool tensor_cores = use_tensor_cores<T>(s.M, at::globalContext().allowTF32CuBLAS());
  GridParams gp{};
  const void* src = p.x;
  int64_t K = s.in;
  auto add_stage = [&](const void* w, int64_t n, void* dst, bool output, const void* bias) {
    GridStage& st = gp.stage[gp.stages++];
    st.w = w;
    st.src = src;
    st.dst = dst;
    st.bias = bias;
    st.M = s.M;
    st.n = n;
    st.K = K;
    st.dst_output = output;
    st.vec = K % kVec<T> == 0 && aligned16(w) && aligned16(src);
    st.tc = tensor_cores;
    // The output rows are row-major (M, out): one "image" of M pixels.
    st.out_pixels = s.M;
    st.s_image = 0;
    st.s_pixel = n;
    st.s_out = 1;
    src = dst;
    K = n;
  };
  if (s.has_first) add_stage(p.first, s.R_in, t1, false, nullptr);
  if (s.has_last) {
    add_stage(p.core, s.R_out, t2, false, nullptr);
    add_stage(p.last, s.out, p.out, true, p.bias);
  } else {
    add_stage(p.core, s.out, p.out, true, p.bias);
  }
  const int per_sm = blocks_per_sm<grid_linear_kernel<T>>("tucker_linear");
  const int64_t blocks = plan_grid<T>(gp.stage, gp.stages, 0, per_sm);
  launch_cooperative(grid_linear_kernel<T>, blocks, gp);
}

// Predicted GPU time of the kernel in seconds: a fixed cost (the cooperative
// launch, the grid barriers) plus its multiply-adds and bytes at rates fitted
// by least squares to bench_gpu.py's CUDA-graph replays on an H200
// (benchmarks/RESULTS_GPU.md: within 0.61-1.46x of the times of two runs).
// float32 at its CUDA-core rate (measured with TF32 off, torch's default for
// matmuls; its TF32 tasks are faster). Infinity for float64.
double grid_linear_seconds(const LinearSizes& s, c10::ScalarType dtype) {
  double macs_per_second = 0.0, bytes_per_second = 0.0;
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    macs_per_second = 21.6e12, bytes_per_second = 0.76e12;
  } else if (dtype == at::kFloat) {
    macs_per_second = 3.6e12, bytes_per_second = 16e12;
  } else {
    return std::numeric_limits<double>::infinity();
  }
  const double rows = static_cast<double>(s.M);
  const double first = s.has_first ? static_cast<double>(s.R_in) * s.in : 0.0;
  const double core = static_cast<double>(s.R_out) * (s.has_first ? s.R_in : s.in);
  const double last = s.has_last ? static_cast<double>(s.out) * s.R_out : 0.0;
  const double elems = rows * (s.in + s.out) + first + core + last;
  constexpr double kFixedSeconds = 12e-6;
  return kFixedSeconds + rows * (first + core + last) / macs_per_second +
         elems * static_cast<double>(c10::elementSize(dtype)) / bytes_per_second;
}

}  // namespace

bool grid_linear_applies() { return grid::cooperative_launch_supported(); }

bool grid_linear_chosen(const at::Tensor& like, const LinearSizes& s, FusedMode mode, bool fused_applies) {
  if (mode == FusedMode::kNever || !grid_linear_applies()) return false;
  const FusedMode grid = switch_from_env("TUCKER_OPS_CUDA_LINEAR_GRID");
  if (grid != FusedMode::kAuto) return grid == FusedMode::kAlways;
  if (mode == FusedMode::kAlways || fused_applies || current_stream_is_capturing()) return false;
  return std::max(kGridHostSeconds, grid_linear_seconds(s, like.scalar_type())) <
         eager_chain_seconds(s.has_first, s.has_last);
}

void grid_linear_forward(const at::Tensor& like, const LinearSizes& s, const LinearPointers& p) {
  if (s.M == 0 || s.out == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "tucker_linear_cuda_grid",
                                  [&] { launch<scalar_t>(like, s, p); });
}

}  // namespace tucker_ops::cuda
