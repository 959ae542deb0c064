// Registration of the cross-entropy ops for one device, written once: each device's
// TORCH_LIBRARY_IMPL calls register_ce_ops<Device> with its policy (Device::Guard,
// Device::rows, Device::record; see run_ce in csrc/ce_call.h), so a new cross-entropy op is
// registered for every device by adding one line here.
#pragma once
#include <torch/library.h>

#include "ce_call.h"
#include "linear_cross_entropy.h"

namespace gdc {

template <typename Device>
void register_ce_ops(torch::Library& m) {
  m.impl("cross_entropy_fwd", &ce_fwd<Device>);
  m.impl("cross_entropy_fwd_inplace", &ce_fwd_inplace<Device>);
  m.impl("linear_cross_entropy_fwd", &linear_ce_fwd_on<Device>);
}

}  // namespace gdc
