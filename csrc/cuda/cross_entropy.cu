// CUDA kernels of the fused cross-entropy op, with the semantics of csrc/cpu/cross_entropy.cpp.
//
// One block per row: an online logsumexp pass (float32, 16-byte vector loads after a scalar
// head that reaches alignment, scalar tail; it also tests whether the target is the argmax)
// reduced across the block with row_stats_merge (and __syncthreads_or), then
// row_finish (csrc/ce_math.h, shared with the CPU) and a gradient pass that may overwrite the
// logits. Everything is launched on the current stream with no host synchronisation, so a
// training step stays CUDA-graph capturable.
//
// Data errors (target out of range, sample id out of range, non-finite NLL while recording)
// cannot raise without a sync. Instead of a device assert (which kills the CUDA context), a bad
// row gets NaN loss, NaN NLL and a NaN gradient row, so the batch loss is visibly NaN, and a
// device flag makes the recording kernel skip the *whole batch*: as on the CPU, a rejected batch
// leaves the CartoState unchanged. (Unlike the CPU, the logits of an in-place call are already
// overwritten by then.)
//
// Recording into acc[N, P.acc_cols] (each column's per-row value: ce_source_value of its
// P.acc_src, csrc/ce_params.h) happens in a second kernel once every row's NLL is known:
//  - default: one thread per row, atomicAdd of doubles (fast; summation order varies run to run);
//  - torch.use_deterministic_algorithms(True): rows are stably sorted by sample id and one thread
//    per sample adds its rows in row order, which is exactly the CPU's order, so acc is
//    bit-reproducible (and bit-equal to the CPU given bit-equal per-row values).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "ce_call.h"
#include "ce_math.h"
#include "ce_params.h"
#include "ce_register.h"
#include "static_switch.h"

namespace gdc {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;
constexpr int64_t kMaxBlocks = 1 << 20;  // rows beyond this are covered by a grid-stride loop
constexpr int64_t kIgnoredKey = std::numeric_limits<int64_t>::max();

// Elements of T in one 16-byte vector.
template <typename T>
struct Vec {
  static constexpr int n = 16 / sizeof(T);
};

// Leading elements of a row before its first 16-byte boundary (the whole row if shorter).
template <typename T>
__device__ __forceinline__ int64_t head_len(const T* p, int64_t V) {
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15);
  const int64_t h = mis ? (16 - mis) / static_cast<int64_t>(sizeof(T)) : 0;
  return h < V ? h : V;
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&x)[Vec<T>::n]) {
  alignas(16) T buf[Vec<T>::n];
  *reinterpret_cast<uint4*>(buf) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < Vec<T>::n; ++i) x[i] = static_cast<float>(buf[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&x)[Vec<T>::n]) {
  alignas(16) T buf[Vec<T>::n];
#pragma unroll
  for (int i = 0; i < Vec<T>::n; ++i) buf[i] = static_cast<T>(x[i]);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(buf);
}

// Adds n logits (already float) to a thread's running stats: one rescale per chunk, so one
// exp per element. fmaxf drops NaN (fmaxf(-inf, NaN) = -inf), so NaN is tested on its own and
// makes m and s NaN, as the CPU's chunk_stats does; row_stats_merge and every later stats_add
// keep s NaN, so the row's loss is NaN whichever thread read the NaN first.
template <int n>
__device__ __forceinline__ void stats_add(RowStats& st, const float (&x)[n]) {
  float cm = st.m;
  bool has_nan = false;
#pragma unroll
  for (int i = 0; i < n; ++i) {
    cm = fmaxf(cm, x[i]);
    has_nan |= x[i] != x[i];
  }
  if (has_nan) {
    st.m = NAN;
    st.s = NAN;
    return;
  }
  if (cm == -INFINITY) return;  // every logit so far is -inf: contributes nothing
  const float f = __expf(st.m - cm);
  st.s *= f;
  st.s2 *= f * f;
  st.m = cm;
#pragma unroll
  for (int i = 0; i < n; ++i) {
    const float e = __expf(x[i] - cm);
    st.s += e;
    st.s2 += e * e;
  }
}

