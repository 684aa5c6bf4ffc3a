// Row-major GEMM dispatch: BLAS for large products, hand kernels (AVX-512,
// AVX2+FMA, baseline; picked from cpuid) for small ones. See gemm.h.
//
// The hand kernels use GCC vector extensions inside always_inline templates;
// each ISA variant is a wrapper with __attribute__((target)) into which the
// template is inlined, so one source yields all variants without -march flags.
#include "cpu/gemm.h"
#include "cpu/simd.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

extern "C" {
// Fortran BLAS, resolved from the BLAS torch itself links (MKL, OpenBLAS).
// Weak: a torch without BLAS leaves them null and the hand kernels run.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL only: per-thread thread count. Our GEMMs are already one per thread;
// MKL left to itself would fork its own team for every call made outside an
// active parallel region (and on a loaded machine wait on its barrier).
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));  // C interface (by value)
}

namespace tucker_ops::cpu {
namespace {

// ---- hand kernels ----------------------------------------------------------------

// Where row k of B starts: a fixed stride, or (an implicit im2col) a table
// of offsets into one buffer. shifted(n) moves every row n columns right.
template <typename T>
struct StridedRows {
  static constexpr bool kReadsPastN = false;
  const T* b;
  int64_t ldb;
  TUCKER_INLINE const T* row(int64_t k) const { return b + k * ldb; }
  TUCKER_INLINE StridedRows shifted(int64_t n) const { return {b + n, ldb}; }
  TUCKER_INLINE StridedRows skip(int64_t k) const { return {b + k * ldb, ldb}; }
};

template <typename T>
struct OffsetRows {
  static constexpr bool kReadsPastN = true;  // gemm_nn_offsets' contract (gemm.h)
  const T* b;
  const int64_t* offsets;
  TUCKER_INLINE const T* row(int64_t k) const { return b + offsets[k]; }
  TUCKER_INLINE OffsetRows shifted(int64_t n) const { return {b + n, offsets}; }
  TUCKER_INLINE OffsetRows skip(int64_t k) const { return {b, offsets + k}; }
};

// MR rows x NV vectors of C; B rows are read NV vectors at a time, A
// broadcast one element at a time. Accumulators stay in registers.
template <typename T, typename V, int MR, int NV, bool Stream, typename Rows>
TUCKER_INLINE void nn_micro(int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const Rows& b, T* c, int64_t ldc,
                            bool accumulate) {
  constexpr int L = sizeof(V) / sizeof(T);
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = accumulate ? load<V>(c + m * ldc + j * L) : V{};
  for (int64_t k = 0; k < K; ++k) {
    const T* bk = b.row(k);
    V bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = load<V>(bk + j * L);
    for (int m = 0; m < MR; ++m) {
      const T av = a[m * a_rs + k * a_cs];
      for (int j = 0; j < NV; ++j) acc[m][j] += av * bv[j];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) {
      if constexpr (Stream)
        store_streaming(c + m * ldc + j * L, acc[m][j]);
      else
        store(c + m * ldc + j * L, acc[m][j]);
    }
}

// Rows of C per micro-tile of the broadcast kernel (in place and packed).
constexpr int kMicroRows = 6;

// nn_micro for a run-time row count of 1..kMicroRows.
template <typename T, typename V, int NV, bool Stream, typename Rows>
TUCKER_INLINE void nn_micro_rows(int rows, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const Rows& b, T* c,
                                 int64_t ldc, bool accumulate) {
  switch (rows) {
    case 6: nn_micro<T, V, 6, NV, Stream>(K, a, a_rs, a_cs, b, c, ldc, accumulate); break;
    case 5: nn_micro<T, V, 5, NV, Stream>(K, a, a_rs, a_cs, b, c, ldc, accumulate); break;
    case 4: nn_micro<T, V, 4, NV, Stream>(K, a, a_rs, a_cs, b, c, ldc, accumulate); break;
    case 3: nn_micro<T, V, 3, NV, Stream>(K, a, a_rs, a_cs, b, c, ldc, accumulate); break;
    case 2: nn_micro<T, V, 2, NV, Stream>(K, a, a_rs, a_cs, b, c, ldc, accumulate); break;
    default: nn_micro<T, V, 1, NV, Stream>(K, a, a_rs, a_cs, b, c, ldc, accumulate); break;
  }
}

template <typename T, typename V, int MR, int NV, bool Stream = false, typename Rows>
TUCKER_INLINE void nn_rows(int64_t M, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const Rows& b, T* c,
                           int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    nn_micro<T, V, MR, NV, Stream>(K, a + m * a_rs, a_rs, a_cs, b, c + m * ldc, ldc, accumulate);
  if (m < M) nn_micro_rows<T, V, NV, Stream>(int(M - m), K, a + m * a_rs, a_rs, a_cs, b, c + m * ldc, ldc, accumulate);
}

// Scratch for the last, narrower-than-a-vector column strip: B's strip and
// C's strip are copied into zero-padded buffers so the same vector kernel runs.
template <typename T>
std::vector<T>& tail_buffer() {
  thread_local std::vector<T> buf;
  return buf;
}

template <typename T, typename V, bool Stream = false, typename Rows>
TUCKER_INLINE void gemm_nn_unpacked(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs,
                                const Rows& b, T* c, int64_t ldc, bool accumulate) {
  constexpr int L = sizeof(V) / sizeof(T);
  constexpr int MR = kMicroRows;
  int64_t n = 0;
  for (; n + 2 * L <= N; n += 2 * L)
    nn_rows<T, V, MR, 2, Stream>(M, K, a, a_rs, a_cs, b.shifted(n), c + n, ldc, accumulate);
  for (; n + L <= N; n += L) nn_rows<T, V, MR, 1, Stream>(M, K, a, a_rs, a_cs, b.shifted(n), c + n, ldc, accumulate);
  if constexpr (Stream) streaming_fence();
  const int64_t rem = N - n;
  if (rem == 0) return;
  std::vector<T>& buf = tail_buffer<T>();
  if constexpr (Rows::kReadsPastN) {
    // B's rows may be read a whole vector past N (the caller's buffer has the
    // slack): only C's strip goes through the buffer.
    buf.assign(static_cast<size_t>(M * L), T(0));
    T* ct = buf.data();
    if (accumulate)
      for (int64_t m = 0; m < M; ++m) std::memcpy(ct + m * L, c + m * ldc + n, rem * sizeof(T));
    nn_rows<T, V, MR, 1>(M, K, a, a_rs, a_cs, b.shifted(n), ct, L, accumulate);
    for (int64_t m = 0; m < M; ++m) std::memcpy(c + m * ldc + n, ct + m * L, rem * sizeof(T));
    return;
  }
  buf.assign(static_cast<size_t>((K + M) * L), T(0));
  T* bt = buf.data();
  T* ct = bt + K * L;
  for (int64_t k = 0; k < K; ++k) std::memcpy(bt + k * L, b.row(k) + n, rem * sizeof(T));
  if (accumulate)
    for (int64_t m = 0; m < M; ++m) std::memcpy(ct + m * L, c + m * ldc + n, rem * sizeof(T));
  nn_rows<T, V, MR, 1>(M, K, a, a_rs, a_cs, StridedRows<T>{bt, L}, ct, L, accumulate);
  for (int64_t m = 0; m < M; ++m) std::memcpy(c + m * ldc + n, ct + m * L, rem * sizeof(T));
}

// ---- cache-blocked (packed) form ------------------------------------------------
//
// gemm_nn_unpacked reads each strip of B (K rows x two vectors) once per MR
// rows of A, in place: with K long or B's rows far apart that strip falls out
// of L1 between passes and every row of it is a different cache line (and,
// 2 KiB apart, nearly a different page). The packed form copies B, a KC x NC
// block at a time, into strips laid out k-major (one strip = KC contiguous
// rows of two vectors, half of L1), and a transposed A into panels, so the
// same micro-kernel streams from contiguous memory: each strip is read from
// memory once per MC rows instead of once per MR, and the copy reads B whole
// rows at a time (or, for gemm_nt's B^T, rows of B along K).
template <typename T, typename V>
struct PackedBlocking {
  static constexpr int L = sizeof(V) / sizeof(T);
  static constexpr int MR = kMicroRows;
  static constexpr int NR = 2 * L;
  static constexpr int64_t KC = 16384 / (NR * int64_t(sizeof(T)));  // one B strip = 16 KiB
  static constexpr int64_t MC = 20 * MR;                             // A block: 120 x KC, in L2
  static constexpr int64_t NC = (int64_t(1) << 20) / (KC * int64_t(sizeof(T)));  // B block: 1 MiB
};

// Per-thread pack space, grown as needed and kept (as tail_buffer), aligned
// to a cache line so that each strip row of two vectors is one line.
template <typename T>
T* pack_buffer(int slot, int64_t elements) {
  thread_local std::vector<T> bufs[2];
  std::vector<T>& buf = bufs[slot];
  const size_t pad = 64 / sizeof(T);
  if (buf.size() < size_t(elements) + pad) buf.resize(size_t(elements) + pad);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));
}

// One strip of B (kc rows x w columns, w = NR or L; element (k, n) at
// b[k * b_rs + n * b_cs]) into dst, k-major: row k at dst + k * w.
template <typename T, typename V>
TUCKER_INLINE void pack_b_strip(int64_t kc, int64_t w, const T* b, int64_t b_rs, int64_t b_cs, T* dst) {
  constexpr int L = PackedBlocking<T, V>::L, NR = PackedBlocking<T, V>::NR;
  if (b_cs != 1) {
    for (int64_t j = 0; j < w; ++j) {
      const T* col = b + j * b_cs;
      for (int64_t k = 0; k < kc; ++k) dst[k * w + j] = col[k * b_rs];
    }
  } else if (w == NR) {
    for (int64_t k = 0; k < kc; ++k) {
      store(dst + k * NR, load<V>(b + k * b_rs));
      store(dst + k * NR + L, load<V>(b + k * b_rs + L));
    }
  } else {
    for (int64_t k = 0; k < kc; ++k) store(dst + k * L, load<V>(b + k * b_rs));
  }
}

// Rows of the panel starting at row p of an mc-row block: MR, except that
// the last 7 or 8 rows split into two panels (4 + 3, 4 + 4) rather than MR
// and 1 or 2. A panel of 1-2 rows has fewer independent accumulators than the
// FMA latency covers, so it would run at the speed of a full one.
template <int MR>
TUCKER_INLINE int panel_rows(int64_t mc, int64_t p) {
  const int64_t left = mc - p;
  if (left > MR && left < MR + 3) return int((left + 1) / 2);
  return int(std::min<int64_t>(MR, left));
}

// A block stored transposed (mc x kc, element (m, k) at a[m * a_rs + k * a_cs])
// into panels of panel_rows rows, each k-major: the panel at row p starts at
// dst + p * kc.
template <typename T, int MR>
TUCKER_INLINE void pack_a_block(int64_t mc, int64_t kc, const T* a, int64_t a_rs, int64_t a_cs, T* dst) {
  for (int64_t p = 0, rows = 0; p < mc; p += rows) {
    rows = panel_rows<MR>(mc, p);
    T* out = dst + p * kc;
    for (int64_t k = 0; k < kc; ++k) {
      const T* col = a + p * a_rs + k * a_cs;
      for (int64_t i = 0; i < rows; ++i) out[k * rows + i] = col[i * a_rs];
    }
  }
}

// Asks for the lines of the next strip of B to be packed (kc rows of w
// columns), while this one computes: the copy then finds them in cache rather
// than waiting on memory for each row.
template <typename T>
TUCKER_INLINE void prefetch_b_strip(int64_t kc, int64_t w, const T* b, int64_t b_rs, int64_t b_cs) {
  constexpr int64_t kLine = 64 / sizeof(T);
  if (b_cs == 1) {
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t j = 0; j < w; j += kLine) __builtin_prefetch(b + k * b_rs + j, 0, 2);
  } else {
    for (int64_t j = 0; j < w; ++j)
      for (int64_t k = 0; k < kc; k += kLine) __builtin_prefetch(b + j * b_cs + k * b_rs, 0, 2);
  }
}

