#include "cpu/fresh_tensors.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <ATen/Functions.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tucker_ops::cpu {
namespace {

constexpr uintptr_t kHugePage = uintptr_t(2) << 20;

bool read_env() {
  const char* v = std::getenv("TUCKER_OPS_HUGE_PAGES");
  return !(v && std::strcmp(v, "0") == 0);
}

const bool kHugePages = read_env();

#if defined(__linux__) && defined(MADV_HUGEPAGE)
// Whether the 2 MiB at lo have no page in memory yet: fresh from mmap (or
// returned to the kernel), so every touch would fault. Memory the allocator
// reuses (its pages still mapped) is left alone: there is no fault to save,
// and advising it measured slower (resnet50_3x3 at batch 32, whose 6 MB
// outputs glibc serves from its heap).
bool untouched(uintptr_t lo) {
  unsigned char resident[kHugePage / 4096];
  if (mincore(reinterpret_cast<void*>(lo), kHugePage, resident) != 0) return false;
  for (unsigned char r : resident)
    if (r & 1) return false;
  return true;
}
#endif

// Only the whole 2 MiB pages inside the storage: the advice is per page
// range, and the storage's first and last pages may hold other allocations.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!kHugePages || !t.defined() || static_cast<int64_t>(t.storage().nbytes()) < kHugePageMinBytes) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t lo = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t hi = (begin + t.storage().nbytes()) & ~(kHugePage - 1);
  // A hint: where the kernel refuses it the pages are simply small.
  if (hi > lo && untouched(lo)) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace

at::Tensor empty_fresh(c10::IntArrayRef sizes, const c10::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

at::Tensor zeros_fresh(c10::IntArrayRef sizes, const c10::TensorOptions& options) {
  at::Tensor t = empty_fresh(sizes, options);
  t.zero_();
  return t;
}

}  // namespace tucker_ops::cpu
