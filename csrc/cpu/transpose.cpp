// transpose.h: blocks of L x L elements (L = lanes of the ISA's vector)
// transposed in registers, the ragged edges element by element.
#include "cpu/transpose.h"

#include <type_traits>

#include "cpu/simd.h"

namespace tucker_ops::cpu {
namespace {

// One butterfly stage of the in-register transpose of r[0..L): rows i and
// i + H (i without bit H) exchange the H-wide column blocks that are on the
// wrong side, which moves bit H of each element's column index into its row
// index. The stages H = L/2, ..., 1 together swap row and column indices.
template <typename T, typename V, int H>
TUCKER_INLINE void transpose_stage(V* r) {
  constexpr int L = sizeof(V) / sizeof(T);
  using Index = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef Index Mask __attribute__((vector_size(sizeof(V))));
  Mask lo, hi;  // lanes of (r[i], r[i + H]) as one 2L-lane source
  for (int j = 0; j < L; ++j) {
    lo[j] = (j & H) ? L + j - H : j;
    hi[j] = (j & H) ? L + j : j + H;
  }
  for (int i = 0; i < L; ++i)
    if (!(i & H)) {
      const V a = r[i], b = r[i + H];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + H] = __builtin_shuffle(a, b, hi);
    }
  if constexpr (H > 1) transpose_stage<T, V, H / 2>(r);
}

template <typename T, typename V>
TUCKER_INLINE void transpose_block(const T* src, int64_t lds, T* dst, int64_t ldd) {
  constexpr int L = sizeof(V) / sizeof(T);
  V r[L];
  for (int i = 0; i < L; ++i) r[i] = load<V>(src + i * lds);
  transpose_stage<T, V, L / 2>(r);
  for (int i = 0; i < L; ++i) store(dst + i * ldd, r[i]);
}

template <typename T, typename V>
TUCKER_INLINE void transpose_impl(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t whole_rows = rows / L * L, whole_cols = cols / L * L;
  for (int64_t c0 = 0; c0 < whole_cols; c0 += L)
    for (int64_t r0 = 0; r0 < whole_rows; r0 += L)
      transpose_block<T, V>(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = c < whole_cols ? whole_rows : 0; r < rows; ++r) dst[c * ldd + r] = src[r * lds + c];
}

#define TUCKER_VARIANT(NAME, TARGET, BYTES)                                                                   \
  template <typename T>                                                                                       \
  TARGET void transpose_##NAME(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) { \
    transpose_impl<T, typename Vec<T, BYTES>::type>(rows, cols, src, lds, dst, ldd);                          \
  }
TUCKER_FOR_EACH_ISA(TUCKER_VARIANT)
#undef TUCKER_VARIANT

}  // namespace

template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  TUCKER_CALL_ISA(transpose, rows, cols, src, lds, dst, ldd)
}

template void transpose<float>(int64_t, int64_t, const float*, int64_t, float*, int64_t);
template void transpose<double>(int64_t, int64_t, const double*, int64_t, double*, int64_t);

}  // namespace tucker_ops::cpu
