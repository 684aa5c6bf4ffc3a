// CPU kernels for tucker_ops::tucker_conv2d (and its ReLU + pool epilogue and
// kept-intermediates variants): one fused pass per output tile (conv_tiles.h;
// the backward is tucker_conv2d_backward_cpu.cpp).
//
// Forward, per tile: project the tile's input rows (with halo) to R_in
// channels in thread-local scratch and copy them, zero-padded, into phase
// planes (conv_tiles.h, PhasePlanes); then per block of output rows, run the
// core into R_out with a GEMM that reads every tap's window of the planes in
// place (an implicit im2col, gemm_nn_offsets) and expand to C_out straight into
// the output, on top of the bias. A pointwise core on a channel-major
// projection reads the projection itself; a 3x3 stride-1 core may run by
// Winograd instead (winograd.h). Tiles run in parallel (at::parallel_for over
// batch x tiles).
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

// Copies the rows [ih_lo, own_hi) a forward tile owns from its projection
// into image n of the saved projection: the tile owns its input rows up to
// the next tile's first, so every row is written once. Rows no output reads
// are zeros (whatever the tiling, so the result does not depend on the
// thread count); the backward never reads them.
template <typename T>
void save_projection_rows(const Conv2dSizes& s, bool nhwc, const T* p, const Projection& pr, int64_t n,
                          int64_t own_hi, T* saved) {
  const int64_t HW = s.H * s.W;
  for (int64_t ih = pr.ih_lo; ih < own_hi; ++ih) {
    const bool keep = ih < pr.ih_hi && input_row_is_read(s, ih);
    const int64_t row = ih - pr.ih_lo;
    if (nhwc) {  // the scratch is pixel-major too: one block per row
      T* dst = saved + (n * HW + ih * s.W) * s.R_in;
      if (keep) {
        std::copy(p + row * s.W * s.R_in, p + (row + 1) * s.W * s.R_in, dst);
      } else {
        std::fill(dst, dst + s.W * s.R_in, T(0));
      }
      continue;
    }
    for (int64_t c = 0; c < s.R_in; ++c) {
      T* dst = saved + (n * s.R_in + c) * HW + ih * s.W;
      if (keep) {
        std::copy(p + c * pr.cs + row * s.W, p + c * pr.cs + (row + 1) * s.W, dst);
      } else {
        std::fill(dst, dst + s.W, T(0));
      }
    }
  }
}

// Where a tile's conv output goes, from its first pixel: channel-major rows
// (NCHW output, or the relu_pool tile buffer) with channel stride ld, or,
// where the output is NHWC (channels_last input), pixels of C_out channels.
template <typename T>
struct TileOutput {
  T* y;
  int64_t ld;  // NCHW: channel stride; NHWC: C_out, the pixel stride
  bool nhwc;
  T* pixel(int64_t px) const { return y + (nhwc ? px * ld : px); }
};

// Output pixels [px0, px0 + npx) of the tile = [bias +] last * Q, or, NHWC
// output only, Q [+ bias] without last (C_out == R_out; NCHW output without
// last takes the core output straight, in each path). Q (R_out x npx):
// element (r, i) at q[r * q_cs + i * q_ps]; NCHW output needs it
// channel-major (q_ps == 1). NHWC pixels run as Q^T * last^T (npx x C_out),
// the A * B the hand kernel wants, with any Q strides.
template <typename T>
void expand_into_output(const Conv2dSizes& s, const ConvOperands<T>& op, const T* q, int64_t q_cs, int64_t q_ps,
                        int64_t npx, const T* bias, const TileOutput<T>& out, int64_t px0) {
  T* y = out.pixel(px0);
  if (!out.nhwc) {
    TORCH_INTERNAL_ASSERT(q_ps == 1 && op.last);
    if (bias)
      for (int64_t c = 0; c < s.C_out; ++c) std::fill(y + c * out.ld, y + c * out.ld + npx, bias[c]);
    gemm_nn<T>(s.C_out, npx, s.R_out, op.last, s.R_out, 1, q, q_cs, y, out.ld, bias != nullptr);
    return;
  }
  if (!op.last) {
    if (q_cs == 1 && q_ps == s.R_out) {
      std::copy(q, q + npx * s.R_out, y);
    } else {
      TORCH_INTERNAL_ASSERT(q_ps == 1);
      transpose<T>(s.R_out, npx, q, q_cs, y, out.ld);
    }
    if (bias)
      for (int64_t i = 0; i < npx; ++i)
        for (int64_t c = 0; c < s.C_out; ++c) y[i * out.ld + c] += bias[c];
    return;
  }
  if (bias)
    for (int64_t i = 0; i < npx; ++i) std::copy(bias, bias + s.C_out, y + i * out.ld);
  gemm_nn<T>(npx, s.C_out, s.R_out, q, q_ps, q_cs, op.last_t, s.C_out, y, out.ld, bias != nullptr);
}

