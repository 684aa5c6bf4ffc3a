// The whole-GPU fused forward kernel of tucker_conv2d, for layers with few
// output pixels (ResNet's 14x14 and 7x7 stages at small batch), where
// conv_fused*.cu's one block per output tile leaves most multiprocessors idle
// and runs each tile's chain serially: one cooperative launch whose every
// block takes part in each stage (grid_stage.cuh), the projections passing
// between stages through L2 scratch.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/conv_fused.cuh"

namespace tucker_ops::cuda {

// Whether grid_conv_forward can run this shape and dtype: the device supports
// cooperative launches, and R_in (C_in without `first`) is a multiple of the
// 16-byte run of the dtype (4 float32, 8 float16/bfloat16, 2 float64), so that
// no run of the implicit im2col crosses a tap.
bool grid_conv_applies(const Conv2dSizes& s, c10::ScalarType dtype);

// Whether this call runs the kernel. TUCKER_OPS_CUDA_CONV_GRID=1 runs it on
// every shape it applies to (any batch, during graph capture too), so tests
// and benchmarks can check it; =0 never. Unset, the op chooses it for eager
// calls where its time model beats both the chosen tile kernel (`fused`) and
// the unfused chain's host time: the small layers where the chain's three
// calls are host-bound and the tile kernels leave the GPU idle, in float16,
// bfloat16 and float32 with TF32 (the dtypes it was measured in). Never
// where `mode` forces a path (TUCKER_OPS_CUDA_FUSED), nor in graph capture,
// where the other paths replayed faster (benchmarks/RESULTS_GPU.md).
// `capturing`: the current stream is capturing (current_stream_is_capturing).
bool grid_conv_chosen(const Conv2dSizes& s, c10::ScalarType dtype, FusedMode mode, const FusedConvChoice& fused,
                      bool capturing);

// Launches the kernel on the current stream; `out` is (N, C_out, H_out, W_out),
// NHWC when out_nhwc, else NCHW. Scratch (the transposed NCHW input, the
// projections, the repacked core) comes from the caching allocator.
// Requires grid_conv_applies.
void grid_conv_forward(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p, bool out_nhwc);

}  // namespace tucker_ops::cuda
