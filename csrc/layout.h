// How every backend reads a conv input (and writes its output and returns its
// gradient): as NCHW or NHWC contiguous memory, whichever it already is; other
// strides through an NCHW-contiguous copy.
#pragma once

#include <utility>

#include <ATen/core/Tensor.h>

namespace tucker_ops {

// channels_last memory that is not also NCHW-contiguous.
inline bool reads_nhwc(const at::Tensor& input) {
  return !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The memory format a conv reads its input in, and returns its output and the
// input's gradient in (as nn.Conv2d does for these two layouts).
inline at::MemoryFormat conv_memory_format(const at::Tensor& input) {
  return reads_nhwc(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The input as NCHW or NHWC contiguous memory, and whether it is NHWC.
inline std::pair<at::Tensor, bool> input_layout(const at::Tensor& input) {
  if (reads_nhwc(input)) return {input, true};
  return {input.contiguous(), false};
}

}  // namespace tucker_ops
