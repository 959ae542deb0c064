// CUDA end_epoch: one thread per sample folds its epoch accumulators with fold_epoch
// (csrc/epoch_math.h, shared with the CPU). The epoch counter stays on the device: the fold
// kernel reads it, and a one-thread kernel queued after it on the same stream increments it, so
// every sample sees the old value and the host never reads it (CUDA-graph capturable).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "epoch_checks.h"
#include "epoch_math.h"

namespace gdc {
namespace {

__global__ void fold_kernel(double* acc, double* f, int64_t F, int32_t* ist, int32_t* forgets, const double* eps,
                            int64_t K, const int64_t* epoch, int64_t burn_in, int64_t N) {
  const int64_t e = epoch[0] + 1;  // the 1-based epoch being closed
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    fold_epoch(acc + i * kNumACols, f + i * F, F, ist + i * kNumICols, forgets + i * K, eps, K, e, burn_in);
  }
}

__global__ void bump_epoch_kernel(int64_t* epoch) { epoch[0] += 1; }

void end_epoch_cuda(at::Tensor& acc, at::Tensor& fstats, at::Tensor& istats, at::Tensor& forgets, at::Tensor& epoch,
                    const at::Tensor& eps, int64_t burn_in) {
  check_epoch_inputs(acc, fstats, istats, forgets, epoch, eps, burn_in);
  const c10::cuda::CUDAGuard guard(acc.device());
  const int64_t N = acc.size(0), F = fstats.size(1), K = eps.size(0);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (N > 0) {
    constexpr int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((N + threads - 1) / threads, 1 << 20));
    fold_kernel<<<blocks, threads, 0, stream>>>(acc.data_ptr<double>(), fstats.data_ptr<double>(), F,
                                                istats.data_ptr<int32_t>(), forgets.data_ptr<int32_t>(),
                                                eps.data_ptr<double>(), K, epoch.data_ptr<int64_t>(), burn_in, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  bump_epoch_kernel<<<1, 1, 0, stream>>>(epoch.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(gdc, CUDA, m) { m.impl("end_epoch_", &end_epoch_cuda); }

}  // namespace gdc
