// Folding one epoch into a sample's running statistics (shared by CPU and CUDA end_epoch).
// See docs/method.md: difficulty over burn-in epochs, forget events between consecutive
// observations, transitions, last/min loss, Welford mean/M2, accumulated gradient energy.
#pragma once
#include <cstdint>

#include "ce_math.h"

namespace gdc {

// Column layout of the state's float64 statistics fstats[N, F] (F = 2, or 6 with extras).
enum FCol { kDiffSum = 0, kLast = 1, kMin = 2, kMean = 3, kM2 = 4, kEnergy = 5, kNumFColsExtras = 6 };
// Without extras only the first two columns exist.
constexpr int64_t kNumFColsBasic = kLast + 1;
// Column layout of the int32 statistics istats[N, kNumICols].
enum ICol { kDiffCount = 0, kObserved = 1, kTransitions = 2, kNumICols = 3 };
// Column layout of the epoch accumulator acc[N, kNumACols].
enum ACol { kLossSum = 0, kCount = 1, kEnergySum = 2, kNumACols = 3 };

// epoch: the 1-based epoch being closed.
GDC_HD void fold_epoch(double* acc, double* f, int64_t F, int32_t* ist, int32_t* forgets, const double* eps,
                       int64_t K, int64_t epoch, int64_t burn_in) {
  const double cnt = acc[kCount];
  if (cnt > 0) {
    const double L = acc[kLossSum] / cnt;
    if (epoch <= burn_in) {
      f[kDiffSum] += L;
      ist[kDiffCount] += 1;
    }
    if (ist[kObserved] > 0) {
      const double prev = f[kLast];
      ist[kTransitions] += 1;
      for (int64_t k = 0; k < K; ++k) {
        if (prev < eps[k] && L > eps[k]) forgets[k] += 1;
      }
    }
    f[kLast] = L;
    ist[kObserved] += 1;
    if (F >= kNumFColsExtras) {
      const int32_t n = ist[kObserved];
      f[kMin] = (n == 1 || L < f[kMin]) ? L : f[kMin];
      const double delta = L - f[kMean];
      f[kMean] += delta / n;
      f[kM2] += delta * (L - f[kMean]);
      f[kEnergy] += acc[kEnergySum];
    }
  }
  acc[kLossSum] = 0.0;
  acc[kCount] = 0.0;
  acc[kEnergySum] = 0.0;
}

}  // namespace gdc
