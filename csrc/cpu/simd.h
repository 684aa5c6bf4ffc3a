// What the hand-vectorised CPU kernels (gemm.cpp, winograd.cpp) share: GCC
// vector types, unaligned loads and stores, and the instruction set picked at
// load time.
//
// The kernels are always_inline templates over a vector type; each ISA
// variant is a wrapper function with __attribute__((target)) into which they
// are inlined, so one source yields every variant without -march flags, and
// the caller picks one with TUCKER_CALL_ISA.
#pragma once

#include <cstdint>

// The vector helpers pass AVX vectors by value; they are always inlined into a
// wrapper compiled for that ISA, so no call ever uses the ABI GCC warns about.
#pragma GCC diagnostic ignored "-Wpsabi"

#define TUCKER_INLINE inline __attribute__((always_inline))

namespace tucker_ops::cpu {

template <typename T, int Bytes>
struct Vec;
#define TUCKER_VEC(T, B)                              \
  template <>                                         \
  struct Vec<T, B> {                                  \
    typedef T type __attribute__((vector_size(B)));   \
  };
TUCKER_VEC(float, 16)
TUCKER_VEC(float, 32)
TUCKER_VEC(float, 64)
TUCKER_VEC(double, 16)
TUCKER_VEC(double, 32)
TUCKER_VEC(double, 64)
#undef TUCKER_VEC

template <typename V, typename T>
TUCKER_INLINE V load(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
TUCKER_INLINE void store(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// A non-temporal (streaming) store: the line goes to memory without being
// read first or kept in cache. p must be aligned to sizeof(V). Inline
// assembly rather than intrinsics: the helper is inlined into each ISA's
// wrapper, and the operand constraint picks that ISA's register width (SSE2's
// movnt for the 16-byte baseline vectors, VEX/EVEX vmovnt for wider ones).
template <typename V, typename T>
TUCKER_INLINE void store_streaming(T* p, const V& v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8);
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (sizeof(V) == 16) {
    if constexpr (sizeof(T) == 4)
      asm("movntps %1, %0" : "=m"(*reinterpret_cast<V*>(p)) : "x"(v));
    else
      asm("movntpd %1, %0" : "=m"(*reinterpret_cast<V*>(p)) : "x"(v));
  } else {
    if constexpr (sizeof(T) == 4)
      asm("vmovntps %1, %0" : "=m"(*reinterpret_cast<V*>(p)) : "v"(v));
    else
      asm("vmovntpd %1, %0" : "=m"(*reinterpret_cast<V*>(p)) : "v"(v));
  }
#else
  store(p, v);
#endif
}

// Streaming stores are weakly ordered: this orders them before every later
// store (the thread's "done" signal to the others included).
TUCKER_INLINE void streaming_fence() {
#if defined(__x86_64__) && defined(__GNUC__)
  asm volatile("sfence" ::: "memory");
#endif
}

// The instruction set the hand kernels run with: the best the CPU has, capped
// by TUCKER_OPS_ISA = auto | avx512 | avx2 | baseline (read once, at load).
enum class Isa { kBaseline, kAvx2, kAvx512 };
Isa kernel_isa();

#if defined(__x86_64__) && defined(__GNUC__)
#define TUCKER_HAVE_X86_VARIANTS 1
#define TUCKER_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TUCKER_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,fma")))
// Returns NAME_<isa><T>(args) for the instruction set picked at load time.
#define TUCKER_CALL_ISA(NAME, ...)                                       \
  switch (::tucker_ops::cpu::kernel_isa()) {                             \
    case ::tucker_ops::cpu::Isa::kAvx512: return NAME##_avx512<T>(__VA_ARGS__); \
    case ::tucker_ops::cpu::Isa::kAvx2: return NAME##_avx2<T>(__VA_ARGS__);     \
    default: return NAME##_baseline<T>(__VA_ARGS__);                    \
  }
// Expands VARIANT(name, target attribute, vector bytes) once per ISA: the
// variants TUCKER_CALL_ISA picks from.
#define TUCKER_FOR_EACH_ISA(VARIANT)     \
  VARIANT(baseline, , 16)                \
  VARIANT(avx2, TUCKER_TARGET_AVX2, 32)  \
  VARIANT(avx512, TUCKER_TARGET_AVX512, 64)
#else
#define TUCKER_CALL_ISA(NAME, ...) return NAME##_baseline<T>(__VA_ARGS__);
#define TUCKER_FOR_EACH_ISA(VARIANT) VARIANT(baseline, , 16)
#endif

}  // namespace tucker_ops::cpu
