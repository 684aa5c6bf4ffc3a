// Out-of-place matrix transpose, vectorised (the activations' layout changes
// between the fused kernels' GEMM forms sit on their critical path).
#pragma once

#include <cstdint>

namespace tucker_ops::cpu {

// dst (cols x rows, row stride ldd) = src (rows x cols, row stride lds)
// transposed. Single-threaded; the buffers must not overlap.
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd);

}  // namespace tucker_ops::cpu
