// Winograd F(2x2, 3x3) for the fused conv's 3x3 stride-1 core (Lavin and
// Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).
//
// A 2x2 block of core outputs is computed from the 4x4 block of projection
// pixels that covers it: Y = A^T [U . V] A, with V = B^T d B per input
// channel, U = G g G^T per (output, input) channel pair, and the sum over
// input channels of the 16 elementwise products one GEMM per element xi =
// 4*a + b. That is 16 multiply-adds per channel pair per 4 outputs instead of
// 36: 2.25x fewer in the core's forward and in both of its gradients (the
// core gradient dU[xi] = M[xi]^T V[xi] and the projection gradient
// gV[xi] = M[xi] U[xi], with M = A gY A^T, are the same GEMMs transposed).
//
// Tiles cover the output in row-major order, ceil(H_out / 2) by tiles_w =
// ceil(W_out / 2); tile (ty, tx) reads input rows 2*ty - pad_h + i and
// columns 2*tx - pad_w + j, i, j in [0, 4), zeros outside the image, and
// writes outputs beyond H_out / W_out nowhere. Each transform runs over the
// tile rows [ty0, ty1) of one image (a band, to keep its buffers in cache).
// Pixel data is the whole image, pixel-major (pixel q's C channels at
// x + q * ld, ld >= C); transformed data is the band's,
// v[xi * xs + t * C + c] with t = (ty - ty0) * tiles_w + tx: every transform
// runs vectorised over channels.
//
// The transforms are exact linear maps, so the results equal the direct
// convolution's up to rounding (a few ulps: the coefficients are 0, +-1 and
// +-1/2), with one exception: B^T subtracts input pixels, so an infinite
// input can turn into NaN where the direct sum would be infinite. Callers
// run the direct path for non-finite data.
#pragma once

#include <cstdint>

namespace tucker_ops::cpu {

constexpr int64_t kWinogradElems = 16;  // 4 x 4 transformed values per tile

// kron(G, G) as a (16 x 9) row-major matrix: U (16 x pairs) = kWinogradCore *
// g^T for a core g (pairs x 9 taps), and a core gradient (pairs x 9) =
// dU^T * kWinogradCore.
template <typename T>
struct WinogradCore {
  static constexpr T g[4][3] = {{1, 0, 0}, {T(0.5), T(0.5), T(0.5)}, {T(0.5), T(-0.5), T(0.5)}, {0, 0, 1}};
  T kron[16][9];
  constexpr WinogradCore() : kron{} {
    for (int a = 0; a < 4; ++a)
      for (int b = 0; b < 4; ++b)
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) kron[a * 4 + b][i * 3 + j] = g[a][i] * g[b][j];
  }
};

inline int64_t winograd_tiles(int64_t out) {
  return (out + 1) / 2;
}

// v = B^T d B for every tile of p (H x W pixels); zeros: C readable zeros.
template <typename T>
void winograd_input_transform(const T* p, int64_t ldp, int64_t H, int64_t W, int64_t C, int64_t pad_h, int64_t pad_w,
                              int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* v, int64_t xs);

// Adjoint: gp (H x W pixels) += B gv B^T of every tile, scattered onto the
// input pixels the tile read (those outside the image are dropped: sink, C
// writable elements, receives them).
template <typename T>
void winograd_input_transform_adjoint(const T* gv, int64_t xs, int64_t H, int64_t W, int64_t C, int64_t pad_h,
                                      int64_t pad_w, int64_t ty0, int64_t ty1, int64_t tiles_w, T* sink, T* gp, int64_t ldp);

// z (H_out x W_out pixels) = A^T m A of every tile; sink as above.
template <typename T>
void winograd_output_transform(const T* m, int64_t xs, int64_t H_out, int64_t W_out, int64_t C, int64_t ty0, int64_t ty1,
                               int64_t tiles_w, T* sink, T* z, int64_t ldz);

// Adjoint: m = A gz A^T of every tile (gz is H_out x W_out pixels; zeros: C
// readable zeros stand for the outputs past the edge).
template <typename T>
void winograd_output_transform_adjoint(const T* gz, int64_t ldz, int64_t H_out, int64_t W_out, int64_t C,
                                       int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* m, int64_t xs);

}  // namespace tucker_ops::cpu
