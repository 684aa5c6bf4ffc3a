// The fused forward kernel of tucker_conv2d: 1x1 (first) -> kh x kw (core) ->
// 1x1 (last) + bias in one launch, the rank-sized intermediates kept on chip.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace tucker_ops::cuda {

struct ConvPointers {
  const void* x;      // input (N, C_in, H, W): NCHW contiguous, or NHWC when nhwc
  bool nhwc;
  const void* first;  // (R_in, C_in) contiguous, or null
  const void* core;   // (R_out, R_in, kh, kw) contiguous
  const void* last;   // (C_out, R_out) contiguous, or null
  const void* bias;   // (C_out,) or null
  void* out;          // (N, C_out, H_out, W_out) contiguous
};

// Launches the fused kernel on the current stream and returns true, or returns
// false without launching anything when the shape is outside what it takes
// (R_out > 128, or a patch too large for shared memory); the caller then runs
// an unfused chain.
bool fused_conv_forward(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p);

// Whether the fused kernel is expected to beat the unfused chain on this shape:
// a time model of the kernel against the chain's host-side floor, both
// measured on an H200 (benchmarks/RESULTS_GPU.md).
bool fused_conv_preferred(const Conv2dSizes& s);

}  // namespace tucker_ops::cuda
