// Single-threaded row-major GEMMs on raw buffers, for use inside a parallel
// region (one call per tile or row block).
//
// Each call picks, by size and form alone (so results are reproducible),
// between the BLAS that torch links (MKL/OpenBLAS sgemm_/dgemm_, found at load
// time) and a hand-written register-blocked kernel compiled for AVX-512,
// AVX2+FMA and a portable baseline, chosen at run time from cpuid. Small
// products go to the hand kernel (a BLAS call costs about a microsecond
// before any arithmetic), and for float with AVX-512 or AVX2 so do gemm_nn's
// larger ones, which it ran about as fast as MKL or faster (gemm.cpp,
// nn_uses_blas). Below AVX-512 the kernel packs B (and a transposed A) into
// cache-sized blocks where reading them in place would miss (gemm.cpp, packs).
//
// Environment overrides, read once (for benchmarks and tests):
//   TUCKER_OPS_GEMM = auto | blas | kernel
//   TUCKER_OPS_ISA  = auto | avx512 | avx2 | baseline   (capped by the CPU)
#pragma once

#include <cstdint>
#include <string>

namespace tucker_ops::cpu {

// How gemm_nn writes C. kStreamed: non-temporal stores, for a large
// write-once output nobody reads soon (a weight gradient the optimizer reads
// after the rest of the backward): its lines are not read from memory first
// nor evict the operands. Honoured by the hand kernel when C is overwritten
// (not accumulated), at least kStreamedMinBytes, and its rows are aligned to
// the vector width; otherwise C is written as usual.
enum class OutputStore { kCached, kStreamed };
constexpr int64_t kStreamedMinBytes = int64_t(1) << 20;

// C (M x N, row stride ldc) = [C +] A * B.
// A element (m, k) is a[m * a_rs + k * a_cs] (so a transposed matrix is just
// swapped strides); B is row-major (K x N) with row stride ldb.
template <typename T>
void gemm_nn(int64_t M, int64_t N, int64_t K,
             const T* a, int64_t a_rs, int64_t a_cs,
             const T* b, int64_t ldb,
             T* c, int64_t ldc, bool accumulate,
             OutputStore store = OutputStore::kCached);

// C (M x N, row stride ldc) = [C +] A * B^T, with A (M x K, row stride lda) and
// B (N x K, row stride ldb) both contiguous along K: the weight-gradient form.
template <typename T>
void gemm_nt(int64_t M, int64_t N, int64_t K,
             const T* a, int64_t lda,
             const T* b, int64_t ldb,
             T* c, int64_t ldc, bool accumulate);

// C (M x N, row stride ldc) = [C +] A * B with A row-major (M x K, row stride
// lda) and row k of B starting at b + b_offsets[k], contiguous along N: an
// implicit im2col (rows are shifted windows of one buffer). Every row must be
// readable kGemmRowSlack elements past N (the values there never reach C).
// Hand kernel only.
constexpr int64_t kGemmRowSlack = 64;  // >= one 64-byte vector of any element type

template <typename T>
void gemm_nn_offsets(int64_t M, int64_t N, int64_t K,
                     const T* a, int64_t lda,
                     const T* b, const int64_t* b_offsets,
                     T* c, int64_t ldc, bool accumulate);

// C (M x N) = [C +] A * B^T with A (M x K, row stride lda) and row n of B
// starting at b + b_offsets[n], contiguous along K: the weight gradient against
// an implicit im2col. Hand kernel only.
template <typename T>
void gemm_nt_offsets(int64_t M, int64_t N, int64_t K,
                     const T* a, int64_t lda,
                     const T* b, const int64_t* b_offsets,
                     T* c, int64_t ldc, bool accumulate);

// Whether gemm_nt would hand an (M x N x K) product to the BLAS (gemm_nn
// keeps more products on the hand kernel: see nn_uses_blas in gemm.cpp).
template <typename T>
bool gemm_uses_blas(int64_t M, int64_t N, int64_t K);

// Whether gemm_nn would hand an (M x N x K) product with A row-major to the BLAS.
template <typename T>
bool gemm_nn_uses_blas(int64_t M, int64_t N, int64_t K);

// Whether gemm_nn's hand kernel is the measured-fast one (float, AVX-512 or
// AVX2, no TUCKER_OPS_GEMM override): products are then worth rearranging
// into its form (W times transposed activations) even at the price of
// transposing.
template <typename T>
bool gemm_nn_kernel_preferred();

// Name of the instruction set the hand kernels run with ("avx512", "avx2",
// "baseline") and whether a BLAS was found; for benchmark reports.
std::string kernel_isa_name();
bool blas_available();

}  // namespace tucker_ops::cpu