// Whether logit v at index j keeps the target y (logit zy) from being the argmax under torch's
// rule: the first index among equal maxima wins. Compared in Cmp<T>: float64 in float64 (rounding
// to float32 could tie two distinct logits); the other dtypes in float32, exact and in order.
template <typename T>
struct CmpOf {
  using type = float;
};
template <>
struct CmpOf<double> {
  using type = double;
};
template <typename T>
using Cmp = typename CmpOf<T>::type;

template <typename U>
__device__ __forceinline__ bool beats(U v, int64_t j, int64_t y, U zy) {
  return j < y ? v >= zy : v > zy;
}

// Butterfly reduction: every lane ends with the merge of all 32 lanes' stats. Lanes merge in
// different orders (and FMA contraction can round them differently), so their bits may differ
// in the last place; only lane 0's result is used, which keeps a launch deterministic.
__device__ __forceinline__ RowStats warp_merge(RowStats st) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    RowStats b;
    b.m = __shfl_xor_sync(0xffffffffu, st.m, o);
    b.s = __shfl_xor_sync(0xffffffffu, st.s, o);
    b.s2 = __shfl_xor_sync(0xffffffffu, st.s2, o);
    b.wz = __shfl_xor_sync(0xffffffffu, st.wz, o);
    st = row_stats_merge(st, b);
  }
  return st;
}

// Block-wide merge; every thread returns the row's total. blockDim.x is a multiple of 32.
__device__ __forceinline__ RowStats block_merge(RowStats st) {
  __shared__ RowStats part[kMaxThreads / kWarp];
  __shared__ RowStats total;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  st = warp_merge(st);
  if (lane == 0) part[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = warp_merge(lane < nwarps ? part[lane] : row_stats_init());
    if (lane == 0) total = st;
  }
  __syncthreads();
  return total;
}

// g[0..V) = v, with vector stores.
template <typename T>
__device__ __forceinline__ void fill_row(T* g, int64_t V, float v) {
  constexpr int n = Vec<T>::n;
  const int64_t head = head_len(g, V);
  const int64_t nvec = (V - head) / n;
  float x[n];
#pragma unroll
  for (int i = 0; i < n; ++i) x[i] = v;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) g[j] = static_cast<T>(v);
  for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) store_vec(g + head + k * n, x);
  for (int64_t j = head + nvec * n + threadIdx.x; j < V; j += blockDim.x) g[j] = static_cast<T>(v);
}

