// The F(2x2, 3x3) tile transforms (winograd.h), vectorised over channels:
// each tile's 16 (or 4) pixel pointers are set up once, then every channel
// vector runs the same adds. Compiled per ISA like the GEMM kernels (simd.h).
#include "cpu/winograd.h"

#include "cpu/simd.h"

namespace tucker_ops::cpu {
namespace {

// The 1-D transforms. B^T and A^T of F(2, 3), and their transposes.
template <typename V>
TUCKER_INLINE void bt(const V d[4], V v[4]) {
  v[0] = d[0] - d[2];
  v[1] = d[1] + d[2];
  v[2] = d[2] - d[1];
  v[3] = d[1] - d[3];
}
template <typename V>
TUCKER_INLINE void b(const V g[4], V d[4]) {
  d[0] = g[0];
  d[1] = g[1] - g[2] + g[3];
  d[2] = g[1] + g[2] - g[0];
  d[3] = -g[3];
}
template <typename V>
TUCKER_INLINE void at(const V m[4], V y[2]) {
  y[0] = m[0] + m[1] + m[2];
  y[1] = m[1] - m[2] - m[3];
}
template <typename V>
TUCKER_INLINE void a(const V y[2], V m[4]) {
  m[0] = y[0];
  m[1] = y[0] + y[1];
  m[2] = y[0] - y[1];
  m[3] = -y[1];
}

// One tile, channels [c, c + lanes): rows are transformed along j, then the
// columns of the result along i (the adjoints undo that order).
template <typename T, typename V>
TUCKER_INLINE void input_tile(const T* const src[16], int64_t c, T* dst, int64_t xs) {
  V r[4][4];
  for (int i = 0; i < 4; ++i) {
    V d[4];
    for (int j = 0; j < 4; ++j) d[j] = load<V>(src[i * 4 + j] + c);
    bt(d, r[i]);
  }
  for (int j = 0; j < 4; ++j) {
    const V col[4] = {r[0][j], r[1][j], r[2][j], r[3][j]};
    V v[4];
    bt(col, v);
    for (int i = 0; i < 4; ++i) store(dst + (i * 4 + j) * xs + c, v[i]);
  }
}

template <typename T, typename V>
TUCKER_INLINE void input_tile_adjoint(const T* src, int64_t xs, int64_t c, T* const dst[16]) {
  V r[4][4];
  for (int j = 0; j < 4; ++j) {
    V g[4], o[4];
    for (int i = 0; i < 4; ++i) g[i] = load<V>(src + (i * 4 + j) * xs + c);
    b(g, o);
    for (int i = 0; i < 4; ++i) r[i][j] = o[i];
  }
  for (int i = 0; i < 4; ++i) {
    V o[4];
    b(r[i], o);
    for (int j = 0; j < 4; ++j) {
      T* d = dst[i * 4 + j] + c;
      store(d, load<V>(d) + o[j]);
    }
  }
}

template <typename T, typename V>
TUCKER_INLINE void output_tile(const T* src, int64_t xs, int64_t c, T* const dst[4]) {
  V r[4][2];
  for (int i = 0; i < 4; ++i) {
    V m[4];
    for (int j = 0; j < 4; ++j) m[j] = load<V>(src + (i * 4 + j) * xs + c);
    at(m, r[i]);
  }
  for (int j = 0; j < 2; ++j) {
    const V col[4] = {r[0][j], r[1][j], r[2][j], r[3][j]};
    V y[2];
    at(col, y);
    for (int i = 0; i < 2; ++i) store(dst[i * 2 + j] + c, y[i]);
  }
}

template <typename T, typename V>
TUCKER_INLINE void output_tile_adjoint(const T* const src[4], int64_t c, T* dst, int64_t xs) {
  V r[4][2];
  for (int j = 0; j < 2; ++j) {
    const V y[2] = {load<V>(src[j] + c), load<V>(src[2 + j] + c)};
    V o[4];
    a(y, o);
    for (int i = 0; i < 4; ++i) r[i][j] = o[i];
  }
  for (int i = 0; i < 4; ++i) {
    V o[4];
    a(r[i], o);
    for (int j = 0; j < 4; ++j) store(dst + (i * 4 + j) * xs + c, o[j]);
  }
}

// Runs TILE<T, V>(args..., c, ...) over the channels: whole vectors, then the
// remainder one channel at a time.
#define TUCKER_OVER_CHANNELS(TILE, ...)                                   \
  do {                                                                    \
    constexpr int64_t lanes = sizeof(V) / sizeof(T);                      \
    int64_t c = 0;                                                        \
    for (; c + lanes <= C; c += lanes) TILE<T, V>(__VA_ARGS__);           \
    for (; c < C; ++c) TILE<T, T>(__VA_ARGS__);                           \
  } while (0)

// Pixel (i, j) of the tile whose top-left input pixel is (h0, w0), or the
// fallback buffer outside the image.
template <typename T>
TUCKER_INLINE T* pixel(T* x, int64_t ld, int64_t H, int64_t W, int64_t h, int64_t w, T* outside) {
  return h >= 0 && h < H && w >= 0 && w < W ? x + (h * W + w) * ld : outside;
}

template <typename T, typename V>
TUCKER_INLINE void input_transform(const T* p, int64_t ldp, int64_t H, int64_t W, int64_t C, int64_t pad_h,
                                   int64_t pad_w, int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* v,
                                   int64_t xs) {
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t tx = 0; tx < tiles_w; ++tx) {
      const T* src[16];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          src[i * 4 + j] = pixel(p, ldp, H, W, 2 * ty - pad_h + i, 2 * tx - pad_w + j, zeros);
      T* dst = v + ((ty - ty0) * tiles_w + tx) * C;
      TUCKER_OVER_CHANNELS(input_tile, src, c, dst, xs);
    }
}

template <typename T, typename V>
TUCKER_INLINE void input_transform_adjoint(const T* gv, int64_t xs, int64_t H, int64_t W, int64_t C, int64_t pad_h,
                                           int64_t pad_w, int64_t ty0, int64_t ty1, int64_t tiles_w, T* sink, T* gp,
                                           int64_t ldp) {
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t tx = 0; tx < tiles_w; ++tx) {
      T* dst[16];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          dst[i * 4 + j] = pixel(gp, ldp, H, W, 2 * ty - pad_h + i, 2 * tx - pad_w + j, sink);
      const T* src = gv + ((ty - ty0) * tiles_w + tx) * C;
      TUCKER_OVER_CHANNELS(input_tile_adjoint, src, xs, c, dst);
    }
}

