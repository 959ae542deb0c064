// Checks of the cross-entropy ops' inputs and the filling of CeParams (see csrc/ce_call.h).
#include "ce_call.h"

#include "epoch_checks.h"  // check_groups

namespace gdc {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

namespace {

// Ids of ignored rows are not used (padding may carry any id, -1 say), so they are not checked.
void check_ids_in_range(const int64_t* ids, const int64_t* target, int64_t ignore_index, int64_t R, int64_t N,
                        const char* name) {
  if (N < 0) return;
  for (int64_t r = 0; r < R; ++r) {
    if (target[r] == ignore_index) continue;
    TORCH_CHECK_VALUE(ids[r] >= 0 && ids[r] < N, "gdc.cross_entropy: ", name, "[", r, "] = ", ids[r],
                      " is out of range: expected a sample id in [0, ", N, ")");
  }
}

// Targets are read on the host, so in-place mode never half-overwrites the logits of a batch that
// is then rejected. (CUDA checks them in the kernel instead: no host synchronisation.)
void check_targets_in_range(const int64_t* tgt, int64_t ignore_index, int64_t R, int64_t V) {
  for (int64_t r = 0; r < R; ++r) {
    const int64_t y = tgt[r];
    TORCH_CHECK_INDEX(y == ignore_index || (y >= 0 && y < V), "gdc.cross_entropy: target[", r, "] = ", y,
                      " is out of bounds: expected a class index in [0, ", V, ") or ignore_index = ",
                      ignore_index);
  }
}

// `name` lives on the logits' device: anything else would need a hidden copy (or fail later).
void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, "gdc.cross_entropy: ", name, " is on ", t.device(),
                    " but input (logits) is on ", device);
}

// target and sample_ids: one contiguous int64 index per row.
void check_row_indices(const at::Tensor& t, const char* name, const char* what, int64_t R,
                       const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == R, "gdc.cross_entropy: ", name, " must be 1-D with one ", what,
                    " per row (", R, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, "gdc.cross_entropy: ", name, " must be int64, got ",
                    t.scalar_type());
  check_device(t, name, device);
  TORCH_CHECK_VALUE(t.is_contiguous(), "gdc.cross_entropy: ", name, " must be contiguous");
}

}  // namespace

