// When the CPU autograd kernels keep the chain's intermediates for the
// backward (ops.cpp: *_with_intermediates) instead of letting it recompute them.
//
// Keeping them writes the projection and the core output once in the forward
// (the tensors a Sequential chain keeps) and spares the backward the GEMMs
// that recompute them: 1.4x less backward work on a large-rank conv.
// Recomputing keeps the activation memory of a training step at the op's
// input and output, and wins where the kept forward is slower than the plain
// one (a linear layer on a few rows). tucker_ops.keep_intermediates(True /
// False) in Python, else TUCKER_OPS_KEEP_INTERMEDIATES=1 / 0, keeps them
// wherever the op has them / never (the memory-lean choice); with neither,
// the rules below decide per call.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace tucker_ops::cpu {

enum class KeepIntermediates { kAuto, kAlways, kNever };

// The environment's choice, read on every call (a getenv), so tests and users
// may switch it at run time.
inline KeepIntermediates keep_intermediates_from_env() {
  const char* v = std::getenv("TUCKER_OPS_KEEP_INTERMEDIATES");
  if (v && std::strcmp(v, "1") == 0) return KeepIntermediates::kAlways;
  if (v && std::strcmp(v, "0") == 0) return KeepIntermediates::kNever;
  return KeepIntermediates::kAuto;
}

// The Python setting if one is active (intermediates.cpp), else the environment's.
KeepIntermediates keep_intermediates_mode();

// The automatic choice for a linear call with first or last on `rows` rows
// (defined next to its kernels). Convs keep whenever they may.
bool linear_keeps_intermediates(int64_t rows);

}  // namespace tucker_ops::cpu
