// A branch-free expf that GCC vectorises (with -fno-trapping-math, set in CMakeLists.txt),
// compiled per instruction set.
// Relative error ~2e-7 (degree-6 polynomial on [-0.5, 0.5] after range reduction), which is
// below float32 accumulation noise; torch's Sleef-based exp is not reachable from an extension.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GDC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GDC_CLONES
#endif

namespace gdc {

static inline float fast_exp(float x) {
  // NaN must stay NaN: (x < lo) is false for NaN, so it is not clamped away.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f;  // log2(e)
  // Round to nearest with the 1.5 * 2^23 trick: the integer lands in tm's low mantissa bits,
  // so neither roundps nor a float->int conversion is needed and the loop vectorises.
  const float tm = t + 12582912.0f;
  const float n = tm - 12582912.0f;
  const float f = t - n;                     // in [-0.5, 0.5]
  // 2^f
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t ni;
  std::memcpy(&ni, &tm, sizeof(float));
  const int32_t bits = (ni - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

}  // namespace gdc
