// The baseline-ISA copy of the kernel loops.
#define ZOO_ISA generic
#include "simd_kernels.hpp"
#include "simd_table.hpp"

namespace zoo {
KernelTable generic_table() {
  return {"generic", generic::softmax_rows, generic::softmax_vjp_rows,
          generic::silu, generic::silu_vjp, generic::attend_one_query,
          generic::matvec_f32,
          generic::matvec_quantized};
}
} // namespace zoo
