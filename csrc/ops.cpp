// ops.cpp -- the op schemas (one TORCH_LIBRARY for the whole extension) and the Python module
// stub.  Device implementations register separately: csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu
// for CUDA.  Fake (meta) implementations for torch.compile live in rho_kernels/backends/_extension.py.
//
// Argument contract (checked in Python by rho_kernels/_contract.py, re-checked cheaply in C++):
//   logits            [N, V] or [B, T, V] (rows = leading dims), float32/bfloat16/float16/float64,
//                     any strides, never written;
//   targets           int64 [N], contiguous (flattened leading dims);
//   irreducible_loss  float32 [N], contiguous, or None where the method does not read it;
//   method            rho::Method id (csrc/rho_math.h);
//   k                 0 <= k <= N.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import rho_kernels._C` loads this library, which runs the registrations below.  No Python
// bindings: everything is reached through torch.ops.rho_kernels.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rho_kernels, m) {
  // Every method reads the transformed logits z' (rho::Transform: softcap = 0 means no cap,
  // logit_scale = 1 no scale; rho_math.h).
  // Per-row score (float32 [N]) and log-sum-exp ([N]; float64 for float64 logits, else
  // float32; NaN for methods that do not read the logits).  with_lse=False: the lse is an empty
  // [0] tensor and is never written -- at small V that output is as large as the logits read.
  // with_zsum: a third output sum_j z'_j ([N], the lse dtype; NaN for irreducible), label
  // smoothing's sum; else an empty [0] tensor.
  m.def(
      "score_rows(Tensor logits, Tensor targets, Tensor? irreducible_loss, int method, "
      "int ignore_index, bool with_lse=True, float softcap=0.0, float logit_scale=1.0, "
      "bool with_zsum=False) -> (Tensor, Tensor, Tensor)");
  // Fused score + top-k: (indices int64 [k], scores float32 [k], valid bool [k]) in the
  // order of rho::select_key (score descending, ties to the lower row, ineligible last).
  m.def(
      "select_rows(Tensor logits, Tensor targets, Tensor? irreducible_loss, int k, int method, "
      "int ignore_index, float softcap=0.0, float logit_scale=1.0) -> (Tensor, Tensor, Tensor)");
}
