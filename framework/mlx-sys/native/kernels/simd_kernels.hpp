// The loops behind mlx-zoo's CPU primitives, written so that the compiler
// vectorises them (`#pragma omp simd` under -fopenmp-simd, branch-free
// bodies). This header is compiled twice: once for the baseline ISA and, on
// x86_64, once with AVX2 + FMA; `kernels.cpp` picks one at run time.
//
// ZOO_ISA names the namespace of this copy.

#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace zoo::ZOO_ISA {

// exp(x) to about one ulp for x in [-86.6, 88.7] (Cephes' expf polynomial on
// a range reduced by round(x / ln 2)); 0 below that range, +inf above, NaN
// for NaN. Branch-free, so a loop over it vectorises.
static inline float exp_approx(float x) {
  const float hi = 88.72283f;
  const float lo = -86.6f;
  float xc = x < hi ? x : hi;
  xc = xc > lo ? xc : lo;
  // round(xc / ln 2) with the 1.5 * 2^23 trick (default rounding mode).
  float t = xc * 1.44269504088896341f + 12582912.0f;
  float n = t - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^(n-1), then times 2: n reaches 128 at the top of the range.
  int32_t bits = (static_cast<int32_t>(n) + 126) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float result = p * scale * 2.0f;
  result = x < lo ? 0.0f : result;
  result = x > hi ? __builtin_inff() : result;
  return x == x ? result : x;
}

// softmax over each of `rows` contiguous rows of `n` values.
inline void softmax_rows(const float* in, float* out, size_t rows, size_t n) {
  for (size_t row = 0; row < rows; ++row) {
    const float* x = in + row * n;
    float* y = out + row * n;
    float max = -__builtin_inff();
#pragma omp simd reduction(max : max)
    for (size_t i = 0; i < n; ++i) {
      max = x[i] > max ? x[i] : max;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (size_t i = 0; i < n; ++i) {
      float e = exp_approx(x[i] - max);
      y[i] = e;
      sum += e;
    }
    float inverse = 1.0f / sum;
#pragma omp simd
    for (size_t i = 0; i < n; ++i) {
      y[i] *= inverse;
    }
  }
}

// The input's cotangent of softmax from its output `y` and the output's
// cotangent `g`: y * (g - sum(g * y)) per row.
inline void softmax_vjp_rows(
    const float* y,
    const float* g,
    float* out,
    size_t rows,
    size_t n) {
  for (size_t row = 0; row < rows; ++row) {
    const float* yr = y + row * n;
    const float* gr = g + row * n;
    float* o = out + row * n;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (size_t i = 0; i < n; ++i) {
      dot += yr[i] * gr[i];
    }
#pragma omp simd
    for (size_t i = 0; i < n; ++i) {
      o[i] = yr[i] * (gr[i] - dot);
    }
  }
}

static inline float sigmoid(float x) {
  return 1.0f / (1.0f + exp_approx(-x));
}

// x * sigmoid(x) over `n` values.
inline void silu(const float* in, float* out, size_t n) {
#pragma omp simd
  for (size_t i = 0; i < n; ++i) {
    out[i] = in[i] * sigmoid(in[i]);
  }
}

// The input's cotangent of SiLU: g * s * (1 + x * (1 - s)), s = sigmoid(x).
inline void silu_vjp(const float* x, const float* g, float* out, size_t n) {
#pragma omp simd
  for (size_t i = 0; i < n; ++i) {
    float s = sigmoid(x[i]);
    out[i] = g[i] * s * (1.0f + x[i] * (1.0f - s));
  }
}

} // namespace zoo::ZOO_ISA
