// The process-wide keep/recompute setting of cpu/intermediates.h, and the two
// utility ops through which Python sets and reads it
// (tucker_ops.keep_intermediates).
#include "cpu/intermediates.h"

#include <atomic>

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace tucker_ops::cpu {
namespace {

// -1: not set (the environment, then the rules, decide); 0: never; 1: always.
std::atomic<int64_t> setting{-1};

int64_t set_keep_intermediates(int64_t mode) {
  TORCH_CHECK_VALUE(
      mode >= -1 && mode <= 1, "_set_keep_intermediates: expected mode to be -1 (automatic), 0 (recompute) or 1 "
      "(keep), but got ", mode);
  return setting.exchange(mode);
}

int64_t keep_intermediates_mode_op() {
  switch (keep_intermediates_mode()) {
    case KeepIntermediates::kAlways: return 1;
    case KeepIntermediates::kNever: return 0;
    default: return -1;
  }
}

}  // namespace

KeepIntermediates keep_intermediates_mode() {
  const int64_t set = setting.load(std::memory_order_relaxed);
  if (set == 1) return KeepIntermediates::kAlways;
  if (set == 0) return KeepIntermediates::kNever;
  return keep_intermediates_from_env();
}

}  // namespace tucker_ops::cpu

TORCH_LIBRARY_IMPL(tucker_ops, CompositeExplicitAutograd, m) {
  m.impl("_set_keep_intermediates", &tucker_ops::cpu::set_keep_intermediates);
  m.impl("_keep_intermediates_mode", &tucker_ops::cpu::keep_intermediates_mode_op);
}
