// The CartoState's layout, generated from the declarations of csrc/state_stats.def: enums of the
// groups, tensors, per-row sources, signals, fold kinds and statistics; the declarations as
// constexpr tables (host side), checked at compile time; and the columns of a state with a given
// set of groups (StateLayout, computed on the host and handed to the kernels in their params).
#pragma once
#include <cstdint>
#include <limits>
#include <type_traits>

namespace gdc {

enum GroupBit : int32_t {
#define GDC_GROUP(name, bit) kGroup_##name = bit,
#include "state_stats.def"
};
constexpr int32_t kAllGroups = 0
#define GDC_GROUP(name, bit) | (bit)
#include "state_stats.def"
    ;

enum DType : int32_t { kDType_float64, kDType_float32, kDType_int16 };
enum Per : int32_t { kPer_stat, kPer_eps };

enum TensorId : int32_t {
#define GDC_TENSOR(name, dtype, per) kTensor_##name,
#include "state_stats.def"
  kNumTensors
};
enum SourceId : int32_t {
#define GDC_SOURCE(name) kSrc_##name,
#include "state_stats.def"
  kNumSources
};
enum SignalId : int32_t {
#define GDC_SIGNAL(name, sum) kSig_##name,
#include "state_stats.def"
  kNumSignals
};
enum FoldId : int32_t {
#define GDC_FOLD(name, tensor) kFold_##name,
#include "state_stats.def"
  kNumFolds
};
enum StatId : int32_t {
#define GDC_STAT(name, group, tensor, fold, input, saved, scores) kStat_##name,
#include "state_stats.def"
  kNumStats
};

// One dense numbering of everything a statistic can take as input: sources, then signals, then
// statistics (a name declared twice is a redefinition error here).
#define GDC_SOURCE(name) constexpr int32_t kIn_##name = kSrc_##name;
#define GDC_SIGNAL(name, sum) constexpr int32_t kIn_##name = kNumSources + kSig_##name;
#define GDC_STAT(name, group, tensor, fold, input, saved, scores) \
  constexpr int32_t kIn_##name = kNumSources + kNumSignals + kStat_##name;
#include "state_stats.def"
constexpr int32_t kNumInputs = kNumSources + kNumSignals + kNumStats;
constexpr int32_t kInSignal0 = kNumSources;
constexpr int32_t kInStat0 = kNumSources + kNumSignals;

// ---- the declarations as tables (host code: layout, checks, the export to Python)
struct GroupDecl { const char* name; int32_t bit; };
struct TensorDecl { const char* name; int32_t dtype; int32_t per; };
struct SignalDecl { const char* name; int32_t sum; };
struct FoldDecl { const char* name; int32_t tensor; };
struct StatDecl {
  const char* name;
  int32_t group, tensor, fold, input;
  const char* saved;
  const char* scores;
};

constexpr GroupDecl kGroupDecls[] = {
#define GDC_GROUP(name, bit) {#name, bit},
#include "state_stats.def"
};
constexpr int32_t kNumGroups = sizeof(kGroupDecls) / sizeof(kGroupDecls[0]);
constexpr TensorDecl kTensorDecls[kNumTensors] = {
#define GDC_TENSOR(name, dtype, per) {#name, kDType_##dtype, kPer_##per},
#include "state_stats.def"
};
constexpr const char* kSourceNames[kNumSources] = {
#define GDC_SOURCE(name) #name,
#include "state_stats.def"
};
constexpr SignalDecl kSignalDecls[kNumSignals] = {
#define GDC_SIGNAL(name, sum) {#name, kStat_##sum},
#include "state_stats.def"
};
constexpr FoldDecl kFoldDecls[kNumFolds] = {
#define GDC_FOLD(name, tensor) {#name, kTensor_##tensor},
#include "state_stats.def"
};
constexpr StatDecl kStatDecls[kNumStats] = {
#define GDC_STAT(name, group, tensor, fold, input, saved, scores) \
  {#name, kGroup_##group, kTensor_##tensor, kFold_##fold, kIn_##input, #saved, #scores},
#include "state_stats.def"
};

// Counters are int16 and grow by at most 1 per epoch: a state folds at most this many epochs.
constexpr int64_t kMaxEpochs = std::numeric_limits<int16_t>::max();
// Upper bounds of a row's columns, for the fixed-size arrays of the kernels.
constexpr int32_t count_in(int32_t tensor) {
  int32_t n = 0;
  for (const StatDecl& s : kStatDecls) n += s.tensor == tensor;
  return n;
}
constexpr int32_t kMaxAccCols = count_in(kTensor_acc);
constexpr int32_t kMaxFCols = count_in(kTensor_fstats);

// The statistic whose old value a fold kind reads besides its own (-1: none): welford_m2 needs
// the welford_mean of its input, forget_events and full_drops the last value of their input.
constexpr int32_t partner_fold(int32_t fold) {
  if (fold == kFold_welford_m2) return kFold_welford_mean;
  if (fold == kFold_forget_events || fold == kFold_full_drops) return kFold_last;
  return -1;
}
// The group of the accumulator column an input is computed from: a source's is core (the kernels
// always have it), a signal's that of its sum, an acc statistic's its own.
constexpr int32_t input_group(int32_t in) {
  return in < kInSignal0 ? kGroup_core
         : in < kInStat0 ? kStatDecls[kSignalDecls[in - kInSignal0].sum].group
                         : kStatDecls[in - kInStat0].group;
}
constexpr int32_t partner_of(int32_t stat) {
  const int32_t want = partner_fold(kStatDecls[stat].fold);
  if (want < 0) return -1;
  for (int32_t p = 0; p < kNumStats; ++p) {
    if (kStatDecls[p].fold == want && kStatDecls[p].input == kStatDecls[stat].input) return p;
  }
  return -2;  // missing: rejected below
}

// ---- compile-time checks of the declarations
constexpr bool table_is_valid() {
  for (int32_t s = 0; s < kNumStats; ++s) {
    const StatDecl& d = kStatDecls[s];
    if (kFoldDecls[d.fold].tensor != d.tensor) return false;  // a fold kind lives in one tensor
    const bool acc = d.tensor == kTensor_acc;
    if (acc != (d.input < kInSignal0)) return false;  // acc: a source; folded: a signal or a statistic
    if (d.input >= kInStat0 && kStatDecls[d.input - kInStat0].tensor != kTensor_acc) return false;
    // its input is kept whenever it is
    if (input_group(d.input) != kGroup_core && input_group(d.input) != d.group) return false;
    const int32_t p = partner_of(s);
    if (p == -2) return false;
    if (p >= 0 && kStatDecls[p].group != kGroup_core && kStatDecls[p].group != d.group) return false;
  }
  for (const SignalDecl& g : kSignalDecls) {
    if (kStatDecls[g.sum].tensor != kTensor_acc) return false;
  }
  return kStatDecls[kStat_count].group == kGroup_core && kStatDecls[kStat_observed].group == kGroup_core &&
         kStatDecls[kStat_count].tensor == kTensor_acc && kStatDecls[kStat_observed].tensor == kTensor_istats &&
         kTensorDecls[kTensor_acc].dtype == kDType_float64 && kTensorDecls[kTensor_fstats].dtype == kDType_float32 &&
         kTensorDecls[kTensor_istats].dtype == kDType_int16 && kTensorDecls[kTensor_forgets].dtype == kDType_int16 &&
         kTensorDecls[kTensor_forgets].per == kPer_eps;
}
static_assert(table_is_valid(), "csrc/state_stats.def: inconsistent declarations (see table_is_valid)");

// ---- the columns of a state with a set of groups (host)
struct StateLayout {
  int32_t groups = 0;
  int64_t K = 0;                      // eps thresholds
  int64_t width[kNumTensors] = {};    // columns of each tensor
  int32_t col[kNumStats] = {};        // column of each statistic in its tensor, -1 if its group is off
                                      // (per-eps statistics: the first of its K columns)
  int32_t partner[kNumStats] = {};    // column of the statistic its fold also reads, -1 if none
};

constexpr bool groups_are_valid(int64_t groups) {
  return (groups & kGroup_core) && (groups & ~int64_t(kAllGroups)) == 0;
}

// groups must be valid (groups_are_valid) and K >= 1. constexpr: the fold is compiled for each
// group set with its columns as constants (csrc/epoch_math.h).
constexpr StateLayout make_state_layout(int64_t groups, int64_t K) {
  StateLayout L{};
  L.groups = static_cast<int32_t>(groups);
  L.K = K;
  for (int32_t s = 0; s < kNumStats; ++s) {
    const StatDecl& d = kStatDecls[s];
    if (!(groups & d.group)) {
      L.col[s] = -1;
      continue;
    }
    const int64_t step = kTensorDecls[d.tensor].per == kPer_eps ? K : 1;
    L.col[s] = static_cast<int32_t>(L.width[d.tensor]);
    L.width[d.tensor] += step;
  }
  for (int32_t s = 0; s < kNumStats; ++s) {
    const int32_t p = partner_of(s);
    L.partner[s] = p >= 0 && L.col[s] >= 0 ? L.col[p] : -1;
  }
  return L;
}

// Calls f(std::integral_constant<int32_t, G>{}) with G == groups, for every valid group set G
// (host code: picks the fold compiled for the state's groups). groups must be valid.
template <int32_t G = kAllGroups, typename F>
void with_groups(int64_t groups, F&& f) {
  if constexpr (G >= 1) {
    if constexpr (groups_are_valid(G)) {
      if (groups == G) {
        f(std::integral_constant<int32_t, G>{});
        return;
      }
    }
    with_groups<G - 1>(groups, static_cast<F&&>(f));
  }
}

}  // namespace gdc
