// CPU kernels of the fused cross-entropy op: one reduction pass and one gradient pass per row,
// rows split across threads with at::parallel_for, per-sample recording done serially in row
// order afterwards so that scores are bit-reproducible whatever the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "ce_call.h"
#include "ce_math.h"
#include "ce_register.h"
#include "cpu/fast_exp.h"

namespace gdc {
namespace {

constexpr int64_t kChunk = 512;

// Stats of one float chunk, merged into st. The max pass also decides the argmax test of the
// row's target: beat |= some logit before the target (x[0..before)) is >= zy, or one from it on
// is > zy, so the target is the argmax with torch's rule (the first index among equal maxima)
// iff no chunk sets beat. zy = NaN leaves beat alone (float64 logits compare in float64).
GDC_CLONES void chunk_stats(const float* x, int64_t n, const float* w, bool want_wz, float zy, int64_t before,
                            RowStats& st, int& beat) {
  // `omp simd reduction` lets the compiler reorder these float sums into vector lanes (it
  // will not without -ffast-math); the order change is far below float32 accumulation noise.
  float cm = -INFINITY;
  int has_nan = 0, b = 0;
#pragma omp simd reduction(max : cm) reduction(| : has_nan, b)
  for (int64_t j = 0; j < before; ++j) {
    cm = x[j] > cm ? x[j] : cm;
    has_nan |= (x[j] != x[j]);
    b |= (x[j] >= zy);
  }
#pragma omp simd reduction(max : cm) reduction(| : has_nan, b)
  for (int64_t j = before; j < n; ++j) {
    cm = x[j] > cm ? x[j] : cm;
    has_nan |= (x[j] != x[j]);
    b |= (x[j] > zy);
  }
  beat |= b;
  if (has_nan) cm = NAN;
  float s = 0.f, s2 = 0.f, wz = 0.f;
  if (cm == -INFINITY) {
    // Every logit is -inf: contributes nothing.
  } else {
#pragma omp simd reduction(+ : s, s2)
    for (int64_t j = 0; j < n; ++j) {
      const float e = fast_exp(x[j] - cm);
      s += e;
      s2 += e * e;
    }
  }
  if (want_wz) {
    if (w) {
#pragma omp simd reduction(+ : wz)
      for (int64_t j = 0; j < n; ++j) wz += w[j] * x[j];
    } else {
#pragma omp simd reduction(+ : wz)
      for (int64_t j = 0; j < n; ++j) wz += x[j];
    }
  }
  st = row_stats_merge(st, RowStats{cm, s, s2, wz});
}

// g[j] = c (p[j] a - b w[j]),  p[j] = exp(x[j] - lse).
GDC_CLONES void chunk_grad(const float* x, int64_t n, float lse, float a, float b, const float* w,
                           float c, float* g) {
  if (w) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] = c * (fast_exp(x[j] - lse) * a - b * w[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] = c * (fast_exp(x[j] - lse) * a - b);
  }
}

template <typename T>
inline const float* as_float(const T* src, int64_t n, float* buf) {
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(src[j]);
  return buf;
}
inline const float* as_float(const float* src, int64_t, float*) { return src; }

// The argmax test of chunk_stats in T itself. Only float64 needs it: rounding to float32 could
// make two distinct logits equal; bfloat16 and float16 convert to float32 exactly and in order.
template <typename T>
inline void beat_in(const T* z, int64_t n, T zy, int64_t before, int& beat) {
  int b = 0;
  for (int64_t j = 0; j < before; ++j) b |= (z[j] >= zy);
  for (int64_t j = before; j < n; ++j) b |= (z[j] > zy);
  beat |= b;
}

template <typename T>
void ce_rows(const CeParams& A) {
  const T* logits = static_cast<const T*>(A.logits);
  T* grad = static_cast<T*>(A.grad);
  const int64_t V = A.V;
  const float wsum = A.wsum ? *A.wsum : static_cast<float>(V);
  const float gscale = A.grad_scale[0];
  const bool want_wz = A.smoothing > 0.f;
  // float, bfloat16, float16: the argmax test runs on the float32 values inside chunk_stats
  constexpr bool exact_in_float = !std::is_same<T, double>::value;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, A.R, grain, [&](int64_t r0, int64_t r1) {
    float xbuf[kChunk];
    float gbuf[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const T* z = logits + r * V;
      T* g = grad ? grad + r * V : nullptr;
      const int64_t y = A.target[r];
      if (y == A.ignore_index) {
        A.loss[r] = 0.f;
        A.nll[r] = 0.f;
        A.energy[r] = 0.f;
        A.correct[r] = 0.f;
        if (g) std::fill(g, g + V, T(0));
        continue;
      }
      const T zy = z[y];
      const float zy_cmp = exact_in_float ? static_cast<float>(zy) : NAN;
      RowStats st = row_stats_init();
      int beat = 0;
      for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
        const int64_t n = std::min(kChunk, V - j0);
        const int64_t before = std::min(std::max<int64_t>(y - j0, 0), n);
        if (!exact_in_float) beat_in(z + j0, n, zy, before, beat);
        chunk_stats(as_float(z + j0, n, xbuf), n, A.cw ? A.cw + j0 : nullptr, want_wz, zy_cmp, before, st, beat);
      }
      const float wy = A.cw ? A.cw[y] : 1.f;
      RowResult res = row_finish(st, static_cast<float>(zy), wy, wsum, V, A.smoothing);
      const float sw = (A.ids && A.sw) ? A.sw[A.ids[r]] : 1.f;
      A.loss[r] = sw * res.loss;
      A.nll[r] = res.nll;
      A.energy[r] = std::max(res.energy, 0.f);
      A.correct[r] = beat ? 0.f : 1.f;
      if (!g) continue;
      const float c = sw * gscale;
      for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
        const int64_t n = std::min(kChunk, V - j0);
        const float* x = as_float(z + j0, n, xbuf);
        float* go = std::is_same<T, float>::value ? reinterpret_cast<float*>(g + j0) : gbuf;
        chunk_grad(x, n, res.lse, res.a, res.b, A.cw ? A.cw + j0 : nullptr, c, go);
        if (y >= j0 && y < j0 + n) go[y - j0] -= c * res.cy;
        if (!std::is_same<T, float>::value) {
          for (int64_t j = 0; j < n; ++j) g[j0 + j] = static_cast<T>(gbuf[j]);
        }
      }
    }
  });
}

