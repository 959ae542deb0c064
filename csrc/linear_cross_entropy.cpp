// The chunk loop of the fused linear + cross-entropy op, written once for every device (the
// matmuls go through ATen: MKL/oneDNN on the CPU, cuBLAS on the current CUDA stream; the row
// kernels come from the device: linear_ce_fwd_on<Device> in csrc/linear_cross_entropy.h, registered
// next to each device's cross-entropy kernels).
//
// Per chunk of rows [r0, r1):
//   L = X[r0:r1] @ W^T (+ b)         into ONE reusable [C, V] buffer in the input's dtype
//   row kernel: loss, NLL, energy and the logit gradient G, written over L in place
//   dX[r0:r1] = G @ W;  dW += G^T @ X[r0:r1];  db += sum_rows(G)   (each only if its
//   compute_grad_* flag is set; dW, db summed in float32 for bfloat16 / float16 inputs)
// and, after the last chunk, the recording of every row at once (a rejected batch leaves the
// CartoState unchanged). The gradients are those of sum(loss_rows * grad_scale); autograd only
// scales them (python/gdc_ext/ops.py). No host synchronisation anywhere: on CUDA every step is
// queued on the current stream.
#include "linear_cross_entropy.h"

#include <c10/core/DeviceGuard.h>

#include <algorithm>

#include "ce_call.h"

namespace gdc {

namespace {

constexpr int64_t kMiB = int64_t(1) << 20;
// Chunk budget constants (see linear_ce_chunk_rows).
constexpr int64_t kMinChunkBytes = 64 * kMiB;
constexpr int64_t kInputFraction = 8;

void check_lce_inputs(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      int64_t chunk_size) {
  TORCH_CHECK_VALUE(input.dim() == 2, "gdc.linear_cross_entropy: input must be 2-D [rows, hidden], got ",
                    input.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(input.scalar_type()),
                    "gdc.linear_cross_entropy: input must be float32, bfloat16, float16 or float64, got ",
                    input.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == input.size(1),
                    "gdc.linear_cross_entropy: linear_weight must be 2-D [classes, hidden] with hidden = ",
                    input.size(1), " (the input's last dimension), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == input.scalar_type(), "gdc.linear_cross_entropy: linear_weight is ",
                    weight.scalar_type(), " but input is ", input.scalar_type(), " (expected the same dtype)");
  TORCH_CHECK_VALUE(weight.device() == input.device(), "gdc.linear_cross_entropy: linear_weight is on ",
                    weight.device(), " but input is on ", input.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0),
                      "gdc.linear_cross_entropy: linear_bias must be 1-D with one value per class (",
                      weight.size(0), "), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == input.scalar_type(), "gdc.linear_cross_entropy: linear_bias is ",
                      bias->scalar_type(), " but input is ", input.scalar_type(), " (expected the same dtype)");
    TORCH_CHECK_VALUE(bias->device() == input.device(), "gdc.linear_cross_entropy: linear_bias is on ",
                      bias->device(), " but input is on ", input.device());
  }
  TORCH_CHECK_VALUE(chunk_size >= 0, "gdc.linear_cross_entropy: chunk_size must be >= 0 (0: automatic), got ",
                    chunk_size);
  TORCH_CHECK_VALUE(weight.size(0) > 0 || input.size(0) == 0, "gdc.linear_cross_entropy: linear_weight has no "
                    "classes (0 rows)");
}

}  // namespace