// One block per row (grid-stride over rows). The flags are constant per launch, so the hot loops
// carry no per-element branch on them: kHasCw (class weights), kSmooth (label smoothing > 0, the
// only case that needs sum_c w[c] z[c]), kRecord (flag rows that must not be recorded).
// grad_vec: logits and grad rows share their 16-byte alignment (vector stores for the gradient).
// __launch_bounds__: launched with up to kMaxThreads threads (threads_for), so the compiler must
// keep to 65536 / 512 = 128 registers per thread; without the bound a later change could make it
// use more, and a 512-thread launch would then fail with "too many resources requested for
// launch". (Today: 27-40 registers, no spills, 272 B shared memory; ptxas -v, sm_90.)
template <typename T, bool kHasCw, bool kSmooth, bool kRecord>
__global__ void __launch_bounds__(kMaxThreads) ce_rows_kernel(CeParams P, bool grad_vec) {
  constexpr int n = Vec<T>::n;
  const T* logits = static_cast<const T*>(P.logits);
  T* grad = static_cast<T*>(P.grad);
  const int64_t V = P.V;
  auto weight = [&](int64_t j) { return kHasCw ? P.cw[j] : 1.f; };
  for (int64_t r = blockIdx.x; r < P.R; r += gridDim.x) {
    const T* z = logits + r * V;
    T* g = grad ? grad + r * V : nullptr;
    const int64_t y = P.target[r];
    const bool ignored = y == P.ignore_index;
    bool bad = !ignored && (y < 0 || y >= V);
    if (!ignored && P.ids && P.N >= 0) {
      const int64_t id = P.ids[r];
      bad |= id < 0 || id >= P.N;
    }
    if (ignored || bad) {  // uniform across the block
      const float fill = bad ? NAN : 0.f;
      if (threadIdx.x == 0) {
        P.loss[r] = fill;
        P.nll[r] = fill;
        P.energy[r] = 0.f;
        P.correct[r] = 0.f;
        if (kRecord && bad) atomicOr(P.bad, 1);
      }
      if (g) fill_row(g, V, fill);
      continue;
    }
    // Read before any thread of the block overwrites the row (in-place mode).
    const Cmp<T> zy_c = static_cast<Cmp<T>>(z[y]);
    const float zy = static_cast<float>(zy_c);

    // The argmax test in the same pass: beat is set by a logit before the target that is >= z[y]
    // or one after it that is > z[y]; the target is the argmax with torch's rule (the first index
    // among equal maxima) iff no thread sets it (compared in Cmp<T>, see beats).
    bool beat = false;
    RowStats st = row_stats_init();
    const int64_t head = head_len(z, V);
    const int64_t nvec = (V - head) / n;
    const int64_t tail = head + nvec * n;
    for (int64_t j = threadIdx.x; j < head; j += blockDim.x) {
      const T v = z[j];
      const float x[1] = {static_cast<float>(v)};
      stats_add<1>(st, x);
      if (kSmooth) st.wz += weight(j) * x[0];
      beat |= beats(static_cast<Cmp<T>>(v), j, y, zy_c);
    }
    for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) {
      const int64_t j0 = head + k * n;
      float x[n];
      load_vec(z + j0, x);
      stats_add<n>(st, x);
      if (kSmooth) {
#pragma unroll
        for (int i = 0; i < n; ++i) st.wz += weight(j0 + i) * x[i];
      }
      if (std::is_same<T, double>::value) {
#pragma unroll
        for (int i = 0; i < n; ++i) beat |= beats(static_cast<Cmp<T>>(z[j0 + i]), j0 + i, y, zy_c);  // L1: just loaded
      } else {
#pragma unroll
        for (int i = 0; i < n; ++i) beat |= beats(static_cast<Cmp<T>>(x[i]), j0 + i, y, zy_c);
      }
    }
    for (int64_t j = tail + threadIdx.x; j < V; j += blockDim.x) {
      const T v = z[j];
      const float x[1] = {static_cast<float>(v)};
      stats_add<1>(st, x);
      if (kSmooth) st.wz += weight(j) * x[0];
      beat |= beats(static_cast<Cmp<T>>(v), j, y, zy_c);
    }
    st = block_merge(st);
    const bool beaten = __syncthreads_or(beat) != 0;  // every thread of the block reaches it

    const float wy = weight(y);
    const float wsum = kHasCw ? *P.wsum : static_cast<float>(V);
    const RowResult res = row_finish(st, zy, wy, wsum, V, P.smoothing);
    const float swr = (P.ids && P.sw) ? P.sw[P.ids[r]] : 1.f;
    if (threadIdx.x == 0) {
      P.loss[r] = swr * res.loss;
      P.nll[r] = res.nll;
      P.energy[r] = res.energy < 0.f ? 0.f : res.energy;
      P.correct[r] = beaten ? 0.f : 1.f;
      if (kRecord && !isfinite(res.nll)) atomicOr(P.bad, 1);
    }
    if (!g) continue;

    // g[j] = c (p[j] a - b w[j]) - c cy [j == y], rounded to T once, as on the CPU.
    const float c = swr * P.grad_scale[0];
    const float cyc = c * res.cy;
    auto grad_of = [&](int64_t j, float x) {
      float v = c * (__expf(x - res.lse) * res.a - res.b * weight(j));
      if (j == y) v -= cyc;
      return v;
    };
    const int64_t ghead = grad_vec ? head : V;
    const int64_t gvec = grad_vec ? nvec : 0;
    for (int64_t j = threadIdx.x; j < ghead; j += blockDim.x) g[j] = static_cast<T>(grad_of(j, static_cast<float>(z[j])));
    for (int64_t k = threadIdx.x; k < gvec; k += blockDim.x) {
      const int64_t j0 = ghead + k * n;
      float x[n];
      load_vec(z + j0, x);
#pragma unroll
      for (int i = 0; i < n; ++i) x[i] = grad_of(j0 + i, x[i]);
      store_vec(g + j0, x);
    }
    const int64_t gtail = ghead + gvec * n;
    for (int64_t j = gtail + threadIdx.x; j < V; j += blockDim.x) g[j] = static_cast<T>(grad_of(j, static_cast<float>(z[j])));
  }
}

