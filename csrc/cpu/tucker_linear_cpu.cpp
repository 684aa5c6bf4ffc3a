// CPU kernels for tucker_ops::tucker_linear and its backward.
//
// Forward: the chain first -> core -> last is a product of up to three
// matrices. Before running it, adjacent factors may be multiplied together
// (core*first, last*core, or all three) when that lowers the total
// multiply-adds for this call's row count; the fold is recomputed every call
// (weights change between calls in training, and it is only chosen when
// cheaper than the rows it saves). Rows are split into one chunk per thread
// and walked in blocks of kRowBlock, so a block's rank-sized intermediates
// stay in cache. Few rows (batch 1) run each stage split over output features
// instead, in one parallel region per stage only when the weights are large.
//
// Backward: per row block, recompute the projection (or read the one the
// forward kept: tucker_linear_with_intermediates), then every requested
// gradient; weight gradients are summed per chunk and then over chunks in
// order (deterministic at a fixed thread count). With at most one row block
// per chunk, two phases instead: the rows' gradients row-parallel, then each
// weight gradient over all rows, split by outputs. Where the weights dominate,
// every product is one whole-batch GEMM split over the threads.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/conv_tiles.h"
#include "cpu/fresh_tensors.h"
#include "cpu/gemm.h"
#include "cpu/gemm_threads.h"
#include "cpu/intermediates.h"
#include "cpu/parallel_chunks.h"

