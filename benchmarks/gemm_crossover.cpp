// Times csrc/cpu/gemm.cpp's hand kernels (gemm_nn's and gemm_nt's forms), the
// AVX-512 variants where the CPU has AVX-512 and else the AVX2 ones, against
// the BLAS call each would make, on one thread, for benchmarks/gemm_crossover.py.
// Includes gemm.cpp itself to reach its internal (anonymous-namespace) kernels.
#include <torch/extension.h>

#include <chrono>
#include <string>
#include <vector>

#include "cpu/gemm.cpp"

namespace {

using namespace tucker_ops::cpu;

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}

// The two hand forms gemm_nn's kernel chooses between (gemm.cpp, packs), forced.
#define TUCKER_FORMS(NAME, TARGET, BYTES)                                                                          \
  template <typename T>                                                                                            \
  TARGET void forced_##NAME(bool packed, int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs,  \
                            const T* b, int64_t b_rs, int64_t b_cs, T* c, int64_t ldc) {                           \
    using V = typename Vec<T, BYTES>::type;                                                                        \
    constexpr int64_t L = BYTES / sizeof(T);                                                                       \
    if (packed && N % L == 0) {                                                                                    \
      gemm_packed<T, V, false>(M, N, K, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, false);                              \
    } else if (b_cs == 1) {                                                                                        \
      gemm_nn_unpacked<T, V>(M, N, K, a, a_rs, a_cs, StridedRows<T>{b, b_rs}, c, ldc, false);                      \
    } else {                                                                                                       \
      gemm_nt_dots<T, V>(M, N, K, a, a_rs, StridedRows<T>{b, b_cs}, c, ldc, false);                                \
    }                                                                                                              \
  }
TUCKER_FORMS(avx2, TUCKER_TARGET_AVX2, 32)
TUCKER_FORMS(avx512, TUCKER_TARGET_AVX512, 64)
#undef TUCKER_FORMS

template <typename F>
double best_ns(int64_t reps, const F& f) {
  double best = 1e300;
  for (int64_t r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::nano>(t1 - t0).count());
  }
  return best;
}

// {hand ns (gemm_nn's choice), BLAS ns, in-place form ns, packed form ns}: best of reps
// (packed: N a multiple of the vector width, else in place). transposed_a stores A as (K x M).
// Best time of one forced form (in place or packed) of gemm_nn's kernel on
// C (M x N, row-major) = A * B, A and B read through their strides.
template <typename T>
double forced_ns(int64_t reps, bool avx512, bool packed, int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs,
                 int64_t a_cs, const T* b, int64_t b_rs, int64_t b_cs, T* c) {
  return best_ns(reps, [&] {
    if (avx512) {
      forced_avx512<T>(packed, M, N, K, a, a_rs, a_cs, b, b_rs, b_cs, c, N);
    } else {
      forced_avx2<T>(packed, M, N, K, a, a_rs, a_cs, b, b_rs, b_cs, c, N);
    }
  });
}

template <typename T>
std::vector<double> time_nn(int64_t M, int64_t N, int64_t K, bool transposed_a, int64_t reps) {
  std::vector<T> a(M * K, T(0.5)), b(K * N, T(0.25)), c(M * N);
  const int64_t a_rs = transposed_a ? 1 : K, a_cs = transposed_a ? M : 1;
  const bool avx512 = has_avx512();  // asked once, outside the timed calls
  const double hand = best_ns(reps, [&] {
    if (avx512) {
      nn_avx512<T>(M, N, K, a.data(), a_rs, a_cs, b.data(), N, c.data(), N, false);
    } else {
      nn_avx2<T>(M, N, K, a.data(), a_rs, a_cs, b.data(), N, c.data(), N, false);
    }
  });
  const double in_place = forced_ns<T>(reps, avx512, false, M, N, K, a.data(), a_rs, a_cs, b.data(), N, 1, c.data());
  const double packed = forced_ns<T>(reps, avx512, true, M, N, K, a.data(), a_rs, a_cs, b.data(), N, 1, c.data());
  const double blas = best_ns(reps, [&] {
    blas_call('N', transposed_a ? 'T' : 'N', int(N), int(M), int(K), b.data(), int(N), a.data(),
              int(transposed_a ? M : K), T(0), c.data(), int(N));
  });
  return {hand, blas, in_place, packed};
}

// C = A * B^T with A (M x K) and B (N x K) row-major: gemm_nt's form.
template <typename T>
std::vector<double> time_nt(int64_t M, int64_t N, int64_t K, int64_t reps) {
  std::vector<T> a(M * K, T(0.5)), b(N * K, T(0.25)), c(M * N);
  const bool avx512 = has_avx512();
  const double hand = best_ns(reps, [&] {
    if (avx512) {
      nt_avx512<T>(M, N, K, a.data(), K, b.data(), K, c.data(), N, false);
    } else {
      nt_avx2<T>(M, N, K, a.data(), K, b.data(), K, c.data(), N, false);
    }
  });
  const double in_place = forced_ns<T>(reps, avx512, false, M, N, K, a.data(), K, 1, b.data(), 1, K, c.data());
  const double packed = forced_ns<T>(reps, avx512, true, M, N, K, a.data(), K, 1, b.data(), 1, K, c.data());
  const double blas = best_ns(reps, [&] {
    blas_call('T', 'N', int(N), int(M), int(K), b.data(), int(K), a.data(), int(K), T(0), c.data(), int(N));
  });
  return {hand, blas, in_place, packed};
}

// form: "nn" (A row-major), "nn_at" (A stored transposed) or "nt".
std::vector<double> time_gemm(const std::string& form, int64_t M, int64_t N, int64_t K, bool float64, int64_t reps) {
  TORCH_CHECK(blas_available(), "no BLAS linked into torch: nothing to compare against");
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), "this CPU has neither AVX-512 nor AVX2");
  if (form == "nt") return float64 ? time_nt<double>(M, N, K, reps) : time_nt<float>(M, N, K, reps);
  const bool transposed_a = form == "nn_at";
  return float64 ? time_nn<double>(M, N, K, transposed_a, reps) : time_nn<float>(M, N, K, transposed_a, reps);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("time_gemm", &time_gemm);
  m.def("isa", [] { return std::string(has_avx512() ? "avx512" : "avx2"); });
}
