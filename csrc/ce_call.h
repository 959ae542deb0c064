// Filling the cross-entropy contract (csrc/ce_params.h) from the op's tensors: the one place that
// checks the inputs of both cross-entropy ops on every device. Each error names the argument and
// what was expected (ValueError; IndexError for a target out of range), and every check runs
// before any output or state is written.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "ce_params.h"

namespace gdc {

// A filled CeParams and the tensors its pointers point into (outputs and float32 copies).
struct CeCall {
  CeParams p;
  bool recording = false;       // p.acc is set
  at::Tensor loss, nll, energy, correct;  // [R] float32 outputs
  at::Tensor cw, wsum, sw, gs;   // float32 class weights, their sum, sample weights, grad_scale
  at::Tensor bad;                // [1] int32 flag (CUDA with recording)
};

bool is_float_dtype(at::ScalarType t);

// Checks everything but the logits for R rows of V classes whose logits live on `device`, and
// fills every field of the result except p.dtype / p.logits / p.grad (see CeParams::rows). On the
// CPU it also range-checks targets (IndexError) and sample ids (ValueError), which reads them.
// groups: the statistic groups of the state that owns acc (csrc/state_stats.def): they fix
// acc's columns and what the kernels add into each.
CeCall prepare_ce_rows(int64_t R, int64_t V, const at::Device& device, const at::Tensor& target,
                       const c10::optional<at::Tensor>& class_weight, const at::Tensor& sample_ids,
                       const at::Tensor& sample_weight, const at::Tensor& grad_scale, const at::Tensor& acc,
                       int64_t ignore_index, double label_smoothing, int64_t groups);

// prepare_ce_rows for a [R, V] logits tensor (checked first), with grad (null: no gradient;
// may be &logits) filled in.
CeCall prepare_ce(const at::Tensor& logits, at::Tensor* grad, const at::Tensor& target,
                  const c10::optional<at::Tensor>& class_weight, const at::Tensor& sample_ids,
                  const at::Tensor& sample_weight, const at::Tensor& grad_scale, const at::Tensor& acc,
                  int64_t ignore_index, double label_smoothing, int64_t groups);

// scale_grad_(grad, grad_output): grad_output is a scalar or one value per row, on grad's device
// (a tensor on another device would need a hidden blocking copy).
void check_scale_grad_inputs(const at::Tensor& grad, const at::Tensor& grad_output);

// The two op entry points over a device: Device::Guard makes the device current (a no-op on the
// CPU); Device::rows / Device::record run ce_rows_* / ce_record_* of CeParams.
template <typename Device>
std::tuple<at::Tensor, at::Tensor> run_ce(const at::Tensor& logits, at::Tensor* grad, const at::Tensor& target,
                                          const c10::optional<at::Tensor>& class_weight,
                                          const at::Tensor& sample_ids, const at::Tensor& sample_weight,
                                          const at::Tensor& grad_scale, at::Tensor& acc, int64_t ignore_index,
                                          double label_smoothing, int64_t groups) {
  CeCall call = prepare_ce(logits, grad, target, class_weight, sample_ids, sample_weight, grad_scale, acc,
                           ignore_index, label_smoothing, groups);
  if (call.p.R == 0) return {call.loss, call.nll};
  const typename Device::Guard guard(logits.device());
  Device::rows(call.p);
  if (call.recording) Device::record(call.p);
  return {call.loss, call.nll};
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                      const c10::optional<at::Tensor>& class_weight,
                                                      const at::Tensor& sample_ids, const at::Tensor& sample_weight,
                                                      const at::Tensor& grad_scale, at::Tensor& acc,
                                                      int64_t ignore_index, double label_smoothing,
                                                      bool compute_grad, int64_t groups) {
  at::Tensor grad =
      compute_grad ? at::empty_like(logits, at::MemoryFormat::Contiguous) : at::empty({0}, logits.options());
  auto out = run_ce<Device>(logits, compute_grad ? &grad : nullptr, target, class_weight, sample_ids,
                            sample_weight, grad_scale, acc, ignore_index, label_smoothing, groups);
  return {std::get<0>(out), std::get<1>(out), grad};
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> ce_fwd_inplace(at::Tensor& logits, const at::Tensor& target,
                                                  const c10::optional<at::Tensor>& class_weight,
                                                  const at::Tensor& sample_ids, const at::Tensor& sample_weight,
                                                  const at::Tensor& grad_scale, at::Tensor& acc,
                                                  int64_t ignore_index, double label_smoothing, int64_t groups) {
  TORCH_CHECK_VALUE(logits.is_contiguous(), "gdc.cross_entropy_inplace: input (logits) must be contiguous");
  return run_ce<Device>(logits, &logits, target, class_weight, sample_ids, sample_weight, grad_scale, acc,
                        ignore_index, label_smoothing, groups);
}

}  // namespace gdc