namespace tucker_ops::cpu {
namespace {

using at::Tensor;

constexpr int64_t kRowBlock = 128;
constexpr int64_t kMinRowsPerChunk = 16;
// Below this many multiply-adds a stage runs on the calling thread.
constexpr int64_t kParallelMacs = kMinMacsPerThread;

std::vector<int64_t> output_shape(const Tensor& input, int64_t out_features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out_features;
  return shape;
}

// One stage y = x W^T: W is (out x in), row-major.
template <typename T>
struct Stage {
  const T* w;
  int64_t out, in;
};

// The stages after optional folding, with the folded weights' storage.
template <typename T>
struct Chain {
  std::vector<Stage<T>> stages;
  Tensor folded;  // keeps folded weights alive
};

// Chooses the association by multiply-adds for M rows and folds accordingly.
// allow_fold=false keeps the reference's association: with an Inf in the input,
// folding changes which products meet it ((a + b)*inf instead of a*inf + b*(-inf)),
// so Inf and NaN would not land exactly where the reference puts them.
template <typename T>
Chain<T> plan_chain(const LinearSizes& s, int64_t M, const T* A, const T* G, const T* B, const at::TensorOptions& opts,
                    bool allow_fold) {
  // Candidate groupings of [A?, G, B?] (applied right to left: A first).
  struct Option {
    bool fold_first, fold_last;  // fold first into core / last into core
    int64_t cost;
  };
  const int64_t in = s.in, ri = s.R_in, ro = s.R_out, out = s.out;
  std::vector<Option> options;
  const int64_t chain_rows = (s.has_first ? in * ri : 0) + (s.has_first ? ri : in) * ro + (s.has_last ? ro * out : 0);
  options.push_back({false, false, M * chain_rows});
  if (s.has_first) {
    // W1 = G A (ro x in)
    options.push_back({true, false, ro * ri * in + M * (in * ro + (s.has_last ? ro * out : 0))});
  }
  if (s.has_last) {
    // W2 = B G (out x ri_or_in)
    const int64_t k = s.has_first ? ri : in;
    options.push_back({false, true, out * ro * k + M * ((s.has_first ? in * ri : 0) + k * out)});
  }
  if (s.has_first && s.has_last) {
    // W = (B G) A: out*ro*ri + out*ri*in, or B (G A): ro*ri*in + out*ro*in; take the cheaper.
    const int64_t fold = std::min(out * ro * ri + out * ri * in, ro * ri * in + out * ro * in);
    options.push_back({true, true, fold + M * in * out});
  }
  Option best = options[0];
  for (const Option& o : options)
    if (allow_fold && o.cost < best.cost) best = o;

  Chain<T> chain;
  if (!best.fold_first && !best.fold_last) {
    if (s.has_first) chain.stages.push_back({A, ri, in});
    chain.stages.push_back({G, ro, s.has_first ? ri : in});
    if (s.has_last) chain.stages.push_back({B, out, ro});
    return chain;
  }
  const int64_t k = ri;  // core's input features (in without first)
  if (best.fold_first && best.fold_last) {
    chain.folded = at::empty({out * k + out * in + ro * in}, opts);
    T* bg = chain.folded.template mutable_data_ptr<T>();  // (out x ri)
    T* full = bg + out * k;                      // (out x in)
    T* ga = full + out * in;                     // (ro x in)
    if (out * ro * ri + out * ri * in <= ro * ri * in + out * ro * in) {
      gemm_nn<T>(out, k, ro, B, ro, 1, G, k, bg, k, false);
      gemm_nn<T>(out, in, ri, bg, k, 1, A, in, full, in, false);
    } else {
      gemm_nn<T>(ro, in, ri, G, ri, 1, A, in, ga, in, false);
      gemm_nn<T>(out, in, ro, B, ro, 1, ga, in, full, in, false);
    }
    chain.stages.push_back({full, out, in});
    return chain;
  }
  if (best.fold_first) {
    chain.folded = at::empty({ro * in}, opts);
    T* ga = chain.folded.template mutable_data_ptr<T>();
    gemm_nn<T>(ro, in, ri, G, ri, 1, A, in, ga, in, false);
    chain.stages.push_back({ga, ro, in});
    if (s.has_last) chain.stages.push_back({B, out, ro});
    return chain;
  }
  chain.folded = at::empty({out * k}, opts);
  T* bg = chain.folded.template mutable_data_ptr<T>();
  gemm_nn<T>(out, k, ro, B, ro, 1, G, k, bg, k, false);
  if (s.has_first) chain.stages.push_back({A, ri, in});
  chain.stages.push_back({bg, out, k});
  return chain;
}

template <typename T>
int64_t chain_macs(const Chain<T>& chain, int64_t M) {
  int64_t macs = 0;
  for (const Stage<T>& st : chain.stages) macs += M * st.out * st.in;
  return macs;
}

// True when every stage of the chain, run on transposed activations (W times
// a (features x M) matrix), goes to the hand kernel (gemm_nn_uses_blas: the
// transposed activations are at most 1M elements). The kernel then streams
// each weight row once per strip of rows: 1.4-1.6x faster than the BLAS's x W^T on
// linear_4096's stages at 32 rows, 1.4-2.6x on thesis_l1's and thesis_l2's at
// 16 and 32 (benchmarks/gemm_crossover.py, forms nn and nt).
template <typename T>
bool stages_transposed(const Chain<T>& chain, int64_t M) {
  if (!gemm_nn_kernel_preferred<T>() || M < kMinRowsPerChunk) return false;
  for (const Stage<T>& st : chain.stages)
    if (gemm_nn_uses_blas<T>(st.out, M, st.in)) return false;
  return true;
}

// Rows [r0, r0 + m) through every stage; the last stage writes y (on top of
// the bias when there is one), the others thread-local scratch, or the rows'
// place in kept[i] (row stride: the stage's outputs) where that is given.
// With stages_transposed (most float row blocks on AVX-512), the block is
// transposed into scratch and every stage runs W * X^T on the hand kernel
// (1.4-2.6x the x W^T products on thesis_l1's and thesis_l2's stages at 16
// and 32 rows: benchmarks/gemm_crossover.py), the output (and each kept
// intermediate) transposed back.
template <typename T>
void run_rows(const Chain<T>& chain, const T* x, int64_t ldx, const T* bias, T* y, int64_t ldy, int64_t m,
              T* const* kept = nullptr) {
  const size_t last = chain.stages.size() - 1;
  if (stages_transposed(chain, m)) {
    int64_t widest = 0;
    for (const Stage<T>& st : chain.stages) widest = std::max(widest, st.out);
    const int64_t in = chain.stages[0].in;
    T* xt = scratch<T>(3, in * m);
    transpose_columns<T>(m, x, ldx, xt, m, 0, in);
    T* bufs[2] = {scratch<T>(4, widest * m), scratch<T>(5, widest * m)};
    const T* cur = xt;  // (features x m)
    for (size_t i = 0; i < chain.stages.size(); ++i) {
      const Stage<T>& st = chain.stages[i];
      T* dst = bufs[i % 2];
      gemm_nn<T>(st.out, m, st.in, st.w, st.in, 1, cur, m, dst, m, false);
      if (i != last && kept && kept[i]) transpose_columns<T>(st.out, dst, m, kept[i], st.out, 0, m);
      cur = dst;
    }
    transpose_columns<T>(chain.stages[last].out, cur, m, y, ldy, 0, m);
    if (bias)
      for (int64_t r = 0; r < m; ++r)
        for (int64_t o = 0; o < chain.stages[last].out; ++o) y[r * ldy + o] += bias[o];
    return;
  }
  const T* cur = x;
  int64_t ld = ldx;
  for (size_t i = 0; i < chain.stages.size(); ++i) {
    const Stage<T>& st = chain.stages[i];
    if (i == last) {
      if (bias)
        for (int64_t r = 0; r < m; ++r) std::copy(bias, bias + st.out, y + r * ldy);
      gemm_nt<T>(m, st.out, st.in, cur, ld, st.w, st.in, y, ldy, bias != nullptr);
    } else {
      T* buf = kept && kept[i] ? kept[i] : scratch<T>(static_cast<int>(i), m * st.out);
      gemm_nt<T>(m, st.out, st.in, cur, ld, st.w, st.in, buf, st.out, false);
      cur = buf;
      ld = st.out;
    }
  }
}

// Few rows: each stage split over its output features across threads.
template <typename T>
void run_few_rows(const Chain<T>& chain, const T* x, int64_t in, const T* bias, T* y, int64_t out, int64_t M) {
  const T* cur = x;
  int64_t ld = in;
  const size_t last = chain.stages.size() - 1;
  for (size_t i = 0; i < chain.stages.size(); ++i) {
    const Stage<T>& st = chain.stages[i];
    T* dst;
    int64_t ldd;
    if (i == last) {
      dst = y;
      ldd = out;
    } else {
      // The calling thread's scratch (slots the row-block path does not use
      // here), shared read-only with the workers of the next stage.
      dst = scratch<T>(6 + static_cast<int>(i % 2), M * st.out);
      ldd = st.out;
    }
    const bool add_bias = i == last && bias;
    const int64_t grain = std::max<int64_t>(16, kParallelMacs / std::max<int64_t>(1, M * st.in));
    const int64_t parts = chunks_for_work((st.out + grain - 1) / grain, M * st.out * st.in);
    for_each_chunk_raw(parts, [&](int64_t part) {
      const auto [o0, o1] = chunk_range(part, parts, st.out);
      if (add_bias)
        for (int64_t r = 0; r < M; ++r) std::copy(bias + o0, bias + o1, dst + r * ldd + o0);
      gemm_nt<T>(M, o1 - o0, st.in, cur, ld, st.w + o0 * st.in, st.in, dst + o0, ldd, add_bias);
    });
    cur = dst;
    ld = ldd;
  }
}

template <typename T>
int64_t chain_weights(const Chain<T>& chain) {
  int64_t n = 0;
  for (const Stage<T>& st : chain.stages) n += st.out * st.in;
  return n;
}

// True when the weights, not the rows, are the traffic: every row-block of
// the fused path would stream all of them (once per thread), while a
// whole-batch GEMM per stage reads them once and splits them over threads.
// Then there is nothing left to fuse: each stage runs over all rows at once.
bool weights_dominate(int64_t weights, int64_t M, int64_t in, int64_t out) {
  constexpr int64_t kCacheResidentWeights = int64_t(1) << 18;  // 1 MiB of float: about one L2
  return weights >= kCacheResidentWeights && weights > M * (in + out);
}

// Every stage as one GEMM over all M rows, each split over the threads
// (gemm_threads.h): the last writes y (on top of the bias), the others
// kept[i] where given, else a whole-batch buffer. With stages_transposed, the
// activations are transposed once on the way in and once on the way out
// (and each kept intermediate), the stages running W * X^T in between.
template <typename T>
void run_whole_batch(const Chain<T>& chain, const T* x, int64_t in, const T* bias, T* y, int64_t out, int64_t M,
                     const at::TensorOptions& opts, T* const* kept = nullptr) {
  const size_t last = chain.stages.size() - 1;
  if (stages_transposed(chain, M)) {
    int64_t widest = in;
    for (const Stage<T>& st : chain.stages) widest = std::max(widest, st.out);
    Tensor buffers = at::empty({2 * widest * M}, opts);
    T* bufs[2] = {buffers.template mutable_data_ptr<T>(), buffers.template mutable_data_ptr<T>() + widest * M};
    transpose_threads<T>(M, in, x, in, bufs[0], M);
    for (size_t i = 0; i < chain.stages.size(); ++i) {
      const Stage<T>& st = chain.stages[i];
      const T* cur = bufs[i % 2];  // (st.in x M)
      T* dst = bufs[(i + 1) % 2];  // (st.out x M)
      gemm_nn_threads<T>(st.out, M, st.in, st.w, st.in, 1, cur, M, dst, M, false);
      if (i != last && kept && kept[i]) transpose_threads<T>(st.out, M, dst, M, kept[i], st.out);
    }
    transpose_threads<T>(out, M, bufs[chain.stages.size() % 2], M, y, out);
    if (bias)
      for (int64_t r = 0; r < M; ++r)
        for (int64_t o = 0; o < out; ++o) y[r * out + o] += bias[o];
    return;
  }
  const T* cur = x;
  int64_t ld = in;
  Tensor buffers[2];
  for (size_t i = 0; i < chain.stages.size(); ++i) {
    const Stage<T>& st = chain.stages[i];
    T* dst = y;
    if (i != last) {
      dst = kept && kept[i] ? kept[i] : nullptr;
      if (!dst) {
        buffers[i % 2] = at::empty({M, st.out}, opts);
        dst = buffers[i % 2].template mutable_data_ptr<T>();
      }
    } else if (bias) {
      for (int64_t r = 0; r < M; ++r) std::copy(bias, bias + out, y + r * out);
    }
    gemm_nt_threads<T>(M, st.out, st.in, cur, ld, st.w, st.in, dst, st.out, i == last && bias);
    cur = dst;
    ld = st.out;
  }
}

// The factors as contiguous tensors (undefined where absent).
struct Factors {
  Tensor first, core, last, bias;
};

Factors contiguous_factors(const std::optional<Tensor>& first, const Tensor& core, const std::optional<Tensor>& last,
                           const std::optional<Tensor>& bias = std::nullopt) {
  return {present(first) ? first->contiguous() : Tensor(), core.contiguous(),
          present(last) ? last->contiguous() : Tensor(), present(bias) ? bias->contiguous() : Tensor()};
}

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Where the unfolded chain ([first], core, [last]) keeps its intermediates
// (keeping: tucker_linear_with_intermediates): first's output in p (M x
// R_in), core's, when last follows, in q (M x R_out); null where absent.
template <typename T>
struct KeptRows {
  bool keeping = false;
  T* p = nullptr;
  T* q = nullptr;
  int64_t ri = 0, ro = 0;
  // Row r's place per stage, as run_rows / run_whole_batch take it.
  void at(int64_t r, T* (&kept)[2]) const {
    kept[0] = kept[1] = nullptr;
    int k = 0;
    if (p) kept[k++] = p + r * ri;
    if (q) kept[k] = q + r * ro;
  }
};

// All M rows of x through the chain into y: fewer than kMinRowsPerChunk rows
// (when not keeping) split over output features, whole-batch GEMMs where the
// weights dominate, otherwise row blocks per chunk (no threading inside
// their small products: a parallel region stalls whenever another process
// holds a core).
template <typename T>
void run_chain(const Chain<T>& chain, const LinearSizes& s, const T* x, const T* bias, T* y,
               const at::TensorOptions& opts, const KeptRows<T>& keep = {}) {
  if (!keep.keeping && s.M < kMinRowsPerChunk) {
    run_few_rows<T>(chain, x, s.in, bias, y, s.out, s.M);
    return;
  }
  T* kept[2];
  if (weights_dominate(chain_weights(chain), s.M, s.in, s.out)) {
    keep.at(0, kept);
    run_whole_batch<T>(chain, x, s.in, bias, y, s.out, s.M, opts, kept);
    return;
  }
  const int64_t chunks = chunks_for_work(s.M, chain_macs(chain, s.M));
  for_each_chunk_raw(chunks, [&](int64_t c) {
    const auto [begin, end] = chunk_range(c, chunks, s.M);
    for (int64_t r = begin; r < end; r += kRowBlock) {
      T* kept_block[2];
      keep.at(r, kept_block);
      run_rows<T>(chain, x + r * s.in, s.in, bias, y + r * s.out, s.out, std::min(kRowBlock, end - r), kept_block);
    }
  });
}

Tensor tucker_linear_cpu(
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    const std::optional<Tensor>& bias) {
  const LinearSizes s = check_tucker_linear_args(input, first, core, last, bias, kCpuDtypes);
  const auto opts = input.options();
  Tensor out = empty_fresh(output_shape(input, s.out), opts);
  if (s.M == 0) return out;

  const Tensor x = input.contiguous();
  const Factors f = contiguous_factors(first, core, last, bias);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tucker_linear_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const Chain<T> chain = plan_chain<T>(s, s.M, data_or_null<T>(f.first), data_or_null<T>(f.core),
                                         data_or_null<T>(f.last), opts, /*allow_fold=*/all_finite(xp, s.M * s.in));
    run_chain<T>(chain, s, xp, data_or_null<T>(f.bias), out.mutable_data_ptr<T>(), opts);
  });
  return out;
}

