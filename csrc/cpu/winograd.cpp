// The F(m x m, r x r) tile transforms (winograd.h), vectorised over channels:
// each tile's pixel pointers are set up once, then every channel vector runs
// the same constant-coefficient sums (zero coefficients skipped and +-1 ones
// turned into adds at compile time). Compiled per ISA like the GEMM kernels
// (simd.h).
#include "cpu/winograd.h"

#include "cpu/simd.h"

namespace tucker_ops::cpu {
namespace {

// B^T (alpha x alpha), A^T (m x alpha) and G (alpha x r) of F(m, r), for the
// interpolation points 0, +-1 (alpha = 4) and 0, +-1, +-2 (alpha = 6), plus
// infinity. B^T depends on the points alone; A^T's rows are the points' first
// m powers, G's the first r powers over the product of the point's distances
// to the others.
struct Points4 {
  static constexpr double bt[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
};

struct Points6 {
  static constexpr double bt[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                      {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
};

template <int M, int R>
struct Matrices;

template <>
struct Matrices<2, 3> : Points4 {
  static constexpr double at[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
  static constexpr double g[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
};

template <>
struct Matrices<4, 3> : Points6 {
  static constexpr double at[4][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
  static constexpr double g[6][3] = {{1.0 / 4, 0, 0},           {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                     {-1.0 / 6, 1.0 / 6, -1.0 / 6}, {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                     {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};
};

template <>
struct Matrices<2, 5> : Points6 {
  static constexpr double at[2][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 1}};
  static constexpr double g[6][5] = {{1.0 / 4, 0, 0, 0, 0},
                                     {-1.0 / 6, -1.0 / 6, -1.0 / 6, -1.0 / 6, -1.0 / 6},
                                     {-1.0 / 6, 1.0 / 6, -1.0 / 6, 1.0 / 6, -1.0 / 6},
                                     {1.0 / 24, 1.0 / 12, 1.0 / 6, 1.0 / 3, 2.0 / 3},
                                     {1.0 / 24, -1.0 / 12, 1.0 / 6, -1.0 / 3, 2.0 / 3},
                                     {0, 0, 0, 0, 1}};
};

// out[r] = sum_c mx[r][c] * in[c] (TRANSPOSED: mx[c][r]); the loops unroll,
// so each coefficient is a constant and the zero ones vanish.
template <typename T, typename V, int R, int C, bool TRANSPOSED, typename Mx>
TUCKER_INLINE void apply(const Mx& mx, const V* in, V* out) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    V acc{};
    bool empty = true;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const T k = static_cast<T>(TRANSPOSED ? mx[c][r] : mx[r][c]);
      if (k == T(0)) continue;
      const V term = k == T(1) ? in[c] : k == T(-1) ? -in[c] : in[c] * k;
      acc = empty ? term : acc + term;
      empty = false;
    }
    out[r] = acc;
  }
}

// One tile, channels [c, c + lanes): rows are transformed along j, then the
// columns of the result along i (the adjoints undo that order).
template <typename T, typename V, int M, int R>
TUCKER_INLINE void input_tile(const T* const* src, int64_t c, T* dst, int64_t xs) {
  constexpr int A = M + R - 1;
  using Mx = Matrices<M, R>;
  V r[A][A];
  for (int i = 0; i < A; ++i) {
    V d[A];
    for (int j = 0; j < A; ++j) d[j] = load<V>(src[i * A + j] + c);
    apply<T, V, A, A, false>(Mx::bt, d, r[i]);
  }
  for (int j = 0; j < A; ++j) {
    V col[A], v[A];
    for (int i = 0; i < A; ++i) col[i] = r[i][j];
    apply<T, V, A, A, false>(Mx::bt, col, v);
    for (int i = 0; i < A; ++i) store(dst + (i * A + j) * xs + c, v[i]);
  }
}

template <typename T, typename V, int M, int R>
TUCKER_INLINE void input_tile_adjoint(const T* src, int64_t xs, int64_t c, T* const* dst) {
  constexpr int A = M + R - 1;
  using Mx = Matrices<M, R>;
  V r[A][A];
  for (int j = 0; j < A; ++j) {
    V g[A], o[A];
    for (int i = 0; i < A; ++i) g[i] = load<V>(src + (i * A + j) * xs + c);
    apply<T, V, A, A, true>(Mx::bt, g, o);
    for (int i = 0; i < A; ++i) r[i][j] = o[i];
  }
  for (int i = 0; i < A; ++i) {
    V o[A];
    apply<T, V, A, A, true>(Mx::bt, r[i], o);
    for (int j = 0; j < A; ++j) {
      T* d = dst[i * A + j] + c;
      store(d, load<V>(d) + o[j]);
    }
  }
}

template <typename T, typename V, int M, int R>
TUCKER_INLINE void output_tile(const T* src, int64_t xs, int64_t c, T* const* dst) {
  constexpr int A = M + R - 1;
  using Mx = Matrices<M, R>;
  V r[A][M];
  for (int i = 0; i < A; ++i) {
    V m[A];
    for (int j = 0; j < A; ++j) m[j] = load<V>(src + (i * A + j) * xs + c);
    apply<T, V, M, A, false>(Mx::at, m, r[i]);
  }
  for (int j = 0; j < M; ++j) {
    V col[A], y[M];
    for (int i = 0; i < A; ++i) col[i] = r[i][j];
    apply<T, V, M, A, false>(Mx::at, col, y);
    for (int i = 0; i < M; ++i) store(dst[i * M + j] + c, y[i]);
  }
}

template <typename T, typename V, int M, int R>
TUCKER_INLINE void output_tile_adjoint(const T* const* src, int64_t c, T* dst, int64_t xs) {
  constexpr int A = M + R - 1;
  using Mx = Matrices<M, R>;
  V r[A][M];
  for (int j = 0; j < M; ++j) {
    V y[M], o[A];
    for (int i = 0; i < M; ++i) y[i] = load<V>(src[i * M + j] + c);
    apply<T, V, A, M, true>(Mx::at, y, o);
    for (int i = 0; i < A; ++i) r[i][j] = o[i];
  }
  for (int i = 0; i < A; ++i) {
    V o[A];
    apply<T, V, A, M, true>(Mx::at, r[i], o);
    for (int j = 0; j < A; ++j) store(dst + (i * A + j) * xs + c, o[j]);
  }
}

// Runs TILE<T, V, M, R>(args..., c, ...) over the channels: whole vectors, then
// the remainder one channel at a time.
#define TUCKER_OVER_CHANNELS(TILE, ...)                                   \
  do {                                                                    \
    constexpr int64_t lanes = sizeof(V) / sizeof(T);                      \
    int64_t c = 0;                                                        \
    for (; c + lanes <= C; c += lanes) TILE<T, V, M, R>(__VA_ARGS__);     \
    for (; c < C; ++c) TILE<T, T, M, R>(__VA_ARGS__);                     \
  } while (0)

// Pixel (h, w) of rows, or the fallback buffer outside them.
template <typename T>
TUCKER_INLINE T* pixel(T* x, const PixelRows& rows, int64_t h, int64_t w, T* outside) {
  return h >= rows.h_lo && h < rows.h_hi && w >= 0 && w < rows.W ? x + ((h - rows.h_lo) * rows.W + w) * rows.ld
                                                                   : outside;
}

template <typename T, typename V, int M, int R>
TUCKER_INLINE void input_transform(const T* p, const PixelRows& rows, int64_t C, int64_t pad_h, int64_t pad_w,
                                   int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* v, int64_t xs) {
  constexpr int A = M + R - 1;
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t tx = 0; tx < tiles_w; ++tx) {
      const T* src[A * A];
      for (int i = 0; i < A; ++i)
        for (int j = 0; j < A; ++j) src[i * A + j] = pixel(p, rows, M * ty - pad_h + i, M * tx - pad_w + j, zeros);
      T* dst = v + ((ty - ty0) * tiles_w + tx) * C;
      TUCKER_OVER_CHANNELS(input_tile, src, c, dst, xs);
    }
}

template <typename T, typename V, int M, int R>
TUCKER_INLINE void input_transform_adjoint(const T* gv, int64_t xs, const PixelRows& rows, int64_t C, int64_t pad_h,
                                           int64_t pad_w, int64_t ty0, int64_t ty1, int64_t tiles_w, T* sink, T* gp) {
  constexpr int A = M + R - 1;
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t tx = 0; tx < tiles_w; ++tx) {
      T* dst[A * A];
      for (int i = 0; i < A; ++i)
        for (int j = 0; j < A; ++j) dst[i * A + j] = pixel(gp, rows, M * ty - pad_h + i, M * tx - pad_w + j, sink);
      const T* src = gv + ((ty - ty0) * tiles_w + tx) * C;
      TUCKER_OVER_CHANNELS(input_tile_adjoint, src, xs, c, dst);
    }
}

template <typename T, typename V, int M, int R>
TUCKER_INLINE void output_transform(const T* mt, int64_t xs, const PixelRows& rows, int64_t C, int64_t ty0,
                                    int64_t ty1, int64_t tiles_w, T* sink, T* z) {
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t tx = 0; tx < tiles_w; ++tx) {
      T* dst[M * M];
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < M; ++j) dst[i * M + j] = pixel(z, rows, M * ty + i, M * tx + j, sink);
      const T* src = mt + ((ty - ty0) * tiles_w + tx) * C;
      TUCKER_OVER_CHANNELS(output_tile, src, xs, c, dst);
    }
}

template <typename T, typename V, int M, int R>
TUCKER_INLINE void output_transform_adjoint(const T* gz, const PixelRows& rows, int64_t C, int64_t ty0, int64_t ty1,
                                            int64_t tiles_w, const T* zeros, T* mt, int64_t xs) {
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t tx = 0; tx < tiles_w; ++tx) {
      const T* src[M * M];
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < M; ++j) src[i * M + j] = pixel(gz, rows, M * ty + i, M * tx + j, zeros);
      T* dst = mt + ((ty - ty0) * tiles_w + tx) * C;
      TUCKER_OVER_CHANNELS(output_tile_adjoint, src, c, dst, xs);
    }
}

#undef TUCKER_OVER_CHANNELS

// One wrapper per ISA and transform; k picks the algorithm.
#define TUCKER_BY_TILE(FN, V, ...)                                                           \
  (k.r == 5 ? FN<T, V, 2, 5>(__VA_ARGS__) : k.m == 4 ? FN<T, V, 4, 3>(__VA_ARGS__)        \
                                                      : FN<T, V, 2, 3>(__VA_ARGS__))
#define TUCKER_VARIANT(NAME, TARGET, BYTES)                                                                          \
  template <typename T>                                                                                              \
  TARGET void input_##NAME(WinogradKind k, const T* p, const PixelRows& rows, int64_t C, int64_t pad_h, int64_t pad_w,    \
                           int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* v, int64_t xs) {            \
    using V = typename Vec<T, BYTES>::type;                                                                          \
    TUCKER_BY_TILE(input_transform, V, p, rows, C, pad_h, pad_w, ty0, ty1, tiles_w, zeros, v, xs);                   \
  }                                                                                                                  \
  template <typename T>                                                                                              \
  TARGET void input_adjoint_##NAME(WinogradKind k, const T* gv, int64_t xs, const PixelRows& rows, int64_t C,             \
                                   int64_t pad_h, int64_t pad_w, int64_t ty0, int64_t ty1, int64_t tiles_w, T* sink, \
                                   T* gp) {                                                                          \
    using V = typename Vec<T, BYTES>::type;                                                                          \
    TUCKER_BY_TILE(input_transform_adjoint, V, gv, xs, rows, C, pad_h, pad_w, ty0, ty1, tiles_w, sink, gp);          \
  }                                                                                                                  \
  template <typename T>                                                                                              \
  TARGET void output_##NAME(WinogradKind k, const T* mt, int64_t xs, const PixelRows& rows, int64_t C, int64_t ty0,       \
                            int64_t ty1, int64_t tiles_w, T* sink, T* z) {                                           \
    using V = typename Vec<T, BYTES>::type;                                                                          \
    TUCKER_BY_TILE(output_transform, V, mt, xs, rows, C, ty0, ty1, tiles_w, sink, z);                                \
  }                                                                                                                  \
  template <typename T>                                                                                              \
  TARGET void output_adjoint_##NAME(WinogradKind k, const T* gz, const PixelRows& rows, int64_t C, int64_t ty0,           \
                                    int64_t ty1, int64_t tiles_w, const T* zeros, T* mt, int64_t xs) {               \
    using V = typename Vec<T, BYTES>::type;                                                                          \
    TUCKER_BY_TILE(output_transform_adjoint, V, gz, rows, C, ty0, ty1, tiles_w, zeros, mt, xs);                      \
  }

