// Fused tucker_linear forward over the whole GPU (linear_grid.cuh).
//
// linear_fused.cu gives every block all the factors, which suits factor sets
// that stay in L2 and stream in a few microseconds. For large ones at few rows
// (linear_4096 at batch 1-32: 4.5 M elements, 9 MB in bfloat16) the time is
// the weight stream itself, and it takes every multiprocessor to keep enough
// loads in flight. So each stage is spread over all the grid's warps
// (grid_stage.cuh): one launch where the cuBLAS chain makes three.
#include <cstdlib>
#include <cstring>

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

}  // namespace

bool grid_linear_forced() {
  const char* v = std::getenv("TUCKER_OPS_CUDA_LINEAR_GRID");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

bool grid_linear_applies(const at::Tensor& /*like*/, const LinearSizes& /*s*/) {
  return grid_linear_forced() && grid::cooperative_launch_supported();
}

void grid_linear_forward(const at::Tensor& like, const LinearSizes& s, const LinearPointers& p) {
  if (s.M == 0 || s.out == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "tucker_linear_cuda_grid",
                                  [&] { launch<scalar_t>(like, s, p); });
}

}  // namespace tucker_ops::cuda