// The unfolded chain (the association Sequential runs), keeping both
// intermediates (ops.cpp), each stage's rows written to the kept tensors
// instead of scratch (run_chain: whole-batch GEMMs where the weights
// dominate, otherwise row blocks, at any row count). The autograd kernel
// keeps them from kMinRowsPerChunk rows (linear_keeps_intermediates).
// Checked, and named in errors, as tucker_linear.
std::tuple<Tensor, Tensor, Tensor> tucker_linear_with_intermediates_cpu(
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    const std::optional<Tensor>& bias) {
  const LinearSizes s = check_tucker_linear_args(input, first, core, last, bias, kCpuDtypes);
  const auto opts = input.options();
  const Tensor x = input.reshape({s.M, s.in}).contiguous();
  // (M x R_in), (M x R_out), (M x out)
  Tensor p = s.has_first ? empty_fresh({s.M, s.R_in}, opts) : Tensor();
  Tensor q = s.has_last ? empty_fresh({s.M, s.R_out}, opts) : Tensor();
  Tensor y = empty_fresh({s.M, s.out}, opts);
  if (s.M > 0) {
    const Factors f = contiguous_factors(first, core, last, bias);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tucker_linear_with_intermediates_cpu", [&] {
      using T = scalar_t;
      const Chain<T> chain = plan_chain<T>(s, s.M, data_or_null<T>(f.first), data_or_null<T>(f.core),
                                           data_or_null<T>(f.last), opts, /*allow_fold=*/false);
      const KeptRows<T> keep{true, p.defined() ? p.mutable_data_ptr<T>() : nullptr,
                             q.defined() ? q.mutable_data_ptr<T>() : nullptr, s.R_in, s.R_out};
      run_chain<T>(chain, s, x.const_data_ptr<T>(), data_or_null<T>(f.bias), y.mutable_data_ptr<T>(), opts, keep);
    });
  }
  auto shaped = [&](const Tensor& t, int64_t features) {
    return t.defined() ? t.view(output_shape(input, features)) : at::empty({0}, opts);
  };
  return {shaped(y, s.out), shaped(p, s.R_in), shaped(q, s.R_out)};
}

