// Helpers shared by the CPU kernels (csrc/cpu) and the CUDA bindings (csrc/cuda/*.cpp): the
// dtype policy and the argument checks of each op's kernels, so that a kernel on either device
// rejects the same input with the same message. The ops' own argument check (gloro_fast/ops,
// Python) runs before any kernel; these guard the kernels' memory accesses when they are
// called directly.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <map>
#include <vector>

namespace gloro_fast {

// bfloat16 / float16 are read as such and computed in float32 (at::opmath_type), then cast back.
inline bool is_reduced(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// The dtype a kernel computes in: float64 for float64, float32 for every other floating dtype.
inline at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Layer indices grouped by dtype (one group in the usual case): a call may mix dtypes.
inline std::map<at::ScalarType, std::vector<size_t>> by_dtype(at::TensorList weights) {
  std::map<at::ScalarType, std::vector<size_t>> groups;
  for (size_t l = 0; l < weights.size(); ++l) groups[weights[l].scalar_type()].push_back(l);
  return groups;
}

// `t` must live where the kernel runs: on `device` (a CUDA kernel runs on its first tensor's device).
inline void check_device(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the kernel's other tensors, got ",
              t.device());
}

// The device a kernel for `type` runs on, given its first tensor (named `name`).
inline at::Device kernel_device(const at::Tensor& first, at::DeviceType type, const char* op, const char* name) {
  TORCH_CHECK(first.device().type() == type, op, " (", at::DeviceTypeName(type), " kernel): ", name, " must be a ",
              at::DeviceTypeName(type), " tensor, got one on ", first.device());
  return first.device();
}

// class_distances(_backward): W (C, d), C, d >= 1, floating point.
inline void check_class_weight(const at::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (C, d), got ", weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(1) >= 1, op, ": weight must have C, d >= 1, got ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op, ": weight must be floating point, got ",
              weight.scalar_type());
}

// class_distances_backward: grad and distances (C, C) of weight's dtype and device.
inline void check_class_backward(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& distances,
                                 const at::Device& device) {
  const char* op = "class_distances_backward";
  const int64_t C = weight.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == C && grad.size(1) == C, op, ": grad must have shape (", C, ", ", C,
              "), got ", grad.sizes());
  TORCH_CHECK(distances.dim() == 2 && distances.size(0) == C && distances.size(1) == C, op,
              ": distances must have shape (", C, ", ", C, "), got ", distances.sizes());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type() && distances.scalar_type() == weight.scalar_type(), op,
              ": grad, weight and distances must share a dtype");
  check_device(grad, device, op, "grad");
  check_device(distances, device, op, "distances");
}

// bottom_logit(_backward): D (C, C) and a 0-dim K, both of dtype `dtype`, on `device`, C >= 2.
inline void check_margin_operands(const at::Tensor& distances, const at::Tensor& lipschitz, int64_t C,
                                  at::ScalarType dtype, const at::Device& device, const char* op) {
  TORCH_CHECK(C >= 2, op, ": need at least 2 classes, got ", C);
  TORCH_CHECK(distances.dim() == 2 && distances.size(0) == C && distances.size(1) == C, op,
              ": distances must have shape (", C, ", ", C, "), got ", distances.sizes());
  TORCH_CHECK(lipschitz.dim() == 0, op, ": lipschitz must be 0-dim, got ", lipschitz.sizes());
  TORCH_CHECK(distances.scalar_type() == dtype && lipschitz.scalar_type() == dtype, op,
              ": distances and lipschitz must have dtype ", dtype);
  TORCH_CHECK(at::isFloatingType(dtype), op, ": expected a floating-point dtype, got ", dtype);
  check_device(distances, device, op, "distances");
  check_device(lipschitz, device, op, "lipschitz");
}

