// Op schemas of the `gdc` namespace. Kernels register per device in csrc/cpu and csrc/cuda;
// fake (meta) implementations and autograd live in python/gdc_ext/ops.py. The module also exports
// the state's layout (csrc/state_stats.def) to Python: gdc_ext._C.state_layout().
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "epoch_checks.h"  // dtype_name
#include "state_layout.h"

TORCH_LIBRARY(gdc, m) {
  // Fused cross-entropy over [R, V] logits. Returns per-row training loss (float32, sample weight
  // applied), per-row recorded NLL (float32, 0 where ignored) and, if compute_grad, the gradient
  // of sum(loss * grad_scale) w.r.t. the logits (logits' dtype). When acc is non-empty (the
  // float64 [N, columns] epoch accumulator of a state with these statistic groups, see
  // csrc/state_stats.def), each non-ignored row's source values (NLL, a token count, and its
  // logit-gradient energy where the groups keep it) are added to acc[sample_ids[r]] in place.
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, Tensor? class_weight, Tensor sample_ids, "
        "Tensor sample_weight, Tensor grad_scale, Tensor(a!) acc, int ignore_index, float label_smoothing, "
        "bool compute_grad, int groups=1) -> (Tensor, Tensor, Tensor)");
  // Same, writing the gradient over the logits (zero extra memory).
  m.def("cross_entropy_fwd_inplace(Tensor(b!) logits, Tensor target, Tensor? class_weight, Tensor sample_ids, "
        "Tensor sample_weight, Tensor grad_scale, Tensor(a!) acc, int ignore_index, float label_smoothing, "
        "int groups=1) -> (Tensor, Tensor)");
  // grad *= grad_output (scalar or per row), in place; a no-op when the scalar is 1.
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  // Folds the epoch accumulators into the per-sample statistics and zeroes them; epoch += 1.
  // Tensors as csrc/state_stats.def lays them out for `groups`.
  m.def("end_epoch_(Tensor(a!) acc, Tensor(b!) fstats, Tensor(c!) istats, Tensor(d!) forgets, "
        "Tensor(e!) epoch, Tensor eps, int burn_in, int groups=1) -> ()");
  // Fused linear + cross-entropy over input [R, H] and weight [V, H] (+ bias [V]) without the
  // [R, V] logits: chunks of chunk_size rows (0: automatic, see csrc/linear_cross_entropy.cpp).
  // Returns loss_rows [R], nll_rows [R] (float32, as cross_entropy_fwd) and the gradients of
  // sum(loss_rows * grad_scale) w.r.t. input [R, H], weight [V, H] and bias [V], each only if its
  // compute_grad_* flag is set (else, and for an absent bias, empty): a frozen weight (LoRA) skips
  // the dW matmuls and the [V, H] buffer. Records into acc as cross_entropy_fwd does.
  m.def("linear_cross_entropy_fwd(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
        "Tensor sample_ids, Tensor sample_weight, Tensor grad_scale, Tensor(a!) acc, int ignore_index, "
        "float label_smoothing, int chunk_size, bool compute_grad_input, bool compute_grad_weight, "
        "bool compute_grad_bias, int groups=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

std::string quoted(const char* s) { return std::string("\"") + s + "\""; }

// The declarations of csrc/state_stats.def as compiled into this module, as JSON (names only: the
// table's own words), for python/gdc_ext/layout.py.
std::string state_layout_json() {
  using namespace gdc;
  std::string j = "{\"max_epochs\": " + std::to_string(kMaxEpochs) + ", \"groups\": [";
  for (int32_t g = 0; g < kNumGroups; ++g) {
    j += (g ? ", [" : "[") + quoted(kGroupDecls[g].name) + ", " + std::to_string(kGroupDecls[g].bit) + "]";
  }
  j += "], \"tensors\": [";
  for (int32_t t = 0; t < kNumTensors; ++t) {
    j += (t ? ", [" : "[") + quoted(kTensorDecls[t].name) + ", " + quoted(dtype_name(kTensorDecls[t].dtype)) + ", " +
         quoted(kTensorDecls[t].per == kPer_eps ? "eps" : "stat") + "]";
  }
  j += "], \"sources\": [";
  for (int32_t s = 0; s < kNumSources; ++s) j += (s ? ", " : "") + quoted(kSourceNames[s]);
  j += "], \"signals\": [";
  for (int32_t s = 0; s < kNumSignals; ++s) {
    j += (s ? ", [" : "[") + quoted(kSignalDecls[s].name) + ", " + quoted(kStatDecls[kSignalDecls[s].sum].name) + "]";
  }
  j += "], \"folds\": [";
  for (int32_t f = 0; f < kNumFolds; ++f) {
    j += (f ? ", [" : "[") + quoted(kFoldDecls[f].name) + ", " + quoted(kTensorDecls[kFoldDecls[f].tensor].name) + "]";
  }
  auto input_name = [](int32_t in) {
    return in < kInSignal0 ? kSourceNames[in] : in < kInStat0 ? kSignalDecls[in - kInSignal0].name
                                                               : kStatDecls[in - kInStat0].name;
  };
  auto group_name = [](int32_t bit) {
    for (const GroupDecl& g : kGroupDecls) {
      if (g.bit == bit) return g.name;
    }
    return "?";
  };
  j += "], \"stats\": [";
  for (int32_t s = 0; s < kNumStats; ++s) {
    const StatDecl& d = kStatDecls[s];
    j += (s ? ", [" : "[") + quoted(d.name) + ", " + quoted(group_name(d.group)) + ", " +
         quoted(kTensorDecls[d.tensor].name) + ", " + quoted(kFoldDecls[d.fold].name) + ", " +
         quoted(input_name(d.input)) + ", " + quoted(d.saved) + ", " + quoted(d.scores) + "]";
  }
  return j + "]}";
}

PyObject* py_state_layout(PyObject*, PyObject*) {
  const std::string j = state_layout_json();
  return PyUnicode_FromStringAndSize(j.data(), static_cast<Py_ssize_t>(j.size()));
}

PyMethodDef gdc_methods[] = {
    {"state_layout", py_state_layout, METH_NOARGS,
     "The CartoState layout declared in csrc/state_stats.def, as compiled into this module (JSON)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing gdc_ext._C loads this library, which registers the ops above.
static struct PyModuleDef gdc_module = {PyModuleDef_HEAD_INIT, "_C", "gdc_ext kernels (torch.ops.gdc)", -1,
                                        gdc_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&gdc_module); }
