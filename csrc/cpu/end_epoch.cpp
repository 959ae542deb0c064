// CPU end_epoch: folds the epoch accumulators of all N samples into their statistics, in parallel
// (each sample is independent, so the result does not depend on the thread count).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "epoch_checks.h"
#include "epoch_math.h"

namespace gdc {
namespace {

void end_epoch_cpu(at::Tensor& acc, at::Tensor& fstats, at::Tensor& istats, at::Tensor& forgets,
                   at::Tensor& epoch, const at::Tensor& eps, int64_t burn_in, int64_t groups) {
  const EpochParams P = check_epoch_inputs(acc, fstats, istats, forgets, epoch, eps, burn_in, groups);
  const int64_t e = P.epoch[0] + 1;
  // Before anything changes: the int16 counters grow by at most 1 per epoch (csrc/state_stats.def).
  TORCH_CHECK_VALUE(e <= kMaxEpochs, "gdc.end_epoch: the state has folded ", P.epoch[0], " epochs, the most its int16 "
                    "counters can hold (", kMaxEpochs, "); nothing was changed");
  with_groups(P.groups, [&](auto g) {  // the fold compiled for the state's group set
    at::parallel_for(0, P.N, 16384, [&](int64_t i0, int64_t i1) {
      const EpochParams local = P;  // a copy the loop owns: no reload of its fields after each store
      for (int64_t i = i0; i < i1; ++i) fold_sample<decltype(g)::value>(local, i, e);
    });
  });
  P.epoch[0] = e;
}

}  // namespace

TORCH_LIBRARY_IMPL(gdc, CPU, m) { m.impl("end_epoch_", &end_epoch_cpu); }

}  // namespace gdc
