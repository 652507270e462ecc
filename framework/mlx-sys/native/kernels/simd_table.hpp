// One ISA's set of kernel loops, as function pointers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace zoo {

struct KernelTable {
  const char* isa;
  void (*softmax_rows)(const float*, float*, size_t, size_t);
  void (*softmax_vjp_rows)(const float*, const float*, float*, size_t, size_t);
  void (*silu)(const float*, float*, size_t);
  void (*silu_vjp)(const float*, const float*, float*, size_t);
  void (*attend_one_query)(
      const float*, const float*, int64_t, const float*, int64_t, float*,
      size_t, size_t, float, float*);
  void (*matvec_f32)(
      const float*, const float*, float*, size_t, size_t, size_t, size_t,
      size_t);
  void (*matvec_quantized)(
      const uint32_t*, const float*, const float*, const float*, const float*,
      float*, size_t, size_t, size_t, int, int, size_t, size_t);
};

KernelTable generic_table();
#if defined(__x86_64__)
KernelTable avx2_table();
#endif

} // namespace zoo