// grad *= grad_output (a scalar, or one value per row); skipped when the scalar is exactly 1.
void scale_grad_cpu(at::Tensor& grad, const at::Tensor& grad_output) {
  if (grad.numel() == 0) return;
  check_scale_grad_inputs(grad, grad_output);
  if (grad_output.numel() == 1) {
    const double g = grad_output.to(at::kDouble).item<double>();
    if (g == 1.0) return;
    grad.mul_(g);
    return;
  }
  grad.mul_(grad_output.to(grad.scalar_type()).unsqueeze(1));
}

struct Cpu {
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
  static void rows(const CeParams& P) { ce_rows_cpu(P); }
  static void record(const CeParams& P) { ce_record_cpu(P); }
};

}  // namespace

void ce_rows_cpu(const CeParams& P) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, P.dtype, "gdc_ce_cpu", [&] { ce_rows<scalar_t>(P); });
}

// Adds each row's source values (NLL, a token count, energy: P.acc_src) into the per-sample epoch
// accumulators acc[N, P.acc_cols] in row order, after rejecting non-finite losses so that a bad
// batch leaves the state unchanged.
void ce_record_cpu(const CeParams& P) {
  for (int64_t r = 0; r < P.R; ++r) {
    if (P.target[r] == P.ignore_index) continue;
    TORCH_CHECK_VALUE(std::isfinite(P.nll[r]), "gdc.cross_entropy: input (logits) row ", r,
                      " gives a non-finite loss (", P.nll[r], "): NaN or inf logits cannot be recorded; "
                      "the CartoState was left unchanged");
  }
  for (int64_t r = 0; r < P.R; ++r) {
    if (P.target[r] == P.ignore_index) continue;
    double* row = P.acc + P.ids[r] * P.acc_cols;
    for (int32_t c = 0; c < P.acc_cols; ++c) row[c] += ce_source_value(P, P.acc_src[c], r);
  }
}

TORCH_LIBRARY_IMPL(gdc, CPU, m) {
  register_ce_ops<Cpu>(m);
  m.impl("scale_grad_", &scale_grad_cpu);
}

}  // namespace gdc
