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

// {hand ns, BLAS ns}: best of reps. transposed_a stores A as (K x M).
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
  const double blas = best_ns(reps, [&] {
    blas_call('N', transposed_a ? 'T' : 'N', int(N), int(M), int(K), b.data(), int(N), a.data(),
              int(transposed_a ? M : K), T(0), c.data(), int(N));
  });
  return {hand, blas};
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
  const double blas = best_ns(reps, [&] {
    blas_call('T', 'N', int(N), int(M), int(K), b.data(), int(K), a.data(), int(K), T(0), c.data(), int(N));
  });
  return {hand, blas};
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