// Fast recording: one thread per row, double atomics. Skips everything if the batch is bad.
__global__ void record_atomic_kernel(CeParams P) {
  if (*P.bad) return;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < P.R;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (P.target[r] == P.ignore_index) continue;
    double* a = P.acc + P.ids[r] * P.acc_cols;
    for (int32_t c = 0; c < P.acc_cols; ++c) atomicAdd(a + c, ce_source_value(P, P.acc_src[c], r));
  }
}

// Deterministic recording: keys are the stably sorted sample ids (ignored rows last), order the
// original row of each key. The first thread of each run of equal keys adds the run in row order.
__global__ void record_sorted_kernel(CeParams P, const int64_t* keys, const int64_t* order) {
  if (*P.bad) return;
  const int64_t R = P.R;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < R;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = keys[i];
    if (k == kIgnoredKey || (i > 0 && keys[i - 1] == k)) continue;
    double* a = P.acc + k * P.acc_cols;
    double sum[kMaxAccCols];
    for (int32_t c = 0; c < P.acc_cols; ++c) sum[c] = a[c];
    for (int64_t j = i; j < R && keys[j] == k; ++j) {
      const int64_t r = order[j];
      for (int32_t c = 0; c < P.acc_cols; ++c) sum[c] += ce_source_value(P, P.acc_src[c], r);
    }
    for (int32_t c = 0; c < P.acc_cols; ++c) a[c] = sum[c];
  }
}

// Threads per row: enough for about two vectors per thread, a multiple of 32, at most 512.
int threads_for(int64_t V, int64_t elems_per_vec) {
  int t = kWarp;
  while (t < kMaxThreads && static_cast<int64_t>(t) * elems_per_vec * 2 < V) t *= 2;
  return t;
}

int grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks)));
}

// grad *= s: s is read on the device; when the scalar is exactly 1 every thread returns at
// once, which is the common 'mean'/'sum' backward (no host read needed). Per-row factors are
// rounded to T first, like the CPU's grad.mul_(grad_output.to(grad.dtype)).
template <typename T>
__device__ __forceinline__ void scale_span(T* g, int64_t V, at::opmath_type<T> f, int64_t tid, int64_t nthreads) {
  using opmath_t = at::opmath_type<T>;
  constexpr int n = Vec<T>::n;
  const int64_t head = head_len(g, V);
  const int64_t nvec = (V - head) / n;
  for (int64_t j = tid; j < head; j += nthreads) g[j] = static_cast<T>(static_cast<opmath_t>(g[j]) * f);
  for (int64_t k = tid; k < nvec; k += nthreads) {
    T* p = g + head + k * n;
    alignas(16) T buf[n];
    *reinterpret_cast<uint4*>(buf) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < n; ++i) buf[i] = static_cast<T>(static_cast<opmath_t>(buf[i]) * f);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(buf);
  }
  for (int64_t j = head + nvec * n + tid; j < V; j += nthreads) g[j] = static_cast<T>(static_cast<opmath_t>(g[j]) * f);
}

