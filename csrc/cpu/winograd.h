// Winograd F(m x m, r x r) for the fused conv's stride-1 core: F(2x2, 3x3),
// F(4x4, 3x3) and F(2x2, 5x5) (Lavin and Gray, "Fast Algorithms for
// Convolutional Neural Networks", CVPR 2016).
//
// An m x m block of core outputs is computed from the alpha x alpha block of
// projection pixels that covers it (alpha = m + r - 1): Y = A^T [U . V] A,
// with V = B^T d B per input channel, U = G g G^T per (output, input) channel
// pair, and the sum over input channels of the alpha^2 elementwise products
// one GEMM per element xi = alpha*a + b. That is alpha^2 multiply-adds per
// channel pair per m^2 outputs instead of r^2 m^2: 2.25x fewer for F(2, 3),
// 4x for F(4, 3), 2.78x for F(2, 5) (less where the tiles overhang the
// image), in the core's forward and in both of its gradients (the core
// gradient dU[xi] = M[xi]^T V[xi] and the projection gradient gV[xi] =
// M[xi] U[xi], with M = A gY A^T, are the same GEMMs transposed).
//
// Tiles cover the output in row-major order, ceil(H_out / m) by tiles_w =
// ceil(W_out / m); tile (ty, tx) reads input rows m*ty - pad_h + i and
// columns m*tx - pad_w + j, i, j in [0, alpha), zeros outside the image, and
// writes outputs beyond H_out / W_out nowhere. Each transform runs over the
// tile rows [ty0, ty1) of one image (a band, to keep its buffers in cache).
// Pixel data is pixel-major (a pixel's C channels contiguous, PixelRows);
// transformed data is the band's,
// v[xi * xs + t * C + c] with t = (ty - ty0) * tiles_w + tx: every transform
// runs vectorised over channels.
//
// The transforms are exact linear maps, so the results equal the direct
// convolution's up to rounding (F(2, 3)'s coefficients are 0, +-1 and +-1/2;
// F(4, 3)'s and F(2, 5)'s, on the same six interpolation points and so the
// same B^T, reach 8 and 1/24, a few times F(2, 3)'s rounding error), with one
// exception: B^T subtracts input pixels, so an infinite input can turn into
// NaN where the direct sum would be infinite. Callers run the direct path for
// non-finite data.
#pragma once

#include <cstdint>

namespace tucker_ops::cpu {

// The algorithm F(m x m, r x r): one of F(2, 3), F(4, 3), F(2, 5).
struct WinogradKind {
  int64_t m;  // output tile size
  int64_t r;  // core size
  int64_t alpha() const { return m + r - 1; }
  int64_t elems() const { return alpha() * alpha(); }
};

inline int64_t winograd_tiles(int64_t out, int64_t m) {
  return (out + m - 1) / m;
}

// kron(G, G) (alpha^2 x r^2, row-major) into kron: U (alpha^2 x pairs) =
// kron * g^T for a core g (pairs x r^2 taps), and a core gradient (pairs x
// r^2) = dU^T * kron.
template <typename T>
void winograd_kron(WinogradKind k, T* kron);

// Rows [h_lo, h_hi) of an image W pixels wide (input or output), stored
// pixel-major from row h_lo: pixel (h, w) at x + ((h - h_lo) * W + w) * ld.
// The transforms read zeros for pixels outside it and drop writes to them.
struct PixelRows {
  int64_t h_lo, h_hi, W, ld;
};

// v = B^T d B for every tile of the band, d from p; zeros: C readable zeros.
template <typename T>
void winograd_input_transform(WinogradKind k, const T* p, const PixelRows& rows, int64_t C, int64_t pad_h, int64_t pad_w,
                              int64_t ty0, int64_t ty1, int64_t tiles_w, const T* zeros, T* v, int64_t xs);

// Adjoint: gp += B gv B^T of every tile of the band, scattered onto the input
// pixels the tile read (those outside rows are dropped: sink, C writable
// elements, receives them).
template <typename T>
void winograd_input_transform_adjoint(WinogradKind k, const T* gv, int64_t xs, const PixelRows& rows, int64_t C,
                                      int64_t pad_h, int64_t pad_w, int64_t ty0, int64_t ty1, int64_t tiles_w,
                                      T* sink, T* gp);

// z = A^T mt A of every tile of the band, z's pixels as rows says (outputs
// outside them dropped into sink).
template <typename T>
void winograd_output_transform(WinogradKind k, const T* mt, int64_t xs, const PixelRows& rows, int64_t C, int64_t ty0,
                               int64_t ty1, int64_t tiles_w, T* sink, T* z);

// Adjoint: mt = A gz A^T of every tile of the band (zeros stand for the
// outputs outside rows).
template <typename T>
void winograd_output_transform_adjoint(WinogradKind k, const T* gz, const PixelRows& rows, int64_t C, int64_t ty0,
                                       int64_t ty1, int64_t tiles_w, const T* zeros, T* mt, int64_t xs);

}  // namespace tucker_ops::cpu