TUCKER_FOR_EACH_ISA(TUCKER_VARIANT)
#undef TUCKER_VARIANT
#undef TUCKER_BY_TILE

template <int M, int R, typename T>
void kron_of(T* kron) {
  constexpr int A = M + R - 1;
  for (int a = 0; a < A; ++a)
    for (int b = 0; b < A; ++b)
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < R; ++j)
          kron[(a * A + b) * R * R + i * R + j] = static_cast<T>(Matrices<M, R>::g[a][i] * Matrices<M, R>::g[b][j]);
}

}  // namespace

template <typename T>
void winograd_kron(WinogradKind k, T* kron) {
  k.r == 5 ? kron_of<2, 5>(kron) : k.m == 4 ? kron_of<4, 3>(kron) : kron_of<2, 3>(kron);
}

template <typename T>
void winograd_input_transform(WinogradKind k, const T* p, const PixelRows& rows, int64_t C, int64_t pad_h, int64_t pad_w,
                              int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* v, int64_t xs) {
  TUCKER_CALL_ISA(input, k, p, rows, C, pad_h, pad_w, ty0, ty1, tiles_w, zeros, v, xs)
}

template <typename T>
void winograd_input_transform_adjoint(WinogradKind k, const T* gv, int64_t xs, const PixelRows& rows, int64_t C,
                                      int64_t pad_h, int64_t pad_w, int64_t ty0, int64_t ty1, int64_t tiles_w,
                                      T* sink, T* gp) {
  TUCKER_CALL_ISA(input_adjoint, k, gv, xs, rows, C, pad_h, pad_w, ty0, ty1, tiles_w, sink, gp)
}

