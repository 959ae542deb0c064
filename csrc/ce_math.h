// Per-row cross-entropy math shared by the CPU and CUDA kernels.
//
// A row holds logits z[0..V) and a target y. With class weights w (all 1 when absent),
// label smoothing e and W = sum_c w[c], the training loss of the row is
//   loss = (1-e) w[y] (lse - z[y]) + (e/V) (lse W - sum_c w[c] z[c])
// and its gradient, with p = softmax(z),
//   dloss/dz[j] = p[j] a - (e/V) w[j] - (1-e) w[y] [j == y],   a = (1-e) w[y] + (e/V) W.
// The recorded loss is always the plain NLL lse - z[y]; the recorded logit-gradient energy is
//   ||p - onehot(y)||^2 = sum_j p[j]^2 - 2 p[y] + 1 = s2 / s^2 - 2 p[y] + 1
// where s = sum exp(z - m) and s2 = sum exp(2 (z - m)) come from the same online pass.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GDC_HD __host__ __device__ __forceinline__
#else
#define GDC_HD inline
#endif

namespace gdc {

// Reductions of one row, merged chunk by chunk (online logsumexp).
struct RowStats {
  float m;      // running max
  float s;      // sum exp(z - m)
  float s2;     // sum exp(2 (z - m))
  float wz;     // sum w[c] z[c]   (only needed with label smoothing)
};

GDC_HD RowStats row_stats_init() { return RowStats{-INFINITY, 0.f, 0.f, 0.f}; }

// Merges the stats of another part of the row (b) into a.
GDC_HD RowStats row_stats_merge(RowStats a, RowStats b) {
  if (b.m == -INFINITY) { a.wz += b.wz; return a; }
  if (a.m == -INFINITY) { b.wz += a.wz; return b; }
  const float m = a.m > b.m ? a.m : b.m;
  const float fa = expf(a.m - m), fb = expf(b.m - m);
  RowStats r;
  r.m = m;
  r.s = a.s * fa + b.s * fb;
  r.s2 = a.s2 * fa * fa + b.s2 * fb * fb;
  r.wz = a.wz + b.wz;
  return r;
}

// Everything a row needs after its reduction pass.
struct RowResult {
  float lse;
  float nll;      // recorded loss: lse - z[y]
  float energy;   // recorded ||softmax - onehot||^2
  float loss;     // training loss before the sample weight
  float a;        // gradient coefficient of p[j]
  float b;        // gradient coefficient of w[j] (label smoothing)
  float cy;       // extra gradient at j == y
};

// zy: logit of the target; wy: class weight of the target (1 without weights);
// wsum: sum of class weights (V without weights).
GDC_HD RowResult row_finish(RowStats st, float zy, float wy, float wsum, int64_t V, float smoothing) {
  RowResult r;
  r.lse = st.m + logf(st.s);
  r.nll = r.lse - zy;
  const float py = expf(zy - r.lse);
  const float inv_s = 1.f / st.s;
  r.energy = st.s2 * inv_s * inv_s - 2.f * py + 1.f;
  const float eV = smoothing / static_cast<float>(V);
  r.loss = (1.f - smoothing) * wy * r.nll;
  if (smoothing > 0.f) r.loss += eV * (r.lse * wsum - st.wz);
  r.a = (1.f - smoothing) * wy + eV * wsum;
  r.b = eV;
  r.cy = (1.f - smoothing) * wy;
  return r;
}

}  // namespace gdc