// C (M x N, N a multiple of L) = [C +] A * B with B's element (k, n) at
// b[k * b_rs + n * b_cs], through packed strips of B. Each strip is packed
// right before its first use (the first MC rows), so with few rows it is
// still in L1 when it computes; later row blocks reuse the packed block.
// A is packed only when stored transposed (its columns, one line per k, would
// conflict in L1 the way B's rows do); row-major A is read in place, MR rows
// streaming along K. Streams C only when one K block covers K (otherwise C
// is read back for the next block).
template <typename T, typename V, bool Stream>
TUCKER_INLINE void gemm_packed(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b,
                               int64_t b_rs, int64_t b_cs, T* c, int64_t ldc, bool accumulate) {
  using Blk = PackedBlocking<T, V>;
  static_assert(Blk::MR == 6, "nn_micro_rows dispatches up to 6 rows");
  const bool pack_a = a_cs != 1;
  T* bpack = pack_buffer<T>(0, Blk::KC * std::min<int64_t>(Blk::NC, N));
  T* apack = pack_a ? pack_buffer<T>(1, Blk::KC * std::min<int64_t>(Blk::MC, M)) : nullptr;
  for (int64_t jc = 0; jc < N; jc += Blk::NC) {
    const int64_t nc = std::min<int64_t>(Blk::NC, N - jc);
    for (int64_t pc = 0; pc < K; pc += Blk::KC) {
      const int64_t kc = std::min<int64_t>(Blk::KC, K - pc);
      const bool acc = accumulate || pc > 0;
      const T* b_block = b + pc * b_rs + jc * b_cs;
      for (int64_t ic = 0; ic < M; ic += Blk::MC) {
        const int64_t mc = std::min<int64_t>(Blk::MC, M - ic);
        const T* a_block = a + ic * a_rs + pc * a_cs;
        if (pack_a) pack_a_block<T, Blk::MR>(mc, kc, a_block, a_rs, a_cs, apack);
        for (int64_t s = 0; s < nc; s += Blk::NR) {
          const int64_t w = std::min<int64_t>(Blk::NR, nc - s);
          T* bp = bpack + s * kc;
          if (ic == 0) {
            pack_b_strip<T, V>(kc, w, b_block + s * b_cs, b_rs, b_cs, bp);
            if (s + w < nc)
              prefetch_b_strip(kc, std::min<int64_t>(Blk::NR, nc - s - w), b_block + (s + w) * b_cs, b_rs, b_cs);
            else if (pc + kc < K)
              prefetch_b_strip(std::min<int64_t>(Blk::KC, K - pc - kc), std::min<int64_t>(Blk::NR, nc),
                               b_block + kc * b_rs, b_rs, b_cs);
          }
          T* cs = c + ic * ldc + jc + s;
          for (int64_t p = 0, rows = 0; p < mc; p += rows) {
            rows = panel_rows<Blk::MR>(mc, p);
            const T* ap = pack_a ? apack + p * kc : a_block + p * a_rs;
            const int64_t ars = pack_a ? 1 : a_rs, acs = pack_a ? rows : a_cs;
            // One panel of A against the strip, two vectors wide (or one).
            if (w == Blk::NR)
              nn_micro_rows<T, V, 2, Stream>(int(rows), kc, ap, ars, acs, StridedRows<T>{bp, Blk::NR}, cs + p * ldc,
                                             ldc, acc);
            else
              nn_micro_rows<T, V, 1, Stream>(int(rows), kc, ap, ars, acs, StridedRows<T>{bp, Blk::L}, cs + p * ldc,
                                             ldc, acc);
          }
        }
      }
    }
  }
  if constexpr (Stream) streaming_fence();
}