template <typename T, typename V>
TUCKER_INLINE void output_transform(const T* m, int64_t xs, int64_t H_out, int64_t W_out, int64_t C, int64_t ty0, int64_t ty1,
                                    int64_t tiles_w, T* sink, T* z, int64_t ldz) {
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t tx = 0; tx < tiles_w; ++tx) {
      T* dst[4];
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) dst[i * 2 + j] = pixel(z, ldz, H_out, W_out, 2 * ty + i, 2 * tx + j, sink);
      const T* src = m + ((ty - ty0) * tiles_w + tx) * C;
      TUCKER_OVER_CHANNELS(output_tile, src, xs, c, dst);
    }
}

template <typename T, typename V>
TUCKER_INLINE void output_transform_adjoint(const T* gz, int64_t ldz, int64_t H_out, int64_t W_out, int64_t C,
                                            int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* m, int64_t xs) {
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t tx = 0; tx < tiles_w; ++tx) {
      const T* src[4];
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) src[i * 2 + j] = pixel(gz, ldz, H_out, W_out, 2 * ty + i, 2 * tx + j, zeros);
      T* dst = m + ((ty - ty0) * tiles_w + tx) * C;
      TUCKER_OVER_CHANNELS(output_tile_adjoint, src, c, dst, xs);
    }
}

#undef TUCKER_OVER_CHANNELS

