// Vector helpers of the CPU kernels: 16-lane float vectors in GCC/Clang vector extensions
// (one AVX-512 register, two AVX2 ones), a vector exp for softmax, sums and maxima across
// lanes, bf16 rounding and row conversion. Included by cpu_attention.cpp only.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline v16 load(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof(x)); }
inline v16 splat(float x) { return v16{} + x; }

inline float hsum(v16 x) {
  v16 a = x + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  a = a + __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  a = a + __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  a = a + __builtin_shufflevector(a, a, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return a[0];
}

// e^x for x <= 0 (x = -inf gives 0): 2^(x log2 e) split into an integer power, put into
// the exponent bits, and a degree-7 Taylor series of 2^f on |f| <= 0.5 (rel. error ~1e-8).
inline v16 exp_nonpos(v16 x) {
  const v16 floor_x = splat(-87.0f);
  v16i dead = x < floor_x;
  x = dead ? floor_x : x;
  v16 t = x * 1.44269504088896341f;
  v16 n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  v16 f = t - n;
  v16 p = splat(1.525273380405984e-5f);
  p = p * f + 1.540353039338161e-4f;
  p = p * f + 1.333355814642844e-3f;
  p = p * f + 9.618129107628477e-3f;
  p = p * f + 5.550410866482158e-2f;
  p = p * f + 2.402265069591007e-1f;
  p = p * f + 6.931471805599453e-1f;
  p = p * f + 1.0f;
  v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  v16 r = p * scale;
  return dead ? splat(0.0f) : r;
}

// x rounded to the nearest bfloat16 (ties to even), kept as fp32.
inline v16 round_bf16(v16 x) {
  v16i b;
  std::memcpy(&b, &x, sizeof(b));
  b = (b + 0x7FFF + ((b >> 16) & 1)) & static_cast<int32_t>(0xFFFF0000u);
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

// D values of one K or V row as fp32.
inline void row_to_float(const float* src, float* dst, int64_t d) { std::memcpy(dst, src, d * 4); }
inline void row_to_float(const at::BFloat16* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; i += 16) {
    v16h h;
    std::memcpy(&h, src + i, sizeof(h));
    v16i w = __builtin_convertvector(h, v16i) << 16;
    std::memcpy(dst + i, &w, sizeof(w));
  }
}
inline void row_to_float(const at::Half* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
}

// Lane j of the result is the sum of p[j]'s lanes: four rounds of pairwise shuffles and
// adds, about three operations per key where a sum per vector takes eight.
inline v16 reduce16(const v16* p) {
  v16 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)
    x[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10,
                                   11, 24, 25, 26, 27) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13,
                                   14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    z[i] = __builtin_shufflevector(y[2 * i], y[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24,
                                   25, 12, 13, 28, 29) +
           __builtin_shufflevector(y[2 * i], y[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11,
                                   26, 27, 14, 15, 30, 31);
  v16 w = __builtin_shufflevector(z[0], z[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12,
                                  28, 14, 30) +
          __builtin_shufflevector(z[0], z[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13,
                                  29, 15, 31);
  // The rounds leave key j in lane bitreverse4(j).
  return __builtin_shufflevector(w, w, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

inline float hmax(v16 x) {
  v16 a = x > __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
              ? x
              : __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6,
                                        7);
  float m = a[0];
  for (int i = 1; i < 8; ++i) m = a[i] > m ? a[i] : m;
  return m;
}

inline int32_t clip_pos(int64_t p) {
  return p > std::numeric_limits<int32_t>::max() ? std::numeric_limits<int32_t>::max()
                                                 : static_cast<int32_t>(p);
}

}  // namespace