// Whether gemm_nn's hand kernel packs an (M x N x K) product whose B rows are
// ldb elements apart and whose A is stored transposed with columns a_cs apart
// (a_cs = 1: row-major). Packing pays where the in-place walk would miss in
// L1: B's strip (K rows, ldb apart) spanning 1 MiB, or 256 KiB once A has
// enough rows to reuse a packed strip, or rows a multiple of 1 KiB apart
// (they then share a few L1 sets: 2 KiB apart, 2 of a 32 KiB 8-way L1's 64,
// which 16 rows fill); or A's columns spanning 1 MiB. Measured on AVX2 (EPYC, one thread:
// benchmarks/gemm_crossover.py's "in place" and "packed" columns): packing
// ran 1.1-6x faster there (4096 x 512 x 32 with B rows 2 KiB apart: 0.74-0.93
// against 1.18-1.23 of MKL's time; 32 x 512 x 4096: 1.0-1.1 against 5-6) and
// 0-30% slower below it, where the copies outweigh the reuse (8-16 rows, or a
// transposed A of 16-32 columns). AVX-512 keeps the in-place kernel its BLAS
// rules (nn_uses_blas) were measured with.
constexpr int64_t kPackSpanBytes = int64_t(1) << 20;
constexpr int64_t kPackReusedSpanBytes = int64_t(256) << 10;
constexpr int64_t kPackReuseRows = 32;

