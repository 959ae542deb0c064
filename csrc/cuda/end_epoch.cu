// CUDA end_epoch: one thread per sample folds its epoch accumulators with fold_sample<G>
// (csrc/epoch_math.h, shared with the CPU; G the state's group set). The epoch counter stays on the device: the fold
// kernel reads it, and a one-thread kernel queued after it on the same stream increments it, so
// every sample sees the old value and the host never reads it (CUDA-graph capturable).
// A state that has folded kMaxEpochs epochs (its int16 counters full) is left unchanged by both
// kernels; CartoState.end_epoch raises before launching them (the host cannot raise here
// without a synchronisation).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "epoch_checks.h"
#include "epoch_math.h"

namespace gdc {
namespace {

// One instantiation per group set G (csrc/state_stats.def): the columns are constants.
template <int32_t G>
__global__ void fold_kernel(EpochParams P) {
  const int64_t e = P.epoch[0] + 1;  // the 1-based epoch being closed
  if (e > kMaxEpochs) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < P.N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    fold_sample<G>(P, i, e);
  }
}

__global__ void bump_epoch_kernel(int64_t* epoch) {
  if (epoch[0] < kMaxEpochs) epoch[0] += 1;
}

void end_epoch_cuda(at::Tensor& acc, at::Tensor& fstats, at::Tensor& istats, at::Tensor& forgets, at::Tensor& epoch,
                    const at::Tensor& eps, int64_t burn_in, int64_t groups) {
  const EpochParams P = check_epoch_inputs(acc, fstats, istats, forgets, epoch, eps, burn_in, groups);
  const c10::cuda::CUDAGuard guard(acc.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (P.N > 0) {
    constexpr int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((P.N + threads - 1) / threads, 1 << 20));
    with_groups(P.groups, [&](auto g) { fold_kernel<decltype(g)::value><<<blocks, threads, 0, stream>>>(P); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  bump_epoch_kernel<<<1, 1, 0, stream>>>(P.epoch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(gdc, CUDA, m) { m.impl("end_epoch_", &end_epoch_cuda); }

}  // namespace gdc
