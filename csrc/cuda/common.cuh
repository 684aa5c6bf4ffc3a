// Shared pieces of the CUDA backend: the dtypes it implements, the
// accumulation type, element loads that convert to it, and launch checks.
//
// Every kernel accumulates in float (double for float64 inputs) and indexes
// global memory with int64_t, so N*C*H*W beyond 2^31 is fine.
#pragma once

#include <array>
#include <cstdint>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace tucker_ops::cuda {

// The dtypes the CUDA kernels implement; passed to the shared checks so the
// error messages name this list (float64 is there for gradcheck).
inline constexpr std::array<c10::ScalarType, 4> kCudaDtypes = {
    c10::ScalarType::Float, c10::ScalarType::Double, c10::ScalarType::Half, c10::ScalarType::BFloat16};

// float for float/half/bfloat16, double for double.
template <typename T>
using acc_t = at::opmath_type<T>;

// Options for scratch tensors that hold intermediates in the accumulation type,
// so that half/bfloat16 calls round only once, on the final output.
inline at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(at::toOpMathType(like.scalar_type()));
}

// Largest dynamic shared memory a kernel may use without an opt-in
// (cudaFuncSetAttribute), valid on every architecture we build for.
inline constexpr int64_t kSharedMemBudget = 48 * 1024;

// Reads element `off` of a buffer that holds either the call's dtype T or its
// accumulation type, converting to the accumulation type.
template <typename T>
__device__ __forceinline__ acc_t<T> load_as_acc(const void* ptr, bool is_acc, int64_t off) {
  if (is_acc) return static_cast<const acc_t<T>*>(ptr)[off];
  return static_cast<acc_t<T>>(static_cast<const T*>(ptr)[off]);
}

template <typename T>
__device__ __forceinline__ void store_from_acc(void* ptr, bool is_acc, int64_t off, acc_t<T> v) {
  if (is_acc) {
    static_cast<acc_t<T>*>(ptr)[off] = v;
  } else {
    static_cast<T*>(ptr)[off] = static_cast<T>(v);
  }
}

// TUCKER_OPS_CUDA_FUSED picks the forward path, so tests can check every path
// on the same shapes: "0" never runs the fused kernels (the unfused chain
// runs), "1" runs them on every shape they take, unset lets the op choose.
enum class FusedMode { kAuto, kNever, kAlways };
FusedMode fused_mode_from_env();

// Whether the current stream is capturing a CUDA graph. Replays cost no host
// time, so there the unfused chain's tensor-core kernels win every shape but
// the smallest, and the op's path choice changes accordingly.
bool current_stream_is_capturing();

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace tucker_ops::cuda
