// Argument checks shared by the CPU and CUDA entry points: each error names the argument and
// what was expected, and every check runs before any output or state is written.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace gdc {

struct CheckedInputs {
  int64_t R, V, N;
  bool has_ids, has_sw, recording;
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline CheckedInputs check_ce_inputs(const at::Tensor& logits, const at::Tensor& target,
                                     const c10::optional<at::Tensor>& class_weight,
                                     const at::Tensor& sample_ids, const at::Tensor& sample_weight,
                                     const at::Tensor& grad_scale, const at::Tensor& acc,
                                     int64_t ignore_index, double label_smoothing) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "gdc.cross_entropy: input (logits) must be 2-D [rows, classes], got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(logits.scalar_type()),
                    "gdc.cross_entropy: input (logits) must be float32, bfloat16, float16 or float64, got ",
                    logits.scalar_type());
  TORCH_CHECK_VALUE(logits.is_contiguous(), "gdc.cross_entropy: input (logits) must be contiguous");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V > 0 || R == 0, "gdc.cross_entropy: input (logits) has no classes");
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == R,
                    "gdc.cross_entropy: target must be 1-D with one class index per row (", R, "), got ",
                    target.sizes());
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong, "gdc.cross_entropy: target must be int64, got ",
                    target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == logits.device(), "gdc.cross_entropy: target is on ", target.device(),
                    " but input (logits) is on ", logits.device());
  TORCH_CHECK_VALUE(target.is_contiguous(), "gdc.cross_entropy: target must be contiguous");
  if (class_weight.has_value() && class_weight->defined()) {
    TORCH_CHECK_VALUE(class_weight->dim() == 1 && class_weight->size(0) == V,
                      "gdc.cross_entropy: weight must be 1-D with one value per class (", V, "), got ",
                      class_weight->sizes());
    TORCH_CHECK_VALUE(class_weight->device() == logits.device(), "gdc.cross_entropy: weight is on ",
                      class_weight->device(), " but input (logits) is on ", logits.device());
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "gdc.cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(grad_scale.numel() == 1, "gdc.cross_entropy: grad_scale must hold one value");
  CheckedInputs ci{R, V, -1, sample_ids.numel() > 0, sample_weight.numel() > 0, acc.numel() > 0};
  if (ci.has_ids) {
    TORCH_CHECK_VALUE(sample_ids.dim() == 1 && sample_ids.size(0) == R,
                      "gdc.cross_entropy: sample_ids must be 1-D with one id per row (", R, "), got ",
                      sample_ids.sizes());
    TORCH_CHECK_VALUE(sample_ids.scalar_type() == at::kLong, "gdc.cross_entropy: sample_ids must be int64, got ",
                      sample_ids.scalar_type());
    TORCH_CHECK_VALUE(sample_ids.device() == logits.device(), "gdc.cross_entropy: sample_ids is on ",
                      sample_ids.device(), " but input (logits) is on ", logits.device());
    TORCH_CHECK_VALUE(sample_ids.is_contiguous(), "gdc.cross_entropy: sample_ids must be contiguous");
  }
  if (ci.recording) {
    TORCH_CHECK_VALUE(ci.has_ids || R == 0, "gdc.cross_entropy: recording into a state needs sample_ids");
    TORCH_CHECK_VALUE(acc.dim() == 2 && acc.size(1) == 3 && acc.scalar_type() == at::kDouble && acc.is_contiguous(),
                      "gdc.cross_entropy: acc must be a contiguous float64 [N, 3] epoch accumulator, got ",
                      acc.sizes(), " ", acc.scalar_type());
    TORCH_CHECK_VALUE(acc.device() == logits.device(), "gdc.cross_entropy: the CartoState is on ", acc.device(),
                      " but input (logits) is on ", logits.device());
    ci.N = acc.size(0);
  }
  if (ci.has_sw) {
    TORCH_CHECK_VALUE(ci.has_ids, "gdc.cross_entropy: sample_weight needs sample_ids");
    TORCH_CHECK_VALUE(sample_weight.dim() == 1, "gdc.cross_entropy: sample_weight must be 1-D [N], got ",
                      sample_weight.sizes());
    TORCH_CHECK_VALUE(sample_weight.device() == logits.device(), "gdc.cross_entropy: sample_weight is on ",
                      sample_weight.device(), " but input (logits) is on ", logits.device());
    TORCH_CHECK_VALUE(ci.N < 0 || ci.N == sample_weight.size(0), "gdc.cross_entropy: sample_weight has ",
                      sample_weight.size(0), " entries but the CartoState has N = ", ci.N);
    ci.N = sample_weight.size(0);
  }
  return ci;
}

// Ids of ignored rows are not used (padding may carry any id, -1 say), so they are not checked.
inline void check_ids_in_range(const int64_t* ids, const int64_t* target, int64_t ignore_index, int64_t R,
                               int64_t N, const char* name) {
  if (N < 0) return;
  for (int64_t r = 0; r < R; ++r) {
    if (target[r] == ignore_index) continue;
    TORCH_CHECK_VALUE(ids[r] >= 0 && ids[r] < N, "gdc.cross_entropy: ", name, "[", r, "] = ", ids[r],
                      " is out of range: expected a sample id in [0, ", N, ")");
  }
}

}  // namespace gdc
