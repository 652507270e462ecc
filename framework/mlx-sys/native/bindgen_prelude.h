/* Parsed by bindgen before mlx-c's headers (see build/bindings.rs).
 *
 * mlx-c's half.h only defines float16_t / bfloat16_t on ARM. Everywhere
 * the bindings describe them the way upstream mlx-sys does on Apple silicon:
 * float16_t as clang's storage-only __fp16 (bindgen: a u16 newtype) and
 * bfloat16_t as a plain 16-bit integer. */
#include <stdint.h>
#if !defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC) && !defined(__aarch64__)
#define MLX_HALF_H
#define HAS_FLOAT16
#define HAS_BFLOAT16
typedef __fp16 float16_t;
typedef uint16_t bfloat16_t;
#endif