template <typename T, typename V>
TUCKER_INLINE bool packs(int64_t M, int64_t N, int64_t K, int64_t ldb, int64_t a_cs) {
  using Blk = PackedBlocking<T, V>;
  if constexpr (sizeof(V) > 32) {
    return false;
  } else {
    if (M <= Blk::MR || N < Blk::NR) return false;
    const int64_t row_bytes = ldb * int64_t(sizeof(T)), b_span = K * row_bytes;
    const bool b_misses = b_span >= kPackSpanBytes ||
                          (M >= kPackReuseRows && (b_span >= kPackReusedSpanBytes || (row_bytes % 1024 == 0 && K > 16)));
    const bool a_misses = a_cs != 1 && K * a_cs * int64_t(sizeof(T)) >= kPackSpanBytes;
    return b_misses || a_misses;
  }
}

// In-place orders for the shapes packing skips (AVX2 and the baseline): an
// outer product of inner dimension at most kRowOrderMaxK with B in half of L1
// (as a batch-1 linear's weight gradients) runs rows of C outermost; at most
// MR rows against a B beyond L1 (a batch-1 linear's input-side products) run
// kRowsPerKBlock rows of B at a time. Both are limited to the shapes they
// were measured on (benchmarks/notes.md, Design: in-place orders).
constexpr int64_t kRowOrderMaxK = 8;
constexpr int64_t kRowOrderMaxBBytes = int64_t(16) << 10;
constexpr int64_t kRowsPerKBlock = 16;
constexpr int64_t kL1Bytes = int64_t(32) << 10;

