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

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

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

// Attention of one query over `s_len` cached positions for one head:
// out = softmax(scale * q . k_i) . v_i. Rows of k and v are `k_row` /
// `v_row` floats apart with unit stride inside a row (the KV cache's
// layout, also when it is a view into a larger buffer). `scores` has room
// for `s_len` values.
inline void attend_one_query(
    const float* q,
    const float* k,
    int64_t k_row,
    const float* v,
    int64_t v_row,
    float* out,
    size_t s_len,
    size_t d,
    float scale,
    float* scores) {
  float max = -__builtin_inff();
  for (size_t i = 0; i < s_len; ++i) {
    const float* key = k + static_cast<int64_t>(i) * k_row;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (size_t j = 0; j < d; ++j) {
      dot += q[j] * key[j];
    }
    scores[i] = dot * scale;
    max = scores[i] > max ? scores[i] : max;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (size_t i = 0; i < s_len; ++i) {
    float e = exp_approx(scores[i] - max);
    scores[i] = e;
    sum += e;
  }
  for (size_t j = 0; j < d; ++j) {
    out[j] = 0.0f;
  }
  float inverse = 1.0f / sum;
  for (size_t i = 0; i < s_len; ++i) {
    const float* value = v + static_cast<int64_t>(i) * v_row;
    float p = scores[i] * inverse;
#pragma omp simd
    for (size_t j = 0; j < d; ++j) {
      out[j] += p * value[j];
    }
  }
}

// Matrix-vector products for a few rows (token-by-token decoding): the
// weight is [n, k] row-major, the input [m, k], the output [m, n]; each call
// computes the output columns [n0, n1) so that threads can share a product.

constexpr size_t kMaxMatvecRows = 4;

// y[r, j] = sum_i w[j, i] x[r, i] for j in [n0, n1), r < m (m <= 4).
inline void matvec_f32(
    const float* w,
    const float* x,
    float* y,
    size_t m,
    size_t k,
    size_t n,
    size_t n0,
    size_t n1) {
  for (size_t j = n0; j < n1; ++j) {
    const float* row = w + j * k;
    for (size_t r = 0; r < m; ++r) {
      const float* xr = x + r * k;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (size_t i = 0; i < k; ++i) {
        acc += row[i] * xr[i];
      }
      y[r * n + j] = acc;
    }
  }
}

// The same for an affine-quantized weight in MLX's layout: `bits` (4 or 8)
// per value packed little-end first into uint32 words, one scale and bias
// per `group` consecutive inputs ([n, k / group] float32 each), the weight
// being scale * q + bias. `xsums` holds each input row's sum over each group
// ([m, k / group]), so the bias term costs one multiply per group. The
// number of input rows M is a template parameter so that the accumulators
// stay in registers (with a run-time count they were spilled: 2x slower).
template <size_t M>
inline void matvec_quantized_rows(
    const uint32_t* w,
    const float* scales,
    const float* biases,
    const float* x,
    const float* xsums,
    float* y,
    size_t k,
    size_t n,
    int bits,
    int group,
    size_t n0,
    size_t n1) {
  constexpr size_t m = M;
  const size_t per_word = 32 / bits;
  const size_t words_per_row = k / per_word;
  const size_t groups = k / group;
  const size_t words_per_group = group / per_word;
  for (size_t j = n0; j < n1; ++j) {
    const uint32_t* row = w + j * words_per_row;
    const float* row_scales = scales + j * groups;
    const float* row_biases = biases + j * groups;
#if defined(__AVX2__) && defined(__FMA__)
    // Per input row: sum over groups of scale * (q . x), kept as a vector
    // (one horizontal sum per output), two independent partial dot
    // products per group so that the FMA chains overlap.
    __m256 total[M];
    for (size_t r = 0; r < m; ++r) {
      total[r] = _mm256_setzero_ps();
    }
    const __m256i shifts4 = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i low4 = _mm256_set1_epi32(15);
    for (size_t g = 0; g < groups; ++g) {
      const uint32_t* words = row + g * words_per_group;
      const float* xg = x + g * group;
      __m256 even[M];
      __m256 odd[M];
      for (size_t r = 0; r < m; ++r) {
        even[r] = _mm256_setzero_ps();
        odd[r] = _mm256_setzero_ps();
      }
      // Two vectors of 8 weights at a time, from 2 words of 4-bit values
      // or 4 words of 8-bit ones (groups hold a multiple of 16 values).
      auto accumulate = [&](auto unpack, size_t words_per_step) {
        for (size_t v = 0; v < words_per_group; v += words_per_step) {
          __m256 q0;
          __m256 q1;
          unpack(words + v, q0, q1);
          for (size_t r = 0; r < m; ++r) {
            const float* xr = xg + r * k + v * per_word;
            even[r] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xr), even[r]);
            odd[r] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xr + 8), odd[r]);
          }
        }
      };
      if (bits == 4) {
        accumulate(
            [&](const uint32_t* at, __m256& q0, __m256& q1) {
              q0 = _mm256_cvtepi32_ps(_mm256_and_si256(
                  _mm256_srlv_epi32(_mm256_set1_epi32(at[0]), shifts4), low4));
              q1 = _mm256_cvtepi32_ps(_mm256_and_si256(
                  _mm256_srlv_epi32(_mm256_set1_epi32(at[1]), shifts4), low4));
            },
            2);
      } else {
        accumulate(
            [](const uint32_t* at, __m256& q0, __m256& q1) {
              q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                  _mm_loadl_epi64(reinterpret_cast<const __m128i*>(at))));
              q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                  _mm_loadl_epi64(reinterpret_cast<const __m128i*>(at + 2))));
            },
            4);
      }
      __m256 scale = _mm256_set1_ps(row_scales[g]);
      for (size_t r = 0; r < m; ++r) {
        total[r] = _mm256_fmadd_ps(_mm256_add_ps(even[r], odd[r]), scale, total[r]);
      }
    }
    for (size_t r = 0; r < m; ++r) {
      __m128 half = _mm_add_ps(
          _mm256_castps256_ps128(total[r]), _mm256_extractf128_ps(total[r], 1));
      half = _mm_add_ps(half, _mm_movehl_ps(half, half));
      half = _mm_add_ss(half, _mm_movehdup_ps(half));
      float bias_term = 0.0f;
      for (size_t g = 0; g < groups; ++g) {
        bias_term += row_biases[g] * xsums[r * groups + g];
      }
      y[r * n + j] = _mm_cvtss_f32(half) + bias_term;
    }
