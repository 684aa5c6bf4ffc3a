// What the fused conv's forward (tucker_conv2d_cpu.cpp) and backward
// (tucker_conv2d_backward_cpu.cpp) share: one call's operands, the projection
// of a tile's input rows (channel-major, and pixel-major for the Winograd and
// pixel-major paths), the work measure behind the thread count, and the
// Winograd core's choice, operands and forward (which the backward reruns
// where it recomputes the core output).
#pragma once

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>

#include "checks.h"
#include "layout.h"
#include "cpu/conv_tiles.h"
#include "cpu/gemm.h"
#include "cpu/gemm_threads.h"
#include "cpu/winograd.h"

namespace tucker_ops::cpu {

// Raw pointers and layout of one call's operands.
template <typename T>
struct ConvOperands {
  const T* x;      // input, NCHW or NHWC
  bool nhwc;
  const T* first;  // (R_in, C_in) or null
  const T* core;   // (R_out, R_in*kh*kw)
  const T* last;   // (C_out, R_out) or null
  // Backward only: the forward's saved projection (N, R_in, H, W), NCHW or
  // NHWC as saved_p_nhwc says, and core output (N, R_out, H_out, W_out) NCHW;
  // null to recompute them.
  const T* saved_p = nullptr;
  bool saved_p_nhwc = false;
  const T* saved_q = nullptr;
  // first transposed, (C_in, R_in), for NHWC input (null otherwise): the
  // pixel-major projection X * first^T then runs as A * B on the hand kernel.
  const T* first_t = nullptr;
  // Forward only: last transposed, (R_out, C_out), where the output is NHWC:
  // its pixel rows (npx x C_out) = Q^T * last^T then run as A * B.
  const T* last_t = nullptr;
};

// A factor transposed and contiguous where the pixel-major side of its product
// is NHWC (first^T (C_in, R_in) for NHWC input, last^T (R_out, C_out) for NHWC
// output: ConvOperands::first_t / last_t), else undefined.
inline at::Tensor transposed_for_nhwc(const at::Tensor& factor, bool nhwc) {
  return factor.defined() && nhwc ? factor.t().contiguous() : at::Tensor();
}

// Where the forward writes the intermediates it is asked to keep (null: not
// kept): the projection in the input's layout, the core output NCHW.
template <typename T>
struct SavedIntermediates {
  T* p = nullptr;
  T* q = nullptr;
};

struct Projection {
  int64_t ih_lo, ih_hi, cs, ps;
};

// ---- Staged activation rows ----------------------------------------------------
//
// A product that reads a large activation tensor (the input, grad_output) in
// place walks, for each strip of output columns, every one of the image's
// channel rows at the tensor's row stride: from L3 or memory the hardware
// prefetcher follows that pattern badly, and the hand kernel waits. Copying
// the rows into thread scratch first (read in order, then multiplied from
// L2) ran resnet50_3x3's projection (64 x 196 x 256 per image, one thread,
// the batch's input out of cache) 1.2x faster, and at batch 32 on two threads
// its forward 4.4 -> 3.5 ms and its backward op 9.8 -> 8.7 ms (dev A/B,
// benchmarks/notes.md). The copy only costs where the tensor is small enough
// to be in the cores' L2 already, and measured no gain or a loss below 256
// channels or 128 pixels per row (7 x 7 images: 0.9-0.98x).
constexpr int64_t kStageMinChannels = 256;
constexpr int64_t kStageMinPixels = 128;
constexpr int64_t kStageMinTensorBytes = int64_t(2) << 20;

// Whether `channels` rows of `px` pixels of a tensor of `tensor_elems`
// elements are read through staged_rows.
template <typename T>
bool stages_activation_rows(int64_t channels, int64_t px, int64_t tensor_elems) {
  return gemm_nn_kernel_preferred<T>() && channels >= kStageMinChannels && px >= kStageMinPixels &&
         tensor_elems * int64_t(sizeof(T)) > kStageMinTensorBytes;
}

// Thread-scratch slots of the staged copies: the input (project_rows, and the
// first gradient's product) and grad_output (shared with its NHWC transposes).
constexpr int kStagedInputSlot = 14;
constexpr int kGradOutputSlot = 13;

// rows x px elements from src (row stride ld), contiguous in scratch `slot`.
template <typename T>
const T* staged_rows(const T* src, int64_t rows, int64_t px, int64_t ld, int slot) {
  T* dst = scratch<T>(slot, rows * px);
  if (ld == px) {
    std::memcpy(dst, src, static_cast<size_t>(rows * px) * sizeof(T));
  } else {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * px, src + r * ld, static_cast<size_t>(px) * sizeof(T));
  }
  return dst;
}

