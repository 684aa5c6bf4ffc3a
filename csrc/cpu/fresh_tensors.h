// The large tensors the CPU kernels return or keep (outputs, input and weight
// gradients, kept intermediates, per-chunk projection-gradient copies) come
// from the default allocator, and are fresh memory on every call: a 51 MB
// conv output is 12,500 4 KiB pages, each zero-filled by a page fault on
// first touch, which cost more than the arithmetic on some benchmark layers
// (vgg_128 at batch 32, benchmarks/notes.md). Where the kernel lets a process
// ask for transparent huge pages (Linux, THP "madvise" or "always"), these
// helpers ask for them on the tensor's memory before anything touches it,
// when it has no page in memory yet (memory the allocator reuses has no
// faults to save): one fault per 2 MiB. PyTorch offers the same for all its
// allocations behind THP_MEM_ALLOC_ENABLE=1; this covers only the tensors
// tucker-ops allocates (python benchmarks/huge_pages.py measures it).
//
// TUCKER_OPS_HUGE_PAGES=0 (read once, at load) turns it off.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>
#include <c10/util/ArrayRef.h>

namespace tucker_ops::cpu {

// Below this many bytes a tensor holds no whole aligned 2 MiB page worth asking for.
constexpr int64_t kHugePageMinBytes = int64_t(4) << 20;

// at::empty / at::zeros, with huge pages asked for when the tensor is large.
at::Tensor empty_fresh(c10::IntArrayRef sizes, const c10::TensorOptions& options);
at::Tensor zeros_fresh(c10::IntArrayRef sizes, const c10::TensorOptions& options);

}  // namespace tucker_ops::cpu
