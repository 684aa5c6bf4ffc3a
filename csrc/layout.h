// How every backend reads a conv input (and returns its gradient): as NCHW or
// NHWC contiguous memory, whichever it already is; other strides through an
// NCHW-contiguous copy.
#pragma once

#include <utility>

#include <ATen/core/Tensor.h>

namespace tucker_ops {

// channels_last memory that is not also NCHW-contiguous.
inline bool reads_nhwc(const at::Tensor& input) {
  return !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The input as NCHW or NHWC contiguous memory, and whether it is NHWC.
inline std::pair<at::Tensor, bool> input_layout(const at::Tensor& input) {
  if (reads_nhwc(input)) return {input, true};
  return {input.contiguous(), false};
}

}  // namespace tucker_ops
