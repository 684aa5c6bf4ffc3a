// Deterministic work splitting for the CPU kernels.
//
// Work (images, rows) is cut into at most one chunk per thread. Each chunk
// owns its slice of the weight-gradient accumulators, and the slices are
// summed in chunk order afterwards, so results depend only on the thread
// count, never on scheduling.
#pragma once

#include <algorithm>
#include <atomic>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>

namespace tucker_ops::cpu {

// Number of chunks for `work` items with at least `min_items` per chunk.
inline int64_t num_chunks(int64_t work, int64_t min_items) {
  if (work <= 0) return 0;
  const int64_t by_work = (work + min_items - 1) / min_items;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_work));
}

// Below about this many multiply-adds per thread, waking another thread
// costs more than it saves (and on a loaded machine an OpenMP barrier can wait
// a whole scheduler time slice for a descheduled worker).
constexpr int64_t kMinMacsPerThread = int64_t(1) << 19;

// Chunks for `work` items carrying `macs` multiply-adds in all: at most one
// per thread, and only as many as keep kMinMacsPerThread each busy.
inline int64_t chunks_for_work(int64_t work, int64_t macs) {
  if (work <= 0) return 0;
  const int64_t by_macs = std::max<int64_t>(1, macs / kMinMacsPerThread);
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), work, by_macs}));
}

// Half-open item range [begin, end) of chunk c out of n over `work` items.
inline std::pair<int64_t, int64_t> chunk_range(int64_t c, int64_t n, int64_t work) {
  const int64_t base = work / n, rem = work % n;
  const int64_t begin = c * base + std::min(c, rem);
  return {begin, begin + base + (c < rem ? 1 : 0)};
}

// Runs body(chunk) for every chunk in [0, n), in parallel. at::parallel_for
// does not carry the caller's thread-local state (grad mode, inference mode,
// dispatch-key exclusions) to its OpenMP workers, so it is restored here:
// the at:: calls inside a kernel must see the same state on every thread.
//
// One chunk runs inline: at::parallel_for opens a full OpenMP team even for a
// single chunk, and its closing barrier can stall for a scheduler time slice
// on a busy machine.
template <typename F>
void for_each_chunk(int64_t n, const F& body) {
  if (n == 1) {
    body(0);
    return;
  }
  const at::ThreadLocalState state;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t c = begin; c < end; ++c) body(c);
  });
}

// for_each_chunk without the thread-local state propagation, for kernels that
// call no at:: operators inside the parallel region.
template <typename F>
void for_each_chunk_raw(int64_t n, const F& body) {
  if (n == 1) {
    body(0);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) body(c);
  });
}

// Runs body(task) for every task in [0, tasks) on `threads` threads (at most
// at::get_num_threads()), handing tasks out in order, a few at a time, to
// whichever thread is free, rather than one fixed range per thread: on a
// shared machine a thread whose core is taken for a while leaves its share
// to the others instead of holding them at the closing barrier. Only for
// work whose result does not depend on which thread runs a task (each task
// writing its own part of the output; no per-chunk accumulators).
template <typename F>
void for_each_task_dynamic(int64_t tasks, int64_t threads, const F& body) {
  if (threads <= 1 || tasks <= 1) {
    for (int64_t t = 0; t < tasks; ++t) body(t);
    return;
  }
  // About four grabs per thread: few enough that the shared counter costs
  // nothing, enough to even out a slow thread.
  const int64_t grain = std::max<int64_t>(1, tasks / (4 * threads));
  std::atomic<int64_t> next{0};
  for_each_chunk_raw(threads, [&](int64_t) {
    for (;;) {
      const int64_t begin = next.fetch_add(grain, std::memory_order_relaxed);
      if (begin >= tasks) return;
      const int64_t end = std::min(tasks, begin + grain);
      for (int64_t t = begin; t < end; ++t) body(t);
    }
  });
}

// Sums a (chunks, ...) accumulator over its first dimension in chunk order.
inline at::Tensor sum_chunks(const at::Tensor& acc) {
  // One chunk: its accumulator is the result (no copy; the (1, ...) buffer is not used otherwise).
  if (acc.size(0) == 1) return acc.view(acc.sizes().slice(1));
  at::Tensor total = acc.select(0, 0).clone();
  for (int64_t c = 1; c < acc.size(0); ++c) total.add_(acc.select(0, c));
  return total;
}

}  // namespace tucker_ops::cpu
