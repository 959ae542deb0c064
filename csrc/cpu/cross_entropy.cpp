// CPU kernels of the fused cross-entropy op: one reduction pass and one gradient pass per row,
// rows split across threads with at::parallel_for, per-sample recording done serially in row
// order afterwards so that scores are bit-reproducible whatever the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ce_math.h"
#include "checks.h"
#include "cpu/fast_exp.h"

namespace gdc {
namespace {

constexpr int64_t kChunk = 512;

// Stats of one float chunk, merged into st.
GDC_CLONES void chunk_stats(const float* x, int64_t n, const float* w, bool want_wz, RowStats& st) {
  // `omp simd reduction` lets the compiler reorder these float sums into vector lanes (it
  // will not without -ffast-math); the order change is far below float32 accumulation noise.
  float cm = -INFINITY;
  int has_nan = 0;
#pragma omp simd reduction(max : cm) reduction(| : has_nan)
  for (int64_t j = 0; j < n; ++j) {
    cm = x[j] > cm ? x[j] : cm;
    has_nan |= (x[j] != x[j]);
  }
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

struct RowArgs {
  int64_t R, V, ignore_index;
  float smoothing;
  const int64_t* target;
  const float* cw;          // class weights [V] or null
  float wsum;               // sum of class weights (V without)
  const int64_t* ids;       // per-row sample ids [R] or null
  const float* sw;          // per-sample loss weights [N] or null
  const float* grad_scale;  // scalar
  float* loss;              // [R] training loss (sample weight applied)
  float* nll;               // [R] recorded NLL (NaN for ignored rows)
  float* energy;            // [R]
};

template <typename T>
void ce_rows(const T* logits, T* grad, const RowArgs& A) {
  const int64_t V = A.V;
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
        if (g) std::fill(g, g + V, T(0));
        continue;
      }
      const bool want_wz = A.smoothing > 0.f;
      RowStats st = row_stats_init();
      for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
        const int64_t n = std::min(kChunk, V - j0);
        chunk_stats(as_float(z + j0, n, xbuf), n, A.cw ? A.cw + j0 : nullptr, want_wz, st);
      }
      const float wy = A.cw ? A.cw[y] : 1.f;
      RowResult res = row_finish(st, static_cast<float>(z[y]), wy, A.wsum, V, A.smoothing);
      const float sw = (A.ids && A.sw) ? A.sw[A.ids[r]] : 1.f;
      A.loss[r] = sw * res.loss;
      A.nll[r] = res.nll;
      A.energy[r] = std::max(res.energy, 0.f);
      if (!g) continue;
      const float c = sw * A.grad_scale[0];
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

// Folds per-row NLL / energy into the per-sample epoch accumulators acc[N, 3]
// (loss sum, token count, energy sum), in row order.
void record_rows(const RowArgs& A, at::Tensor& acc) {
  double* a = acc.data_ptr<double>();
  for (int64_t r = 0; r < A.R; ++r) {
    if (A.target[r] == A.ignore_index) continue;
    double* row = a + A.ids[r] * 3;
    row[0] += static_cast<double>(A.nll[r]);
    row[1] += 1.0;
    row[2] += static_cast<double>(A.energy[r]);
  }
}

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& logits, at::Tensor* grad_out,
                                       const at::Tensor& target, const c10::optional<at::Tensor>& class_weight,
                                       const at::Tensor& sample_ids, const at::Tensor& sample_weight,
                                       const at::Tensor& grad_scale, at::Tensor& acc, int64_t ignore_index,
                                       double label_smoothing) {
  const CheckedInputs ci = check_ce_inputs(logits, target, class_weight, sample_ids, sample_weight,
                                           grad_scale, acc, ignore_index, label_smoothing);
  const int64_t R = ci.R, V = ci.V;
  // Targets and ids are checked before any write, so in-place mode never half-overwrites
  // the logits of a batch that is then rejected.
  const int64_t* tgt = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t y = tgt[r];
    TORCH_CHECK_INDEX(y == ignore_index || (y >= 0 && y < V), "gdc.cross_entropy: target[", r, "] = ", y,
                      " is out of bounds: expected a class index in [0, ", V, ") or ignore_index = ",
                      ignore_index);
  }
  const int64_t* ids = ci.has_ids ? sample_ids.data_ptr<int64_t>() : nullptr;
  if (ids) check_ids_in_range(ids, tgt, ignore_index, R, ci.N, "sample_ids");

