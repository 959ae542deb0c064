// The cross-entropy contract: everything one launch of the per-row kernels needs, as plain
// pointers, filled once by prepare_ce / prepare_ce_rows (csrc/ce_call.h), which checks every input.
//
// The CPU and CUDA kernels read only this struct, so a caller that produces logits in chunks of
// rows (a fused linear + cross-entropy op, say) fills it once for the whole batch, then points it
// at each chunk with CeParams::rows() and calls the row kernel of its device:
//
//   CeCall call = prepare_ce_rows(R, V, hidden.device(), target, class_weight, sample_ids,
//                                 sample_weight, grad_scale, acc, ignore_index, label_smoothing, groups);
//   for each chunk [r0, r1):              // chunk: [r1 - r0, V] contiguous logits of `dtype`
//     ce_rows_cpu(call.p.rows(r0, r1, dtype, chunk.data_ptr(), grad_chunk_or_null));
//     // (CUDA: ce_rows_cuda(..., stream); chunk may be overwritten by its own gradient)
//   if (call.recording) ce_record_cpu(call.p);   // once, over all R rows (see below)
//
// Recording once after every chunk keeps the rule that a rejected batch (a non-finite NLL, a bad
// target or id) leaves the CartoState unchanged.
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "ce_math.h"      // GDC_HD
#include "state_layout.h"  // the columns of acc (csrc/state_stats.def)

struct CUstream_st;  // cudaStream_t is CUstream_st*; declared here so CPU code needs no CUDA headers

namespace gdc {

struct CeParams {
  // ---- sizes and scalars of the call
  int64_t R = 0;              // rows in this launch
  int64_t V = 0;              // classes
  int64_t N = -1;             // samples (rows of acc / sample_weight); < 0: ids are not range-checked
  int64_t ignore_index = -100;
  float smoothing = 0.f;      // label smoothing in [0, 1]
  c10::ScalarType dtype = c10::ScalarType::Float;  // of logits and grad
  // ---- per row: [R] arrays of this launch (offset by CeParams::rows)
  const void* logits = nullptr;     // [R, V] contiguous, dtype
  void* grad = nullptr;             // [R, V] contiguous, dtype, or null (no gradient); may equal logits
  const int64_t* target = nullptr;  // class index per row, or ignore_index
  const int64_t* ids = nullptr;     // sample id per row, or null (no per-sample data)
  float* loss = nullptr;            // out: training loss (sample weight applied; 0 where ignored)
  float* nll = nullptr;             // out: recorded NLL lse - z[y] (0 where ignored)
  float* energy = nullptr;          // out: recorded ||softmax - onehot||^2 (0 where ignored)
  float* correct = nullptr;         // out: 1 if argmax z == y (the first index among equal maxima,
                                    // as torch.argmax), else 0 (0 where ignored)
  // ---- per call: shared by every chunk
  const float* cw = nullptr;          // [V] class weights, or null (all 1)
  const float* wsum = nullptr;        // scalar sum of cw (same device), or null without cw
  const float* sw = nullptr;          // [N] per-sample loss weights, or null
  const float* grad_scale = nullptr;  // scalar folded into the gradient
  double* acc = nullptr;              // [N, acc_cols] epoch accumulator, or null (not recording)
  int32_t acc_cols = 0;               // columns of acc: the acc statistics of the state's groups
  int32_t acc_src[kMaxAccCols > 0 ? kMaxAccCols : 1] = {};  // the GDC_SOURCE added into each column
  int* bad = nullptr;                 // CUDA with recording: device flag set by a row that must
                                      // not be recorded (the host cannot raise without a sync)

  // This call restricted to rows [r0, r1), whose logits (and gradient, or null) start at the
  // given pointers: a chunk buffer of [r1 - r0, V], or row r0 of the full tensor.
  CeParams rows(int64_t r0, int64_t r1, c10::ScalarType chunk_dtype, const void* chunk_logits,
                void* chunk_grad) const {
    CeParams p = *this;
    p.R = r1 - r0;
    p.dtype = chunk_dtype;
    p.logits = chunk_logits;
    p.grad = chunk_grad;
    p.target = target + r0;
    p.ids = ids ? ids + r0 : nullptr;
    p.loss = loss + r0;
    p.nll = nll + r0;
    p.energy = energy + r0;
    p.correct = correct + r0;
    return p;
  }
};

// The value row r adds into an acc column whose source is src (csrc/state_stats.def, GDC_SOURCE);
// the CPU and CUDA recording both add exactly this. A new source needs a case here.
// p(y) is exp(-nll) of the recorded float32 NLL, in float64: no pass over the logits, and the
// value a caller recomputes from the op's nll output.
GDC_HD double ce_source_value(const CeParams& P, int32_t src, int64_t r) {
  static_assert(kNumSources == 5, "a new GDC_SOURCE needs its per-row value in ce_source_value");
  switch (src) {
    case kSrc_nll:
      return static_cast<double>(P.nll[r]);
    case kSrc_one:
      return 1.0;
    case kSrc_energy:
      return static_cast<double>(P.energy[r]);
    case kSrc_p_y:
      return exp(-static_cast<double>(P.nll[r]));
    case kSrc_correct:
      return static_cast<double>(P.correct[r]);
    default:
      return 0.0;
  }
}

// Per-row kernels: fill loss, nll, energy, correct (and grad if set) for rows [0, P.R). They do
// not record.
// CPU: targets and ids must already be range-checked (prepare_ce does it on the host).
void ce_rows_cpu(const CeParams& P);
// Adds each recorded row's source values (NLL, a token count, energy, p(y), correct: see acc_src) into
// acc[ids[r]] in row order. Raises ValueError
// (state unchanged) if a recorded row has a non-finite NLL. Requires P.acc and P.ids.
void ce_record_cpu(const CeParams& P);

#if defined(GDC_WITH_CUDA)
// Same on the given stream, without host synchronisation. A bad target / id gives NaN loss, NLL
// and gradient for its row and, when recording, sets *P.bad, as does a non-finite NLL.
void ce_rows_cuda(const CeParams& P, CUstream_st* stream);
// Records unless *P.bad is set (then acc is left unchanged); deterministic (CPU row order) under
// torch.use_deterministic_algorithms(True). Needs the CUDA device of P current.
void ce_record_cuda(const CeParams& P, CUstream_st* stream);
#endif

}  // namespace gdc