// gemm_nn's hand kernel: packed where that pays, else in place; the last
// N % L columns always go through gemm_nn_unpacked's zero-padded tail.
template <typename T, typename V, bool Stream = false, typename Rows>
TUCKER_INLINE void gemm_nn_impl(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs,
                                const Rows& b, T* c, int64_t ldc, bool accumulate) {
  constexpr int L = sizeof(V) / sizeof(T);
  if constexpr (!Rows::kReadsPastN) {
    if (packs<T, V>(M, N, K, b.ldb, a_cs)) {
      const int64_t n_vec = N - N % L;
      if (Stream && K <= PackedBlocking<T, V>::KC)
        gemm_packed<T, V, true>(M, n_vec, K, a, a_rs, a_cs, b.b, b.ldb, 1, c, ldc, accumulate);
      else
        gemm_packed<T, V, false>(M, n_vec, K, a, a_rs, a_cs, b.b, b.ldb, 1, c, ldc, accumulate);
      if (n_vec < N)
        gemm_nn_unpacked<T, V>(M, N - n_vec, K, a, a_rs, a_cs, b.shifted(n_vec), c + n_vec, ldc, accumulate);
      return;
    }
  }
  if constexpr (sizeof(V) <= 32) {
    constexpr int64_t MR = PackedBlocking<T, V>::MR;
    const int64_t b_bytes = K * N * int64_t(sizeof(T));
    if (M > MR && K <= kRowOrderMaxK && b_bytes <= kRowOrderMaxBBytes) {
      // An outer product of a small B: rows of C outermost, so C is written
      // row block by row block, each row in order, rather than a column strip
      // at a time.
      for (int64_t m0 = 0; m0 < M; m0 += MR)
        gemm_nn_unpacked<T, V, Stream>(std::min(MR, M - m0), N, K, a + m0 * a_rs, a_rs, a_cs, b, c + m0 * ldc, ldc,
                                       accumulate);
      return;
    }
    if (M <= MR && K > kRowsPerKBlock && b_bytes > kL1Bytes) {
      // A few rows against a B from beyond L1: a block of B's rows at a time,
      // so that each is read whole while it is in cache, not a column strip
      // down all K rows at a time.
      for (int64_t k0 = 0; k0 < K; k0 += kRowsPerKBlock)
        gemm_nn_unpacked<T, V>(M, N, std::min(kRowsPerKBlock, K - k0), a + k0 * a_cs, a_rs, a_cs, b.skip(k0), c, ldc,
                               accumulate || k0 > 0);
      return;
    }
  }
  gemm_nn_unpacked<T, V, Stream>(M, N, K, a, a_rs, a_cs, b, c, ldc, accumulate);
}

// Horizontal sum by halving (a log-depth tree of vector adds down to 16
// bytes), not a serial chain over the lanes.
template <typename V, typename T>
TUCKER_INLINE T hsum(const V& v) {
  constexpr int B = sizeof(V);
  if constexpr (B > 16) {
    using H = typename Vec<T, B / 2>::type;
    H lo, hi;
    __builtin_memcpy(&lo, &v, B / 2);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + B / 2, B / 2);
    return hsum<H, T>(lo + hi);
  } else {
    T s = T(0);
    for (int i = 0; i < int(B / sizeof(T)); ++i) s += v[i];
    return s;
  }
}

// The K % L tail of the dot products, one step of each narrower vector width
// (down to 16 bytes) before the scalar remainder: K = 40 with 16-float vectors
// is two full steps and one half step instead of 8 dependent scalar products.
template <typename T, int Bytes, int MR, int NB>
TUCKER_INLINE void nt_tail(int64_t& k, int64_t K, const T* a, int64_t lda, const T* const* brow, T (&s)[MR][NB]) {
  if constexpr (Bytes >= 16) {
    using H = typename Vec<T, Bytes>::type;
    constexpr int L = Bytes / int(sizeof(T));
    if (k + L <= K) {
      H bv[NB];
      for (int j = 0; j < NB; ++j) bv[j] = load<H>(brow[j] + k);
      for (int m = 0; m < MR; ++m) {
        const H av = load<H>(a + m * lda + k);
        for (int j = 0; j < NB; ++j) s[m][j] += hsum<H, T>(av * bv[j]);
      }
      k += L;
    }
    nt_tail<T, Bytes / 2, MR, NB>(k, K, a, lda, brow, s);
  }
}

// MR rows of A against NB rows of B: MR * NB dot products along K. Row j of
// B is rows.row(j); rows are advanced by NB with next().
template <typename T, typename V, int MR, int NB, typename Rows>
TUCKER_INLINE void nt_micro(int64_t K, const T* a, int64_t lda, const Rows& b, T* c, int64_t ldc, bool accumulate) {
  constexpr int L = sizeof(V) / sizeof(T);
  const T* brow[NB];
  for (int j = 0; j < NB; ++j) brow[j] = b.row(j);
  V acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = V{};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V bv[NB];
    for (int j = 0; j < NB; ++j) bv[j] = load<V>(brow[j] + k);
    for (int m = 0; m < MR; ++m) {
      const V av = load<V>(a + m * lda + k);
      for (int j = 0; j < NB; ++j) acc[m][j] += av * bv[j];
    }
  }
  T sum[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NB; ++j) sum[m][j] = hsum<V, T>(acc[m][j]);
  nt_tail<T, int(sizeof(V)) / 2, MR, NB>(k, K, a, lda, brow, sum);
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) {
      T s = sum[m][j];
      for (int64_t kk = k; kk < K; ++kk) s += a[m * lda + kk] * brow[j][kk];
      T& out = c[m * ldc + j];
      out = accumulate ? out + s : s;
    }
  }
}

template <typename T, typename V, int NB, typename Rows>
TUCKER_INLINE void nt_cols(int64_t M, int64_t K, const T* a, int64_t lda, const Rows& b, T* c, int64_t ldc,
                           bool accumulate) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) nt_micro<T, V, 2, NB>(K, a + m * lda, lda, b, c + m * ldc, ldc, accumulate);
  if (m < M) nt_micro<T, V, 1, NB>(K, a + m * lda, lda, b, c + m * ldc, ldc, accumulate);
}

