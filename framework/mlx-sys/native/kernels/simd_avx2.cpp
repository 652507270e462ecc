// The AVX2 + FMA copy of the kernel loops (built on x86_64 only, with
// -mavx2 -mfma; chosen at run time when the CPU has both).
#define ZOO_ISA avx2
#include "simd_kernels.hpp"
#include "simd_table.hpp"

namespace zoo {
KernelTable avx2_table() {
  return {"avx2+fma", avx2::softmax_rows, avx2::softmax_vjp_rows, avx2::silu,
          avx2::silu_vjp, avx2::attend_one_query,
          avx2::matvec_f32,
          avx2::matvec_quantized};
}
} // namespace zoo
