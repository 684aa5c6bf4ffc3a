// The fused forward kernel of tucker_linear for small factor sets:
// X first^T -> core^T -> last^T + bias in one launch, the rank-sized rows kept
// in shared memory.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace tucker_ops::cuda {

struct LinearPointers {
  const void* x;      // (M, in) contiguous
  const void* first;  // (R_in, in) contiguous, or null
  const void* core;   // (R_out, R_in) contiguous
  const void* last;   // (out, R_out) contiguous, or null
  const void* bias;   // (out,) or null
  void* out;          // (M, out) contiguous
};

// Launches the fused kernel on the current stream and returns true, or returns
// false without launching anything when the shape is better served by the GEMM
// chain (factors too large for every block to stream them, or many rows).
// TUCKER_OPS_CUDA_FUSED=0 in the environment forces false, as for the conv.
bool fused_linear_forward(const at::Tensor& like, const LinearSizes& s, const LinearPointers& p);
// Whether fused_linear_forward would launch on this shape: callers check it
// before allocating the output, so the GEMM chain does not allocate twice.
bool fused_linear_applies(const at::Tensor& like, const LinearSizes& s);

}  // namespace tucker_ops::cuda