// One scalar over the whole (contiguous) tensor, grid-wide.
template <typename T>
__global__ void scale_all_kernel(T* grad, int64_t numel, const double* s) {
  if (s[0] == 1.0) return;
  scale_span(grad, numel, static_cast<at::opmath_type<T>>(s[0]),
             blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x,
             static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// One factor per row, one block per row (up to kMaxThreads threads: see ce_rows_kernel).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads) scale_rows_kernel(T* grad, int64_t R, int64_t V, const double* s) {
  using opmath_t = at::opmath_type<T>;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    scale_span(grad + r * V, V, static_cast<opmath_t>(static_cast<T>(s[r])), threadIdx.x, blockDim.x);
  }
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& grad_output) {
  if (grad.numel() == 0) return;
  check_scale_grad_inputs(grad, grad_output);
  const bool per_row = grad_output.numel() != 1;
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor s = grad_output.to(at::kDouble).contiguous();  // on grad's device (checked): no host copy
  if (!grad.is_contiguous()) {
    // Not produced by our kernels; stays on the device but without the early exit.
    grad.mul_(per_row ? s.to(grad.scalar_type()).reshape({-1, 1}) : s.reshape({}));
    return;
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "gdc_scale_grad_cuda", [&] {
    constexpr int n = Vec<scalar_t>::n;
    if (per_row) {
      const int64_t R = grad.size(0), V = grad.numel() / R;
      scale_rows_kernel<scalar_t><<<static_cast<int>(std::min<int64_t>(R, kMaxBlocks)), threads_for(V, n), 0, stream>>>(
          grad.data_ptr<scalar_t>(), R, V, s.data_ptr<double>());
    } else {
      scale_all_kernel<scalar_t><<<grid_for(grad.numel() / n + 1, 256), 256, 0, stream>>>(
          grad.data_ptr<scalar_t>(), grad.numel(), s.data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct Cuda {
  using Guard = c10::cuda::CUDAGuard;
  static void rows(const CeParams& P) { ce_rows_cuda(P, at::cuda::getCurrentCUDAStream()); }
  static void record(const CeParams& P) { ce_record_cuda(P, at::cuda::getCurrentCUDAStream()); }
};

}  // namespace

void ce_rows_cuda(const CeParams& P, CUstream_st* stream) {
  if (P.R == 0) return;
  const auto d = reinterpret_cast<uintptr_t>(P.logits) - reinterpret_cast<uintptr_t>(P.grad);
  const bool grad_vec = P.grad != nullptr && (d % 16) == 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, P.dtype, "gdc_ce_cuda", [&] {
    const int threads = threads_for(P.V, Vec<scalar_t>::n);
    const int blocks = static_cast<int>(std::min<int64_t>(P.R, kMaxBlocks));
    BOOL_SWITCH(P.cw != nullptr, kHasCw, [&] {
      BOOL_SWITCH(P.smoothing > 0.f, kSmooth, [&] {
        BOOL_SWITCH(P.acc != nullptr, kRecord, [&] {
          ce_rows_kernel<scalar_t, kHasCw, kSmooth, kRecord><<<blocks, threads, 0, stream>>>(P, grad_vec);
        });
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void ce_record_cuda(const CeParams& P, CUstream_st* stream) {
  if (P.R == 0) return;
  if (at::globalContext().deterministicAlgorithms()) {
    // at::sort (stable) runs on the stream without host synchronisation. The ATen calls run on
    // the current stream: make it `stream` so they are ordered with the kernel below.
    const c10::cuda::CUDAStreamGuard stream_guard(c10::cuda::getStreamFromExternal(stream, c10::cuda::current_device()));
    const auto lopts = at::TensorOptions().dtype(at::kLong).device(at::kCUDA, c10::cuda::current_device());
    const at::Tensor target = at::from_blob(const_cast<int64_t*>(P.target), {P.R}, lopts);
    const at::Tensor ids = at::from_blob(const_cast<int64_t*>(P.ids), {P.R}, lopts);
    at::Tensor keys = at::where(target.eq(P.ignore_index), at::Scalar(kIgnoredKey), ids);
    auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    record_sorted_kernel<<<grid_for(P.R, 256), 256, 0, stream>>>(P, std::get<0>(sorted).data_ptr<int64_t>(),
                                                                std::get<1>(sorted).data_ptr<int64_t>());
  } else {
    record_atomic_kernel<<<grid_for(P.R, 256), 256, 0, stream>>>(P);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(gdc, CUDA, m) {
  register_ce_ops<Cuda>(m);
  m.impl("scale_grad_", &scale_grad_cuda);
}

}  // namespace gdc