// Dot-product form over rows of B given by a Rows policy (rows n.. of B are
// b.skip(n)).
template <typename T, typename V, typename Rows>
TUCKER_INLINE void gemm_nt_dots(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const Rows& b, T* c,
                                int64_t ldc, bool accumulate) {
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) nt_cols<T, V, 4>(M, K, a, lda, b.skip(n), c + n, ldc, accumulate);
  for (; n < N; ++n) nt_cols<T, V, 1>(M, K, a, lda, b.skip(n), c + n, ldc, accumulate);
}

template <typename T>
std::vector<T>& packed_b_buffer() {
  thread_local std::vector<T> buf;
  return buf;
}

// The dot-product form (vectors along K, one horizontal sum per output) loses
// to the broadcast kernel on short K, but transposing B costs N*K copies: worth
// it only with enough rows of A to reuse them and at least a vector of columns.
// (Measured: thesis l2 at batch 32, K = 30 and 120, runs 3x faster packed;
// conv weight gradients with N = R_out = 2 or few rows run slower packed.)
constexpr int64_t kNtPackMinRows = 16;

template <typename T, typename V>
TUCKER_INLINE void gemm_nt_impl(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
                                T* c, int64_t ldc, bool accumulate) {
  constexpr int L = sizeof(V) / sizeof(T);
  if (M < kNtPackMinRows || N < L) {
    gemm_nt_dots<T, V>(M, N, K, a, lda, StridedRows<T>{b, ldb}, c, ldc, accumulate);
    return;
  }
  if (packs<T, V>(M, N, K, N, 1)) {
    // Where gemm_nn would pack B^T (K x N) after the transpose below, pack it
    // straight from B's rows instead (B^T's element (k, n) is b[n * ldb + k]).
    const int64_t n_vec = N - N % L;
    gemm_packed<T, V, false>(M, n_vec, K, a, lda, 1, b, 1, ldb, c, ldc, accumulate);
    if (n_vec < N)
      gemm_nt_dots<T, V>(M, N - n_vec, K, a, lda, StridedRows<T>{b + n_vec * ldb, ldb}, c + n_vec, ldc, accumulate);
    return;
  }
  // Transpose B into K x N so the broadcast-A kernel (vectors along N, no
  // horizontal sums) runs; A is read in place through its strides.
  std::vector<T>& buf = packed_b_buffer<T>();
  buf.resize(static_cast<size_t>(N * K));
  T* bt = buf.data();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) bt[k * N + n] = b[n * ldb + k];
  gemm_nn_impl<T, V>(M, N, K, a, lda, 1, StridedRows<T>{bt, N}, c, ldc, accumulate);
}


// One wrapper per ISA; the target attribute makes the inlined templates use it.
#define TUCKER_VARIANT(NAME, TARGET, BYTES)                                                                        \
  template <typename T>                                                                                            \
  TARGET void nn_##NAME(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b,       \
                        int64_t ldb, T* c, int64_t ldc, bool accumulate) {                                         \
    gemm_nn_impl<T, typename Vec<T, BYTES>::type>(M, N, K, a, a_rs, a_cs, StridedRows<T>{b, ldb}, c, ldc,          \
                                                  accumulate);                                                     \
  }                                                                                                                \
  template <typename T>                                                                                            \
  TARGET void nn_streaming_##NAME(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs,         \
                                  const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {                   \
    gemm_nn_impl<T, typename Vec<T, BYTES>::type, true>(M, N, K, a, a_rs, a_cs, StridedRows<T>{b, ldb}, c, ldc,    \
                                                        accumulate);                                               \
  }                                                                                                                \
  template <typename T>                                                                                            \
  TARGET void nt_offsets_##NAME(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b,              \
                                const int64_t* b_offsets, T* c, int64_t ldc, bool accumulate) {                    \
    gemm_nt_dots<T, typename Vec<T, BYTES>::type>(M, N, K, a, lda, OffsetRows<T>{b, b_offsets}, c, ldc,            \
                                                  accumulate);                                                     \
  }                                                                                                                \
  template <typename T>                                                                                            \
  TARGET void nn_offsets_##NAME(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b,              \
                                const int64_t* b_offsets, T* c, int64_t ldc, bool accumulate) {                    \
    gemm_nn_impl<T, typename Vec<T, BYTES>::type>(M, N, K, a, lda, 1, OffsetRows<T>{b, b_offsets}, c, ldc,         \
                                                  accumulate);                                                     \
  }                                                                                                                \
  template <typename T>                                                                                            \
  TARGET void nt_##NAME(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,   \
                        int64_t ldc, bool accumulate) {                                                            \
    gemm_nt_impl<T, typename Vec<T, BYTES>::type>(M, N, K, a, lda, b, ldb, c, ldc, accumulate);                    \
  }

TUCKER_FOR_EACH_ISA(TUCKER_VARIANT)
#undef TUCKER_VARIANT