// Projects input rows [ih_lo, ih_hi) of image n to R_in channels into buf
// (or points at the input itself without first); returns P's addressing.
template <typename T>
Projection project_rows(const Conv2dSizes& s, const ConvOperands<T>& op, int64_t n, int64_t ih_lo, int64_t ih_hi,
                        T* buf, const T** p) {
  const int64_t rows = ih_hi - ih_lo, px = rows * s.W, HW = s.H * s.W;
  const T* xn = op.x + n * s.C_in * HW;
  if (!op.first) {
    if (op.nhwc) {
      *p = xn + ih_lo * s.W * s.C_in;
      return {ih_lo, ih_hi, 1, s.C_in};
    }
    *p = xn + ih_lo * s.W;
    return {ih_lo, ih_hi, HW, 1};
  }
  if (op.saved_p) {
    if (op.saved_p_nhwc) {
      *p = op.saved_p + (n * HW + ih_lo * s.W) * s.R_in;
      return {ih_lo, ih_hi, 1, s.R_in};
    }
    *p = op.saved_p + n * s.R_in * HW + ih_lo * s.W;
    return {ih_lo, ih_hi, HW, 1};
  }
  *p = buf;
  if (px == 0) return {ih_lo, ih_hi, px, 1};
  if (op.nhwc) {
    // P^T (px x R_in) = X (px x C_in) * first^T
    if (op.first_t)
      gemm_nn<T>(px, s.R_in, s.C_in, xn + ih_lo * s.W * s.C_in, s.C_in, 1, op.first_t, s.R_in, buf, s.R_in, false);
    else
      gemm_nt<T>(px, s.R_in, s.C_in, xn + ih_lo * s.W * s.C_in, s.C_in, op.first, s.C_in, buf, s.R_in, false);
    return {ih_lo, ih_hi, 1, s.R_in};
  }
  // P (R_in x px) = first (R_in x C_in) * X (C_in x px, row stride HW)
  const T* x_rows = xn + ih_lo * s.W;
  int64_t ld = HW;
  if (stages_activation_rows<T>(s.C_in, px, s.N * s.C_in * HW)) {
    x_rows = staged_rows<T>(x_rows, s.C_in, px, HW, kStagedInputSlot);
    ld = px;
  }
  gemm_nn<T>(s.R_in, px, s.C_in, op.first, s.C_in, 1, x_rows, ld, buf, px, false);
  return {ih_lo, ih_hi, px, 1};
}

// Multiply-adds of the whole chain for this call (for the threading decision).
inline int64_t chain_macs(const Conv2dSizes& s) {
  const int64_t per_out = s.R_out * s.R_in * s.kh * s.kw + (s.has_last ? s.C_out * s.R_out : 0);
  const int64_t per_in = s.has_first ? s.R_in * s.C_in : 0;
  return s.N * (s.H_out * s.W_out * per_out + s.H * s.W * per_in);
}

// ---- Winograd core (winograd.h) ----------------------------------------------

