// Output tiling of the fused Tucker conv, shared by its forward and backward.
//
// A tile is a band of whole output rows [oh0, oh1) of one image; its input is
// the rows those outputs read (the band plus the (k-1)*dilation halo, clipped
// to the image). Within a tile the im2col of the rank-R_in projection is built
// one block of output pixels at a time, so every scratch buffer of a tile
// stays within L2 and no intermediate ever goes to a full-size tensor.
//
// The projection P of a tile (R_in channels, rows [ih_lo, ih_hi) of the image,
// all W columns) is addressed as P(c, ih, iw) = p[c * cs + ((ih - ih_lo) * W + iw) * ps]:
// channel-major (cs = rows * W, ps = 1) when projected from NCHW input or when
// it is the NCHW input itself, pixel-major (cs = 1, ps = R_in) from NHWC input.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"

namespace tucker_ops::cpu {

struct TilePlan {
  int64_t rows;           // output rows per tile (the last tile of an image may be shorter)
  int64_t tiles_per_image;
  int64_t block;          // output pixels per im2col block
};

// First and one-past-last input row read by output rows [oh0, oh1), clipped.
inline std::pair<int64_t, int64_t> input_rows(const Conv2dSizes& s, int64_t oh0, int64_t oh1) {
  const int64_t lo = std::max<int64_t>(0, oh0 * s.stride_h - s.pad_h);
  const int64_t hi = std::min<int64_t>(s.H, (oh1 - 1) * s.stride_h - s.pad_h + (s.kh - 1) * s.dil_h + 1);
  return {lo, std::max(lo, hi)};
}

// Tiles: whole images when the batch alone keeps every thread busy (no halo
// is recomputed then); otherwise bands, at least 2 per thread, shrunk until
// the tile's projection fits in about 256 KiB. `no_skip_overlap` asks that
// tiles k and k+2 of an image read disjoint input rows (the backward scatters
// into the input gradient in two passes, even tiles then odd tiles).
inline TilePlan plan_tiles(const Conv2dSizes& s, int64_t threads, int64_t elem_size, bool no_skip_overlap) {
  const int64_t want_tiles = s.N >= 2 * threads ? 1 : (2 * threads + s.N - 1) / std::max<int64_t>(s.N, 1);
  int64_t rows = std::max<int64_t>(1, (s.H_out + want_tiles - 1) / want_tiles);
  const int64_t budget = 256 * 1024 / elem_size;
  auto proj_elems = [&](int64_t r) { return s.R_in * std::min<int64_t>(s.H, (r - 1) * s.stride_h + (s.kh - 1) * s.dil_h + 1) * s.W; };
  while (rows > 4 && proj_elems(rows) > budget) rows = (rows + 1) / 2;
  if (no_skip_overlap) {
    while (rows < s.H_out && (s.kh - 1) * s.dil_h >= (rows + 1) * s.stride_h) ++rows;
  }
  rows = std::min(rows, s.H_out);
  const int64_t K = s.R_in * s.kh * s.kw;
  // im2col block: about 384 KiB of columns (L2 is 1 MiB on the benchmark
  // machine), a multiple of 32 pixels, 64..512. Smaller blocks measured slower:
  // per-call GEMM overhead (B packing in MKL) grows as N shrinks.
  int64_t block = (384 * 1024 / elem_size) / std::max<int64_t>(K, 1);
  block = std::clamp<int64_t>(block / 32 * 32, 64, 512);
  return {rows, (s.H_out + rows - 1) / rows, block};
}

// True when the core reads the projection exactly as stored (1x1, stride 1,
// no padding) and the projection is channel-major: the im2col is skipped.
inline bool reads_projection_directly(const Conv2dSizes& s, int64_t ps) {
  return s.kh == 1 && s.kw == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 && s.pad_w == 0 && ps == 1;
}

// Output columns ow whose input column ow*stride - pad + j*dil lies inside
// [0, W): the half-open range [lo, hi), possibly empty.
inline std::pair<int64_t, int64_t> valid_cols(const Conv2dSizes& s, int64_t j) {
  const int64_t off = j * s.dil_w - s.pad_w;  // iw = ow * stride + off
  int64_t lo = off >= 0 ? 0 : (-off + s.stride_w - 1) / s.stride_w;
  int64_t hi = off > s.W - 1 ? 0 : (s.W - 1 - off) / s.stride_w + 1;
  lo = std::min(lo, s.W_out);
  hi = std::clamp<int64_t>(hi, lo, s.W_out);
  return {lo, hi};
}

// cols (R_in*kh*kw x n, row stride n) for the output pixels [q0, q0 + n) of the
// tile starting at output row oh0 (pixel q is row oh0 + q / W_out, column
// q % W_out). Reads P (see above); zeros outside the image.
template <typename T>
void im2col_block(const Conv2dSizes& s, const T* p, int64_t cs, int64_t ps, int64_t ih_lo, int64_t ih_hi,
                  int64_t oh0, int64_t q0, int64_t n, T* cols) {
  // One output-row segment at a time: its bounds are computed once and the
  // inner copies are short plain loops (a memcpy call per segment costs more
  // than the copy when W_out is small).
  const int64_t step = s.stride_w * ps;
  for (int64_t q = q0, qend = q0 + n; q < qend;) {
    const int64_t oh = oh0 + q / s.W_out;
    const int64_t ow0 = q % s.W_out;
    const int64_t ow1 = std::min<int64_t>(s.W_out, ow0 + (qend - q));
    const int64_t col0 = q - q0 - ow0;  // column of (oh, ow) is col0 + ow
    for (int64_t i = 0; i < s.kh; ++i) {
      const int64_t ih = oh * s.stride_h - s.pad_h + i * s.dil_h;
      const bool row_in = ih >= ih_lo && ih < ih_hi;
      for (int64_t j = 0; j < s.kw; ++j) {
        const auto [lo, hi] = valid_cols(s, j);
        const int64_t a = row_in ? std::max(ow0, lo) : ow1, b = row_in ? std::min(ow1, hi) : ow1;
        const int64_t off = j * s.dil_w - s.pad_w;
        for (int64_t c = 0; c < s.R_in; ++c) {
          T* d = cols + ((c * s.kh + i) * s.kw + j) * n + col0;
          if (a >= b) {
            for (int64_t ow = ow0; ow < ow1; ++ow) d[ow] = T(0);
          } else {
            for (int64_t ow = ow0; ow < a; ++ow) d[ow] = T(0);
            const T* src = p + c * cs + ((ih - ih_lo) * s.W + off) * ps;  // src[ow * step] is (ih, iw)
            if (step == 1) {
              for (int64_t ow = a; ow < b; ++ow) d[ow] = src[ow];
            } else {
              for (int64_t ow = a; ow < b; ++ow) d[ow] = src[ow * step];
            }
            for (int64_t ow = b; ow < ow1; ++ow) d[ow] = T(0);
          }
        }
      }
    }
    q += ow1 - ow0;
  }
}

// Adjoint of im2col_block: gp (R_in, H, W) of one image, channel-major,
// += the scatter of gcols (R_in*kh*kw x n).
template <typename T>
void col2im_block_add(const Conv2dSizes& s, const T* gcols, int64_t oh0, int64_t q0, int64_t n, T* gp) {
  const int64_t HW = s.H * s.W;
  for (int64_t j = 0; j < s.kw; ++j) {
    const auto [lo, hi] = valid_cols(s, j);
    const int64_t off = j * s.dil_w - s.pad_w;
    for (int64_t c = 0; c < s.R_in; ++c) {
      for (int64_t i = 0; i < s.kh; ++i) {
        const T* src = gcols + ((c * s.kh + i) * s.kw + j) * n;
        int64_t q = q0;
        const int64_t qend = q0 + n;
        while (q < qend) {
          const int64_t oh = oh0 + q / s.W_out;
          const int64_t ow0 = q % s.W_out;
          const int64_t ow1 = std::min<int64_t>(s.W_out, ow0 + (qend - q));
          const T* sp = src + (q - q0) - ow0;
          const int64_t ih = oh * s.stride_h - s.pad_h + i * s.dil_h;
          if (ih >= 0 && ih < s.H) {
            const int64_t a = std::max(ow0, lo), b = std::min(ow1, hi);
            T* dst = gp + c * HW + ih * s.W + off;  // dst[ow*stride] is (ih, iw)
            if (s.stride_w == 1) {
              for (int64_t ow = a; ow < b; ++ow) dst[ow] += sp[ow];
            } else {
              for (int64_t ow = a; ow < b; ++ow) dst[ow * s.stride_w] += sp[ow];
            }
          }
          q += ow1 - ow0;
        }
      }
    }
  }
}

// Per-thread scratch, grown on demand and kept for the next call (a fresh
// allocation per call would cost more than a small layer's arithmetic).
template <typename T>
T* scratch(int slot, int64_t elems) {
  thread_local std::vector<T> bufs[6];
  std::vector<T>& b = bufs[slot];
  if (static_cast<int64_t>(b.size()) < elems) b.resize(static_cast<size_t>(elems));
  return b.data();
}

}  // namespace tucker_ops::cpu
