// Folding one epoch into a sample's running statistics (shared by CPU and CUDA end_epoch).
// The statistics and their fold kinds are declared in csrc/state_stats.def; this file holds the
// code of each fold kind and the params struct of the end_epoch op family. See docs/method.md:
// difficulty over burn-in epochs, forget events between consecutive observations, last/min
// loss, Welford mean/M2, accumulated gradient energy, the cartography group's learnt-epoch
// counts; "Storage" for the dtypes.
//
// Every fold computes in float64 from the float64 accumulator and the stored values, and rounds
// once when it stores a float32 statistic. The CUDA fold is compiled with -fmad=false and the CPU
// build targets x86-64 without FMA contraction, so both round the same float64 results: the
// folded state is bit-identical on CPU and CUDA.
#pragma once
#include <cstdint>

#include "ce_math.h"  // GDC_HD
#include "state_layout.h"

namespace gdc {

// Everything one launch of the fold needs, filled on the host by check_epoch_inputs
// (csrc/epoch_checks.h) after the checks; shared by the CPU and CUDA end_epoch. The columns are
// not here: the fold is compiled per group set (fold_sample<G>), with them as constants.
struct EpochParams {
  double* acc = nullptr;        // [N, acc columns] this epoch's sums (zeroed by the fold)
  float* fstats = nullptr;      // [N, fstats columns] folded float statistics
  int16_t* istats = nullptr;    // [N, istats columns] counters
  int16_t* forgets = nullptr;   // [N, per-eps statistics * K] per-eps counters
  const double* eps = nullptr;  // [K]
  int64_t* epoch = nullptr;     // [1] epochs folded so far (read by the fold, incremented after it)
  int64_t N = 0, K = 0, burn_in = 0;
  int32_t groups = 0;           // the state's statistic groups (csrc/state_stats.def)
};

// What every fold of one sample in one epoch shares.
struct FoldCtx {
  bool burn;       // the epoch is a burn-in epoch (1-based epoch <= burn_in)
  int32_t n_prev;  // epochs in which the sample was observed before this one
  int64_t epoch;   // the epoch being folded, 1-based (<= kMaxEpochs: end_epoch refuses more)
};

// ---- the fold kinds (GDC_FOLD in csrc/state_stats.def), each for one observed epoch.
// v: the statistic's slot; old: its row's float statistics before this epoch's fold (a fold may
// read another statistic's old value through its partner column p); x: the input's value.
GDC_HD void fold_burn_in_sum(float* v, const float*, int32_t, double x, const FoldCtx& c, const EpochParams&) {
  if (c.burn) *v = static_cast<float>(static_cast<double>(*v) + x);
}
GDC_HD void fold_last(float* v, const float*, int32_t, double x, const FoldCtx&, const EpochParams&) {
  *v = static_cast<float>(x);
}
GDC_HD void fold_min(float* v, const float*, int32_t, double x, const FoldCtx& c, const EpochParams&) {
  if (c.n_prev == 0 || x < static_cast<double>(*v)) *v = static_cast<float>(x);
}
GDC_HD void fold_welford_mean(float* v, const float*, int32_t, double x, const FoldCtx& c, const EpochParams&) {
  const double mean = static_cast<double>(*v);
  *v = static_cast<float>(mean + (x - mean) / static_cast<double>(c.n_prev + 1));
}
// p: the column of the welford_mean of the same input (its value before this epoch).
GDC_HD void fold_welford_m2(float* v, const float* old, int32_t p, double x, const FoldCtx& c, const EpochParams&) {
  const double mean = static_cast<double>(old[p]);
  const double delta = x - mean;
  const double mean_new = mean + delta / static_cast<double>(c.n_prev + 1);
  *v = static_cast<float>(static_cast<double>(*v) + delta * (x - mean_new));
}
GDC_HD void fold_epoch_sum(float* v, const float*, int32_t, double x, const FoldCtx&, const EpochParams&) {
  *v = static_cast<float>(static_cast<double>(*v) + x);
}
GDC_HD void fold_burn_in_count(int16_t* v, const float*, int32_t, double, const FoldCtx& c, const EpochParams&) {
  if (c.burn) *v = static_cast<int16_t>(*v + 1);
}
GDC_HD void fold_observed_count(int16_t* v, const float*, int32_t, double, const FoldCtx&, const EpochParams&) {
  *v = static_cast<int16_t>(*v + 1);
}
// v: the K counters; p: the column of the last value of the same input (before this epoch).
// A forget event is a crossing of eps upwards between two consecutive observations.
GDC_HD void fold_forget_events(int16_t* v, const float* old, int32_t p, double x, const FoldCtx& c,
                               const EpochParams& P) {
  if (c.n_prev == 0) return;
  const double prev = static_cast<double>(old[p]);
  for (int64_t k = 0; k < P.K; ++k) {
    if (prev < P.eps[k] && x > P.eps[k]) v[k] = static_cast<int16_t>(v[k] + 1);
  }
}
// The folds of an input in [0, 1] whose value 1 is an event (token accuracy 1: every token of the
// sample argmax-correct, "learnt"). It is exactly 1 when the correct-token sum equals the token
// count (both exact integers in float64); the last value read by full_drops is stored in float32,
// where a value below 1 stays below 1 for fewer than 2**24 tokens per sample and epoch.
GDC_HD bool is_full(double x) { return x >= 1.0; }
GDC_HD void fold_count_full(int16_t* v, const float*, int32_t, double x, const FoldCtx&, const EpochParams&) {
  if (is_full(x)) *v = static_cast<int16_t>(*v + 1);
}
// p: the column of the last value of the same input (before this epoch). Toneva et al.'s
// forgetting event: learnt at the previous observation, not learnt at this one.
GDC_HD void fold_full_drops(int16_t* v, const float* old, int32_t p, double x, const FoldCtx& c,
                            const EpochParams&) {
  if (c.n_prev > 0 && is_full(static_cast<double>(old[p])) && !is_full(x)) *v = static_cast<int16_t>(*v + 1);
}
GDC_HD void fold_first_full(int16_t* v, const float*, int32_t, double x, const FoldCtx& c, const EpochParams&) {
  if (*v == 0 && is_full(x)) *v = static_cast<int16_t>(c.epoch);
}
GDC_HD void fold_row_sum(double*, const float*, int32_t, double, const FoldCtx&, const EpochParams&) {}

// Column of statistic s in its tensor for group set G (per-eps tensors: in units of K; -1: off),
// and the column of the statistic its fold also reads (-1: none): compile-time constants.
constexpr int32_t stat_col(int32_t G, int32_t s) { return make_state_layout(G, 1).col[s]; }
constexpr int32_t stat_partner(int32_t G, int32_t s) { return make_state_layout(G, 1).partner[s]; }
constexpr int64_t tensor_width(int32_t G, int32_t t) { return make_state_layout(G, 1).width[t]; }
constexpr bool tensor_per_eps(int32_t t) { return kTensorDecls[t].per == kPer_eps; }

// Folds epoch e (1-based) into sample i of a state with the group set G and zeroes its
// accumulator row. A sample not observed in the epoch (token count 0) keeps its statistics.
template <int32_t G>
GDC_HD void fold_sample(const EpochParams& P, int64_t i, int64_t e) {
  constexpr int64_t w_acc = tensor_width(G, kTensor_acc);
  constexpr int64_t w_f = tensor_width(G, kTensor_fstats);
  constexpr int64_t w_i = tensor_width(G, kTensor_istats);
  constexpr int64_t w_pe = tensor_width(G, kTensor_forgets);  // times K
  double* a = P.acc + i * w_acc;
  float* f = P.fstats + i * w_f;
  int16_t* ist = P.istats + i * w_i;
  int16_t* pe = P.forgets + i * w_pe * P.K;
  constexpr int32_t c_count = stat_col(G, kStat_count);
  constexpr int32_t c_observed = stat_col(G, kStat_observed);
  const double cnt = a[c_count];
  if (cnt > 0) {
    FoldCtx c;
    c.burn = e <= P.burn_in;
    c.n_prev = ist[c_observed];
    c.epoch = e;
    // the float statistics before this epoch (a fold may read another's old value)
    float old[w_f > 0 ? w_f : 1];
    for (int64_t j = 0; j < w_f; ++j) old[j] = f[j];
    // the inputs: each acc statistic's epoch sum (0 when its group is off), then the signals
    double in[kNumInputs];
#define GDC_STAT(name, group, tensor, fold, input, saved, scores)                         \
    if constexpr (kTensor_##tensor == kTensor_acc) {                                     \
      constexpr int32_t col = stat_col(G, kStat_##name);                                 \
      in[kIn_##name] = col >= 0 ? a[col >= 0 ? col : 0] : 0.0;                            \
    }
#include "state_stats.def"
#define GDC_SIGNAL(name, sum) in[kIn_##name] = in[kIn_##sum] / cnt;
#include "state_stats.def"
    // each folded statistic of the group set, in declaration order
#define GDC_ROW_OF_acc a
#define GDC_ROW_OF_fstats f
#define GDC_ROW_OF_istats ist
#define GDC_ROW_OF_forgets pe
#define GDC_STAT(name, group, tensor, fold, input, saved, scores)                                            \
    if constexpr (kTensor_##tensor != kTensor_acc && stat_col(G, kStat_##name) >= 0) {                       \
      constexpr int32_t col = stat_col(G, kStat_##name);                                                     \
      constexpr int32_t partner = stat_partner(G, kStat_##name);                                             \
      constexpr bool eps_cols = tensor_per_eps(kTensor_##tensor);                                            \
      fold_##fold(GDC_ROW_OF_##tensor + (eps_cols ? col * P.K : col), old, partner, in[kIn_##input], c, P);   \
    }
#include "state_stats.def"
#undef GDC_ROW_OF_acc
#undef GDC_ROW_OF_fstats
#undef GDC_ROW_OF_istats
#undef GDC_ROW_OF_forgets
  }
  for (int64_t j = 0; j < w_acc; ++j) a[j] = 0.0;
}

}  // namespace gdc
