// Consistency checks of the state tensors handed to end_epoch_ and the filling of EpochParams
// (shared by CPU and CUDA). Shapes and dtypes follow csrc/state_stats.def for the state's groups.
#pragma once
#include <ATen/ATen.h>

#include "epoch_math.h"

namespace gdc {

inline at::ScalarType scalar_type_of(int32_t dtype) {
  return dtype == kDType_float64 ? at::kDouble : dtype == kDType_float32 ? at::kFloat : at::kShort;
}

inline const char* dtype_name(int32_t dtype) {
  return dtype == kDType_float64 ? "float64" : dtype == kDType_float32 ? "float32" : "int16";
}

// groups: the bit set of csrc/state_stats.def's GDC_GROUPs the state keeps (core included).
inline void check_groups(int64_t groups, const char* op) {
  TORCH_CHECK_VALUE(groups_are_valid(groups), op, ": groups must be a bit set of the state's statistic groups with "
                    "core (1) set and no unknown bit (all: ", kAllGroups, "), got ", groups);
}

// One state tensor: [N, the layout's width] of the declared dtype (N < 0: the first, sets N).
inline void check_state_tensor(const at::Tensor& t, int32_t tensor, const StateLayout& L, int64_t N, const char* op) {
  const TensorDecl& d = kTensorDecls[tensor];
  TORCH_CHECK_VALUE(t.dim() == 2 && (N < 0 || t.size(0) == N) && t.size(1) == L.width[tensor] &&
                        t.scalar_type() == scalar_type_of(d.dtype),
                    op, ": ", d.name, " must be ", dtype_name(d.dtype), " [N, ", L.width[tensor], "]",
                    N >= 0 ? " with N = " : "", N >= 0 ? std::to_string(N) : std::string(), " (groups = ", L.groups,
                    ", K = ", L.K, "), got ", t.sizes(), " ", t.scalar_type());
}

inline EpochParams check_epoch_inputs(const at::Tensor& acc, const at::Tensor& fstats, const at::Tensor& istats,
                                      const at::Tensor& forgets, const at::Tensor& epoch, const at::Tensor& eps,
                                      int64_t burn_in, int64_t groups) {
  const char* op = "gdc.end_epoch";
  check_groups(groups, op);
  TORCH_CHECK_VALUE(eps.dim() == 1 && eps.size(0) >= 1 && eps.scalar_type() == at::kDouble, op,
                    ": eps must be float64 [K] with K >= 1, got ", eps.sizes(), " ", eps.scalar_type());
  const StateLayout L = make_state_layout(groups, eps.size(0));
  check_state_tensor(acc, kTensor_acc, L, -1, op);
  const int64_t N = acc.size(0);
  check_state_tensor(fstats, kTensor_fstats, L, N, op);
  check_state_tensor(istats, kTensor_istats, L, N, op);
  check_state_tensor(forgets, kTensor_forgets, L, N, op);
  TORCH_CHECK_VALUE(epoch.numel() == 1 && epoch.scalar_type() == at::kLong, op,
                    ": epoch must be a single int64, got ", epoch.sizes(), " ", epoch.scalar_type());
  TORCH_CHECK_VALUE(burn_in >= 0, op, ": burn_in must be >= 0, got ", burn_in);
  for (const at::Tensor* t : {&acc, &fstats, &istats, &forgets, &epoch, &eps}) {
    TORCH_CHECK_VALUE(t->is_contiguous(), op, ": state tensors must be contiguous");
    TORCH_CHECK_VALUE(t->device() == acc.device(), op, ": state tensors must share one device, got ", t->device(),
                      " and ", acc.device());
  }
  EpochParams P;
  P.acc = acc.data_ptr<double>();
  P.fstats = fstats.data_ptr<float>();
  P.istats = istats.data_ptr<int16_t>();
  P.forgets = forgets.data_ptr<int16_t>();
  P.eps = eps.data_ptr<double>();
  P.epoch = epoch.data_ptr<int64_t>();
  P.N = N;
  P.K = eps.size(0);
  P.burn_in = burn_in;
  P.groups = static_cast<int32_t>(groups);
  return P;
}

}  // namespace gdc
