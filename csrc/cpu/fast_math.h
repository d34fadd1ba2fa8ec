// Shared pieces of the CPU kernels: ISA clones, forced inlining, and a vectorizable exp.
#pragma once

#include <cstring>

// Hot entry points are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time,
// so one build runs on any x86-64 CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AXPO_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AXPO_CPU_CLONES
#endif
// Everything a clone calls must be inlined into it to be compiled for the clone's ISA
// (GCC does not inline across different -march otherwise).
#define AXPO_CPU_INLINE inline __attribute__((always_inline))

namespace axpo {
namespace cpu {

// exp(xc) = p(r) * 2^k for xc already clamped to about [-104, 89]: the Cephes polynomial
// (~1 ulp), branch-free so that loops calling it vectorize (a libm call would not).
AXPO_CPU_INLINE float exp_poly(float xc, int& k) {
  const float t = xc * 1.44269504088896341f;
  k = static_cast<int>(t + (t >= 0.f ? 0.5f : -0.5f));
  const float kf = static_cast<float>(k);
  float r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.f;
}

// 2^k as a float, for k in [-126, 127].
AXPO_CPU_INLINE float pow2i(int k) {
  const int bits = (k + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(float));
  return out;
}

// exp(x) for x in [-87, 88.37] (clamped to that range otherwise).
AXPO_CPU_INLINE float exp_clamped(float x) {
  const float xc = x > 88.3762626647949f ? 88.3762626647949f : (x < -87.0f ? -87.0f : x);
  int k;
  const float y = exp_poly(xc, k);
  return y * pow2i(k);
}

// exp(x) over the whole float range without a select on the result (loops around it stay
// vectorized): 2^k is applied in two halves, so overflow gives +inf and underflow a denormal
// or 0 by plain rounding; NaN propagates through the arithmetic.
AXPO_CPU_INLINE float exp_full(float x) {
  const float xc = x > 89.0f ? 89.0f : (x < -104.0f ? -104.0f : x);
  int k;
  const float y = exp_poly(xc, k);
  const int k1 = k / 2;
  return (y * pow2i(k1)) * pow2i(k - k1);
}

}  // namespace cpu
}  // namespace axpo
