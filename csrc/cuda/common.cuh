// Shared pieces of the CUDA backend: the dtypes it implements, the
// accumulation type, element loads that convert to it, and launch checks.
//
// Every kernel accumulates in float (double for float64 inputs) and indexes
// global memory with int64_t, so N*C*H*W beyond 2^31 is fine.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <unordered_map>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "checks.h"

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

// x rounded to TF32 (cvt.rna: to nearest, ties away from zero), the form in
// which tensor cores take float32 operands, as raw bits. Only the bits an mma
// reads are defined: a value rounded once and stored reads the same on every
// later load, so the kernels may round an operand once, where it is written.
__device__ __forceinline__ uint32_t tf32_bits(float x) {
  uint32_t r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
#else
  r = __float_as_uint(x);
#endif
  return r;
}

// TUCKER_OPS_CUDA_FUSED picks the forward path, so tests can check every path
// on the same shapes: "0" never runs the fused kernels (the unfused chain
// runs), "1" runs them on every shape they take, unset lets the op choose.
enum class FusedMode { kAuto, kNever, kAlways };
FusedMode fused_mode_from_env();

// A path switch read from the environment variable `name`: "1" kAlways, "0"
// kNever, unset or anything else kAuto.
FusedMode switch_from_env(const char* name);

// TUCKER_OPS_CUDA_CLUSTER picks the thread-block clusters of the fused kernels
// (sm_90+), so tests can check every size: "0" never uses clusters, "2", "4"
// or "8" force that cluster size wherever the kernel can use it; unset (or
// anything else), -1: the op chooses.
int cluster_size_from_env();

// Whether the current stream is capturing a CUDA graph. Replays cost no host
// time, so there the unfused chain's tensor-core kernels win every shape but
// the smallest, and the op's path choice changes accordingly.
bool current_stream_is_capturing();

// What one eager call of each forward path costs its caller, measured on the
// lent H200s' hosts (benchmarks/RESULTS_GPU.md): each call of the unfused
// chain (a cuDNN conv, a cuDNN or cuBLAS GEMM) about 24 us of host time
// whatever its GPU time (the median over the benchmark's chains at batch 1 in
// two runs; single rows 12-50 us); a call of this library's kernels its GPU
// time, or its host time where that is longer (checks, allocations, launches:
// about 15 us for the tile kernels, 18 us for the cooperative whole-GPU ones).
constexpr double kChainCallSeconds = 24e-6;
constexpr double kFusedHostSeconds = 15e-6;
constexpr double kGridHostSeconds = 18e-6;
// The unfused chain's calls: the core, plus one per 1x1 stage / factor product.
inline double chain_calls(bool has_first, bool has_last) {
  return 1.0 + (has_first ? 1.0 : 0.0) + (has_last ? 1.0 : 0.0);
}
inline double eager_chain_seconds(bool has_first, bool has_last) {
  return kChainCallSeconds * chain_calls(has_first, has_last);
}

// What a CUDA-graph replay of the unfused chain costs at least: no host time,
// but each of its kernels a launch and a tail on the GPU. The least per call
// over the conv chains' replays of runs 8-9 was 4.8 us (two calls) to 6.2 us
// (three calls); a kernel predicted below this floor beats the chain's replay
// whatever the chain's own work.
constexpr double kChainReplayCallSeconds = 6e-6;
inline double replay_chain_floor_seconds(bool has_first, bool has_last) {
  return kChainReplayCallSeconds * chain_calls(has_first, has_last);
}

// compute(device) for the current device, run once per device and process:
// each call site (each lambda type) has its own cache. Values are >= 0.
template <typename Compute>
int cached_per_device(Compute compute) {
  static std::array<std::atomic<int>, 64> cache{};  // value + 1; 0: not computed yet
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v != 0) return v - 1;
  }
  const int value = compute(device);
  if (cached) cache[device].store(value + 1, std::memory_order_relaxed);
  return value;
}

