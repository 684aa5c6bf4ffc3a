// The fused forward kernel of tucker_conv2d: 1x1 (first) -> kh x kw (core) ->
// 1x1 (last) + bias in one launch, the rank-sized intermediates kept on chip.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"
#include "cuda/common.cuh"

namespace tucker_ops::cuda {

struct ConvPointers {
  const void* x;      // input (N, C_in, H, W): NCHW contiguous, or NHWC when nhwc
  bool nhwc;
  const void* first;  // (R_in, C_in) contiguous, or null
  const void* core;   // (R_out, R_in, kh, kw) contiguous
  const void* last;   // (C_out, R_out) contiguous, or null
  const void* bias;   // (C_out,) or null
  void* out;          // (N, C_out, H_out, W_out): NCHW contiguous (grid_conv_forward: NHWC on request)
};

// The fused kernel a call runs, chosen once per call from the kernels' time
// models, with its predicted GPU time (launch excluded; infinity for kNone).
enum class FusedConvKernel { kNone, kTensorCores, kCudaCores };
struct FusedConvChoice {
  FusedConvKernel kernel = FusedConvKernel::kNone;
  double seconds = 0.0;
};
FusedConvChoice choose_fused_conv(const Conv2dSizes& s, c10::ScalarType dtype);

// Launches the chosen fused kernel (choose_fused_conv) on the current stream
// and returns true, or returns false without launching anything when no fused
// kernel takes the shape (R_out > 128, or a patch too large for shared
// memory); the caller then runs an unfused chain. The CUDA-core choice runs
// the cluster kernel on sm_90+ where that fits.
bool fused_conv_forward(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p,
                        const FusedConvChoice& choice);

// The cluster kernel (conv_fused_cluster.cu, sm_90+): a cluster of cl blocks
// shares each output tile. fused_conv_cluster_size gives the cl that
// fused_conv_forward uses on this shape and device (1: the single-block
// kernel); TUCKER_OPS_CUDA_CLUSTER=0 / 2 / 4 / 8 forces none / that size.
int fused_conv_cluster_size(const Conv2dSizes& s, int64_t acc_bytes);
bool fused_conv_forward_cluster(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p, int cl);

// The tensor-core kernel (conv_fused_tc.cu): float16 / bfloat16, and float32
// through TF32 when torch.backends.cudnn.allow_tf32 is set (as nn.Conv2d);
// Tucker-2 with ranks <= 128 and a patch that fits shared memory.
// TUCKER_OPS_CUDA_TC=0 / =1 turns it off / forces it where it applies.
bool fused_conv_tc_forced();
bool fused_conv_forward_tc(const at::Tensor& like, const Conv2dSizes& s, const ConvPointers& p);
// Its predicted GPU time in seconds (launch cost excluded); infinity where it
// does not apply (dtype, switch, device or shape).
double fused_conv_tc_seconds(const Conv2dSizes& s, c10::ScalarType dtype, double multiprocessors);

// What fused_conv_tc_seconds and fused_conv_tc_forced read besides the shape,
// dtype and device (the TUCKER_OPS_CUDA_TC switch, cuDNN's TF32 flag), as one
// number: part of choose_fused_conv's memo key.
int64_t fused_conv_tc_settings();

// Whether the chosen fused kernel is expected to beat the unfused chain on
// this shape: its time model against the chain's host-side cost, both
// measured on an H200 (benchmarks/RESULTS_GPU.md). `capturing`: the current
// stream is capturing a CUDA graph (current_stream_is_capturing).
bool fused_conv_preferred(const Conv2dSizes& s, const FusedConvChoice& choice, bool capturing);

}  // namespace tucker_ops::cuda