// ---- selection -------------------------------------------------------------------

enum class GemmMode { kAuto, kBlas, kKernel };

Isa detect_isa() {
  Isa best = Isa::kBaseline;
#ifdef TUCKER_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) best = Isa::kAvx512;
#endif
  const char* env = std::getenv("TUCKER_OPS_ISA");
  const std::string want = env ? env : "auto";
  if (want == "baseline") return Isa::kBaseline;
  if (want == "avx2" && best != Isa::kBaseline) return Isa::kAvx2;
  return best;
}

GemmMode detect_mode() {
  const char* env = std::getenv("TUCKER_OPS_GEMM");
  const std::string want = env ? env : "auto";
  if (want == "blas") return GemmMode::kBlas;
  if (want == "kernel") return GemmMode::kKernel;
  return GemmMode::kAuto;
}

const Isa kIsa = detect_isa();
const GemmMode kMode = detect_mode();

template <typename T>
bool has_blas();
template <>
bool has_blas<float>() {
  return sgemm_ != nullptr;
}
template <>
bool has_blas<double>() {
  return dgemm_ != nullptr;
}

bool fits_int(int64_t v) {
  return v >= 0 && v <= INT_MAX;
}

// Measured on the benchmark machine (AMD EPYC, AVX-512): below about this many
// multiply-adds a BLAS call's fixed cost exceeds the hand kernel's deficit.
constexpr int64_t kBlasMinMacs = 48 * 48 * 48;

template <typename T>
bool use_blas(int64_t M, int64_t N, int64_t K) {
  if (kMode == GemmMode::kKernel || !has_blas<T>()) return false;
  if (kMode == GemmMode::kBlas) return true;
  return M * N * K >= kBlasMinMacs && std::min({M, N, K}) >= 8;
}

// gemm_nn's rule. With AVX-512 the float broadcast kernel (6 rows x 2
// vectors of accumulators, B read in strips two vectors wide) ran faster than
// MKL's single-threaded sgemm at nearly every measured shape, small or large
// (time hand / BLAS 0.46-0.99 at 145 of the first 146 shapes of
// benchmarks/gemm_crossover.py in each of three runs: M 8-2048, N 32-3136, K
// 32-1024, A row-major or transposed, B up to 0.9M elements; 0.61-0.67 at 512
// x 32 x 4096 with A row-major), but not once B reaches millions of elements
// (32 x 4096 x 512 and 16 x 512 x 4096, 2M: 1.1-1.4x slower, MKL's packing
// and prefetching win), nor where A is that large and stored transposed (its
// columns are then read a cache line per k: 512 x 32 x 4096 with A^T,
// 0.9-1.9x). Double (dgemm) was mixed.
//
// The AVX2 float kernel, read in place, beat MKL only where B held up to about
// 32 K elements (2.8-6.8x slower at 2-4M: B's strips thrash L1, see packs).
// Packing the products that walk would miss on, it stayed within reach of MKL
// at every measured size (one thread, AVX2 EPYC): time hand / BLAS 0.53-1.15 over the
// 97 shapes of gemm_crossover.py with A row-major and 0.53-1.30 with A stored
// transposed, faster at 80 and 67 of them; 2048^3 0.96-1.02; linear_4096's
// weight gradients 0.69-0.88. So with AVX2 every float gemm_nn runs on the
// hand kernel; double and the baseline keep use_blas's size rule.
constexpr int64_t kNnKernelMaxOperand = int64_t(1) << 20;  // elements (4 MiB of float)

template <typename T>
bool nn_uses_blas(int64_t M, int64_t N, int64_t K, bool a_row_major) {
  if (gemm_nn_kernel_preferred<T>()) {
    if (kIsa == Isa::kAvx2) return false;
    if (K * N <= kNnKernelMaxOperand && (a_row_major || M * K <= kNnKernelMaxOperand)) return false;
  }
  return use_blas<T>(M, N, K);
}

// Whether gemm_nn's kernel may write C with streaming stores (gemm.h,
// OutputStore): they need every row of C aligned to the vector width.
template <typename T>
bool streams_output(int64_t M, int64_t N, T* c, int64_t ldc, bool accumulate, OutputStore store) {
  if (store != OutputStore::kStreamed || accumulate || M * N * int64_t(sizeof(T)) < kStreamedMinBytes) return false;
  const int64_t vector_bytes = kIsa == Isa::kAvx512 ? 64 : kIsa == Isa::kAvx2 ? 32 : 16;
  return reinterpret_cast<uintptr_t>(c) % vector_bytes == 0 && (ldc * int64_t(sizeof(T))) % vector_bytes == 0;
}

// Runs the BLAS single-threaded on the calling thread, restoring its setting.
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

void blas_call(char ta, char tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta,
               float* c, int ldc) {
  const float one = 1.0f;
  SingleThreadedBlas one_thread;
  sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}