// One tile's output rows [oh0, oh1) by the implicit im2col (conv_tiles.h,
// PhasePlanes): core over blocks of whole extended rows, then the valid columns
// are expanded by last (or copied) into the output, on top of the bias.
// qn: where the core output of the tile's first row is kept ((R_out, rows,
// W_out), channel stride H_out * W_out), or null.
template <typename T>
void forward_tile_windows(const Conv2dSizes& s, const ConvOperands<T>& op, const Projection& pr, const T* p,
                          int64_t oh0, int64_t oh1, int64_t block, const T* bias, const TileOutput<T>& out, T* qn) {
  const int64_t HWo = s.H_out * s.W_out, K = s.R_in * s.kh * s.kw;
  T* planes = scratch<T>(1, phase_planes_elems(s, oh1 - oh0));
  int64_t* offsets = scratch<int64_t>(0, K + s.kh + s.kw);
  const PhasePlanes t = fill_phase_planes<T>(s, p, pr.cs, pr.ps, pr.ih_lo, pr.ih_hi, oh0, oh1, planes, offsets);
  const int64_t rows_per_block = std::max<int64_t>(1, block / t.wq);
  T* q_ext = scratch<T>(3, s.R_out * rows_per_block * t.wq);
  // Without last, NCHW output takes the core output straight from q_ext.
  const bool direct_out = !op.last && !out.nhwc;
  T* q = !direct_out && !qn ? scratch<T>(2, s.R_out * rows_per_block * s.W_out) : nullptr;
  for (int64_t r0 = 0; r0 < oh1 - oh0; r0 += rows_per_block) {
    const int64_t nr = std::min(rows_per_block, oh1 - oh0 - r0);
    const int64_t ne = nr * t.wq, npx = nr * s.W_out;
    gemm_nn_offsets<T>(s.R_out, ne, K, op.core, K, planes + r0 * t.wq, offsets, q_ext, ne, false);
    // The valid W_out columns of each extended row: into q or the kept core
    // output (then expanded), or straight into the output.
    T* dst = direct_out ? out.pixel(r0 * s.W_out) : qn ? qn + r0 * s.W_out : q;
    const int64_t ld = direct_out ? out.ld : qn ? HWo : npx;
    const bool add_bias = direct_out && bias;
    for (int64_t r = 0; r < s.R_out; ++r) {
      for (int64_t row = 0; row < nr; ++row) {
        const T* src = q_ext + r * ne + row * t.wq;
        T* d = dst + r * ld + row * s.W_out;
        if (add_bias) {
          for (int64_t ow = 0; ow < s.W_out; ++ow) d[ow] = bias[r] + src[ow];
        } else {
          std::copy(src, src + s.W_out, d);
        }
      }
    }
    if (!direct_out) expand_into_output<T>(s, op, dst, ld, 1, npx, bias, out, r0 * s.W_out);
  }
}

