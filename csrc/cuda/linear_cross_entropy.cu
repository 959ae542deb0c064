// CUDA registration of the fused linear + cross-entropy op: the chunk loop is the one in
// csrc/linear_cross_entropy.cpp (matmuls through ATen, i.e. cuBLAS on the current stream);
// this file gives it the CUDA row kernels, launched on the current stream of the input's
// device (the loop makes that device current first). No host synchronisation: a bad target or
// id shows as NaN rows and a skipped recording, as for gdc::cross_entropy_fwd on CUDA.
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "ce_params.h"
#include "linear_cross_entropy.h"

namespace gdc {
namespace {

void rows_on_current_stream(const CeParams& P) { ce_rows_cuda(P, at::cuda::getCurrentCUDAStream()); }
void record_on_current_stream(const CeParams& P) { ce_record_cuda(P, at::cuda::getCurrentCUDAStream()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_fwd_cuda(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& class_weight, const at::Tensor& sample_ids,
    const at::Tensor& sample_weight, const at::Tensor& grad_scale, at::Tensor& acc, int64_t ignore_index,
    double label_smoothing, int64_t chunk_size, bool compute_grad) {
  static const CeRowKernels kCuda{&rows_on_current_stream, &record_on_current_stream};
  return linear_ce_fwd(input, weight, bias, target, class_weight, sample_ids, sample_weight, grad_scale, acc,
                       ignore_index, label_smoothing, chunk_size, compute_grad, kCuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(gdc, CUDA, m) { m.impl("linear_cross_entropy_fwd", &linear_ce_fwd_cuda); }

}  // namespace gdc