// Which algorithm runs a 3x3 or 5x5 stride-1 core: TUCKER_OPS_CONV_CORE =
// auto | direct | winograd (tile size by rule) | winograd2 | winograd4
// (F(2x2, 3x3) / F(4x4, 3x3); a 5x5 core has F(2x2, 5x5) only), read per
// call (benchmarks and tests compare them in one process). A forced Winograd
// still needs a shape it applies to.
struct CoreChoice {
  bool automatic = true, direct = false;
  int64_t tile = 0;  // forced tile size, 0: by rule
};

inline CoreChoice core_choice() {
  const char* env = std::getenv("TUCKER_OPS_CONV_CORE");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") return {};
  if (want == "direct") return {false, true, 0};
  if (want == "winograd") return {false, false, 0};
  if (want == "winograd2") return {false, false, 2};
  if (want == "winograd4") return {false, false, 4};
  TORCH_CHECK(false, "TUCKER_OPS_CONV_CORE must be 'auto', 'direct', 'winograd', 'winograd2' or 'winograd4', got '",
              want, "'");
}

// The Winograd tile size m for this call, or 0 for the direct core. Winograd
// needs a 3x3 or 5x5 stride-1 undilated core: F(2x2) or F(4x4) for 3x3,
// F(2x2) for 5x5 (F(4x4, 5x5) would need eight interpolation points, and
// its coefficients lose float32 accuracy). The forward runs it per tile (bands of
// whole tile rows); the backward per image (at least two per thread) or per
// band of an image (winograd_backward_band_rows), its pixel-major buffers
// (thread scratch, kept for the next call: about seven of them) within 2^19
// elements for a whole image. auto also needs 16 channels on
// both sides of the core: below that the tile transforms, which do not shrink
// with the ranks' product, cost more than the multiply-adds they save. The
// tile size by rule is the one with fewer multiply-adds per image (tiles x
// alpha^2: F(4x4) on 14 x 14 outputs, 16 x 36 against F(2x2)'s 49 x 16), but
// F(4x4) only with at least 16 tiles per image: its GEMMs run over an image's
// (or band's) tiles, and with fewer (4 on 7 x 7 outputs) they are too small
// for the kernel, the core gradient's an outer product of inner dimension 4.
// 512 -> 512 at 7 x 7 with ranks 128 (`python benchmarks/layer_sweep.py --only
// r18_512 --batches 8 32`; dev A/B of the forced cores, two threads): at
// batch 8 F(2x2) forward 1.49 ms, backward 3.14, F(4x4) 1.75 / 3.83, direct
// 1.62 / 3.14, Sequential 1.66 / 2.99; at batch 32 4.82 / 9.62, 4.67 / 10.13,
// 5.97 / 11.44, Sequential 5.04 / 10.22. A 5x5 core's tiles read a 6 x 6
// block for 4 outputs, 36 multiply-adds per channel pair against 100
// direct: F(2x2) whenever auto takes Winograd at all.
inline int64_t winograd_tile(const Conv2dSizes& s, bool backward) {
  const bool core_3x3 = s.kh == 3 && s.kw == 3, core_5x5 = s.kh == 5 && s.kw == 5;
  if (!(core_3x3 || core_5x5) || s.stride_h != 1 || s.stride_w != 1 || s.dil_h != 1 || s.dil_w != 1) return 0;
  if (s.H_out < 2 || s.W_out < 2) return 0;
  if (backward) {
    const int64_t widest = std::max({s.R_in + s.R_out, s.C_in, s.C_out});
    if (s.H * s.W * widest > (int64_t(1) << 19)) return 0;
  }
  const CoreChoice choice = core_choice();
  if (choice.direct || (choice.automatic && (s.R_in < 16 || s.R_out < 16))) return 0;
  if (core_5x5) return choice.tile == 4 ? 0 : 2;
  if (choice.tile) return choice.tile;
  auto work = [&](int64_t m) {
    return winograd_tiles(s.H_out, m) * winograd_tiles(s.W_out, m) * WinogradKind{m, 3}.elems();
  };
  const bool enough_tiles = winograd_tiles(s.H_out, 4) * winograd_tiles(s.W_out, 4) >= 16;
  return work(4) < work(2) && enough_tiles ? 4 : 2;
}