// A per-thread memo of a value computed from a layer's shape and what else it
// reads (dtype, device, switches, flags), all of it in the key: the op's path
// choice builds launch plans and evaluates time models, host time each eager
// call paid again. (How much that was is not known: the gap it was meant to
// close, the op's chain about 5% slower than the chain forced, stayed in run
// 10 and looks like the benchmark's column order: RESULTS_GPU.md, runs 8-10.)
// Bounded: forgets everything past kMaxEntries shapes, so dynamic shapes
// cannot grow it without end.
template <typename Value, size_t N>
class ShapeMemo {
 public:
  using Key = std::array<int64_t, N>;
  static constexpr size_t kMaxEntries = 1024;

  template <typename Compute>
  Value get(const Key& key, Compute compute) {
    if (const auto it = map_.find(key); it != map_.end()) return it->second;
    if (map_.size() >= kMaxEntries) map_.clear();
    const Value value = compute();
    map_.emplace(key, value);
    return value;
  }

 private:
  struct Hash {
    size_t operator()(const Key& key) const noexcept {
      size_t h = 0;
      for (const int64_t v : key) h = h * 1000003u ^ std::hash<int64_t>{}(v);
      return h;
    }
  };
  std::unordered_map<Key, Value, Hash> map_;
};

// The fields of a conv layer's sizes, then `extra`, as a ShapeMemo key.
template <size_t kExtra>
std::array<int64_t, 18 + kExtra> conv_shape_key(const Conv2dSizes& s, const std::array<int64_t, kExtra>& extra) {
  std::array<int64_t, 18 + kExtra> key{s.N,       s.C_in,     s.R_in,     s.R_out, s.C_out, s.H,
                                       s.W,       s.kh,       s.kw,       s.H_out, s.W_out, s.stride_h,
                                       s.stride_w, s.pad_h,   s.pad_w,    s.dil_h, s.dil_w,
                                       (s.has_first ? 1 : 0) | (s.has_last ? 2 : 0) | (s.has_bias ? 4 : 0)};
  for (size_t i = 0; i < kExtra; ++i) key[18 + i] = extra[i];
  return key;
}

// An attribute of the current device (multiprocessor count, compute
// capability), asked from the driver once per device and process.
template <cudaDeviceAttr Attr>
int cached_device_attribute() {
  return cached_per_device([](int device) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, Attr, device));
    return value;
  });
}

// Lets kKernel launch with `bytes` of dynamic shared memory on the current
// device: past the default 48 KB the kernel needs the opt-in attribute, which
// is raised only when a launch needs more than before (a driver call on every
// launch costs host time). Raises only, under a lock, so a concurrent launch
// never sees it lowered.
template <auto kKernel>
void allow_dynamic_shared_memory(size_t bytes) {
  if (bytes <= static_cast<size_t>(kSharedMemBudget)) return;
  static std::array<std::atomic<size_t>, 64> allowed{};
  static std::mutex raising;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < static_cast<int>(allowed.size());
  if (cached && allowed[device].load(std::memory_order_acquire) >= bytes) return;
  const std::lock_guard<std::mutex> lock(raising);
  if (cached && allowed[device].load(std::memory_order_relaxed) >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  if (cached) allowed[device].store(bytes, std::memory_order_release);
}

// A launch on the current stream whose consecutive blocks along x form
// thread-block clusters of `cluster` blocks (sm_90+; 1: no cluster). grid.x
// must be a multiple of `cluster`. Launch it with cudaLaunchKernelEx.
struct ClusterLaunch {
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute attr[1]{};

  ClusterLaunch(dim3 grid, int threads, size_t smem_bytes, int cluster) {
    config.gridDim = grid;
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.dynamicSmemBytes = smem_bytes;
    config.stream = c10::cuda::getCurrentCUDAStream();
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    config.attrs = attr;
    config.numAttrs = cluster > 1 ? 1 : 0;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // config.attrs points into this object
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// v rounded up to a multiple of m.
__host__ __device__ inline int64_t round_up(int64_t v, int64_t m) {
  return ceil_div(v, m) * m;
}

}  // namespace tucker_ops::cuda