// Output rows [oh0, oh1) of image n with the core by Winograd (a forward
// tile; oh0 a multiple of the tile size) into out, on top of the bias, and
// the intermediates when kept (the projection's rows up to own_hi, as the
// direct tile saves them). Returns false, having written nothing, when the
// projection is not all finite (the caller then runs the direct tile).
template <typename T>
bool forward_tile_winograd(const Conv2dSizes& s, const ConvOperands<T>& op, const WinogradOperands<T>& w, int64_t n,
                           int64_t oh0, int64_t oh1, int64_t own_hi, const T* bias, const TileOutput<T>& out,
                           SavedIntermediates<T> keep) {
  const int64_t HWo = s.H_out * s.W_out, npx = (oh1 - oh0) * s.W_out;
  const auto [ih_lo, ih_hi] = input_rows(s, oh0, oh1);
  const PixelMajorProjection<T> proj = project_pixel_major<T>(s, op, n, ih_lo, ih_hi);
  if (!all_finite(proj.pm, (ih_hi - ih_lo) * s.W * s.R_in)) return false;
  if (keep.p) save_projection_rows<T>(s, op.nhwc, proj.p, proj.pr, n, own_hi, keep.p);
  T* z = scratch<T>(11, npx * s.R_out);
  winograd_core_forward<T>(s, w, proj.pm, PixelRows{ih_lo, ih_hi, s.W, s.R_in}, oh0, oh1, z);
  T* kept_q = keep.q ? keep.q + n * s.R_out * HWo + oh0 * s.W_out : nullptr;
  if (out.nhwc) {  // the pixel-major core output is what NHWC pixels are expanded from
    if (kept_q) transpose_columns<T>(npx, z, s.R_out, kept_q, HWo, 0, s.R_out);
    expand_into_output<T>(s, op, z, 1, s.R_out, npx, bias, out, 0);
    return true;
  }
  // The core output channel-major, as the expansion (and the kept tensor)
  // wants it; without last, straight into the output.
  T* q = !op.last ? out.y : kept_q ? kept_q : scratch<T>(2, s.R_out * npx);
  const int64_t ldq = !op.last ? out.ld : kept_q ? HWo : npx;
  transpose_columns<T>(npx, z, s.R_out, q, ldq, 0, s.R_out);
  if (!op.last) {
    if (bias)
      for (int64_t c = 0; c < s.C_out; ++c)
        for (int64_t i = 0; i < npx; ++i) out.y[c * out.ld + i] += bias[c];
    return true;
  }
  expand_into_output<T>(s, op, q, ldq, 1, npx, bias, out, 0);
  return true;
}

// The ReLU + average-pool epilogue of tucker_conv2d_relu_pool for one tile:
// tile (C_out, rows, W_out), rows a multiple of pool, into pooled: the tile's
// first pooled pixel, channel stride pcs and pixel stride pps (NCHW: HWp and
// 1; NHWC: 1 and C_out).
// Rows are summed first, over whole contiguous rows (vectorised), then pairs
// of columns: the epilogue must cost less than the eager ReLU and AvgPool2d
// it replaces even where those run in cache. max(x, 0) keeps NaN, as relu.
template <typename T>
void relu_pool_tile(const Conv2dSizes& s, int64_t pool, const T* tile, int64_t rows, T* pooled, int64_t pcs,
                    int64_t pps) {
  const int64_t Wp = s.W_out / pool, width = Wp * pool, tile_px = rows * s.W_out;
  const T scale = T(1) / static_cast<T>(pool * pool);
  T* sums = scratch<T>(5, width);
  for (int64_t c = 0; c < s.C_out; ++c) {
    for (int64_t pr = 0; pr < rows / pool; ++pr) {
      const T* src = tile + c * tile_px + pr * pool * s.W_out;
      for (int64_t ow = 0; ow < width; ++ow) sums[ow] = std::max(src[ow], T(0));
      for (int64_t i = 1; i < pool; ++i) {
        const T* row = src + i * s.W_out;
        for (int64_t ow = 0; ow < width; ++ow) sums[ow] += std::max(row[ow], T(0));
      }
      T* dst = pooled + c * pcs + pr * Wp * pps;
      if (pool == 2) {
        for (int64_t pw = 0; pw < Wp; ++pw) dst[pw * pps] = (sums[2 * pw] + sums[2 * pw + 1]) * scale;
      } else {
        for (int64_t pw = 0; pw < Wp; ++pw) {
          T sum = sums[pw * pool];
          for (int64_t j = 1; j < pool; ++j) sum += sums[pw * pool + j];
          dst[pw * pps] = sum * scale;
        }
      }
    }
  }
}

// The forward's tiles; with pool, a whole number of pooling windows high, over
// the rows the floor mode keeps.
TilePlan forward_plan(const Conv2dSizes& s, int64_t pool, int64_t elem_size, int64_t winograd_tile) {
  TilePlan plan = plan_tiles(s, at::get_num_threads(), elem_size, false);
  // With Winograd, a whole number of its tiles high too (only the last tile
  // of an image may end inside one).
  const int64_t unit = std::lcm(std::max<int64_t>(pool, 1), std::max<int64_t>(winograd_tile, 1));
  const int64_t rows_used = pool > 0 ? s.H_out / pool * pool : s.H_out;
  plan.rows = std::min((plan.rows + unit - 1) / unit * unit, rows_used);
  plan.tiles_per_image = (rows_used + plan.rows - 1) / plan.rows;
  return plan;
}