// bottom_logit: the optional classes, integer of shape (B,) on `device`.
inline void check_classes(const at::Tensor& classes, int64_t B, const at::Device& device) {
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == B, "bottom_logit: classes must have shape (", B, "), got ",
              classes.sizes());
  TORCH_CHECK(!at::isFloatingType(classes.scalar_type()) && classes.scalar_type() != at::kBool,
              "bottom_logit: classes must be integer");
  check_device(classes, device, "bottom_logit", "classes");
}

// bottom_logit_backward: g (B,) of dtype `dtype`, i_star and classes (B,) int64, on `device`.
inline void check_margin_backward(const at::Tensor& grad, const at::Tensor& i_star, const at::Tensor& classes,
                                  at::ScalarType dtype, const at::Device& device) {
  const char* op = "bottom_logit_backward";
  TORCH_CHECK(grad.dim() == 1, op, ": grad must be 1-D, got ", grad.sizes());
  const int64_t B = grad.size(0);
  TORCH_CHECK(grad.scalar_type() == dtype, op, ": grad must have dtype ", dtype);
  TORCH_CHECK(i_star.dim() == 1 && i_star.size(0) == B && classes.dim() == 1 && classes.size(0) == B, op,
              ": i_star and classes must have shape (", B, ")");
  TORCH_CHECK(i_star.scalar_type() == at::kLong && classes.scalar_type() == at::kLong, op,
              ": i_star and classes must be int64");
  check_device(i_star, device, op, "i_star");
  check_device(classes, device, op, "classes");
}

// power_iteration_linear(_backward): weights[l] (m, n), iterates[l] (n,) of one floating dtype,
// every tensor on `device`.
inline void check_layers(const char* op, at::TensorList weights, at::TensorList iterates, const at::Device& device) {
  TORCH_CHECK(weights.size() == iterates.size(), op, ": weights and iterates must have the same length, got ",
              weights.size(), " and ", iterates.size());
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    const at::Tensor& u = iterates[l];
    TORCH_CHECK(w.dim() == 2, op, ": weights[", l, "] must be 2-D, got ", w.sizes());
    TORCH_CHECK(u.dim() == 1 && u.size(0) == w.size(1), op, ": iterates[", l, "] must have shape (", w.size(1),
                "), got ", u.sizes());
    TORCH_CHECK(at::isFloatingType(w.scalar_type()) && u.scalar_type() == w.scalar_type(), op, ": weights[", l,
                "] and iterates[", l, "] must share one floating dtype, got ", w.scalar_type(), " and ",
                u.scalar_type());
    check_device(w, device, op, "every weight");
    check_device(u, device, op, "every iterate");
  }
}

// power_iteration_linear_backward: one gradient and one sigma per layer.
inline void check_layer_scalars(at::TensorList grad_sigmas, at::TensorList sigmas, size_t layers) {
  const char* op = "power_iteration_linear_backward";
  TORCH_CHECK(grad_sigmas.size() == layers && sigmas.size() == layers, op,
              ": grad_sigmas, weights, iterates and sigmas must have the same length");
  for (size_t l = 0; l < layers; ++l) {
    TORCH_CHECK(grad_sigmas[l].numel() == 1 && sigmas[l].numel() == 1, op, ": grad_sigmas[", l, "] and sigmas[",
                l, "] must hold one value each");
  }
}

// The images y_l = W_l u_l a power_iteration_linear forward returned: (m_l,) in the
// accumulation dtype (float64 for float64 weights, float32 otherwise), on `device`.
inline void check_layer_images(const char* op, at::TensorList images, at::TensorList weights,
                               const at::Device& device) {
  TORCH_CHECK(images.size() == weights.size(), op, ": images and weights must have the same length, got ",
              images.size(), " and ", weights.size());
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& y = images[l];
    const auto want = compute_type(weights[l].scalar_type());
    TORCH_CHECK(y.dim() == 1 && y.size(0) == weights[l].size(0) && y.scalar_type() == want, op, ": images[", l,
                "] must be a ", want, " vector of ", weights[l].size(0), " values, got ", y.scalar_type(), " ",
                y.sizes());
    check_device(y, device, op, "every image");
  }
}

}  // namespace gloro_fast