#else
    const uint32_t mask = (1u << bits) - 1;
    float total[M] = {};
    for (size_t g = 0; g < groups; ++g) {
      const uint32_t* words = row + g * words_per_group;
      float dot[M] = {};
      for (size_t v = 0; v < words_per_group; ++v) {
        uint32_t word = words[v];
        size_t at = g * group + v * per_word;
        for (size_t e = 0; e < per_word; ++e) {
          float q = static_cast<float>((word >> (bits * e)) & mask);
          for (size_t r = 0; r < m; ++r) {
            dot[r] += q * x[r * k + at + e];
          }
        }
      }
      for (size_t r = 0; r < m; ++r) {
        total[r] += row_scales[g] * dot[r] + row_biases[g] * xsums[r * groups + g];
      }
    }
    for (size_t r = 0; r < m; ++r) {
      y[r * n + j] = total[r];
    }
#endif
  }
}

// Dispatches [`matvec_quantized_rows`] on the number of input rows (1-4).
inline void matvec_quantized(
    const uint32_t* w,
    const float* scales,
    const float* biases,
    const float* x,
    const float* xsums,
    float* y,
    size_t m,
    size_t k,
    size_t n,
    int bits,
    int group,
    size_t n0,
    size_t n1) {
  switch (m) {
    case 1:
      return matvec_quantized_rows<1>(
          w, scales, biases, x, xsums, y, k, n, bits, group, n0, n1);
    case 2:
      return matvec_quantized_rows<2>(
          w, scales, biases, x, xsums, y, k, n, bits, group, n0, n1);
    case 3:
      return matvec_quantized_rows<3>(
          w, scales, biases, x, xsums, y, k, n, bits, group, n0, n1);
    default:
      return matvec_quantized_rows<4>(
          w, scales, biases, x, xsums, y, k, n, bits, group, n0, n1);
  }
}

} // namespace zoo::ZOO_ISA