// winograd_tile for the forward, which runs it per tile: by rule (auto) only
// on whole images or bands of at least four tile rows, trying F(2x2)'s
// (twice the tile rows of a band) where F(4x4)'s are thinner, as the backward
// does (winograd_backward_band_rows). Thinner bands (batch 1 on a 14 x 14
// layer: four bands of four rows) recompute half their projection again for
// the halo and run GEMMs over a handful of tiles: slower than the direct core
// (resnet50_3x3 at batch 1, 0.24 against 0.20 ms, dev A/B). Forward at two
// threads, no grad (dev A/B, best of 300): resnet50_3x3 at batch 2, bands of
// eight rows, F(2x2) 0.27 ms, F(4x4) 0.31, direct 0.31; at batch 3 0.39 /
// 0.42 / 0.46; at batch 1 (bands of four rows) 0.195 / 0.23 / 0.20.
int64_t winograd_forward_tile(const Conv2dSizes& s, int64_t pool, int64_t elem_size) {
  const int64_t tile = winograd_tile(s, /*backward=*/false);
  if (!tile || !core_choice().automatic) return tile;
  auto thick_enough = [&](int64_t m) {
    const TilePlan plan = forward_plan(s, pool, elem_size, m);
    return plan.tiles_per_image == 1 || plan.rows >= 4 * m;
  };
  if (thick_enough(tile)) return tile;
  return tile == 4 && thick_enough(2) ? 2 : 0;
}

