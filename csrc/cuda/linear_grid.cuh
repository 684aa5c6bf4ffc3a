// The whole-GPU fused forward kernel of tucker_linear, for factor sets too
// large for linear_fused.cu's per-block streaming (linear_4096: 4.5 M
// elements) at few rows: one cooperative launch whose every block takes part
// in each stage, with a grid-wide barrier between stages.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"
#include "cuda/linear_fused.cuh"

namespace tucker_ops::cuda {

// TUCKER_OPS_CUDA_LINEAR_GRID: "1" runs this kernel on every shape the device
// can launch it for (any rows, any factor sizes, during graph capture too), so
// tests and benchmarks can check it; "0" or unset: the op does not choose it.
// It has not run on a GPU yet (benchmarks/RESULTS_GPU.md): the op's automatic
// choice takes it up once it is measured against the cuBLAS chain.
bool grid_linear_forced();

// Whether grid_linear_forward runs on this shape: forced, and the device
// supports cooperative launches.
bool grid_linear_applies(const at::Tensor& like, const LinearSizes& s);

// Launches the kernel on the current stream. Scratch for the rank-sized rows
// (M x R_in and M x R_out in the call's dtype) comes from the caching
// allocator. Requires grid_linear_applies.
void grid_linear_forward(const at::Tensor& like, const LinearSizes& s, const LinearPointers& p);

}  // namespace tucker_ops::cuda