template <typename T>
struct LinearGrads {
  bool input, first, core, last, bias;
  T *gx, *acc_first, *acc_core, *acc_last, *acc_bias;
  const T* saved_p;  // the forward's projection (M x R_in), or null to recompute it
  const T* saved_q;  // the forward's core output (M x R_out), or null
};

// All requested gradients for rows [r, r + m) into chunk c's accumulators,
// which the chunk's first block (first) writes rather than adds to: they
// start uninitialised.
template <typename T>
void linear_backward_rows(const LinearSizes& s, const T* x, const T* gy, const T* A, const T* G, const T* B,
                          const LinearGrads<T>& g, int64_t c, int64_t r, int64_t m, bool first) {
  const int64_t in = s.in, ri = s.R_in, ro = s.R_out, out = s.out;
  const bool need_p = g.core || (g.last && !g.saved_q);
  const bool need_back = g.input || g.first;
  const bool need_gq = g.core || need_back;
  const T* xb = x + r * in;
  const T* gyb = gy + r * out;
  if (g.bias) {
    T* acc = g.acc_bias + c * out;
    if (first) std::fill(acc, acc + out, T(0));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t o = 0; o < out; ++o) acc[o] += gyb[i * out + o];
  }
  const T* p = xb;  // (m x ri), the core's input
  if (A && g.saved_p) {
    p = g.saved_p + r * ri;
  } else if (need_p && A) {
    T* buf = scratch<T>(0, m * ri);
    gemm_nt<T>(m, ri, in, xb, in, A, in, buf, ri, false);
    p = buf;
  }
  if (g.last) {
    const T* q = g.saved_q ? g.saved_q + r * ro : nullptr;
    if (!q) {
      T* buf = scratch<T>(1, m * ro);
      gemm_nt<T>(m, ro, ri, p, ri, G, ri, buf, ro, false);
      q = buf;
    }
    gemm_nn<T>(out, ro, m, gyb, 1, out, q, ro, g.acc_last + c * out * ro, ro, !first);  // += gy^T q
  }
  if (!need_gq) return;
  const T* gq = gyb;  // (m x ro)
  if (B) {
    T* buf = scratch<T>(2, m * ro);
    gemm_nn<T>(m, ro, out, gyb, out, 1, B, ro, buf, ro, false);
    gq = buf;
  }
  if (g.core) gemm_nn<T>(ro, ri, m, gq, 1, ro, p, ri, g.acc_core + c * ro * ri, ri, !first);  // += gq^T p
  if (!need_back) return;
  // gp (m x ri) = gq G; without first it is the input gradient itself.
  T* gp = A ? scratch<T>(3, m * ri) : g.gx + r * in;
  gemm_nn<T>(m, ri, ro, gq, ro, 1, G, ri, gp, ri, false);
  if (g.first) gemm_nn<T>(ri, in, m, gp, 1, ri, xb, in, g.acc_first + c * ri * in, in, !first);  // += gp^T x
  if (A && g.input) gemm_nn<T>(m, in, ri, gp, ri, 1, A, in, g.gx + r * in, in, false);
}