// The core in the forms the Winograd images read: U (alpha^2, R_out, R_in)
// for the projection gradient, its transpose Ut (alpha^2, R_in, R_out) for
// the forward, and kron(G, G) (alpha^2, r^2) to map the core gradient back.
struct WinogradTensors {
  at::Tensor u, ut, kron;
};

template <typename T>
struct WinogradOperands {
  int64_t m, r, elems;  // tile size, core size, alpha^2
  const T* u;
  const T* ut;
  const T* kron;
  int64_t tiles_h, tiles_w;
  int64_t band;  // tile rows per band (winograd.h): its transformed data stays in L2
  int64_t band_tiles() const { return band * tiles_w; }
  WinogradKind kind() const { return {m, r}; }
};

// core: (R_out, R_in*r*r) contiguous, r = kh = kw. Only the forms asked
// for: the forward reads Ut, the backward U (and Ut where it recomputes the
// core output).
inline WinogradTensors winograd_tensors(const Conv2dSizes& s, int64_t m, const at::Tensor& core, bool want_u,
                                        bool want_ut) {
  const WinogradKind k{m, s.kh};
  const int64_t taps = s.kh * s.kw;
  WinogradTensors w;
  w.kron = at::empty({k.elems(), taps}, core.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(core.scalar_type(), "winograd_kron",
                             [&] { winograd_kron<scalar_t>(k, w.kron.mutable_data_ptr<scalar_t>()); });
  // U = kron * core^T and Ut = kron * (core, channel axes swapped)^T: thin
  // products (K = r^2) on our threads, rather than a BLAS call and a
  // transposing copy (which cost about 0.1 ms a call at resnet50_3x3's ranks).
  const int64_t pairs = s.R_out * s.R_in;
  const at::Tensor per_tap = core.view({s.R_out, s.R_in, taps});
  auto transform = [&](const at::Tensor& taps_first, int64_t rows, int64_t cols) {
    at::Tensor out = at::empty({k.elems(), rows, cols}, w.kron.options());
    AT_DISPATCH_FLOATING_TYPES(core.scalar_type(), "winograd_tensors", [&] {
      gemm_nn_threads<scalar_t>(k.elems(), pairs, taps, w.kron.const_data_ptr<scalar_t>(), taps, 1,
                                taps_first.const_data_ptr<scalar_t>(), pairs, out.mutable_data_ptr<scalar_t>(), pairs,
                                false);
    });
    return out;
  };
  if (want_u) w.u = transform(per_tap.permute({2, 0, 1}).contiguous(), s.R_out, s.R_in);
  if (want_ut) w.ut = transform(per_tap.permute({2, 1, 0}).contiguous(), s.R_in, s.R_out);
  return w;
}

template <typename T>
WinogradOperands<T> winograd_operands(const Conv2dSizes& s, int64_t m, const WinogradTensors& w) {
  // A band's V and M (alpha^2 x tiles x R_in and R_out) within about 512 KiB
  // (L2 is 1 MiB on the benchmark machine).
  const int64_t elems = WinogradKind{m, s.kh}.elems();
  const int64_t tiles_h = winograd_tiles(s.H_out, m), tiles_w = winograd_tiles(s.W_out, m);
  const int64_t band_tiles = (512 * 1024 / int64_t(sizeof(T))) / (elems * (s.R_in + s.R_out));
  const int64_t band = std::clamp<int64_t>(band_tiles / tiles_w, 1, tiles_h);
  return {m,
          s.kh,
          elems,
          w.u.defined() ? w.u.const_data_ptr<T>() : nullptr,
          w.ut.defined() ? w.ut.const_data_ptr<T>() : nullptr,
          w.kron.const_data_ptr<T>(),
          tiles_h,
          tiles_w,
          band};
}

// The projection of input rows [ih_lo, ih_hi) of image n (project_rows:
// computed channel-major from NCHW input, where first * X runs on the hand
// kernel about twice as fast as X^T * first^T, which reads X a column at a
// time), and the same rows pixel-major, (rows * W, R_in), as the Winograd
// transforms read them: transposed into scratch where it is channel-major.
template <typename T>
struct PixelMajorProjection {
  Projection pr;
  const T* p;   // as project_rows returns it
  const T* pm;  // pixel-major
};

template <typename T>
PixelMajorProjection<T> project_pixel_major(const Conv2dSizes& s, const ConvOperands<T>& op, int64_t n, int64_t ih_lo,
                                            int64_t ih_hi) {
  const int64_t px = (ih_hi - ih_lo) * s.W;
  PixelMajorProjection<T> r{};
  r.pr = project_rows<T>(s, op, n, ih_lo, ih_hi, scratch<T>(0, s.R_in * px), &r.p);
  r.pm = r.p;
  if (r.pr.ps == 1) {
    T* buf = scratch<T>(1, px * s.R_in);
    transpose_columns<T>(s.R_in, r.p, r.pr.cs, buf, s.R_in, 0, px);
    r.pm = buf;
  }
  return r;
}

// C zeros (read for pixels outside the image) and a C-element sink (written
// for outputs outside it), thread scratch.
template <typename T>
std::pair<T*, T*> winograd_edges(int64_t C) {
  T* zeros = scratch<T>(12, 2 * C);
  std::fill(zeros, zeros + C, T(0));
  return {zeros, zeros + C};
}

// Scratch for one band's transformed data: V (or gV) and M.
template <typename T>
std::pair<T*, T*> winograd_band_buffers(const Conv2dSizes& s, const WinogradOperands<T>& w) {
  return {scratch<T>(9, w.elems * w.band_tiles() * s.R_in), scratch<T>(10, w.elems * w.band_tiles() * s.R_out)};
}

// Output rows [oh0, oh1) of the core by Winograd (oh0 a multiple of the tile
// size), pixel-major into z, from the projection p of input rows `in`
// (pixel-major), in bands of w.band tile rows: input transform into v, one
// GEMM per transformed element into m, output transform into z.
template <typename T>
void winograd_core_forward(const Conv2dSizes& s, const WinogradOperands<T>& w, const T* p, const PixelRows& in,
                           int64_t oh0, int64_t oh1, T* z) {
  const auto [v, m] = winograd_band_buffers<T>(s, w);
  const auto [zeros, sink] = winograd_edges<T>(std::max(s.R_in, s.R_out));
  const PixelRows out{oh0, oh1, s.W_out, s.R_out};
  const int64_t ty_end = (oh1 + w.m - 1) / w.m;
  for (int64_t ty0 = oh0 / w.m; ty0 < ty_end; ty0 += w.band) {
    const int64_t ty1 = std::min(ty_end, ty0 + w.band), tiles = (ty1 - ty0) * w.tiles_w;
    const int64_t xs_in = tiles * s.R_in, xs_out = tiles * s.R_out;
    winograd_input_transform<T>(w.kind(), p, in, s.R_in, s.pad_h, s.pad_w, ty0, ty1, w.tiles_w, zeros, v, xs_in);
    for (int64_t xi = 0; xi < w.elems; ++xi)
      gemm_nn<T>(tiles, s.R_out, s.R_in, v + xi * xs_in, s.R_in, 1, w.ut + xi * s.R_in * s.R_out, s.R_out,
                 m + xi * xs_out, s.R_out, false);
    winograd_output_transform<T>(w.kind(), m, xs_out, out, s.R_out, ty0, ty1, w.tiles_w, sink, z);
  }
}

}  // namespace tucker_ops::cpu
