// Force-included into every mlx-c translation unit by mlx-sys's build script.
//
// It fills two gaps between mlx-c 0.7.0 and the toolchains of a Linux machine:
//  * mlx-c's C headers name `float16_t` / `bfloat16_t`, which its half.h only
//    defines on ARM. Elsewhere they are MLX's own 16-bit structs, which have
//    the same size and layout as the `u16` the Rust side passes.
//  * mlx-c's private/io.h calls `std::format`, which libstdc++ only ships from
//    GCC 13 on. For older compilers a minimal `{}`-only stand-in is provided.
#pragma once

#ifdef __cplusplus
#include <sstream>
#include <string>
#include <string_view>

#if !defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC) && !defined(__aarch64__)
#include "mlx/types/half_types.h"
using float16_t = mlx::core::float16_t;
using bfloat16_t = mlx::core::bfloat16_t;
// mlx-c only declares its 16-bit accessors when these are set.
#define HAS_FLOAT16
#define HAS_BFLOAT16
#endif

#if __has_include(<format>)
#include <format>
#endif

#if !defined(__cpp_lib_format)
namespace mlx_zoo_compat {
inline void format_into(std::ostringstream& out, std::string_view fmt) {
  out << fmt;
}

template <typename First, typename... Rest>
void format_into(
    std::ostringstream& out,
    std::string_view fmt,
    const First& first,
    const Rest&... rest) {
  auto slot = fmt.find("{}");
  if (slot == std::string_view::npos) {
    out << fmt;
    return;
  }
  out << fmt.substr(0, slot) << first;
  format_into(out, fmt.substr(slot + 2), rest...);
}
} // namespace mlx_zoo_compat

namespace std {
template <typename... Args>
std::string format(std::string_view fmt, const Args&... args) {
  std::ostringstream out;
  mlx_zoo_compat::format_into(out, fmt, args...);
  return out.str();
}
} // namespace std
#endif
#endif