// Backward when the weights dominate (see weights_dominate): each product is
// one whole-batch GEMM split over the threads (gemm_threads.h). The
// rank-sized intermediates (M x R) are small here; the weight gradients are
// written once, with no per-thread accumulators to zero and sum, and with
// streaming stores (OutputStore::kStreamed): each is megabytes of outer
// products of inner dimension M, bound by its stores, and read next by the
// optimizer, after the rest of the backward.
template <typename T>
void linear_backward_whole_batch(const LinearSizes& s, const T* x, const T* gy, const T* A, const T* G, const T* B,
                                 const LinearGrads<T>& g, const at::TensorOptions& opts) {
  const int64_t M = s.M, in = s.in, ri = s.R_in, ro = s.R_out, out = s.out;
  const bool need_p = g.core || (g.last && !g.saved_q);
  const bool need_back = g.input || g.first;
  auto buffer = [&](int64_t rows, int64_t cols) {
    return at::empty({rows, cols}, opts);
  };
  Tensor p_buf, q_buf, gq_buf, gp_buf;
  const T* p = x;  // (M x ri), the core's input
  if (A && g.saved_p) {
    p = g.saved_p;
  } else if (A && need_p) {
    p_buf = buffer(M, ri);
    gemm_nt_threads<T>(M, ri, in, x, in, A, in, p_buf.template mutable_data_ptr<T>(), ri, false);
    p = p_buf.template const_data_ptr<T>();
  }
  if (g.last) {
    const T* q = g.saved_q;
    if (!q) {
      q_buf = buffer(M, ro);
      gemm_nt_threads<T>(M, ro, ri, p, ri, G, ri, q_buf.template mutable_data_ptr<T>(), ro, false);
      q = q_buf.template const_data_ptr<T>();
    }
    gemm_nn_threads<T>(out, ro, M, gy, 1, out, q, ro, g.acc_last, ro, false, OutputStore::kStreamed);  // gy^T q
  }
  if (g.bias) {
    // Column sums of gy, split over columns.
    for_each_gemm_slice(1, out, M, [&](int64_t o0, int64_t o1, bool) {
      std::fill(g.acc_bias + o0, g.acc_bias + o1, T(0));
      for (int64_t r = 0; r < M; ++r)
        for (int64_t o = o0; o < o1; ++o) g.acc_bias[o] += gy[r * out + o];
    });
  }
  if (!g.core && !need_back) return;
  const T* gq = gy;  // (M x ro)
  if (B) {
    gq_buf = buffer(M, ro);
    gemm_nn_threads<T>(M, ro, out, gy, out, 1, B, ro, gq_buf.template mutable_data_ptr<T>(), ro, false);
    gq = gq_buf.template const_data_ptr<T>();
  }
  if (g.core) gemm_nn_threads<T>(ro, ri, M, gq, 1, ro, p, ri, g.acc_core, ri, false);  // gq^T p
  if (!need_back) return;
  // gp (M x ri) = gq G; without first it is the input gradient itself.
  T* gp = g.gx;
  if (A) {
    gp_buf = buffer(M, ri);
    gp = gp_buf.template mutable_data_ptr<T>();
  }
  gemm_nn_threads<T>(M, ri, ro, gq, ro, 1, G, ri, gp, ri, false);
  if (g.first) gemm_nn_threads<T>(ri, in, M, gp, 1, ri, x, in, g.acc_first, in, false, OutputStore::kStreamed);
  if (A && g.input) gemm_nn_threads<T>(M, in, ri, gp, ri, 1, A, in, g.gx, in, false);
}