CeCall prepare_ce_rows(int64_t R, int64_t V, const at::Device& device, const at::Tensor& target,
                       const c10::optional<at::Tensor>& class_weight, const at::Tensor& sample_ids,
                       const at::Tensor& sample_weight, const at::Tensor& grad_scale, const at::Tensor& acc,
                       int64_t ignore_index, double label_smoothing, int64_t groups) {
  // ---- shapes, dtypes and devices (no data read)
  check_row_indices(target, "target", "class index", R, device);
  const bool has_cw = class_weight.has_value() && class_weight->defined();
  if (has_cw) {
    TORCH_CHECK_VALUE(class_weight->dim() == 1 && class_weight->size(0) == V,
                      "gdc.cross_entropy: weight must be 1-D with one value per class (", V, "), got ",
                      class_weight->sizes());
    check_device(*class_weight, "weight", device);
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "gdc.cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(grad_scale.numel() == 1, "gdc.cross_entropy: grad_scale must hold one value");
  // Another device would need a copy that blocks the host (and breaks CUDA-graph capture).
  check_device(grad_scale, "grad_scale", device);
  const bool has_ids = sample_ids.numel() > 0, has_sw = sample_weight.numel() > 0, recording = acc.numel() > 0;
  int64_t N = -1;
  if (has_ids) check_row_indices(sample_ids, "sample_ids", "id", R, device);
  check_groups(groups, "gdc.cross_entropy");
  const StateLayout layout = make_state_layout(groups, 1);
  const int64_t acc_cols = layout.width[kTensor_acc];
  if (recording) {
    TORCH_CHECK_VALUE(has_ids || R == 0, "gdc.cross_entropy: recording into a state needs sample_ids");
    TORCH_CHECK_VALUE(acc.dim() == 2 && acc.size(1) == acc_cols && acc.scalar_type() == at::kDouble &&
                          acc.is_contiguous(),
                      "gdc.cross_entropy: acc must be a contiguous float64 [N, ", acc_cols,
                      "] epoch accumulator (the state's groups = ", groups, "), got ", acc.sizes(), " ",
                      acc.scalar_type());
    TORCH_CHECK_VALUE(acc.device() == device, "gdc.cross_entropy: the CartoState is on ", acc.device(),
                      " but input (logits) is on ", device);
    N = acc.size(0);
  }
  if (has_sw) {
    TORCH_CHECK_VALUE(has_ids, "gdc.cross_entropy: sample_weight needs sample_ids");
    TORCH_CHECK_VALUE(sample_weight.dim() == 1, "gdc.cross_entropy: sample_weight must be 1-D [N], got ",
                      sample_weight.sizes());
    check_device(sample_weight, "sample_weight", device);
    TORCH_CHECK_VALUE(N < 0 || N == sample_weight.size(0), "gdc.cross_entropy: sample_weight has ",
                      sample_weight.size(0), " entries but the CartoState has N = ", N);
    N = sample_weight.size(0);
  }
  // ---- data (CPU only: reading device memory here would synchronise)
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int64_t* ids = has_ids ? sample_ids.data_ptr<int64_t>() : nullptr;
  if (device.is_cpu()) {
    check_targets_in_range(tgt, ignore_index, R, V);
    if (ids) check_ids_in_range(ids, tgt, ignore_index, R, N, "sample_ids");
  }

  // ---- outputs and float32 views of the per-call inputs
  CeCall c;
  const auto fopts = at::TensorOptions().dtype(at::kFloat).device(device);
  c.loss = at::empty({R}, fopts);
  c.nll = at::empty({R}, fopts);
  c.energy = at::empty({R}, fopts);
  c.correct = at::empty({R}, fopts);
  c.recording = recording;
  if (R > 0) {
    if (has_cw) {
      c.cw = class_weight->to(at::kFloat).contiguous();
      c.wsum = at::sum(c.cw);  // stays on the device: no .item()
    }
    c.gs = grad_scale.to(at::kFloat).contiguous();
    if (has_sw) c.sw = sample_weight.to(at::kFloat).contiguous();
    if (recording && !device.is_cpu()) c.bad = at::zeros({1}, fopts.dtype(at::kInt));
  }
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  CeParams& P = c.p;
  P.R = R;
  P.V = V;
  P.N = N;
  P.ignore_index = ignore_index;
  P.smoothing = static_cast<float>(label_smoothing);
  P.target = tgt;
  P.ids = ids;
  P.loss = c.loss.data_ptr<float>();
  P.nll = c.nll.data_ptr<float>();
  P.energy = c.energy.data_ptr<float>();
  P.correct = c.correct.data_ptr<float>();
  P.cw = ptr(c.cw);
  P.wsum = ptr(c.wsum);
  P.sw = ptr(c.sw);
  P.grad_scale = ptr(c.gs);
  P.acc = recording ? acc.data_ptr<double>() : nullptr;
  P.acc_cols = static_cast<int32_t>(acc_cols);
  for (int32_t s = 0; s < kNumStats; ++s) {
    if (kStatDecls[s].tensor == kTensor_acc && layout.col[s] >= 0) P.acc_src[layout.col[s]] = kStatDecls[s].input;
  }
  P.bad = c.bad.defined() ? c.bad.data_ptr<int>() : nullptr;
  return c;
}

CeCall prepare_ce(const at::Tensor& logits, at::Tensor* grad, const at::Tensor& target,
                  const c10::optional<at::Tensor>& class_weight, const at::Tensor& sample_ids,
                  const at::Tensor& sample_weight, const at::Tensor& grad_scale, const at::Tensor& acc,
                  int64_t ignore_index, double label_smoothing, int64_t groups) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "gdc.cross_entropy: input (logits) must be 2-D [rows, classes], got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(logits.scalar_type()),
                    "gdc.cross_entropy: input (logits) must be float32, bfloat16, float16 or float64, got ",
                    logits.scalar_type());
  TORCH_CHECK_VALUE(logits.is_contiguous(), "gdc.cross_entropy: input (logits) must be contiguous");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V > 0 || R == 0, "gdc.cross_entropy: input (logits) has no classes");
  CeCall c = prepare_ce_rows(R, V, logits.device(), target, class_weight, sample_ids, sample_weight, grad_scale,
                             acc, ignore_index, label_smoothing, groups);
  c.p = c.p.rows(0, R, logits.scalar_type(), logits.data_ptr(), grad ? grad->data_ptr() : nullptr);
  return c;
}

void check_scale_grad_inputs(const at::Tensor& grad, const at::Tensor& grad_output) {
  if (grad_output.numel() != 1) {
    TORCH_CHECK_VALUE(grad_output.dim() == 1 && grad.dim() >= 1 && grad_output.size(0) == grad.size(0),
                      "gdc.scale_grad: grad_output must be a scalar or have one value per row (",
                      grad.dim() >= 1 ? grad.size(0) : 1, ")");
  }
  TORCH_CHECK_VALUE(is_float_dtype(grad.scalar_type()), "gdc.scale_grad: grad must be a float tensor, got ",
                    grad.scalar_type());
  // Another device would need a copy that blocks the host (and breaks CUDA-graph capture).
  TORCH_CHECK_VALUE(grad_output.device() == grad.device(), "gdc.scale_grad: grad_output is on ",
                    grad_output.device(), " but grad is on ", grad.device());
}

}  // namespace gdc
