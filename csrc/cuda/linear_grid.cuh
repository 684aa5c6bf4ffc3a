// The whole-GPU fused forward kernel of tucker_linear, for factor sets too
// large for linear_fused.cu's per-block streaming (linear_4096: 4.5 M
// elements) at few rows: one cooperative launch whose every block takes part
// in each stage, with a grid-wide barrier between stages.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/linear_fused.cuh"

namespace tucker_ops::cuda {

// Whether grid_linear_forward can run on this device (cooperative launches);
// it takes every shape and dtype.
bool grid_linear_applies();

// Whether this call runs the kernel. TUCKER_OPS_CUDA_LINEAR_GRID=1 runs it on
// every shape (any rows, any factor sizes, during graph capture too), so tests
// and benchmarks can check it; =0 never. Unset, the op chooses it for eager
// calls where linear_fused.cu's kernel does not apply (`fused_applies`: large
// factors, many rows) and its time model beats the cuBLAS chain's host time:
// linear_4096 at few rows. In float16, bfloat16 and float32, the dtypes it was
// measured in; never where `mode` forces a path (TUCKER_OPS_CUDA_FUSED), nor
// in graph capture, where the chain replayed faster (benchmarks/RESULTS_GPU.md).
bool grid_linear_chosen(const at::Tensor& like, const LinearSizes& s, FusedMode mode, bool fused_applies);

// Launches the kernel on the current stream. Scratch for the rank-sized rows
// (M x R_in and M x R_out in the call's dtype) comes from the caching
// allocator. Requires grid_linear_applies.
void grid_linear_forward(const at::Tensor& like, const LinearSizes& s, const LinearPointers& p);

}  // namespace tucker_ops::cuda
