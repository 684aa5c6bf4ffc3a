// CPU kernel for tucker_ops::tucker_conv2d_backward (the forward:
// tucker_conv2d_cpu.cpp).
//
// Backward, per tile: recompute the projection and the core's output, or read
// them from the forward's saved intermediates when the caller kept them
// (tucker_conv2d_with_intermediates, which writes them from the forward's
// tiles: the chain's own intermediates, as a Sequential keeps them), then the
// gradients of last, bias, core and the projection: through the phase planes
// for cores the hand kernels run, through an explicit im2col for large ones:
// pixel-major where the hand kernel is the fast one (every product then in
// its A * B form, backward_rows_pixel_major), else channel-major with the
// weight gradients on the BLAS. A 3x3 stride-1 core may run by Winograd
// instead (winograd.h). The projection gradient maps to the input and first gradients
// per pixel: right after its tile for whole-image tiles (it stays in thread
// scratch); for bands, whose projection gradients overlap their neighbours' by
// the halo, in a second pass over per-chunk copies (small batches) or over
// one buffer the even and then the odd tiles scattered into. Weight gradients
// are summed per thread chunk, then over chunks in order: results depend on
// the thread count only, never on scheduling. The input gradient comes back in
// the layout the input was read in (NHWC for channels_last input).
#include <array>
#include <cstring>
#include <numeric>

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/conv_common.h"
#include "cpu/conv_tiles.h"
#include "cpu/fresh_tensors.h"
#include "cpu/gemm.h"
#include "cpu/gemm_threads.h"
#include "cpu/parallel_chunks.h"
#include "cpu/winograd.h"

namespace tucker_ops::cpu {
namespace {

using at::Tensor;

// Tile rows per band for the Winograd backward of a batch with fewer images
// than two per chunk (images as the tasks would leave threads idle): lcm(N,
// chunks) tasks, the same number per chunk; or -1 where auto finds the bands
// thinner than four tile rows (the caller then tries F(2x2), else runs the
// direct core). As in the forward (winograd_forward_tile), thin bands
// recompute much of their projection for the halo and run GEMMs over a
// handful of tiles. Backward at batch 1, two threads (`python
// benchmarks/train_breakdown.py resnet50_3x3:1 resnet50_3x3:3 vgg_128:1
// --cores`): resnet50_3x3's bands of two F(4x4) tile rows 0.70 ms against
// the direct core's 0.57 and F(2x2)'s bands of four 0.54; at batch 3, F(2x2)
// 1.08, F(4x4) 1.15, direct 1.32; vgg_128's bands of seven F(4x4) rows 1.51
// against 2.02 direct.
int64_t winograd_backward_band_rows(const Conv2dSizes& s, int64_t m, int64_t chunks) {
  const int64_t tiles_h = winograd_tiles(s.H_out, m);
  const int64_t bands = std::min(tiles_h, chunks / std::gcd(s.N, chunks));
  const int64_t rows = (tiles_h + bands - 1) / bands;
  return core_choice().automatic && rows < 4 ? -1 : rows;
}

// Which gradients a backward call computes, and where they accumulate.
template <typename T>
struct ConvGrads {
  bool input, first, core, last, bias;
  T* gp;         // (N, R_in, H, W) projection gradient; the input gradient itself without first
  // 0: gp is one buffer, which tiles of an image sharing input rows must not
  // scatter into concurrently. Otherwise every chunk scatters into its own
  // copy, gp + chunk * gp_chunk_stride, summed in pass 2 (small batches).
  int64_t gp_chunk_stride;
  // Whole-image tiles with first: no gp tensor (gp null); each image's
  // projection gradient lives in thread scratch while its tile and its input
  // and first gradients run back to back (see conv_backward).
  bool gp_per_image;
  int64_t gp_image_stride;  // R_in*H*W; 0 while gp points at one image's scratch

  T* gp_of(int64_t chunk, int64_t n) const { return gp + chunk * gp_chunk_stride + n * gp_image_stride; }
  T* acc_first;  // (chunks, R_in, C_in)
  T* acc_core;   // (chunks, R_out, K)
  T* acc_last;   // (chunks, C_out, R_out)
  T* acc_bias;   // (chunks, C_out)
  // Winograd images only: the core gradient transformed, (chunks, alpha^2,
  // R_out, R_in), and from NCHW input first's gradient transposed, (chunks,
  // C_in, R_in).
  T* acc_u = nullptr;
  T* acc_first_t = nullptr;
};

// Some output pixels' gY, channel-major: (C_out x pixels) at p, channel stride ld.
template <typename T>
struct GradOutputRows {
  const T* p;
  int64_t ld;
};

// grad_output (N, C_out, H_out, W_out) as the kernels read it: NCHW or NHWC
// memory in place, any other strides (an expanded gradient, what a sum or mean
// loss hands back, is one value) gathered per tile into thread scratch. An
// NHWC gradient (what autograd hands a channels_last output) has each tile's
// rows transposed in thread scratch: a whole-tensor NCHW copy of a fresh
// 6.4 MB tensor took 2.0 ms at resnet50_3x3's batch 32, against a 13 ms
// training step (dev measurement; benchmarks/notes.md, channels_last); the
// gather saves the same copy for the other strides. NCHW rows that last's
// gradient product reads as its B operand are staged (conv_common.h,
// stages_activation_rows) where that pays.
enum class GradOutputLayout { kNchw, kNhwc, kStrided };

template <typename T>
struct GradOutput {
  using Layout = GradOutputLayout;
  const T* gy;
  Layout layout;
  bool has_last;
  std::array<int64_t, 4> strides;  // kStrided: elements, (N, C, H, W)