// The chunk-size rule: a chunk's logits take at most `budget` bytes, where
//   CUDA: budget = max(64 MiB, input bytes / 8). Memory is the scarce resource and cuBLAS runs
//         near peak from a few hundred rows (V = 128256 bfloat16: 261 rows); a very large batch
//         gets bigger chunks, so the number of chunks stays <= 8 V / H.
//   CPU:  budget = max(64 MiB, min(V H elem, R V elem / 4)), i.e. at most the size of the weight
//         gradient the op returns anyway (and a quarter of the full logits). Each chunk re-reads W
//         twice and reads and writes dW (V x H): with fewer than ~H rows per chunk that traffic
//         shows next to the chunk's 6 C V H flops (measured, 2 threads, 4096x1024x32000 float32:
//         520-row chunks 5% slower than 1024-row ones, which match the unchunked matmuls).
// Rows are rounded down to a multiple of 8 (aligned matmul tiles) when there are at least 16;
// at least one row per chunk however large V is; at most R. `requested` > 0 overrides the rule.
int64_t linear_ce_chunk_rows(int64_t R, int64_t V, int64_t H, int64_t elem_size, bool cuda, int64_t requested) {
  if (R <= 0) return 1;
  if (requested > 0) return std::min(requested, R);
  const int64_t row_bytes = std::max<int64_t>(V * elem_size, 1);
  const int64_t budget = cuda ? std::max(kMinChunkBytes, R * H * elem_size / kInputFraction)
                              : std::max(kMinChunkBytes, std::min(V * H * elem_size, R * row_bytes / 4));
  int64_t rows = budget / row_bytes;
  if (rows >= 16) rows -= rows % 8;
  return std::max<int64_t>(1, std::min(rows, R));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_fwd(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& class_weight, const at::Tensor& sample_ids,
    const at::Tensor& sample_weight, const at::Tensor& grad_scale, at::Tensor& acc, int64_t ignore_index,
    double label_smoothing, int64_t chunk_size, bool compute_grad_input, bool compute_grad_weight,
    bool compute_grad_bias, int64_t groups, const CeRowKernels& kernels) {
  check_lce_inputs(input, weight, bias, chunk_size);
  const int64_t R = input.size(0), H = input.size(1), V = weight.size(0);
  // Every input check (targets and ids included) runs here, before anything is written.
  CeCall call = prepare_ce_rows(R, V, input.device(), target, class_weight, sample_ids, sample_weight, grad_scale,
                                acc, ignore_index, label_smoothing, groups);
  const c10::DeviceGuard guard(input.device());
  const bool has_bias = bias.has_value() && bias->defined();
  // Each gradient only when asked for: a frozen weight (LoRA fine-tuning) skips the dW matmul of
  // every chunk (a third of the flops) and the [V, H] buffer. A bias gradient needs a bias.
  const bool want_gx = compute_grad_input;
  const bool want_gw = compute_grad_weight;
  const bool want_gb = compute_grad_bias && has_bias;
  // The logit gradient G is needed by any of them.
  const bool compute_grad = want_gx || want_gw || want_gb;
  const at::Tensor X = input.contiguous();
  const at::Tensor Wt = weight.t();
  // A gradient not computed is a distinct empty tensor: outputs must not alias (the schema says so).
  at::Tensor grad_input = want_gx ? at::empty({R, H}, input.options()) : at::empty({0}, input.options());
  at::Tensor grad_weight = !want_gw ? at::empty({0}, input.options())
                           : R == 0 ? at::zeros_like(weight, at::MemoryFormat::Contiguous)
                                    : at::empty({V, H}, weight.options());  // the first chunk overwrites it
  at::Tensor grad_bias = !want_gb ? at::empty({0}, input.options())
                         : R == 0 ? at::zeros({V}, input.options()) : at::empty({V}, input.options());
  if (R == 0) return {call.loss, call.nll, grad_input, grad_weight, grad_bias};

  const int64_t C = linear_ce_chunk_rows(R, V, H, input.element_size(), input.is_cuda(), chunk_size);
  // dW and db are sums over the chunks. In bfloat16 / float16 a running sum rounded to 8 (11)
  // bits after every chunk loses precision as the chunk count grows (R = 8192 in chunks of 8: a
  // relative max error of 1.5e-1, against torch's 3.8e-3), so for those dtypes the sums are kept
  // in float32 and rounded once at the end. Each chunk's dW product is still one half-precision
  // matmul (float32 accumulation inside the GEMM, full tensor-core speed), written into
  // grad_weight, which serves as the scratch buffer, and added into the float32 sum; with one
  // chunk nothing is summed and grad_weight is the product itself.
  const bool half = input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf;
  const bool sum_w_f32 = want_gw && half && C < R;
  at::Tensor gw_sum = sum_w_f32 ? at::empty({V, H}, input.options().dtype(at::kFloat)) : grad_weight;
  at::Tensor gb_sum = want_gb && half ? at::empty({V}, input.options().dtype(at::kFloat)) : grad_bias;
  at::Tensor buf = at::empty({C, V}, input.options());
  for (int64_t r0 = 0; r0 < R; r0 += C) {
    const int64_t n = std::min(C, R - r0);
    const at::Tensor x = X.narrow(0, r0, n);
    at::Tensor L = buf.narrow(0, 0, n);  // leading rows of a contiguous buffer: contiguous
    if (has_bias) {
      at::addmm_out(L, *bias, x, Wt);
    } else {
      at::mm_out(L, x, Wt);
    }
    kernels.rows(call.p.rows(r0, r0 + n, input.scalar_type(), L.data_ptr(), compute_grad ? L.data_ptr() : nullptr));
    if (want_gx) {
      at::Tensor gx = grad_input.narrow(0, r0, n);
      at::mm_out(gx, L, weight);
    }
    if (want_gw) {
      const at::Tensor Lt = L.t();
      if (sum_w_f32) {
        at::mm_out(grad_weight, Lt, x);
        if (r0 == 0) {
          gw_sum.copy_(grad_weight);
        } else {
          gw_sum.add_(grad_weight);
        }
      } else if (r0 == 0) {
        at::mm_out(grad_weight, Lt, x);
      } else {
        grad_weight.addmm_(Lt, x);
      }
    }
    if (want_gb) {
      if (r0 == 0) {
        at::sum_out(gb_sum, L, at::IntArrayRef{0}, false, gb_sum.scalar_type());
      } else {
        gb_sum.add_(at::sum(L, at::IntArrayRef{0}, false, gb_sum.scalar_type()));
      }
    }
  }
  if (sum_w_f32) grad_weight.copy_(gw_sum);
  if (want_gb && half) grad_bias.copy_(gb_sum);
  if (call.recording) kernels.record(call.p);
  return {call.loss, call.nll, grad_input, grad_weight, grad_bias};
}

}  // namespace gdc