template <typename T>
void winograd_output_transform(WinogradKind k, const T* mt, int64_t xs, const PixelRows& rows, int64_t C, int64_t ty0,
                               int64_t ty1, int64_t tiles_w, T* sink, T* z) {
  TUCKER_CALL_ISA(output, k, mt, xs, rows, C, ty0, ty1, tiles_w, sink, z)
}

template <typename T>
void winograd_output_transform_adjoint(WinogradKind k, const T* gz, const PixelRows& rows, int64_t C, int64_t ty0,
                                       int64_t ty1, int64_t tiles_w, const T* zeros, T* mt, int64_t xs) {
  TUCKER_CALL_ISA(output_adjoint, k, gz, rows, C, ty0, ty1, tiles_w, zeros, mt, xs)
}

#define TUCKER_INSTANTIATE(T)                                                                                      \
  template void winograd_kron<T>(WinogradKind, T*);                                                                     \
  template void winograd_input_transform<T>(WinogradKind, const T*, const PixelRows&, int64_t, int64_t, int64_t,        \
                                            int64_t, int64_t, int64_t, const T*, T*, int64_t);                     \
  template void winograd_input_transform_adjoint<T>(WinogradKind, const T*, int64_t, const PixelRows&, int64_t,         \
                                                    int64_t, int64_t, int64_t, int64_t, int64_t, T*, T*);          \
  template void winograd_output_transform<T>(WinogradKind, const T*, int64_t, const PixelRows&, int64_t, int64_t,       \
                                             int64_t, int64_t, T*, T*);                                            \
  template void winograd_output_transform_adjoint<T>(WinogradKind, const T*, const PixelRows&, int64_t, int64_t,        \
                                                     int64_t, int64_t, const T*, T*, int64_t);
TUCKER_INSTANTIATE(float)
TUCKER_INSTANTIATE(double)
#undef TUCKER_INSTANTIATE

}  // namespace tucker_ops::cpu
