// im2col / col2im for one image, on raw contiguous buffers, int64 indices.
//
// cols has shape (C * kh * kw, H_out * W_out), row (c * kh + i) * kw + j,
// holding src[c, oh * stride_h - pad_h + i * dil_h, ow * stride_w - pad_w + j * dil_w]
// (zero outside the image).
#pragma once

#include <cstdint>

#include "checks.h"

namespace tucker_ops::cpu {

template <typename T>
void im2col(const T* src, int64_t C, const Conv2dSizes& s, T* cols) {
  const int64_t HWo = s.H_out * s.W_out;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < s.kh; ++i) {
      for (int64_t j = 0; j < s.kw; ++j) {
        T* dst = cols + ((c * s.kh + i) * s.kw + j) * HWo;
        for (int64_t oh = 0; oh < s.H_out; ++oh) {
          T* drow = dst + oh * s.W_out;
          const int64_t ih = oh * s.stride_h - s.pad_h + i * s.dil_h;
          if (ih < 0 || ih >= s.H) {
            for (int64_t ow = 0; ow < s.W_out; ++ow) drow[ow] = T(0);
            continue;
          }
          const T* srow = src + (c * s.H + ih) * s.W;
          for (int64_t ow = 0; ow < s.W_out; ++ow) {
            const int64_t iw = ow * s.stride_w - s.pad_w + j * s.dil_w;
            drow[ow] = (iw >= 0 && iw < s.W) ? srow[iw] : T(0);
          }
        }
      }
    }
  }
}

// Adjoint of im2col: dst (C, H, W) += scatter of cols. dst must be zeroed by
// the caller when a plain (not accumulated) result is wanted.
template <typename T>
void col2im_add(const T* cols, int64_t C, const Conv2dSizes& s, T* dst) {
  const int64_t HWo = s.H_out * s.W_out;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < s.kh; ++i) {
      for (int64_t j = 0; j < s.kw; ++j) {
        const T* src = cols + ((c * s.kh + i) * s.kw + j) * HWo;
        for (int64_t oh = 0; oh < s.H_out; ++oh) {
          const int64_t ih = oh * s.stride_h - s.pad_h + i * s.dil_h;
          if (ih < 0 || ih >= s.H) continue;
          const T* srow = src + oh * s.W_out;
          T* drow = dst + (c * s.H + ih) * s.W;
          for (int64_t ow = 0; ow < s.W_out; ++ow) {
            const int64_t iw = ow * s.stride_w - s.pad_w + j * s.dil_w;
            if (iw >= 0 && iw < s.W) drow[iw] += srow[ow];
          }
        }
      }
    }
  }
}

}  // namespace tucker_ops::cpu
