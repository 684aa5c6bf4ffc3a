// Output tiling of the fused Tucker conv, shared by its forward and backward.
//
// A tile is a band of whole output rows [oh0, oh1) of one image; its input is
// the rows those outputs read (the band plus the (k-1)*dilation halo, clipped
// to the image). Within a tile the rank-R_in projection is read either through
// phase planes (an implicit im2col: each tap's window is the planes shifted,
// see PhasePlanes) or through an explicit im2col built one block of output
// pixels at a time; every scratch buffer of a tile stays within L2 and no
// intermediate ever goes to a full-size tensor.
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
#include "cpu/gemm.h"

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

// Whether some output row reads input row ih (through some tap): with a
// stride beyond the kernel's reach, or bottom rows past the last window, not
// every row is.
inline bool input_row_is_read(const Conv2dSizes& s, int64_t ih) {
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t t = ih + s.pad_h - i * s.dil_h;  // = oh * stride_h
    if (t >= 0 && t % s.stride_h == 0 && t / s.stride_h < s.H_out) return true;
  }
  return false;
}

// The block size that splits a tile's npx pixels into equal blocks of at most
// `block`: 196 pixels as 98 + 98 rather than 160 + 36 (a thin last block runs
// its GEMMs, and the weight gradients' per-block updates, at a fraction of
// the speed).
inline int64_t balanced_block(int64_t npx, int64_t block) {
  const int64_t blocks = std::max<int64_t>(1, (npx + block - 1) / block);
  return (npx + blocks - 1) / blocks;
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

// Implicit im2col. The tile's projection is copied, zero-padded, into
// stride_h x stride_w phase planes: plane (ph, pw) holds the padded input
// pixels (a*stride_h + ph, b*stride_w + pw), `wq` columns b per row and `rows`
// rows a (the tile's output rows plus the halo) per channel, channel stride `cs`.
// Output pixels are computed on an extended grid of wq columns per output row
// (columns >= W_out are discarded). On it the window of tap (c, i, j) is one
// plane shifted by whole rows and columns, so a GEMM reads B through a table
// of row offsets (gemm_nn_offsets) and no im2col is materialised. Stride 1 is
// one plane: the padded projection itself.
struct PhasePlanes {
  int64_t wq, rows, cs, plane;  // plane = R_in * cs elements
  // The phases some tap reads (i*dil_h % stride_h, j*dil_w % stride_w), sorted:
  // a stride larger than the kernel's reach leaves most phases unread, and
  // they are not stored (a 1x1 kernel with stride s keeps 1 plane, not s*s).
  std::vector<int64_t> row_phases, col_phases;

  int64_t count() const { return static_cast<int64_t>(row_phases.size() * col_phases.size()); }
  // Plus gemm_nn_offsets' read slack past the last window.
  int64_t elems(const Conv2dSizes& s) const {
    return count() * plane + (s.kw - 1) * s.dil_w / s.stride_w + kGemmRowSlack;
  }
  // Index of plane (ph, pw) = row_index(ph) * (number of column phases) + col_index(pw);
  // both are phases some tap reads.
  int64_t row_index(int64_t ph) const { return position(row_phases, ph); }
  int64_t col_index(int64_t pw) const { return position(col_phases, pw); }
  int64_t index(int64_t ph, int64_t pw) const {
    return row_index(ph) * static_cast<int64_t>(col_phases.size()) + col_index(pw);
  }

 private:
  static int64_t position(const std::vector<int64_t>& v, int64_t x) {
    return static_cast<int64_t>(std::lower_bound(v.begin(), v.end(), x) - v.begin());
  }
};

inline std::vector<int64_t> used_phases(int64_t taps, int64_t dil, int64_t stride) {
  std::vector<int64_t> v;
  for (int64_t i = 0; i < taps; ++i) v.push_back(i * dil % stride);
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

inline PhasePlanes phase_planes(const Conv2dSizes& s, int64_t out_rows) {
  PhasePlanes t;
  t.wq = (s.W + 2 * s.pad_w + s.stride_w - 1) / s.stride_w;
  t.rows = out_rows + (s.kh - 1) * s.dil_h / s.stride_h;
  t.cs = t.rows * t.wq;
  t.plane = s.R_in * t.cs;
  t.row_phases = used_phases(s.kh, s.dil_h, s.stride_h);
  t.col_phases = used_phases(s.kw, s.dil_w, s.stride_w);
  return t;
}

// Buffer elements for a tile of `out_rows` output rows: every plane plus the
// overhang of the last window on the extended grid.
inline int64_t phase_planes_elems(const Conv2dSizes& s, int64_t out_rows) {
  return phase_planes(s, out_rows).elems(s);
}

// Columns b of phase pw inside the image (iw = b*stride_w + pw - pad_w in
// [0, W)): the half-open range [lo, hi) within the plane's wq columns.
inline std::pair<int64_t, int64_t> phase_cols(const Conv2dSizes& s, const PhasePlanes& t, int64_t pw) {
  const int64_t lo = std::min(t.wq, std::max<int64_t>(0, (s.pad_w - pw + s.stride_w - 1) / s.stride_w));
  const int64_t last = s.W - 1 + s.pad_w - pw;  // floor division below: it may be negative
  return {lo, std::clamp<int64_t>(last < 0 ? 0 : last / s.stride_w + 1, lo, t.wq)};
}

// Fills buf with the planes of P (addressed as in im2col_block, rows
// [ih_lo, ih_hi)) for output rows [oh0, oh1), zeros outside the image, and
// offsets (R_in*kh*kw, im2col row order, plus kh + kw entries of scratch) with
// each tap's window start.
template <typename T>
PhasePlanes fill_phase_planes(const Conv2dSizes& s, const T* p, int64_t cs, int64_t ps, int64_t ih_lo, int64_t ih_hi,
                              int64_t oh0, int64_t oh1, T* buf, int64_t* offsets) {
  PhasePlanes t = phase_planes(s, oh1 - oh0);
  for (const int64_t ph : t.row_phases) {
    for (const int64_t pw : t.col_phases) {
      T* plane = buf + t.index(ph, pw) * t.plane;
      const auto [b_lo, b_hi] = phase_cols(s, t, pw);
      for (int64_t c = 0; c < s.R_in; ++c) {
        for (int64_t a = 0; a < t.rows; ++a) {
          T* d = plane + c * t.cs + a * t.wq;
          const int64_t ih = (oh0 + a) * s.stride_h + ph - s.pad_h;
          if (ih < ih_lo || ih >= ih_hi || b_lo >= b_hi) {
            std::fill(d, d + t.wq, T(0));
            continue;
          }
          std::fill(d, d + b_lo, T(0));
          const T* src = p + c * cs + ((ih - ih_lo) * s.W + pw - s.pad_w) * ps;  // src[b*stride_w*ps] is (ih, iw)
          const int64_t step = s.stride_w * ps;
          if (step == 1) {
            std::memcpy(d + b_lo, src + b_lo, (b_hi - b_lo) * sizeof(T));
          } else {
            for (int64_t b = b_lo; b < b_hi; ++b) d[b] = src[b * step];
          }
          std::fill(d + b_hi, d + t.wq, T(0));
        }
      }
    }
  }
  std::fill(buf + t.count() * t.plane, buf + t.elems(s), T(0));
  // offset(c, i, j) = c*cs + row_part(i) + col_part(j): the plane index splits
  // into its row-phase and column-phase parts.
  int64_t* row_part = offsets + s.R_in * s.kh * s.kw;  // caller gives kh + kw spare entries
  int64_t* col_part = row_part + s.kh;
  const int64_t col_phases = static_cast<int64_t>(t.col_phases.size());
  for (int64_t i = 0; i < s.kh; ++i)
    row_part[i] = t.row_index(i * s.dil_h % s.stride_h) * col_phases * t.plane + i * s.dil_h / s.stride_h * t.wq;
  for (int64_t j = 0; j < s.kw; ++j)
    col_part[j] = t.col_index(j * s.dil_w % s.stride_w) * t.plane + j * s.dil_w / s.stride_w;
  for (int64_t c = 0; c < s.R_in; ++c)
    for (int64_t i = 0; i < s.kh; ++i) {
      int64_t* o = offsets + (c * s.kh + i) * s.kw;
      const int64_t base = c * t.cs + row_part[i];
      for (int64_t j = 0; j < s.kw; ++j) o[j] = base + col_part[j];
    }
  return t;
}

// Adjoint of fill_phase_planes, restricted to the tile's input rows
// [ih_lo, ih_hi) (rows outside receive only exact zeros, and another tile may
// own them): gp (R_in, H, W) of one image, channel-major, += the planes.
template <typename T>
void add_phase_planes(const Conv2dSizes& s, const PhasePlanes& t, const T* planes, int64_t ih_lo, int64_t ih_hi,
                      int64_t oh0, T* gp) {
  const int64_t HW = s.H * s.W;
  for (const int64_t ph : t.row_phases) {
    for (const int64_t pw : t.col_phases) {
      const T* plane = planes + t.index(ph, pw) * t.plane;
      const auto [b_lo, b_hi] = phase_cols(s, t, pw);
      for (int64_t a = 0; a < t.rows; ++a) {
        const int64_t ih = (oh0 + a) * s.stride_h + ph - s.pad_h;
        if (ih < ih_lo || ih >= ih_hi) continue;
        for (int64_t c = 0; c < s.R_in; ++c) {
          const T* src = plane + c * t.cs + a * t.wq;
          T* dst = gp + c * HW + ih * s.W + pw - s.pad_w;  // dst[b * stride_w] is (ih, iw)
          if (s.stride_w == 1) {
            for (int64_t b = b_lo; b < b_hi; ++b) dst[b] += src[b];
          } else {
            for (int64_t b = b_lo; b < b_hi; ++b) dst[b * s.stride_w] += src[b];
          }
        }
      }
    }
  }
}

// Sum of n contiguous values. Sixteen independent partial sums: a single
// running sum is one long chain of dependent adds (the compiler may not
// reorder floating-point sums), this vectorises. Deterministic for a given n.
template <typename T>
T sum_contiguous(const T* x, int64_t n) {
  constexpr int64_t kLanes = 16;
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) part[j] += x[i + j];
  T sum = T(0);
  for (; i < n; ++i) sum += x[i];
  for (int64_t j = 0; j < kLanes; ++j) sum += part[j];
  return sum;
}

// x - x is 0 for every finite x and NaN for +-Inf and NaN, and a NaN stays
// in a sum: sixteen partial sums of x - x (as sum_contiguous) vectorise,
// where a running boolean did not.
template <typename T>
bool all_finite(const T* x, int64_t n) {
  constexpr int64_t kLanes = 16;
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) part[j] += x[i + j] - x[i + j];
  T sum = T(0);
  for (; i < n; ++i) sum += x[i] - x[i];
  for (int64_t j = 0; j < kLanes; ++j) sum += part[j];
  return sum == T(0);
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

// GCC would otherwise turn the pixel-major im2col's per-tap zero fill into a
// memset call (g++ 12 -O3), costing more than its R_in values.
#if defined(__GNUC__) && !defined(__clang__)
#define TUCKER_NO_MEMCPY_CALLS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define TUCKER_NO_MEMCPY_CALLS
#endif

// Pixel-major im2col: cols (n x K, K = kh*kw*R_in) for the output pixels
// [q0, q0 + n) of the tile starting at output row oh0, row q the taps of
// pixel q0 + q in tap-major order, cols[q*K + (i*kw + j)*R_in + c] =
// P(c, ih, iw), zeros outside the image; pm is the projection of input rows
// [ih_lo, ih_hi) pixel-major ((rows, W, R_in)), so every tap is one
// contiguous copy of R_in values. The core reads it with its taps reordered
// to match (tap_major_core).
template <typename T>
TUCKER_NO_MEMCPY_CALLS void im2col_pixel_major(const Conv2dSizes& s, const T* pm, int64_t ih_lo, int64_t ih_hi,
                                               int64_t oh0, int64_t q0, int64_t n, T* cols) {
  const int64_t C = s.R_in;
  T* d = cols;
  for (int64_t q = q0; q < q0 + n; ++q) {
    const int64_t oh = oh0 + q / s.W_out, ow = q % s.W_out;
    for (int64_t i = 0; i < s.kh; ++i) {
      const int64_t ih = oh * s.stride_h - s.pad_h + i * s.dil_h;
      const bool row_in = ih >= ih_lo && ih < ih_hi;
      for (int64_t j = 0; j < s.kw; ++j, d += C) {
        const int64_t iw = ow * s.stride_w - s.pad_w + j * s.dil_w;
        if (row_in && iw >= 0 && iw < s.W) {
          const T* src = pm + ((ih - ih_lo) * s.W + iw) * C;
          for (int64_t c = 0; c < C; ++c) d[c] = src[c];
        } else {
          for (int64_t c = 0; c < C; ++c) d[c] = T(0);
        }
      }
    }
  }
}

// Adjoint of im2col_pixel_major: gp (rows from input row h_lo, W, R_in),
// pixel-major, += the scatter of gcols (n x K); taps outside the image are
// dropped.
template <typename T>
TUCKER_NO_MEMCPY_CALLS void col2im_pixel_major_add(const Conv2dSizes& s, const T* gcols, int64_t h_lo, int64_t oh0,
                                                   int64_t q0, int64_t n, T* gp) {
  const int64_t C = s.R_in;
  const T* src = gcols;
  for (int64_t q = q0; q < q0 + n; ++q) {
    const int64_t oh = oh0 + q / s.W_out, ow = q % s.W_out;
    for (int64_t i = 0; i < s.kh; ++i) {
      const int64_t ih = oh * s.stride_h - s.pad_h + i * s.dil_h;
      const bool row_in = ih >= 0 && ih < s.H;
      for (int64_t j = 0; j < s.kw; ++j, src += C) {
        const int64_t iw = ow * s.stride_w - s.pad_w + j * s.dil_w;
        if (!row_in || iw < 0 || iw >= s.W) continue;
        T* d = gp + ((ih - h_lo) * s.W + iw) * C;
        for (int64_t c = 0; c < C; ++c) d[c] += src[c];
      }
    }
  }
}

// Per-thread scratch, grown on demand and kept for the next call (a fresh
// allocation per call would cost more than a small layer's arithmetic).
template <typename T>
T* scratch(int slot, int64_t elems) {
  thread_local std::vector<T> bufs[15];
  std::vector<T>& b = bufs[slot];
  if (static_cast<int64_t>(b.size()) < elems) b.resize(static_cast<size_t>(elems));
  return b.data();
}

}  // namespace tucker_ops::cpu