// The forward. pool == 0 writes the conv output to out (N, C_out, H_out,
// W_out); pool >= 1 computes each tile into thread scratch and writes
// avg_pool(relu(tile)) to out (N, C_out, H_out / pool, W_out / pool), with
// tiles a whole number of pooling windows high and rows the floor mode drops
// never computed. out is NHWC when out_nhwc (channels_last input), else NCHW.
// keep (pool == 0 only) receives the intermediates when asked for.
template <typename T>
void conv_forward(const Conv2dSizes& s, const ConvOperands<T>& op, const T* bias, T* out, bool out_nhwc,
                  int64_t pool = 0, SavedIntermediates<T> keep = {}, const WinogradOperands<T>* wino = nullptr) {
  const TilePlan plan = forward_plan(s, pool, sizeof(T), wino ? wino->m : 0);
  const int64_t rows_used = pool > 0 ? s.H_out / pool * pool : s.H_out;
  const int64_t HWo = s.H_out * s.W_out, K = s.R_in * s.kh * s.kw;
  const int64_t Wp = pool > 0 ? s.W_out / pool : 0, HWp = pool > 0 ? (s.H_out / pool) * Wp : 0;
  // Tile `tile` of image n: by Winograd, or (also where that finds the
  // projection not finite) directly.
  auto run_tile = [&](int64_t n, int64_t tile) {
    const int64_t oh0 = tile * plan.rows;
    const int64_t oh1 = std::min(rows_used, oh0 + plan.rows);
    const int64_t npx = (oh1 - oh0) * s.W_out;
    // Destination of the conv output: the output itself, or the tile buffer
    // (channel-major) the epilogue reads while it is still in cache.
    const TileOutput<T> y = pool > 0   ? TileOutput<T>{scratch<T>(4, s.C_out * npx), npx, false}
                            : out_nhwc ? TileOutput<T>{out + (n * HWo + oh0 * s.W_out) * s.C_out, s.C_out, true}
                                       : TileOutput<T>{out + n * s.C_out * HWo + oh0 * s.W_out, HWo, false};
    // The kept projection's rows this tile writes: up to the next tile's
    // first input row (output row oh1's first tap).
    const int64_t own_hi = oh1 >= rows_used ? s.H : std::clamp<int64_t>(oh1 * s.stride_h - s.pad_h, 0, s.H);
    if (!wino || !forward_tile_winograd<T>(s, op, *wino, n, oh0, oh1, own_hi, bias, y, keep)) {
      const auto [ih_lo, ih_hi] = input_rows(s, oh0, oh1);
      const T* p = nullptr;
      const Projection pr = project_rows<T>(s, op, n, ih_lo, ih_hi, scratch<T>(0, s.R_in * (ih_hi - ih_lo) * s.W), &p);
      const bool direct = reads_projection_directly(s, pr.ps);
      if (keep.p) save_projection_rows<T>(s, op.nhwc, p, pr, n, own_hi, keep.p);
      T* qn = keep.q ? keep.q + n * s.R_out * HWo + oh0 * s.W_out : nullptr;
      if (!direct) {
        forward_tile_windows<T>(s, op, pr, p, oh0, oh1, plan.block, bias, y, qn);
      } else {
        // Pointwise core on a channel-major projection: the core reads it in
        // place, into the output itself where nothing follows.
        const bool direct_out = !op.last && !y.nhwc;
        T* q = !direct_out && !qn ? scratch<T>(2, s.R_out * plan.block) : nullptr;
        const int64_t block = balanced_block(npx, plan.block);
        for (int64_t q0 = 0; q0 < npx; q0 += block) {
          const int64_t nb = std::min(block, npx - q0);
          const T* col = p + (oh0 * s.W_out + q0 - pr.ih_lo * s.W);  // same pixel index in and out
          if (direct_out) {
            T* yb = y.pixel(q0);
            if (bias)
              for (int64_t c = 0; c < s.C_out; ++c) std::fill(yb + c * y.ld, yb + c * y.ld + nb, bias[c]);
            gemm_nn<T>(s.R_out, nb, K, op.core, K, 1, col, pr.cs, yb, y.ld, bias != nullptr);
            continue;
          }
          T* qb = qn ? qn + q0 : q;
          const int64_t ldq = qn ? HWo : nb;
          gemm_nn<T>(s.R_out, nb, K, op.core, K, 1, col, pr.cs, qb, ldq, false);
          expand_into_output<T>(s, op, qb, ldq, 1, nb, bias, y, q0);
        }
      }
    }
    if (pool > 0) {
      const int64_t first_pooled = n * s.C_out * HWp + (oh0 / pool) * Wp * (out_nhwc ? s.C_out : 1);
      relu_pool_tile<T>(s, pool, y.y, oh1 - oh0, out + first_pooled, out_nhwc ? 1 : HWp, out_nhwc ? s.C_out : 1);
    }
  };
  const int64_t tasks = s.N * plan.tiles_per_image;
  // Tasks handed out dynamically: each writes its own output rows (and kept
  // intermediates), so the result does not depend on which thread runs it.
  // On a core shared with another process this evens out the threads:
  // vgg_128 at batch 8 with a busy loop on the second core, forward 8.9 ms
  // with one fixed range per thread, 5.0 ms so (dev A/B); without contention
  // the two measured alike.
  const int64_t threads = chunks_for_work(tasks, chain_macs(s));
  for_each_task_dynamic(tasks, threads,
                        [&](int64_t task) { run_tile(task / plan.tiles_per_image, task % plan.tiles_per_image); });
}

// The output's options: in the input's layout (conv_memory_format).
c10::TensorOptions output_options(const Tensor& input) {
  return input.options().memory_format(conv_memory_format(input));
}

// The intermediates tucker_conv2d_with_intermediates returns (ops.cpp).
struct KeptTensors {
  Tensor projection, core_output;
};

