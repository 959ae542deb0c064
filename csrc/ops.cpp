// Op schemas of the `gdc` namespace. Kernels register per device in csrc/cpu and csrc/cuda;
// fake (meta) implementations and autograd live in python/gdc_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(gdc, m) {
  // Fused cross-entropy over [R, V] logits. Returns per-row training loss (float32, sample weight
  // applied), per-row recorded NLL (float32, 0 where ignored) and, if compute_grad, the gradient
  // of sum(loss * grad_scale) w.r.t. the logits (logits' dtype). When acc is non-empty ([N, kNumACols]
  // float64), each non-ignored row's NLL, a token count and its logit-gradient energy are added
  // to acc[sample_ids[r]] in place.
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, Tensor? class_weight, Tensor sample_ids, "
        "Tensor sample_weight, Tensor grad_scale, Tensor(a!) acc, int ignore_index, float label_smoothing, "
        "bool compute_grad) -> (Tensor, Tensor, Tensor)");
  // Same, writing the gradient over the logits (zero extra memory).
  m.def("cross_entropy_fwd_inplace(Tensor(b!) logits, Tensor target, Tensor? class_weight, Tensor sample_ids, "
        "Tensor sample_weight, Tensor grad_scale, Tensor(a!) acc, int ignore_index, float label_smoothing) "
        "-> (Tensor, Tensor)");
  // grad *= grad_output (scalar or per row), in place; a no-op when the scalar is 1.
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  // Folds the epoch accumulators into the per-sample statistics and zeroes them; epoch += 1.
  m.def("end_epoch_(Tensor(a!) acc, Tensor(b!) fstats, Tensor(c!) istats, Tensor(d!) forgets, "
        "Tensor(e!) epoch, Tensor eps, int burn_in) -> ()");
  // Fused linear + cross-entropy over input [R, H] and weight [V, H] (+ bias [V]) without the
  // [R, V] logits: chunks of chunk_size rows (0: automatic, see csrc/linear_cross_entropy.cpp).
  // Returns loss_rows [R], nll_rows [R] (float32, as cross_entropy_fwd) and the gradients of
  // sum(loss_rows * grad_scale) w.r.t. input [R, H], weight [V, H] and bias [V], each only if its
  // compute_grad_* flag is set (else, and for an absent bias, empty): a frozen weight (LoRA) skips
  // the dW matmuls and the [V, H] buffer. Records into acc as cross_entropy_fwd does.
  m.def("linear_cross_entropy_fwd(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
        "Tensor sample_ids, Tensor sample_weight, Tensor grad_scale, Tensor(a!) acc, int ignore_index, "
        "float label_smoothing, int chunk_size, bool compute_grad_input, bool compute_grad_weight, "
        "bool compute_grad_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// Importing gdc_ext._C loads this library, which registers the ops above.
static struct PyModuleDef gdc_module = {PyModuleDef_HEAD_INIT, "_C", "gdc_ext kernels (torch.ops.gdc)", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&gdc_module); }