  auto fopts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({R}, fopts);
  at::Tensor nll = at::empty({R}, fopts);
  at::Tensor energy = at::empty({R}, fopts);
  at::Tensor cw;
  float wsum = static_cast<float>(V);
  if (class_weight.has_value() && class_weight->defined()) {
    cw = class_weight->to(at::kFloat).contiguous();
    wsum = cw.sum().item<float>();  // CPU tensor: no device synchronisation
  }
  at::Tensor gs = grad_scale.to(at::kFloat).contiguous();
  at::Tensor sw = ci.has_sw ? sample_weight.to(at::kFloat).contiguous() : at::Tensor();

  RowArgs A{R, V, ignore_index, static_cast<float>(label_smoothing), tgt,
            cw.defined() ? cw.data_ptr<float>() : nullptr, wsum, ids,
            sw.defined() ? sw.data_ptr<float>() : nullptr, gs.data_ptr<float>(),
            loss.data_ptr<float>(), nll.data_ptr<float>(), energy.data_ptr<float>()};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gdc_ce_cpu", [&] {
    ce_rows<scalar_t>(logits.data_ptr<scalar_t>(), grad_out ? grad_out->data_ptr<scalar_t>() : nullptr, A);
  });

  if (ci.recording) {
    // Reject non-finite losses before touching the state, so a bad batch leaves it unchanged.
    const float* n = A.nll;
    for (int64_t r = 0; r < R; ++r) {
      if (tgt[r] == ignore_index) continue;
      TORCH_CHECK_VALUE(std::isfinite(n[r]), "gdc.cross_entropy: input (logits) row ", r,
                        " gives a non-finite loss (", n[r], "): NaN or inf logits cannot be recorded; "
                        "the CartoState was left unchanged");
    }
    record_rows(A, acc);
  }
  return {loss, nll};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                              const c10::optional<at::Tensor>& class_weight,
                                              const at::Tensor& sample_ids, const at::Tensor& sample_weight,
                                              const at::Tensor& grad_scale, at::Tensor& acc,
                                              int64_t ignore_index, double label_smoothing, bool compute_grad) {
  at::Tensor grad = compute_grad ? at::empty_like(logits, at::MemoryFormat::Contiguous) : at::empty({0}, logits.options());
  auto out = run(logits, compute_grad ? &grad : nullptr, target, class_weight, sample_ids, sample_weight,
                 grad_scale, acc, ignore_index, label_smoothing);
  return {std::get<0>(out), std::get<1>(out), grad};
}

std::tuple<at::Tensor, at::Tensor> ce_fwd_inplace_cpu(at::Tensor& logits, const at::Tensor& target,
                              const c10::optional<at::Tensor>& class_weight, const at::Tensor& sample_ids,
                              const at::Tensor& sample_weight, const at::Tensor& grad_scale, at::Tensor& acc,
                              int64_t ignore_index, double label_smoothing) {
  TORCH_CHECK_VALUE(logits.is_contiguous(), "gdc.cross_entropy_inplace: input (logits) must be contiguous");
  auto out = run(logits, &logits, target, class_weight, sample_ids, sample_weight, grad_scale, acc,
                 ignore_index, label_smoothing);
  return out;
}

// grad *= grad_output (a scalar, or one value per row); skipped when the scalar is exactly 1.
void scale_grad_cpu(at::Tensor& grad, const at::Tensor& grad_output) {
  if (grad.numel() == 0) return;
  if (grad_output.numel() == 1) {
    const double g = grad_output.to(at::kDouble).item<double>();
    if (g == 1.0) return;
    grad.mul_(g);
    return;
  }
  TORCH_CHECK_VALUE(grad_output.dim() == 1 && grad_output.size(0) == grad.size(0),
                    "gdc.scale_grad: grad_output must be a scalar or have one value per row (", grad.size(0), ")");
  grad.mul_(grad_output.to(grad.scalar_type()).unsqueeze(1));
}

}  // namespace

TORCH_LIBRARY_IMPL(gdc, CPU, m) {
  m.impl("cross_entropy_fwd", &ce_fwd_cpu);
  m.impl("cross_entropy_fwd_inplace", &ce_fwd_inplace_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
}

}  // namespace gdc
