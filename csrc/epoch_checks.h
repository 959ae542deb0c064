// Consistency checks of the state tensors handed to end_epoch_ (shared by CPU and CUDA).
#pragma once
#include <ATen/ATen.h>

#include "epoch_math.h"

namespace gdc {

inline void check_epoch_inputs(const at::Tensor& acc, const at::Tensor& fstats, const at::Tensor& istats,
                               const at::Tensor& forgets, const at::Tensor& epoch, const at::Tensor& eps,
                               int64_t burn_in) {
  TORCH_CHECK_VALUE(acc.dim() == 2 && acc.size(1) == kNumACols && acc.scalar_type() == at::kDouble,
                    "gdc.end_epoch: acc must be float64 [N, ", static_cast<int>(kNumACols), "], got ", acc.sizes(), " ",
                    acc.scalar_type());
  const int64_t N = acc.size(0);
  TORCH_CHECK_VALUE(fstats.dim() == 2 && fstats.size(0) == N &&
                        (fstats.size(1) == kNumFColsBasic || fstats.size(1) == kNumFColsExtras) &&
                        fstats.scalar_type() == at::kDouble,
                    "gdc.end_epoch: fstats must be float64 [N, ", kNumFColsBasic, "] or [N, ",
                    static_cast<int>(kNumFColsExtras), "] with N = ", N, ", got ", fstats.sizes(),
                    " ", fstats.scalar_type());
  TORCH_CHECK_VALUE(istats.dim() == 2 && istats.size(0) == N && istats.size(1) == kNumICols &&
                        istats.scalar_type() == at::kInt,
                    "gdc.end_epoch: istats must be int32 [N, ", static_cast<int>(kNumICols), "] with N = ", N,
                    ", got ", istats.sizes(), " ", istats.scalar_type());
  TORCH_CHECK_VALUE(eps.dim() == 1 && eps.size(0) >= 1 && eps.scalar_type() == at::kDouble,
                    "gdc.end_epoch: eps must be float64 [K] with K >= 1, got ", eps.sizes(), " ", eps.scalar_type());
  TORCH_CHECK_VALUE(forgets.dim() == 2 && forgets.size(0) == N && forgets.size(1) == eps.size(0) &&
                        forgets.scalar_type() == at::kInt,
                    "gdc.end_epoch: forgets must be int32 [N, K] with N = ", N, ", K = ", eps.size(0), ", got ",
                    forgets.sizes(), " ", forgets.scalar_type());
  TORCH_CHECK_VALUE(epoch.numel() == 1 && epoch.scalar_type() == at::kLong,
                    "gdc.end_epoch: epoch must be a single int64, got ", epoch.sizes(), " ", epoch.scalar_type());
  TORCH_CHECK_VALUE(burn_in >= 0, "gdc.end_epoch: burn_in must be >= 0, got ", burn_in);
  for (const at::Tensor* t : {&acc, &fstats, &istats, &forgets, &epoch, &eps}) {
    TORCH_CHECK_VALUE(t->is_contiguous(), "gdc.end_epoch: state tensors must be contiguous");
    TORCH_CHECK_VALUE(t->device() == acc.device(), "gdc.end_epoch: state tensors must share one device, got ",
                      t->device(), " and ", acc.device());
  }
}

}  // namespace gdc