// Runs conv_forward on the call's operands into out (pool as conv_forward's);
// with keep (pool == 0), also allocates and fills the intermediates: the
// projection in the input's memory format (the layout the tiles project in).
void run_forward(const Conv2dSizes& s, const Tensor& input, const std::optional<Tensor>& first, const Tensor& core,
                 const std::optional<Tensor>& last, const std::optional<Tensor>& bias, Tensor& out, int64_t pool,
                 KeptTensors* keep = nullptr) {
  const auto [x, nhwc] = input_layout(input);
  TORCH_INTERNAL_ASSERT(out.is_contiguous(conv_memory_format(input)));
  if (keep) {
    const auto opts = input.options();
    keep->projection = s.has_first ? empty_fresh({s.N, s.R_in, s.H, s.W}, opts.memory_format(conv_memory_format(input)))
                                   : at::empty({0}, opts);
    keep->core_output = s.has_last ? empty_fresh({s.N, s.R_out, s.H_out, s.W_out}, opts) : at::empty({0}, opts);
  }
  if (s.N == 0) return;
  const Tensor A = s.has_first ? first->contiguous() : Tensor();
  const Tensor G = core.contiguous();
  const Tensor B = s.has_last ? last->contiguous() : Tensor();
  const Tensor b = s.has_bias ? bias->contiguous() : Tensor();
  // The output is NHWC where the input is (conv_memory_format).
  const Tensor At = transposed_for_nhwc(A, nhwc), Bt = transposed_for_nhwc(B, nhwc);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tucker_conv2d_cpu", [&] {
    const ConvOperands<scalar_t> op{
        x.const_data_ptr<scalar_t>(), nhwc, s.has_first ? A.const_data_ptr<scalar_t>() : nullptr,
        G.const_data_ptr<scalar_t>(), s.has_last ? B.const_data_ptr<scalar_t>() : nullptr,
        nullptr, false, nullptr, At.defined() ? At.const_data_ptr<scalar_t>() : nullptr,
        Bt.defined() ? Bt.const_data_ptr<scalar_t>() : nullptr};
    SavedIntermediates<scalar_t> kept;
    if (keep && s.has_first) kept.p = keep->projection.mutable_data_ptr<scalar_t>();
    if (keep && s.has_last) kept.q = keep->core_output.mutable_data_ptr<scalar_t>();
    WinogradTensors wt;
    std::optional<WinogradOperands<scalar_t>> wino;
    const int64_t tile = winograd_forward_tile(s, pool, sizeof(scalar_t));
    if (tile && all_finite(op.core, G.numel())) {
      wt = winograd_tensors(s, tile, G, /*want_u=*/false, /*want_ut=*/true);
      wino = winograd_operands<scalar_t>(s, tile, wt);
    }
    conv_forward<scalar_t>(s, op, s.has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                           out.mutable_data_ptr<scalar_t>(), nhwc, pool, kept, wino ? &*wino : nullptr);
  });
}

Tensor tucker_conv2d_cpu(
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    const std::optional<Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation) {
  const Conv2dSizes s = check_tucker_conv2d_args(input, first, core, last, bias, stride, padding, dilation, kCpuDtypes);
  Tensor out = empty_fresh({s.N, s.C_out, s.H_out, s.W_out}, output_options(input));
  if (s.N > 0) run_forward(s, input, first, core, last, bias, out, 0);
  return out;
}

// The same forward, also writing the projection and the core output from its
// tiles (checked, and named in errors, as tucker_conv2d: the autograd kernel
// calls it for tucker_conv2d when it keeps them for the backward).
std::tuple<Tensor, Tensor, Tensor> tucker_conv2d_with_intermediates_cpu(
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    const std::optional<Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation) {
  const Conv2dSizes s = check_tucker_conv2d_args(input, first, core, last, bias, stride, padding, dilation, kCpuDtypes);
  Tensor out = empty_fresh({s.N, s.C_out, s.H_out, s.W_out}, output_options(input));
  KeptTensors keep;
  run_forward(s, input, first, core, last, bias, out, 0, &keep);
  return {out, keep.projection, keep.core_output};
}

Tensor tucker_conv2d_relu_pool_cpu(
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    const std::optional<Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t pool) {
  const Conv2dSizes s = check_tucker_conv2d_relu_pool_args(input, first, core, last, bias, stride, padding, dilation,
                                                           pool, kCpuDtypes);
  Tensor out = empty_fresh({s.N, s.C_out, s.H_out / pool, s.W_out / pool}, output_options(input));
  if (out.numel() > 0) run_forward(s, input, first, core, last, bias, out, pool);
  return out;
}

}  // namespace

}  // namespace tucker_ops::cpu

TORCH_LIBRARY_IMPL(tucker_ops, CPU, m) {
  m.impl("tucker_conv2d_relu_pool", &tucker_ops::cpu::tucker_conv2d_relu_pool_cpu);
  m.impl("tucker_conv2d", &tucker_ops::cpu::tucker_conv2d_cpu);
  m.impl("tucker_conv2d_with_intermediates", &tucker_ops::cpu::tucker_conv2d_with_intermediates_cpu);
}
