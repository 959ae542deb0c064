// CPU end_epoch: folds the epoch accumulators of all N samples into their statistics, in parallel
// (each sample is independent, so the result does not depend on the thread count).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "epoch_checks.h"
#include "epoch_math.h"

namespace gdc {
namespace {

void end_epoch_cpu(at::Tensor& acc, at::Tensor& fstats, at::Tensor& istats, at::Tensor& forgets,
                   at::Tensor& epoch, const at::Tensor& eps, int64_t burn_in) {
  check_epoch_inputs(acc, fstats, istats, forgets, epoch, eps, burn_in);
  const int64_t N = acc.size(0), F = fstats.size(1), K = eps.size(0);
  const int64_t e = epoch.data_ptr<int64_t>()[0] + 1;
  double* a = acc.data_ptr<double>();
  double* f = fstats.data_ptr<double>();
  int32_t* ist = istats.data_ptr<int32_t>();
  int32_t* fg = forgets.data_ptr<int32_t>();
  const double* ep = eps.data_ptr<double>();
  at::parallel_for(0, N, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      fold_epoch(a + i * kNumACols, f + i * F, F, ist + i * kNumICols, fg + i * K, ep, K, e, burn_in);
    }
  });
  epoch.data_ptr<int64_t>()[0] = e;
}

}  // namespace

TORCH_LIBRARY_IMPL(gdc, CPU, m) { m.impl("end_epoch_", &end_epoch_cpu); }

}  // namespace gdc