#define TUCKER_VARIANT(NAME, TARGET, BYTES)                                                                          \
  template <typename T>                                                                                              \
  TARGET void input_##NAME(const T* p, int64_t ldp, int64_t H, int64_t W, int64_t C, int64_t pad_h, int64_t pad_w,   \
                           int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* v, int64_t xs) {                     \
    input_transform<T, typename Vec<T, BYTES>::type>(p, ldp, H, W, C, pad_h, pad_w, ty0, ty1, tiles_w, zeros, v, xs); \
  }                                                                                                                  \
  template <typename T>                                                                                              \
  TARGET void input_adjoint_##NAME(const T* gv, int64_t xs, int64_t H, int64_t W, int64_t C, int64_t pad_h,          \
                                   int64_t pad_w, int64_t ty0, int64_t ty1, int64_t tiles_w, T* sink, T* gp, int64_t ldp) {   \
    input_transform_adjoint<T, typename Vec<T, BYTES>::type>(gv, xs, H, W, C, pad_h, pad_w, ty0, ty1, tiles_w, sink,  \
                                                             gp, ldp);                                               \
  }                                                                                                                  \
  template <typename T>                                                                                              \
  TARGET void output_##NAME(const T* m, int64_t xs, int64_t H_out, int64_t W_out, int64_t C, int64_t ty0, int64_t ty1,        \
                            int64_t tiles_w, T* sink, T* z, int64_t ldz) {                                           \
    output_transform<T, typename Vec<T, BYTES>::type>(m, xs, H_out, W_out, C, ty0, ty1, tiles_w, sink, z, ldz);       \
  }                                                                                                                  \
  template <typename T>                                                                                              \
  TARGET void output_adjoint_##NAME(const T* gz, int64_t ldz, int64_t H_out, int64_t W_out, int64_t C,               \
                                    int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* m, int64_t xs) {            \
    output_transform_adjoint<T, typename Vec<T, BYTES>::type>(gz, ldz, H_out, W_out, C, ty0, ty1, tiles_w, zeros, m,  \
                                                              xs);                                                   \
  }

TUCKER_VARIANT(baseline, , 16)
#ifdef TUCKER_HAVE_X86_VARIANTS
TUCKER_VARIANT(avx2, TUCKER_TARGET_AVX2, 32)
TUCKER_VARIANT(avx512, TUCKER_TARGET_AVX512, 64)
#endif
#undef TUCKER_VARIANT

}  // namespace

template <typename T>
void winograd_input_transform(const T* p, int64_t ldp, int64_t H, int64_t W, int64_t C, int64_t pad_h, int64_t pad_w,
                              int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* v, int64_t xs) {
  TUCKER_CALL_ISA(input, p, ldp, H, W, C, pad_h, pad_w, ty0, ty1, tiles_w, zeros, v, xs)
}

template <typename T>
void winograd_input_transform_adjoint(const T* gv, int64_t xs, int64_t H, int64_t W, int64_t C, int64_t pad_h,
                                      int64_t pad_w, int64_t ty0, int64_t ty1, int64_t tiles_w, T* sink, T* gp, int64_t ldp) {
  TUCKER_CALL_ISA(input_adjoint, gv, xs, H, W, C, pad_h, pad_w, ty0, ty1, tiles_w, sink, gp, ldp)
}

template <typename T>
void winograd_output_transform(const T* m, int64_t xs, int64_t H_out, int64_t W_out, int64_t C, int64_t ty0, int64_t ty1,
                               int64_t tiles_w, T* sink, T* z, int64_t ldz) {
  TUCKER_CALL_ISA(output, m, xs, H_out, W_out, C, ty0, ty1, tiles_w, sink, z, ldz)
}

template <typename T>
void winograd_output_transform_adjoint(const T* gz, int64_t ldz, int64_t H_out, int64_t W_out, int64_t C,
                                       int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* m, int64_t xs) {
  TUCKER_CALL_ISA(output_adjoint, gz, ldz, H_out, W_out, C, ty0, ty1, tiles_w, zeros, m, xs)
}

#define TUCKER_INSTANTIATE(T)                                                                                        \
  template void winograd_input_transform<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                            int64_t, int64_t, const T*, T*, int64_t);                                \
  template void winograd_input_transform_adjoint<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,  \
                                                    int64_t, int64_t, int64_t, T*, T*, int64_t);                     \
  template void winograd_output_transform<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                             T*, T*, int64_t);                                                       \
  template void winograd_output_transform_adjoint<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                                     int64_t, const T*, T*, int64_t);
TUCKER_INSTANTIATE(float)
TUCKER_INSTANTIATE(double)
#undef TUCKER_INSTANTIATE

}  // namespace tucker_ops::cpu
