// Schemas of the gloro_fast custom ops (namespace gloro_fast), shared by every backend.
// CPU kernels register in csrc/cpu/<op>.cpp, CUDA kernels in csrc/cuda/<op>.cpp (+ .cu).
// The Python side (gloro_fast/ops/<op>.py) adds register_fake and register_autograd.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An importable module `gloro_fast._C` whose only job is to load the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(gloro_fast, m) {
  // D (C, C), D_ji = ||w_j - w_i||; exact: direct differences instead of the Gram form.
  m.def("class_distances(Tensor weight, bool exact) -> Tensor");
  m.def("class_distances_backward(Tensor grad, Tensor weight, Tensor distances) -> Tensor");
  // (f_bot (B,), i_star (B,) int64, j (B,) int64); classes=None -> j = argmax f (lowest on ties)
  m.def(
      "bottom_logit(Tensor logits, Tensor distances, Tensor lipschitz, float epsilon, "
      "Tensor? classes) -> (Tensor, Tensor, Tensor)");
  // grads into (logits, distances, lipschitz)
  m.def(
      "bottom_logit_backward(Tensor grad_bottom, Tensor distances, Tensor lipschitz, "
      "float epsilon, Tensor i_star, Tensor classes, int num_classes) -> (Tensor, Tensor, Tensor)");
  // n_iter power iterations on every layer, then sigma_l = ||W_l u_l||: (new iterates, sigmas)
  m.def("power_iteration_linear(Tensor[] weights, Tensor[] iterates, int n_iter) -> (Tensor[], Tensor[])");
  m.def(
      "power_iteration_linear_backward(Tensor[] grad_sigmas, Tensor[] weights, Tensor[] iterates, "
      "Tensor[] sigmas) -> Tensor[]");
  // padding = (top, bottom, left, right); iterate (1, C_in, H, W)
  m.def(
      "power_iteration_conv(Tensor weight, Tensor iterate, int n_iter, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool residual) -> (Tensor, Tensor)");
  m.def(
      "power_iteration_conv_backward(Tensor grad_sigma, Tensor weight, Tensor iterate, Tensor sigma, "
      "int[] stride, int[] padding, int[] dilation, int groups, bool residual) -> Tensor");
}
