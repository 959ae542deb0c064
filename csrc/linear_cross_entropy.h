// Fused linear + cross-entropy: the [R, V] logits of input @ weight^T (+ bias) are never
// materialised. One chunk loop (csrc/linear_cross_entropy.cpp) serves every device; a device
// contributes only its row kernels of the cross-entropy contract (csrc/ce_params.h).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "ce_params.h"

namespace gdc {

// The row kernels of one device. They run with the input's device current (c10::DeviceGuard),
// so a CUDA implementation can take the current stream.
struct CeRowKernels {
  void (*rows)(const CeParams&);
  void (*record)(const CeParams&);
};

// Rows per chunk: `requested` if > 0 (capped at R), else the chunk-size rule (see the .cpp;
// it differs between the CPU and CUDA).
int64_t linear_ce_chunk_rows(int64_t R, int64_t V, int64_t H, int64_t elem_size, bool cuda, int64_t requested);

// gdc::linear_cross_entropy_fwd (schema in csrc/ops.cpp): returns loss_rows [R] float32,
// nll_rows [R] float32, and the gradients of sum(loss_rows * grad_scale) with respect to input
// [R, H] (if compute_grad_input), weight [V, H] (if compute_grad_weight) and bias [V] (if
// compute_grad_bias and there is a bias); each gradient not computed is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_fwd(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& class_weight, const at::Tensor& sample_ids,
    const at::Tensor& sample_weight, const at::Tensor& grad_scale, at::Tensor& acc, int64_t ignore_index,
    double label_smoothing, int64_t chunk_size, bool compute_grad_input, bool compute_grad_weight,
    bool compute_grad_bias, int64_t groups, const CeRowKernels& kernels);

// The op's kernel for one device, registered by register_ce_ops<Device> (csrc/ce_register.h)
// with the device policy of ce_fwd<Device>: Device::rows / Device::record. The chunk loop makes
// the input's device current, so Device::Guard is not needed here. On CUDA nothing synchronises
// with the host: a bad target or id shows as NaN rows and a skipped recording, as for
// gdc::cross_entropy_fwd.
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_fwd_on(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& class_weight, const at::Tensor& sample_ids,
    const at::Tensor& sample_weight, const at::Tensor& grad_scale, at::Tensor& acc, int64_t ignore_index,
    double label_smoothing, int64_t chunk_size, bool compute_grad_input, bool compute_grad_weight,
    bool compute_grad_bias, int64_t groups) {
  return linear_ce_fwd(input, weight, bias, target, class_weight, sample_ids, sample_weight, grad_scale, acc,
                       ignore_index, label_smoothing, chunk_size, compute_grad_input, compute_grad_weight,
                       compute_grad_bias, groups,
                       CeRowKernels{&Device::rows, &Device::record});
}

}  // namespace gdc