void blas_call(char ta, char tb, int m, int n, int k, const double* a, int lda, const double* b, int ldb, double beta,
               double* c, int ldc) {
  const double one = 1.0;
  SingleThreadedBlas one_thread;
  dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Products with an empty dimension: C is left (accumulate) or zeroed (K = 0).
// True when there is nothing else to do.
template <typename T>
bool nothing_to_multiply(int64_t M, int64_t N, int64_t K, T* c, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return true;
  if (K > 0) return false;
  if (!accumulate)
    for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, T(0));
  return true;
}


}  // namespace

template <typename T>
void gemm_nn(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b, int64_t ldb, T* c,
             int64_t ldc, bool accumulate, OutputStore store) {
  if (nothing_to_multiply(M, N, K, c, ldc, accumulate)) return;
  if (nn_uses_blas<T>(M, N, K, a_cs == 1)) {
    // Row-major C = A B is column-major C^T = B^T A^T: B goes first, untransposed.
    const bool a_rows = a_cs == 1 && a_rs >= K;  // A row-major
    const bool a_cols = a_rs == 1 && a_cs >= M;  // A stored transposed
    if ((a_rows || a_cols) && fits_int(M) && fits_int(N) && fits_int(K) && fits_int(ldb) && fits_int(ldc) &&
        fits_int(a_rows ? a_rs : a_cs) && ldb >= N && ldc >= N) {
      blas_call('N', a_rows ? 'N' : 'T', int(N), int(M), int(K), b, int(ldb), a, int(a_rows ? a_rs : a_cs),
                accumulate ? T(1) : T(0), c, int(ldc));
      return;
    }
  }
  if (streams_output<T>(M, N, c, ldc, accumulate, store)) {
    TUCKER_CALL_ISA(nn_streaming, M, N, K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate)
  }
  TUCKER_CALL_ISA(nn, M, N, K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate)
}

template <typename T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc,
             bool accumulate) {
  if (nothing_to_multiply(M, N, K, c, ldc, accumulate)) return;
  if (use_blas<T>(M, N, K) && fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) && fits_int(ldb) &&
      fits_int(ldc) && lda >= K && ldb >= K && ldc >= N) {
    // Column-major C^T = B A^T with B (N x K row-major) read transposed.
    blas_call('T', 'N', int(N), int(M), int(K), b, int(ldb), a, int(lda), accumulate ? T(1) : T(0), c, int(ldc));
    return;
  }
  TUCKER_CALL_ISA(nt, M, N, K, a, lda, b, ldb, c, ldc, accumulate)
}

template <typename T>
void gemm_nn_offsets(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, const int64_t* b_offsets,
                     T* c, int64_t ldc, bool accumulate) {
  if (nothing_to_multiply(M, N, K, c, ldc, accumulate)) return;
  TUCKER_CALL_ISA(nn_offsets, M, N, K, a, lda, b, b_offsets, c, ldc, accumulate)
}

template <typename T>
void gemm_nt_offsets(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, const int64_t* b_offsets,
                     T* c, int64_t ldc, bool accumulate) {
  if (nothing_to_multiply(M, N, K, c, ldc, accumulate)) return;
  TUCKER_CALL_ISA(nt_offsets, M, N, K, a, lda, b, b_offsets, c, ldc, accumulate)
}

template void gemm_nn_offsets<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*, const int64_t*,
                                     float*, int64_t, bool);
template void gemm_nn_offsets<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*,
                                      const int64_t*, double*, int64_t, bool);
template <typename T>
bool gemm_uses_blas(int64_t M, int64_t N, int64_t K) {
  return use_blas<T>(M, N, K);
}
template bool gemm_uses_blas<float>(int64_t, int64_t, int64_t);
template bool gemm_uses_blas<double>(int64_t, int64_t, int64_t);

template <typename T>
bool gemm_nn_uses_blas(int64_t M, int64_t N, int64_t K) {
  return nn_uses_blas<T>(M, N, K, /*a_row_major=*/true);
}

template <typename T>
bool gemm_nn_kernel_preferred() {
  return std::is_same_v<T, float> && kMode == GemmMode::kAuto && kIsa != Isa::kBaseline;
}
template bool gemm_nn_kernel_preferred<float>();
template bool gemm_nn_kernel_preferred<double>();
template bool gemm_nn_uses_blas<float>(int64_t, int64_t, int64_t);
template bool gemm_nn_uses_blas<double>(int64_t, int64_t, int64_t);

template void gemm_nt_offsets<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*, const int64_t*,
                                     float*, int64_t, bool);
template void gemm_nt_offsets<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*,
                                      const int64_t*, double*, int64_t, bool);

template void gemm_nn<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                             int64_t, bool, OutputStore);
template void gemm_nn<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t, const double*, int64_t,
                              double*, int64_t, bool, OutputStore);
template void gemm_nt<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                             bool);
template void gemm_nt<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*, int64_t, double*,
                              int64_t, bool);

std::string kernel_isa_name() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

Isa kernel_isa() {
  return kIsa;
}

bool blas_available() {
  return has_blas<float>() && has_blas<double>();
}

}  // namespace tucker_ops::cpu