// Backward for at most one row block per chunk (linear_backward_rows would
// have every chunk write a whole copy of each weight gradient, from products
// of inner dimension <= kRowBlock, and sum the copies afterwards). Phase 1
// computes the rows' gradients row-parallel into whole-batch buffers (gq, gp
// and the input gradient; the projection and core output where not kept);
// phase 2 computes each weight gradient over all rows at once, every thread
// its slice of the outputs: no copies, no sum, inner dimension M. The weights
// are small here (not weights_dominate), so every thread reading all of them
// in phase 1 costs little.
template <typename T>
void linear_backward_two_phase(const LinearSizes& s, const T* x, const T* gy, const T* A, const T* G, const T* B,
                               const LinearGrads<T>& g, const at::TensorOptions& opts, int64_t chunks) {
  const int64_t M = s.M, in = s.in, ri = s.R_in, ro = s.R_out, out = s.out;
  const bool need_back = g.input || g.first;
  const bool need_gq = g.core || need_back;
  // Without first the core's input is x itself (ri == in); without last gq is gy (ro == out).
  const bool make_p = A && !g.saved_p && (g.core || (g.last && !g.saved_q));
  const bool make_q = g.last && !g.saved_q;
  Tensor buffers = at::empty({M * ((make_p ? ri : 0) + (make_q ? ro : 0) + (B && need_gq ? ro : 0) +
                                   (A && need_back ? ri : 0))},
                             opts);
  T* next = buffers.template mutable_data_ptr<T>();
  auto take = [&](bool wanted, int64_t cols) {
    T* b = wanted ? next : nullptr;
    next += wanted ? M * cols : 0;
    return b;
  };
  T* p_buf = take(make_p, ri);
  T* q_buf = take(make_q, ro);
  T* gq_buf = take(B && need_gq, ro);
  T* gp_buf = take(A && need_back, ri);
  const T* p = !A ? x : g.saved_p ? g.saved_p : p_buf;
  const T* q = g.saved_q ? g.saved_q : q_buf;
  const T* gq = B ? gq_buf : gy;
  T* gp = A ? gp_buf : g.gx;

  for_each_chunk_raw(chunks, [&](int64_t c) {
    const auto [r0, r1] = chunk_range(c, chunks, M);
    const int64_t m = r1 - r0;
    if (make_p) gemm_nt<T>(m, ri, in, x + r0 * in, in, A, in, p_buf + r0 * ri, ri, false);
    if (make_q) gemm_nt<T>(m, ro, ri, p + r0 * ri, ri, G, ri, q_buf + r0 * ro, ro, false);
    if (!need_gq) return;
    if (B) gemm_nn<T>(m, ro, out, gy + r0 * out, out, 1, B, ro, gq_buf + r0 * ro, ro, false);
    if (!need_back) return;
    gemm_nn<T>(m, ri, ro, gq + r0 * ro, ro, 1, G, ri, gp + r0 * ri, ri, false);
    if (A && g.input) gemm_nn<T>(m, in, ri, gp + r0 * ri, ri, 1, A, in, g.gx + r0 * in, in, false);
  });

  for_each_chunk_raw(chunks, [&](int64_t c) {
    if (g.last) {
      const auto [o0, o1] = chunk_range(c, chunks, out);  // gy^T q, rows o0..o1
      gemm_nn<T>(o1 - o0, ro, M, gy + o0, 1, out, q, ro, g.acc_last + o0 * ro, ro, false);
    }
    if (g.core) {
      const auto [o0, o1] = chunk_range(c, chunks, ro);  // gq^T p
      gemm_nn<T>(o1 - o0, ri, M, gq + o0, 1, ro, p, ri, g.acc_core + o0 * ri, ri, false);
    }
    if (g.first) {
      const auto [i0, i1] = gemm_split_range(c, chunks, in, true);  // gp^T x, columns i0..i1
      gemm_nn<T>(ri, i1 - i0, M, gp, 1, ri, x + i0, in, g.acc_first + i0, in, false);
    }
    if (g.bias) {
      const auto [o0, o1] = gemm_split_range(c, chunks, out, true);
      std::fill(g.acc_bias + o0, g.acc_bias + o1, T(0));
      for (int64_t r = 0; r < M; ++r)
        for (int64_t o = o0; o < o1; ++o) g.acc_bias[o] += gy[r * out + o];
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> tucker_linear_backward_cpu(
    const Tensor& grad_output,
    const Tensor& input,
    const std::optional<Tensor>& first,
    const Tensor& core,
    const std::optional<Tensor>& last,
    std::array<bool, 5> output_mask,
    const std::optional<Tensor>& projection,
    const std::optional<Tensor>& core_output) {
  const LinearSizes s = check_tucker_linear_backward_args(grad_output, input, first, core, last, kCpuDtypes,
                                                          projection, core_output);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor P = present(projection) ? projection->contiguous() : Tensor();
  const Tensor Q = present(core_output) ? core_output->contiguous() : Tensor();

  const auto opts = input.options();
  const GradRequest need = grad_request(output_mask, s.has_first, s.has_last);

  const int64_t weights = (s.has_first ? s.in * s.R_in : 0) + s.R_in * s.R_out + (s.has_last ? s.R_out * s.out : 0);
  const bool whole_batch = s.M > 0 && weights_dominate(weights, s.M, s.in, s.out);
  const int64_t backward_macs = 2 * s.M * weights;
  const int64_t row_groups = (s.M + kMinRowsPerChunk - 1) / kMinRowsPerChunk;
  const int64_t chunks = whole_batch ? 1 : std::max<int64_t>(1, chunks_for_work(row_groups, backward_macs));
  const bool two_phase = !whole_batch && chunks > 1 && s.M <= chunks * kRowBlock;
  // The whole-batch and two-phase paths write each weight gradient once (one
  // slice); the row blocks one slice per chunk, written by its first block.
  auto accumulator = [&](bool needed, std::initializer_list<int64_t> shape) {
    if (!needed) return Tensor();
    std::vector<int64_t> sizes{whole_batch || two_phase ? 1 : chunks};
    sizes.insert(sizes.end(), shape);
    return s.M == 0 ? at::zeros(sizes, opts) : empty_fresh(sizes, opts);  // no rows: zero gradients
  };
  Tensor grad_input = need.input ? empty_fresh(input.sizes(), opts) : Tensor();
  Tensor acc_first = accumulator(need.first, {s.R_in, s.in});
  Tensor acc_core = accumulator(need.core, {s.R_out, s.R_in});
  Tensor acc_last = accumulator(need.last, {s.out, s.R_out});
  Tensor acc_bias = accumulator(need.bias, {s.out});

  if (s.M > 0) {
    const Tensor x = input.contiguous();
    const Tensor gy = grad_output.contiguous();
    const Factors f = contiguous_factors(first, core, last);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tucker_linear_backward_cpu", [&] {
      using T = scalar_t;
      const LinearGrads<T> g{need.input, need.first, need.core, need.last, need.bias,
                             need.input ? grad_input.mutable_data_ptr<T>() : nullptr,
                             need.first ? acc_first.mutable_data_ptr<T>() : nullptr,
                             need.core ? acc_core.mutable_data_ptr<T>() : nullptr,
                             need.last ? acc_last.mutable_data_ptr<T>() : nullptr,
                             need.bias ? acc_bias.mutable_data_ptr<T>() : nullptr,
                             data_or_null<T>(P), data_or_null<T>(Q)};
      const T* xp = x.const_data_ptr<T>();
      const T* gyp = gy.const_data_ptr<T>();
      const T* Ap = data_or_null<T>(f.first);
      const T* Gp = data_or_null<T>(f.core);
      const T* Bp = data_or_null<T>(f.last);
      if (whole_batch) {
        linear_backward_whole_batch<T>(s, xp, gyp, Ap, Gp, Bp, g, opts);
        return;
      }
      if (two_phase) {
        linear_backward_two_phase<T>(s, xp, gyp, Ap, Gp, Bp, g, opts, chunks);
        return;
      }
      for_each_chunk_raw(chunks, [&](int64_t c) {
        const auto [begin, end] = chunk_range(c, chunks, s.M);
        for (int64_t r = begin; r < end; r += kRowBlock)
          linear_backward_rows<T>(s, xp, gyp, Ap, Gp, Bp, g, c, r, std::min(kRowBlock, end - r), r == begin);
      });
    });
  }

  return backward_result(
      opts,
      need.input ? grad_input : Tensor(),
      need.first ? sum_chunks(acc_first) : Tensor(),
      need.core ? sum_chunks(acc_core) : Tensor(),
      need.last ? sum_chunks(acc_last) : Tensor(),
      need.bias ? sum_chunks(acc_bias) : Tensor());
}

}  // namespace

// From kMinRowsPerChunk rows: the kept forward is the chain as whole-batch
// GEMMs, which below that loses to the few-rows path by more than the
// backward's recomputation costs (measured: benchmarks/notes.md).
bool linear_keeps_intermediates(int64_t rows) {
  return rows >= kMinRowsPerChunk;
}

}  // namespace tucker_ops::cpu

TORCH_LIBRARY_IMPL(tucker_ops, CPU, m) {
  m.impl("tucker_linear", &tucker_ops::cpu::tucker_linear_cpu);
  m.impl("tucker_linear_with_intermediates", &tucker_ops::cpu::tucker_linear_with_intermediates_cpu);
  m.impl("tucker_linear_backward", &tucker_ops::cpu::tucker_linear_backward_cpu);
}
