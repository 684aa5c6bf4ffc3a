// The whole-GPU fused forward kernel of tucker_conv2d, for layers with few
// output pixels (ResNet's 14x14 and 7x7 stages at small batch), where
// conv_fused*.cu's one block per output tile leaves most multiprocessors idle
// and runs each tile's chain serially: one cooperative launch whose every
// block takes part in each stage (grid_stage.cuh), the projections passing
// between stages through L2 scratch.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"
#include "cuda/conv_fused.cuh"

namespace tucker_ops::cuda {

// TUCKER_OPS_CUDA_CONV_GRID: "1" runs this kernel on every shape it takes
// (any batch, during graph capture too), so tests and benchmarks can check it;
// "0" or unset: the op does not choose it. It has not run on a GPU yet
// (benchmarks/RESULTS_GPU.md): the op's automatic choice takes it up once it
// is measured against the other paths.
bool grid_conv_forced();

// Whether grid_conv_forward runs on this shape and dtype: forced, the device
// supports cooperative launches, and R_in (C_in without `first`) is a multiple
// of the 16-byte run of the dtype (4 float32, 8 float16/bfloat16, 2 float64),
// so that no run of the implicit im2col crosses a tap.
bool grid_conv_applies(const Conv2dSizes& s, c10::ScalarType dtype);

// Launches the kernel on the current stream; `out` is (N, C_out, H_out, W_out),
// NHWC when out_nhwc, else NCHW. Scratch (the transposed NCHW input, the
// projections, the repacked core) comes from the caching allocator.
// Requires grid_conv_applies.
void grid_conv_forward(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p, bool out_nhwc);

}  // namespace tucker_ops::cuda