  // Output rows [oh0, oh1) of image n.
  GradOutputRows<T> rows(const Conv2dSizes& s, int64_t n, int64_t oh0, int64_t oh1) const {
    const int64_t HWo = s.H_out * s.W_out, npx = (oh1 - oh0) * s.W_out;
    if (layout == Layout::kNchw) {
      const T* p = gy + n * s.C_out * HWo + oh0 * s.W_out;
      if (has_last && stages_activation_rows<T>(s.C_out, npx, s.N * s.C_out * HWo))
        return {staged_rows<T>(p, s.C_out, npx, HWo, kGradOutputSlot), npx};
      return {p, HWo};
    }
    T* buf = scratch<T>(kGradOutputSlot, s.C_out * npx);
    if (layout == Layout::kNhwc) {
      transpose<T>(npx, s.C_out, gy + (n * HWo + oh0 * s.W_out) * s.C_out, s.C_out, buf, npx);
      return {buf, npx};
    }
    const auto [sn, sc, sh, sw] = strides;
    for (int64_t c = 0; c < s.C_out; ++c) {
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const T* src = gy + n * sn + c * sc + oh * sh;
        T* dst = buf + c * npx + (oh - oh0) * s.W_out;
        if (sw == 1)
          std::memcpy(dst, src, static_cast<size_t>(s.W_out) * sizeof(T));
        else if (sw == 0)
          std::fill(dst, dst + s.W_out, *src);
        else
          for (int64_t ow = 0; ow < s.W_out; ++ow) dst[ow] = src[ow * sw];
      }
    }
    return {buf, npx};
  }
};

// bias's gradient += the sums of gY's npx pixels from gyn.
template <typename T>
void add_bias_gradient(const Conv2dSizes& s, const ConvGrads<T>& g, int64_t chunk, GradOutputRows<T> gyn,
                       int64_t npx) {
  if (!g.bias) return;
  T* acc = g.acc_bias + chunk * s.C_out;
  for (int64_t c = 0; c < s.C_out; ++c) acc[c] += sum_contiguous(gyn.p + c * gyn.ld, npx);
}

// The core output's gradient for gY's npx pixels from gyb, channel-major
// (R_out x npx): gQ = last^T (R_out x C_out) * gY (C_out x npx) into buf, or
// gY itself without last. Returns it and its row stride.
template <typename T>
std::pair<const T*, int64_t> core_output_gradient(const Conv2dSizes& s, const ConvOperands<T>& op,
                                                  GradOutputRows<T> gyb, int64_t npx, T* buf) {
  if (!op.last) return {gyb.p, gyb.ld};
  gemm_nn<T>(s.R_out, npx, s.C_out, op.last, 1, s.R_out, gyb.p, gyb.ld, buf, npx, false);
  return {buf, npx};
}

// Pass 1 for one tile by the implicit im2col (PhasePlanes): the gradients of
// last, core and the projection (bias is done by the caller). Returns false,
// having done nothing, when the tile's projection is not all finite (a
// discarded grid column times zero would then be NaN); the caller then runs
// the explicit im2col.
template <typename T>
bool backward_tile_windows(const Conv2dSizes& s, const ConvOperands<T>& op, const Projection& pr, const T* p,
                           GradOutputRows<T> gyn, const ConvGrads<T>& g, int64_t chunk, int64_t n, int64_t oh0,
                           int64_t oh1, int64_t block) {
  const int64_t HWo = s.H_out * s.W_out, K = s.R_in * s.kh * s.kw;
  const bool need_back = g.input || g.first;
  T* planes = scratch<T>(1, phase_planes_elems(s, oh1 - oh0));
  int64_t* offsets = scratch<int64_t>(0, K + s.kh + s.kw);
  const PhasePlanes t = fill_phase_planes<T>(s, p, pr.cs, pr.ps, pr.ih_lo, pr.ih_hi, oh0, oh1, planes, offsets);
  const int64_t planes_elems = phase_planes_elems(s, oh1 - oh0);
  if (!all_finite(planes, planes_elems)) return false;
  T* gplanes = need_back ? scratch<T>(6, planes_elems) : nullptr;
  if (need_back) std::fill(gplanes, gplanes + planes_elems, T(0));
  const int64_t rows_per_block = std::max<int64_t>(1, block / t.wq);
  const int64_t max_ne = rows_per_block * t.wq, max_npx = rows_per_block * s.W_out;
  const bool q_recomputed = g.last && !op.saved_q;
  T* q_ext = q_recomputed ? scratch<T>(2, s.R_out * max_ne) : nullptr;
  T* q = q_recomputed ? scratch<T>(5, s.R_out * max_npx) : nullptr;
  T* gq_buf = op.last ? scratch<T>(3, s.R_out * max_npx) : nullptr;
  T* gq_ext = scratch<T>(7, s.R_out * max_ne);
  T* gcols = need_back ? scratch<T>(4, K * max_ne) : nullptr;

  for (int64_t r0 = 0; r0 < oh1 - oh0; r0 += rows_per_block) {
    const int64_t nr = std::min(rows_per_block, oh1 - oh0 - r0);
    const int64_t ne = nr * t.wq, npx = nr * s.W_out;
    const T* window0 = planes + r0 * t.wq;
    const GradOutputRows<T> gyb{gyn.p + r0 * s.W_out, gyn.ld};  // (C_out x npx)
    if (g.last && op.saved_q) {
      const T* qs = op.saved_q + n * s.R_out * HWo + (oh0 + r0) * s.W_out;
      gemm_nt<T>(s.C_out, s.R_out, npx, gyb.p, gyb.ld, qs, HWo, g.acc_last + chunk * s.C_out * s.R_out, s.R_out, true);
    } else if (g.last) {
      gemm_nn_offsets<T>(s.R_out, ne, K, op.core, K, window0, offsets, q_ext, ne, false);
      for (int64_t r = 0; r < s.R_out; ++r)
        for (int64_t row = 0; row < nr; ++row)
          std::copy(q_ext + r * ne + row * t.wq, q_ext + r * ne + row * t.wq + s.W_out, q + r * npx + row * s.W_out);
      gemm_nt<T>(s.C_out, s.R_out, npx, gyb.p, gyb.ld, q, npx, g.acc_last + chunk * s.C_out * s.R_out, s.R_out, true);
    }
    if (!g.core && !need_back) continue;
    const auto [gq, ldgq] = core_output_gradient<T>(s, op, gyb, npx, gq_buf);  // (R_out x npx)
    // gQ on the extended grid, zero in the discarded columns.
    for (int64_t r = 0; r < s.R_out; ++r) {
      for (int64_t row = 0; row < nr; ++row) {
        T* d = gq_ext + r * ne + row * t.wq;
        std::copy(gq + r * ldgq + row * s.W_out, gq + r * ldgq + (row + 1) * s.W_out, d);
        std::fill(d + s.W_out, d + t.wq, T(0));
      }
    }
    if (g.core) gemm_nt_offsets<T>(s.R_out, K, ne, gq_ext, ne, window0, offsets, g.acc_core + chunk * s.R_out * K, K, true);
    if (!need_back) continue;
    // gcols (K x ne) = core^T gQ, each row added back onto its window.
    gemm_nn<T>(K, ne, s.R_out, op.core, 1, K, gq_ext, ne, gcols, ne, false);
    T* gwindow0 = gplanes + r0 * t.wq;
    for (int64_t k = 0; k < K; ++k) {
      T* dst = gwindow0 + offsets[k];
      const T* src = gcols + k * ne;
      for (int64_t e = 0; e < ne; ++e) dst[e] += src[e];
    }
  }
  if (need_back) {
    T* gpn = g.gp_of(chunk, n);
    add_phase_planes<T>(s, t, gplanes, pr.ih_lo, pr.ih_hi, oh0, gpn);
  }
  return true;
}

// Pass 1 for one tile: gradients of bias, last, core and the projection.
template <typename T>
void backward_tile(const Conv2dSizes& s, const ConvOperands<T>& op, const TilePlan& plan, const GradOutput<T>& gy,
                   const ConvGrads<T>& g, int64_t chunk, int64_t task, bool windows) {
  const int64_t HWo = s.H_out * s.W_out, K = s.R_in * s.kh * s.kw;
  // The projection's im2col: for the core's gradient, and to recompute the
  // core output for last's unless it was kept.
  const bool need_cols = g.core || (g.last && !op.saved_q);
  const bool need_back = g.input || g.first;
  const bool need_gq = g.core || need_back;
  const int64_t n = task / plan.tiles_per_image;
  const int64_t oh0 = (task % plan.tiles_per_image) * plan.rows;
  const int64_t oh1 = std::min(s.H_out, oh0 + plan.rows);
  const int64_t npx = (oh1 - oh0) * s.W_out;
  const GradOutputRows<T> gyn = gy.rows(s, n, oh0, oh1);

  add_bias_gradient<T>(s, g, chunk, gyn, npx);
  if (!need_cols && !need_gq && !g.last) return;

  const T* p = nullptr;
  Projection pr{};
  bool direct = false;
  if (need_cols) {
    const auto [ih_lo, ih_hi] = input_rows(s, oh0, oh1);
    pr = project_rows<T>(s, op, n, ih_lo, ih_hi, scratch<T>(0, s.R_in * (ih_hi - ih_lo) * s.W), &p);
    direct = reads_projection_directly(s, pr.ps);
  }
  // Only the input side wanted: no projection to window, the explicit path below.
  if (windows && need_cols && !direct && backward_tile_windows<T>(s, op, pr, p, gyn, g, chunk, n, oh0, oh1, plan.block))
    return;
  T* cols = need_cols && !direct ? scratch<T>(1, K * plan.block) : nullptr;
  T* q = g.last && !op.saved_q ? scratch<T>(2, s.R_out * plan.block) : nullptr;
  T* gq_buf = op.last && need_gq ? scratch<T>(3, s.R_out * plan.block) : nullptr;
  T* gcols = need_back ? scratch<T>(4, K * plan.block) : nullptr;
  T* gpn = need_back ? g.gp_of(chunk, n) : nullptr;

  const int64_t block = balanced_block(npx, plan.block);
  for (int64_t q0 = 0; q0 < npx; q0 += block) {
    const int64_t nb = std::min(block, npx - q0);
    const GradOutputRows<T> gyb{gyn.p + q0, gyn.ld};  // (C_out x nb)
    const T* col = nullptr;
    int64_t ldcol = nb;
    if (need_cols) {
      if (direct) {
        col = p + (oh0 * s.W_out + q0 - pr.ih_lo * s.W);
        ldcol = pr.cs;
      } else {
        im2col_block<T>(s, p, pr.cs, pr.ps, pr.ih_lo, pr.ih_hi, oh0, q0, nb, cols);
        col = cols;
      }
    }
    if (g.last) {
      const T* qb = q;
      int64_t ldq = nb;
      if (op.saved_q) {
        qb = op.saved_q + n * s.R_out * HWo + oh0 * s.W_out + q0;
        ldq = HWo;
      } else {
        gemm_nn<T>(s.R_out, nb, K, op.core, K, 1, col, ldcol, q, nb, false);
      }
      gemm_nt<T>(s.C_out, s.R_out, nb, gyb.p, gyb.ld, qb, ldq, g.acc_last + chunk * s.C_out * s.R_out, s.R_out, true);
    }
    if (!need_gq) continue;
    const auto [gq, ldgq] = core_output_gradient<T>(s, op, gyb, nb, gq_buf);  // (R_out x nb)
    if (g.core) gemm_nt<T>(s.R_out, K, nb, gq, ldgq, col, ldcol, g.acc_core + chunk * s.R_out * K, K, true);
    if (!need_back) continue;
    // gcols (K x nb) = core^T (K x R_out) * gQ (R_out x nb)
    gemm_nn<T>(K, nb, s.R_out, op.core, 1, K, gq, ldgq, gcols, nb, false);
    col2im_block_add<T>(s, gcols, oh0, q0, nb, gpn);
  }
}

// Pass 2, first step with per-chunk projection gradients: their sum for
// pixels [p0, p1) of image n, into dst (channel stride H*W), in chunk order.
template <typename T>
void sum_private_gp(const Conv2dSizes& s, const ConvGrads<T>& g, int64_t chunks, int64_t n, int64_t p0, int64_t p1,
                    T* dst) {
  const int64_t HW = s.H * s.W;
  for (int64_t c = 0; c < s.R_in; ++c) {
    const T* src0 = g.gp_of(0, n) + c * HW;
    T* d = dst + c * HW;
    if (d != src0) std::copy(src0 + p0, src0 + p1, d + p0);
    for (int64_t k = 1; k < chunks; ++k) {
      const T* src = src0 + k * g.gp_chunk_stride;
      for (int64_t p = p0; p < p1; ++p) d[p] += src[p];
    }
  }
}

// Pass 2 for pixels [p0, p1) of image n: input and first gradients from the
// projection gradient (summed over chunks first when each has its own).
template <typename T>
void backward_pixels(const Conv2dSizes& s, const ConvOperands<T>& op, const ConvGrads<T>& g, T* grad_input,
                     int64_t chunk, int64_t chunks, int64_t n, int64_t p0, int64_t p1) {
  const int64_t HW = s.H * s.W, np = p1 - p0;
  if (g.gp_chunk_stride) sum_private_gp<T>(s, g, chunks, n, p0, p1, g.gp_of(0, n));
  const T* gp = g.gp_of(0, n) + p0;
  if (g.input && op.nhwc) {
    // gX^T (np x C_in) = gP^T (np x R_in) * first (R_in x C_in): the input's layout
    gemm_nn<T>(np, s.C_in, s.R_in, gp, 1, HW, op.first, s.C_in, grad_input + (n * HW + p0) * s.C_in, s.C_in, false);
  } else if (g.input) {
    // gX (C_in x np) = first^T (C_in x R_in) * gP (R_in x np)
    gemm_nn<T>(s.C_in, np, s.R_in, op.first, 1, s.C_in, gp, HW, grad_input + n * s.C_in * HW + p0, HW, false);
  }
  if (g.first) {
    T* acc = g.acc_first + chunk * s.R_in * s.C_in;
    const T* xn = op.x + n * s.C_in * HW;
    if (op.nhwc) {
      gemm_nn<T>(s.R_in, s.C_in, np, gp, HW, 1, xn + p0 * s.C_in, s.C_in, acc, s.C_in, true);
    } else {
      gemm_nt<T>(s.R_in, s.C_in, np, gp, HW, xn + p0, HW, acc, s.C_in, true);
    }
  }
}

// The end of a pixel-major backward (Winograd or direct core): gp_pm, the
// projection gradient of input rows [h_lo, h_hi) of image n pixel-major
// ((rows, W, R_in)). A band adds it, halo rows included, into the chunk's
// copy (g.gp_of) for pass 2; a whole image (h_lo = 0, h_hi = H) runs its
// input and first gradients.
template <typename T>
void finish_projection_gradient(const Conv2dSizes& s, const ConvOperands<T>& op, const ConvGrads<T>& g,
                                const T* gp_pm, int64_t h_lo, int64_t h_hi, T* grad_input, int64_t chunk, int64_t n,
                                bool band) {
  const int64_t HW = s.H * s.W, px = (h_hi - h_lo) * s.W;
  // Without first from NHWC input, images too: pass 2 transposes the sum into
  // the input gradient (conv_backward).
  if (band || (!op.first && op.nhwc)) {
    // Onto the chunk's copy, channel-major (R_in, H, W): the halo rows add to
    // what the image's neighbouring band (if this chunk ran it) put there.
    T* gp = scratch<T>(8, s.R_in * px);
    transpose_columns<T>(px, gp_pm, s.R_in, gp, px, 0, s.R_in);
    T* dst = g.gp_of(chunk, n) + h_lo * s.W;
    for (int64_t c = 0; c < s.R_in; ++c)
      for (int64_t i = 0; i < px; ++i) dst[c * HW + i] += gp[c * px + i];
    return;
  }
  TORCH_INTERNAL_ASSERT(h_lo == 0 && h_hi == s.H, "a whole image's projection gradient covers every row");
  if (!op.first) {  // the projection gradient is the input gradient
    transpose_columns<T>(HW, gp_pm, s.R_in, grad_input + n * s.C_in * HW, HW, 0, s.R_in);
    return;
  }
  if (g.input && op.nhwc) {
    // gX^T (HW x C_in) = gP^T (HW x R_in) * first (R_in x C_in): the input's layout
    gemm_nn<T>(HW, s.C_in, s.R_in, gp_pm, s.R_in, 1, op.first, s.C_in, grad_input + n * HW * s.C_in, s.C_in, false);
  } else if (g.input) {
    // gX (C_in x HW) = first^T (C_in x R_in) * gP (R_in x HW)
    T* gp = scratch<T>(8, s.R_in * HW);
    transpose_columns<T>(HW, gp_pm, s.R_in, gp, HW, 0, s.R_in);
    gemm_nn<T>(s.C_in, HW, s.R_in, op.first, 1, s.C_in, gp, HW, grad_input + n * s.C_in * HW, HW, false);
  }
  if (g.first) {
    if (op.nhwc) {
      // first's gradient (R_in x C_in) += gP (R_in x HW) * X (HW x C_in)
      gemm_nn<T>(s.R_in, s.C_in, HW, gp_pm, 1, s.R_in, op.x + n * HW * s.C_in, s.C_in,
                 g.acc_first + chunk * s.R_in * s.C_in, s.C_in, true);
    } else {
      // its transpose (C_in x R_in) += X (C_in x HW) * gP^T (HW x R_in)
      const T* xn = op.x + n * s.C_in * HW;
      if (stages_activation_rows<T>(s.C_in, HW, s.N * s.C_in * HW))
        xn = staged_rows<T>(xn, s.C_in, HW, HW, kStagedInputSlot);
      gemm_nn<T>(s.C_in, s.R_in, HW, xn, HW, 1, gp_pm, s.R_in, g.acc_first_t + chunk * s.C_in * s.R_in, s.R_in,
                 true);
    }
  }
}

// Output rows [oh0, oh1) of image n by Winograd (the backward of
// forward_tile_winograd; oh0 a multiple of the tile size): bias, last, core
// (into acc_u, transformed) and projection gradients. A whole image (image
// tasks) then runs its input and first gradients too; a band (band tasks,
// small batches) adds its projection gradient, halo rows included, into the
// chunk's own copy (g.gp_of) for pass 2. Returns false, having done nothing,
// when the projection or the core output's gradient is not all finite (the
// caller then runs the direct path). The weight gradients over pixels run as
// A * B on the hand kernel (activations pixel-major), not as A * B^T on the
// BLAS: 0.75-0.8x the time at these sizes (benchmarks/gemm_crossover.py,
// 256 x 64 x 196).
template <typename T>
bool backward_rows_winograd(const Conv2dSizes& s, const ConvOperands<T>& op, const WinogradOperands<T>& w,
                            const GradOutput<T>& gy, const ConvGrads<T>& g, T* grad_input, int64_t chunk,
                            int64_t n, int64_t oh0, int64_t oh1, bool band) {
  const int64_t HWo = s.H_out * s.W_out, npx = (oh1 - oh0) * s.W_out;
  const auto [ih_lo, ih_hi] = input_rows(s, oh0, oh1);
  const int64_t px = (ih_hi - ih_lo) * s.W;
  const PixelRows in{ih_lo, ih_hi, s.W, s.R_in}, out{oh0, oh1, s.W_out, s.R_out};
  const bool need_back = g.input || g.first;
  const bool need_gq = g.core || need_back;
  const bool recompute_q = g.last && !op.saved_q;
  const T* p = nullptr;
  if (g.core || recompute_q) {
    p = project_pixel_major<T>(s, op, n, ih_lo, ih_hi).pm;
    if (!all_finite(p, px * s.R_in)) return false;
  }
  // The core output's gradient, pixel-major (npx, R_out): computed
  // channel-major and transposed (as the projection, see project_pixel_major).
  const GradOutputRows<T> gyn = gy.rows(s, n, oh0, oh1);  // (C_out x npx)
  T* gq = nullptr;
  if (need_gq) {
    gq = scratch<T>(11, npx * s.R_out);
    const auto [gq_cm, ld] =
        core_output_gradient<T>(s, op, gyn, npx, op.last ? scratch<T>(3, s.R_out * npx) : nullptr);
    transpose_columns<T>(s.R_out, gq_cm, ld, gq, s.R_out, 0, npx);
    if (!all_finite(gq, npx * s.R_out)) return false;
  }
  add_bias_gradient<T>(s, g, chunk, gyn, npx);
  if (g.last) {
    // last's gradient (C_out x R_out) += gY (C_out x npx) * Q^T (npx x R_out)
    T* acc = g.acc_last + chunk * s.C_out * s.R_out;
    T* z = scratch<T>(2, npx * s.R_out);
    if (op.saved_q)
      transpose_columns<T>(s.R_out, op.saved_q + n * s.R_out * HWo + oh0 * s.W_out, HWo, z, s.R_out, 0, npx);
    else
      winograd_core_forward<T>(s, w, p, in, oh0, oh1, z);
    gemm_nn<T>(s.C_out, s.R_out, npx, gyn.p, gyn.ld, 1, z, s.R_out, acc, s.R_out, true);
  }
  if (!need_gq) return true;
  T* gp_pm = need_back ? scratch<T>(6, px * s.R_in) : nullptr;
  if (need_back) std::fill(gp_pm, gp_pm + px * s.R_in, T(0));
  const auto [v, m] = winograd_band_buffers<T>(s, w);
  const auto [zeros, sink] = winograd_edges<T>(std::max(s.R_in, s.R_out));
  const int64_t ty_end = (oh1 + w.m - 1) / w.m;
  for (int64_t ty0 = oh0 / w.m; ty0 < ty_end; ty0 += w.band) {
    const int64_t ty1 = std::min(ty_end, ty0 + w.band), tiles = (ty1 - ty0) * w.tiles_w;
    const int64_t xs_in = tiles * s.R_in, xs_out = tiles * s.R_out;
    winograd_output_transform_adjoint<T>(w.kind(), gq, out, s.R_out, ty0, ty1, w.tiles_w, zeros, m, xs_out);
    if (g.core) {
      winograd_input_transform<T>(w.kind(), p, in, s.R_in, s.pad_h, s.pad_w, ty0, ty1, w.tiles_w, zeros, v, xs_in);
      // dU[xi] (R_out x R_in) += M[xi]^T (R_out x tiles) * V[xi] (tiles x R_in)
      T* acc = g.acc_u + chunk * w.elems * s.R_out * s.R_in;
      for (int64_t xi = 0; xi < w.elems; ++xi)
        gemm_nn<T>(s.R_out, s.R_in, tiles, m + xi * xs_out, 1, s.R_out, v + xi * xs_in, s.R_in,
                   acc + xi * s.R_out * s.R_in, s.R_in, true);
    }
    if (!need_back) continue;
    // gV[xi] (tiles x R_in) = M[xi] (tiles x R_out) * U[xi] (R_out x R_in), into v's buffer.
    for (int64_t xi = 0; xi < w.elems; ++xi)
      gemm_nn<T>(tiles, s.R_in, s.R_out, m + xi * xs_out, s.R_out, 1, w.u + xi * s.R_out * s.R_in, s.R_in,
                 v + xi * xs_in, s.R_in, false);
    winograd_input_transform_adjoint<T>(w.kind(), v, xs_in, in, s.R_in, s.pad_h, s.pad_w, ty0, ty1, w.tiles_w, sink,
                                        gp_pm);
  }
  if (need_back) finish_projection_gradient<T>(s, op, g, gp_pm, ih_lo, ih_hi, grad_input, chunk, n, band);
  return true;
}

// ---- Direct core, pixel-major backward ----------------------------------------

// The core with its taps reordered to the pixel-major im2col's columns
// (conv_tiles.h, im2col_pixel_major): core_t (R_out x K), column
// (i*kw + j)*R_in + c; its transpose core_tt (K x R_out) where the backward
// recomputes the core output (null where it is kept); and the core gradient's
// per-chunk accumulators in that order, (chunks, R_out, K) (null without it).
template <typename T>
struct PixelMajorCore {
  const T* core_t;
  const T* core_tt;
  T* acc_core_t;
};

// (R_out, R_in, kh, kw) -> (R_out, kh, kw, R_in), contiguous.
Tensor tap_major_core(const Conv2dSizes& s, const Tensor& core) {
  return core.view({s.R_out, s.R_in, s.kh * s.kw}).transpose(1, 2).contiguous();
}

// Whether the backward runs a direct core through the pixel-major im2col
// (backward_rows_pixel_major) rather than the channel-major one: where the
// products over pixels are large enough that the channel-major form hands
// them to the BLAS as A * B^T (pixels the inner dimension; MKL packs both
// operands per call) while the hand kernel runs them as A * B faster
// (gemm_nn_kernel_preferred). A pointwise core on a channel-major projection
// keeps reading the projection in place.
template <typename T>
bool backward_uses_pixel_major_core(const Conv2dSizes& s, int64_t block) {
  const bool pointwise = s.kh == 1 && s.kw == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 && s.pad_w == 0;
  return gemm_nn_kernel_preferred<T>() && !pointwise && gemm_uses_blas<T>(s.R_out, block, s.R_in * s.kh * s.kw);
}

// Output rows [oh0, oh1) of image n with the direct core, every product in
// the hand kernel's A * B form: the projection pixel-major
// (project_pixel_major), its im2col pixel-major and tap-major
// (im2col_pixel_major), per block of output pixels: last's gradient against
// the core output pixel-major (transposed from the kept one or recomputed),
// the core's gradient (tap-major, pc.acc_core_t) against the im2col, and the
// im2col's gradient scattered onto the projection gradient, pixel-major. Then
// as backward_rows_winograd: a band adds that into the chunk's copy, a whole
// image (oh0 = 0, oh1 = H_out) runs its input and first gradients.
template <typename T>
void backward_rows_pixel_major(const Conv2dSizes& s, const ConvOperands<T>& op, const PixelMajorCore<T>& pc,
                               const GradOutput<T>& gy, const ConvGrads<T>& g, T* grad_input, int64_t block,
                               int64_t chunk, int64_t n, int64_t oh0, int64_t oh1, bool band) {
  const int64_t HWo = s.H_out * s.W_out, npx = (oh1 - oh0) * s.W_out, K = s.R_in * s.kh * s.kw;
  const bool need_back = g.input || g.first;
  const bool need_gq = g.core || need_back;
  const bool recompute_q = g.last && !op.saved_q;
  const GradOutputRows<T> gyn = gy.rows(s, n, oh0, oh1);  // (C_out x npx)
  add_bias_gradient<T>(s, g, chunk, gyn, npx);
  const auto [ih_lo, ih_hi] = input_rows(s, oh0, oh1);
  const T* p = g.core || recompute_q ? project_pixel_major<T>(s, op, n, ih_lo, ih_hi).pm : nullptr;
  // The projection gradient: the rows read, or the whole image (rows no
  // output reads get zeros).
  const int64_t gp_lo = band ? ih_lo : 0, gp_hi = band ? ih_hi : s.H;
  T* gp_pm = need_back ? scratch<T>(6, (gp_hi - gp_lo) * s.W * s.R_in) : nullptr;
  if (need_back) std::fill(gp_pm, gp_pm + (gp_hi - gp_lo) * s.W * s.R_in, T(0));
  const int64_t nb_max = balanced_block(npx, block);
  T* cols = scratch<T>(4, nb_max * K);  // the im2col, then its gradient
  T* z = g.last ? scratch<T>(2, nb_max * s.R_out) : nullptr;
  T* gq_buf = op.last && need_gq ? scratch<T>(3, s.R_out * nb_max) : nullptr;
  for (int64_t q0 = 0; q0 < npx; q0 += nb_max) {
    const int64_t nb = std::min(nb_max, npx - q0);
    const GradOutputRows<T> gyb{gyn.p + q0, gyn.ld};  // (C_out x nb)
    if (p) im2col_pixel_major<T>(s, p, ih_lo, ih_hi, oh0, q0, nb, cols);
    if (g.last) {
      // last's gradient (C_out x R_out) += gY (C_out x nb) * Q^T (nb x R_out)
      if (op.saved_q)
        transpose<T>(s.R_out, nb, op.saved_q + n * s.R_out * HWo + oh0 * s.W_out + q0, HWo, z, s.R_out);
      else
        gemm_nn<T>(nb, s.R_out, K, cols, K, 1, pc.core_tt, s.R_out, z, s.R_out, false);
      gemm_nn<T>(s.C_out, s.R_out, nb, gyb.p, gyb.ld, 1, z, s.R_out, g.acc_last + chunk * s.C_out * s.R_out,
                 s.R_out, true);
    }
    if (!need_gq) continue;
    const auto [gq, ldgq] = core_output_gradient<T>(s, op, gyb, nb, gq_buf);  // (R_out x nb)
    // the core's gradient, tap-major (R_out x K) += gQ (R_out x nb) * cols (nb x K)
    if (g.core) gemm_nn<T>(s.R_out, K, nb, gq, ldgq, 1, cols, K, pc.acc_core_t + chunk * s.R_out * K, K, true);
    if (!need_back) continue;
    // the im2col's gradient (nb x K) = gQ^T (nb x R_out) * core_t (R_out x K), over the im2col
    gemm_nn<T>(nb, K, s.R_out, gq, 1, ldgq, pc.core_t, K, cols, K, false);
    col2im_pixel_major_add<T>(s, cols, gp_lo, oh0, q0, nb, gp_pm);
  }
  if (need_back) finish_projection_gradient<T>(s, op, g, gp_pm, gp_lo, gp_hi, grad_input, chunk, n, band);
}

template <typename T>
void conv_backward(const Conv2dSizes& s, const ConvOperands<T>& op, const GradOutput<T>& gy, const ConvGrads<T>& g,
                   T* grad_input, int64_t chunks, const WinogradOperands<T>* wino, int64_t wino_band_rows,
                   const PixelMajorCore<T>* pixel_major) {
  const bool need_back = g.input || g.first;
  const bool shared_gp = need_back && g.gp_chunk_stride == 0;
  const TilePlan plan = plan_tiles(s, at::get_num_threads(), sizeof(T), shared_gp);
  // Tiles of an image that share input rows must not scatter concurrently
  // into one projection gradient: two passes (even tiles, odd tiles) when
  // there is more than one per image.
  const int64_t passes = shared_gp && plan.tiles_per_image > 1 ? 2 : 1;
  // The implicit im2col's weight gradient runs on the hand kernels; where the
  // BLAS would take the core's weight gradient (large ranks) the explicit
  // im2col and the BLAS measured faster. It also multiplies discarded grid
  // columns by the core and by zeros: with an Inf or NaN in the core those
  // would reach real gradients.
  const int64_t K = s.R_in * s.kh * s.kw;
  const bool windows = !gemm_uses_blas<T>(s.R_out, plan.block, K) && all_finite(op.core, s.R_out * K);
  // Image n by one thread: Winograd, or its tiles one after the other; with
  // gp_per_image its projection gradient in thread scratch, then its input and
  // first gradients while that is still in cache.
  auto run_image = [&](int64_t c, int64_t n) {
    if (wino && backward_rows_winograd<T>(s, op, *wino, gy, g, grad_input, c, n, 0, s.H_out, false)) return;
    if (pixel_major) {
      backward_rows_pixel_major<T>(s, op, *pixel_major, gy, g, grad_input, plan.block, c, n, 0, s.H_out, false);
      return;
    }
    ConvGrads<T> gi = g;
    if (g.gp_per_image) {
      gi.gp = scratch<T>(8, s.R_in * s.H * s.W);
      gi.gp_image_stride = 0;
      std::fill(gi.gp, gi.gp + s.R_in * s.H * s.W, T(0));
    }
    for (int64_t tile = 0; tile < plan.tiles_per_image; ++tile)
      backward_tile<T>(s, op, plan, gy, gi, c, n * plan.tiles_per_image + tile, windows);
    if (g.gp_per_image) backward_pixels<T>(s, op, gi, grad_input, c, chunks, n, 0, s.H * s.W);
  };
  // Winograd in bands of wino_band_rows tile rows (small batches): band b of
  // image n is task n * bands + b; one that is not all finite runs as a
  // direct tile of the same rows.
  const int64_t band_rows = wino_band_rows * (wino ? wino->m : 0);
  const int64_t bands = band_rows ? (s.H_out + band_rows - 1) / band_rows : 0;
  const TilePlan band_plan{band_rows, bands, plan.block};
  auto run_band = [&](int64_t c, int64_t task) {
    const int64_t n = task / bands, oh0 = (task % bands) * band_rows;
    if (!backward_rows_winograd<T>(s, op, *wino, gy, g, grad_input, c, n, oh0, std::min(s.H_out, oh0 + band_rows),
                                   true))
      backward_tile<T>(s, op, band_plan, gy, g, c, task, windows);
  };
  if (wino || g.gp_per_image) {
    for_each_chunk_raw(chunks, [&](int64_t c) {
      if (bands) {
        const auto [begin, end] = chunk_range(c, chunks, s.N * bands);
        for (int64_t t = begin; t < end; ++t) run_band(c, t);
      } else {
        const auto [begin, end] = chunk_range(c, chunks, s.N);
        for (int64_t n = begin; n < end; ++n) run_image(c, n);
      }
      if (wino && g.core) {
        // The chunk's transformed core gradient back to taps:
        // acc_core (pairs x r^2) += dU^T (pairs x alpha^2) * kron(G, G) (alpha^2 x r^2).
        const int64_t pairs = s.R_out * s.R_in, taps = s.kh * s.kw;
        gemm_nn<T>(pairs, taps, wino->elems, g.acc_u + c * wino->elems * pairs, 1, pairs, wino->kron, taps,
                   g.acc_core + c * pairs * taps, taps, true);
      }
    });
  } else {
    const int64_t tiles_per_pass = (plan.tiles_per_image + passes - 1) / passes;
    for (int64_t pass = 0; pass < passes; ++pass) {
      // Task t of this pass is tile (t % tiles_per_pass) * passes + pass of image t / tiles_per_pass.
      const int64_t tasks = s.N * tiles_per_pass;
      for_each_chunk_raw(chunks, [&](int64_t c) {
        const auto [begin, end] = chunk_range(c, chunks, tasks);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t tile = (t % tiles_per_pass) * passes + pass, n = t / tiles_per_pass;
          if (tile >= plan.tiles_per_image) continue;
          if (pixel_major) {
            const int64_t oh0 = tile * plan.rows;
            backward_rows_pixel_major<T>(s, op, *pixel_major, gy, g, grad_input, plan.block, c, n, oh0,
                                         std::min(s.H_out, oh0 + plan.rows), true);
          } else {
            backward_tile<T>(s, op, plan, gy, g, c, n * plan.tiles_per_image + tile, windows);
          }
        }
      });
    }
  }
  // Without first, NCHW input: the tiles scattered into the input gradient
  // itself, or a whole Winograd image wrote it. NHWC input: every path added
  // into the channel-major gp, which pass 2 transposes into the input's layout.
  const bool transposes_gp = !op.first && op.nhwc;
  if (!need_back || g.gp_per_image) return;
  if (!transposes_gp && ((!op.first && shared_gp) || (wino && !bands))) return;
  // Pass 2 over (image, pixel range) pieces of about 4096 pixels, at least
  // one per chunk (a single image must not leave threads idle), at most two
  // per chunk.
  const int64_t HW = s.H * s.W;
  const int64_t pieces_per_image = std::clamp<int64_t>(
      std::max((HW + 4095) / 4096, (chunks + s.N - 1) / s.N), 1, std::max<int64_t>(1, std::min(2 * chunks, HW / 32)));
  const int64_t piece = (HW + pieces_per_image - 1) / pieces_per_image;
  const int64_t tasks = s.N * pieces_per_image;
  for_each_chunk_raw(chunks, [&](int64_t c) {
    const auto [begin, end] = chunk_range(c, chunks, tasks);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / pieces_per_image, p0 = (t % pieces_per_image) * piece;
      if (p0 >= HW) continue;
      const int64_t p1 = std::min(HW, p0 + piece);
      if (op.first) {
        backward_pixels<T>(s, op, g, grad_input, c, chunks, n, p0, p1);
      } else if (op.nhwc) {  // it is the input gradient, transposed into the input's layout
        if (g.gp_chunk_stride) sum_private_gp<T>(s, g, chunks, n, p0, p1, g.gp_of(0, n));
        transpose_columns<T>(s.R_in, g.gp_of(0, n), HW, grad_input + n * HW * s.C_in, s.C_in, p0, p1);
      } else {
        sum_private_gp<T>(s, g, chunks, n, p0, p1, grad_input + n * s.C_in * HW);  // it is the input gradient
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> tucker_conv2d_backward_cpu(
    const Tensor& grad_output,
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    std::array<bool, 5> output_mask,
    const std::optional<Tensor>& projection,
    const std::optional<Tensor>& core_output) {
  const Conv2dSizes s = check_tucker_conv2d_backward_args(
      grad_output, input, first, core, last, stride, padding, dilation, kCpuDtypes, projection, core_output);
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const auto opts = input.options();
  const GradRequest need = grad_request(output_mask, s.has_first, s.has_last);
  const bool need_back = need.input || need.first;
  const int64_t K = s.R_in * s.kh * s.kw;

  // One accumulator slice per chunk of work (at most one chunk per thread);
  // the backward does about twice the forward's multiply-adds.
  const int64_t chunks = std::max<int64_t>(1, chunks_for_work(s.N * s.H_out, 2 * chain_macs(s)));
  // The input gradient in the input's layout (conv_memory_format), as
  // nn.Conv2d returns it.
  const bool nhwc_input = reads_nhwc(input);
  Tensor grad_input =
      need.input ? empty_fresh({s.N, s.C_in, s.H, s.W}, opts.memory_format(conv_memory_format(input))) : Tensor();
  Tensor acc_first = need.first ? at::zeros({chunks, s.R_in, s.C_in}, opts) : Tensor();
  Tensor acc_core = need.core ? at::zeros({chunks, s.R_out, K}, opts) : Tensor();
  Tensor acc_last = need.last ? at::zeros({chunks, s.C_out, s.R_out}, opts) : Tensor();
  Tensor acc_bias = need.bias ? at::zeros({chunks, s.C_out}, opts) : Tensor();
  // Projection gradient; without first it is the input gradient itself. For
  // fewer images than two per thread, tiles split images into bands whose
  // halos overlap: each chunk then gets its own copy (at most 2 * threads
  // images each), summed per pixel in pass 2, rather than the tiles
  // scattering in two passes with a barrier between (threads idle at batch 1).
  const bool private_gp = need_back && chunks > 1 && s.N < 2 * at::get_num_threads();
  // Images as the tasks (whole-image tiles, or Winograd): pass 2 runs per
  // image right after it, on a projection gradient in thread scratch.
  int64_t tile = winograd_tile(s, /*backward=*/true);
  // Winograd with fewer images than two per chunk runs in bands of images
  // (winograd_backward_band_rows), the images' projection gradients in the
  // chunks' copies as for the direct tiles. Where auto finds F(4x4)'s bands
  // too thin, F(2x2)'s (twice the tile rows) may do.
  int64_t wino_band_rows = 0;
  if (tile && chunks > 1 && s.N < 2 * at::get_num_threads()) {
    wino_band_rows = winograd_backward_band_rows(s, tile, chunks);
    if (wino_band_rows < 0 && tile == 4) {
      tile = 2;
      wino_band_rows = winograd_backward_band_rows(s, tile, chunks);
    }
    if (wino_band_rows < 0) tile = 0;
  }
  const bool gp_per_image = need_back && s.has_first && !private_gp &&
      (tile || plan_tiles(s, at::get_num_threads(), input.element_size(), true).tiles_per_image == 1);
  Tensor gp;
  if (private_gp) {
    gp = zeros_fresh({chunks, s.N, s.R_in, s.H, s.W}, opts);
  } else if (need_back && s.has_first) {
    if (!gp_per_image) gp = zeros_fresh({s.N, s.R_in, s.H, s.W}, opts);
  } else if (need_back && nhwc_input) {  // pass 2 transposes it into the input gradient
    gp = zeros_fresh({s.N, s.R_in, s.H, s.W}, opts);
  } else if (need_back) {
    grad_input.zero_();
    gp = grad_input;
  }

  if (s.N > 0) {
    const auto [x, nhwc] = input_layout(input);
    // NCHW or NHWC in place; other strides gathered per tile (GradOutput).
    const Tensor& gy = grad_output;
    const GradOutputLayout gy_layout = reads_nhwc(gy)       ? GradOutputLayout::kNhwc
                                       : gy.is_contiguous() ? GradOutputLayout::kNchw
                                                            : GradOutputLayout::kStrided;
    const std::array<int64_t, 4> gy_strides{gy.stride(0), gy.stride(1), gy.stride(2), gy.stride(3)};
    const Tensor A = s.has_first ? first->contiguous() : Tensor();
    const Tensor G = core.contiguous();
    const Tensor B = s.has_last ? last->contiguous() : Tensor();
    const auto [P, p_nhwc] = present(projection) ? input_layout(*projection) : std::pair<Tensor, bool>{};
    const Tensor Q = present(core_output) ? core_output->contiguous() : Tensor();
    const Tensor At = transposed_for_nhwc(A, nhwc);
    Tensor acc_first_t, acc_core_t;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tucker_conv2d_backward_cpu", [&] {
      using T = scalar_t;
      WinogradTensors wt;
      std::optional<WinogradOperands<T>> wino;
      Tensor acc_u;
      if (tile && all_finite(G.const_data_ptr<T>(), G.numel())) {
        // Ut only where the core output is recomputed (backward_rows_winograd).
        wt = winograd_tensors(s, tile, G, /*want_u=*/true, /*want_ut=*/need.last && !Q.defined());
        wino = winograd_operands<T>(s, tile, wt);
        if (need.core) acc_u = at::zeros({chunks, WinogradKind{tile, s.kh}.elems(), s.R_out, s.R_in}, opts);
        if (need.first && !nhwc && !wino_band_rows) acc_first_t = at::zeros({chunks, s.C_in, s.R_in}, opts);
      }
      // Or the direct core pixel-major (whole images or tiles as the direct
      // path plans them).
      std::optional<PixelMajorCore<T>> pixel_major;
      Tensor core_t, core_tt;
      if (!tile && backward_uses_pixel_major_core<T>(s, plan_tiles(s, at::get_num_threads(), sizeof(T), false).block)) {
        core_t = tap_major_core(s, G);
        if (need.last && !Q.defined()) core_tt = core_t.view({s.R_out, K}).t().contiguous();
        if (need.core) acc_core_t = at::zeros({chunks, s.R_out, K}, opts);
        if (need.first && !nhwc && gp_per_image) acc_first_t = at::zeros({chunks, s.C_in, s.R_in}, opts);
        pixel_major = PixelMajorCore<T>{core_t.const_data_ptr<T>(),
                                        core_tt.defined() ? core_tt.const_data_ptr<T>() : nullptr,
                                        acc_core_t.defined() ? acc_core_t.mutable_data_ptr<T>() : nullptr};
      }
      const ConvOperands<T> op{
          x.const_data_ptr<T>(), nhwc, s.has_first ? A.const_data_ptr<T>() : nullptr, G.const_data_ptr<T>(),
          s.has_last ? B.const_data_ptr<T>() : nullptr, P.defined() ? P.const_data_ptr<T>() : nullptr, p_nhwc,
          Q.defined() ? Q.const_data_ptr<T>() : nullptr, At.defined() ? At.const_data_ptr<T>() : nullptr};
      const ConvGrads<T> g{
          need.input, need.first, need.core, need.last, need.bias,
          need_back && !gp_per_image ? gp.mutable_data_ptr<T>() : nullptr,
          private_gp ? s.N * s.R_in * s.H * s.W : 0,
          gp_per_image,
          s.R_in * s.H * s.W,
          need.first ? acc_first.mutable_data_ptr<T>() : nullptr,
          need.core ? acc_core.mutable_data_ptr<T>() : nullptr,
          need.last ? acc_last.mutable_data_ptr<T>() : nullptr,
          need.bias ? acc_bias.mutable_data_ptr<T>() : nullptr,
          acc_u.defined() ? acc_u.mutable_data_ptr<T>() : nullptr,
          acc_first_t.defined() ? acc_first_t.mutable_data_ptr<T>() : nullptr};
      conv_backward<T>(s, op, GradOutput<T>{gy.const_data_ptr<T>(), gy_layout, s.has_last, gy_strides}, g,
                       need.input ? grad_input.mutable_data_ptr<T>() : nullptr, chunks, wino ? &*wino : nullptr,
                       wino ? wino_band_rows : 0, pixel_major ? &*pixel_major : nullptr);
    });
    if (acc_first_t.defined()) acc_first.add_(acc_first_t.transpose(1, 2));
    if (acc_core_t.defined())
      acc_core.view({chunks, s.R_out, s.R_in, s.kh * s.kw})
          .add_(acc_core_t.view({chunks, s.R_out, s.kh * s.kw, s.R_in}).transpose(2, 3));
  }

  return backward_result(
      opts,
      need.input ? grad_input : Tensor(),
      need.first ? sum_chunks(acc_first) : Tensor(),
      need.core ? sum_chunks(acc_core).view({s.R_out, s.R_in, s.kh, s.kw}) : Tensor(),
      need.last ? sum_chunks(acc_last) : Tensor(),
      need.bias ? sum_chunks(acc_bias) : Tensor());
}

}  // namespace

}  // namespace tucker_ops::cpu

TORCH_LIBRARY_IMPL(tucker_ops, CPU, m) {
  m.impl("tucker_conv2d_backward", &tucker_ops::cpu::tucker_conv2d_backward_cpu);
}
