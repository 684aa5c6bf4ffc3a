// Whole GEMMs split over our own threads: one parallel region, each thread
// running a single-threaded gemm_nn / gemm_nt (gemm.h) on its slice of the
// output; and the transposes that put activations into gemm_nn's fast form.
//
// For the thin products of a linear layer whose weights outweigh its rows
// (batch 32 against 4096 x 512 factors) the BLAS's own threading hardly scales:
// MKL ran a 32 x 4096 x 512 sgemm in the same time on 2 threads as on 1, and a
// 32 x 512 x 4096 one slower (benchmarks/notes.md). Splitting the output's
// larger dimension instead gives each thread its own share of the weights and
// keeps the rows' full reuse of every weight it reads.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/gemm.h"
#include "cpu/transpose.h"
#include "cpu/parallel_chunks.h"

namespace tucker_ops::cpu {

// Output columns are split in multiples of this many elements (a 64-byte
// line of float), so no two threads write one cache line of a row.
constexpr int64_t kColumnSplitAlign = 16;

// Slice p of n over `extent` output rows or columns; columns in whole
// kColumnSplitAlign units.
inline std::pair<int64_t, int64_t> gemm_split_range(int64_t p, int64_t n, int64_t extent, bool columns) {
  if (!columns) return chunk_range(p, n, extent);
  const int64_t units = (extent + kColumnSplitAlign - 1) / kColumnSplitAlign;
  const auto [u0, u1] = chunk_range(p, n, units);
  return {std::min(extent, u0 * kColumnSplitAlign), std::min(extent, u1 * kColumnSplitAlign)};
}

// Runs slice(lo, hi, columns) over the parts of an (M x N) output carrying
// M*N*K multiply-adds: the larger of the two dimensions (columns counted in
// aligned units) is split, into at most one part per thread, and only as many
// as keep kMinMacsPerThread busy each.
template <typename F>
void for_each_gemm_slice(int64_t M, int64_t N, int64_t K, const F& slice) {
  const int64_t column_units = (N + kColumnSplitAlign - 1) / kColumnSplitAlign;
  // Rows when they are the longer side; columns otherwise (a column slice
  // reads a strided share of B, a row slice a contiguous share of A).
  const bool columns = N > M;
  const int64_t parts = chunks_for_work(columns ? column_units : M, M * N * K);
  for_each_chunk_raw(parts, [&](int64_t p) {
    const auto [lo, hi] = gemm_split_range(p, parts, columns ? N : M, columns);
    if (hi > lo) slice(lo, hi, columns);
  });
}

// gemm_nn over all threads (same arguments and result as gemm_nn).
template <typename T>
void gemm_nn_threads(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b, int64_t ldb,
                     T* c, int64_t ldc, bool accumulate, OutputStore store = OutputStore::kCached) {
  for_each_gemm_slice(M, N, K, [&](int64_t lo, int64_t hi, bool columns) {
    if (columns)
      gemm_nn<T>(M, hi - lo, K, a, a_rs, a_cs, b + lo, ldb, c + lo, ldc, accumulate, store);
    else
      gemm_nn<T>(hi - lo, N, K, a + lo * a_rs, a_rs, a_cs, b, ldb, c + lo * ldc, ldc, accumulate, store);
  });
}

// gemm_nt over all threads (same arguments and result as gemm_nt).
template <typename T>
void gemm_nt_threads(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                     int64_t ldc, bool accumulate) {
  for_each_gemm_slice(M, N, K, [&](int64_t lo, int64_t hi, bool columns) {
    if (columns)
      gemm_nt<T>(M, hi - lo, K, a, lda, b + lo * ldb, ldb, c + lo, ldc, accumulate);
    else
      gemm_nt<T>(hi - lo, N, K, a + lo * lda, lda, b, ldb, c + lo * ldc, ldc, accumulate);
  });
}

// dst (cols x rows, row stride ldd) = src (rows x cols, row stride lds)
// transposed for source columns [c_begin, c_end).
template <typename T>
void transpose_columns(int64_t rows, const T* src, int64_t lds, T* dst, int64_t ldd, int64_t c_begin, int64_t c_end) {
  if (c_end > c_begin) transpose<T>(rows, c_end - c_begin, src + c_begin, lds, dst + c_begin * ldd, ldd);
}

// The whole transpose of src (rows x cols) into dst (cols x rows), column
// tiles split over the threads when there are enough elements.
template <typename T>
void transpose_threads(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t kTile = 16;
  constexpr int64_t kMinElemsPerThread = int64_t(1) << 16;
  const int64_t tiles = (cols + kTile - 1) / kTile;
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), tiles, rows * cols / kMinElemsPerThread}));
  for_each_chunk_raw(parts, [&](int64_t p) {
    const auto [t0, t1] = chunk_range(p, parts, tiles);
    transpose_columns<T>(rows, src, lds, dst, ldd, t0 * kTile, std::min(cols, t1 * kTile));
  });
}

}  // namespace tucker_ops::cpu
