// CUDA bindings of gloro_fast::bottom_logit / bottom_logit_backward: kernels in
// csrc/cuda/bottom_logit.cu, launched on the current CUDA stream. float32/float64 natively;
// bfloat16/float16 computed in float32 and cast back. Returns (f_bot, i_star, j) like the CPU op.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "utils.h"

namespace gloro_fast {
namespace cuda {
// csrc/cuda/bottom_logit.cu
cudaError_t bottom_logit_forward(const float* logits, const float* dist, const float* lipschitz, double eps,
                                 const int64_t* classes, float* bottom, int64_t* i_star, int64_t* j_out, int64_t B,
                                 int64_t C, cudaStream_t s);
cudaError_t bottom_logit_forward(const double* logits, const double* dist, const double* lipschitz, double eps,
                                 const int64_t* classes, double* bottom, int64_t* i_star, int64_t* j_out, int64_t B,
                                 int64_t C, cudaStream_t s);
cudaError_t bottom_logit_backward(const float* grad, const float* dist, const float* lipschitz, double eps,
                                  const int64_t* i_star, const int64_t* classes, float* grad_f, float* grad_d,
                                  float* grad_k, int64_t B, int64_t C, cudaStream_t s);
cudaError_t bottom_logit_backward(const double* grad, const double* dist, const double* lipschitz, double eps,
                                  const int64_t* i_star, const int64_t* classes, double* grad_f, double* grad_d,
                                  double* grad_k, int64_t B, int64_t C, cudaStream_t s);

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& logits, const at::Tensor& distances,
                                                            const at::Tensor& lipschitz, double epsilon,
                                                            const at::Tensor& classes) {
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor bottom = at::empty({B}, logits.options());
  at::Tensor i_star = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor j_out = at::empty({B}, logits.options().dtype(at::kLong));
  // the current stream (c10::cuda::getCurrentCUDAStream is at::cuda::getCurrentCUDAStream)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "bottom_logit_cuda", [&] {
    check_launch(bottom_logit_forward(logits.const_data_ptr<scalar_t>(), distances.const_data_ptr<scalar_t>(),
                                      lipschitz.const_data_ptr<scalar_t>(), epsilon,
                                      classes.defined() ? classes.const_data_ptr<int64_t>() : nullptr,
                                      bottom.mutable_data_ptr<scalar_t>(), i_star.mutable_data_ptr<int64_t>(),
                                      j_out.mutable_data_ptr<int64_t>(), B, C, stream),
                 "bottom_logit");
  });
  return {bottom, i_star, j_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bottom_logit_cuda(const at::Tensor& logits,
                                                                  const at::Tensor& distances,
                                                                  const at::Tensor& lipschitz, double epsilon,
                                                                  const std::optional<at::Tensor>& classes_in) {
  TORCH_CHECK(logits.dim() == 2, "bottom_logit: logits must be 2-D (B, C), got ", logits.sizes());
  const at::Device device = kernel_device(logits, at::kCUDA, "bottom_logit", "logits");
  const int64_t B = logits.size(0), C = logits.size(1);
  check_margin_operands(distances, lipschitz, C, logits.scalar_type(), device, "bottom_logit");
  TORCH_CHECK(std::isfinite(epsilon) && epsilon >= 0, "bottom_logit: epsilon must be finite and >= 0");
  at::Tensor classes;
  if (classes_in.has_value() && classes_in->defined()) {
    check_classes(*classes_in, B, device);
    // the range is checked by the op before the kernel runs (no host sync here); the kernel
    // writes NaN and i* = -1 for an index out of range, never reading outside D
    classes = classes_in->to(at::kLong).contiguous();
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto dtype = logits.scalar_type();
  if (is_reduced(dtype)) {
    auto [bottom, i_star, j_out] = forward_impl(logits.to(at::kFloat).contiguous(),
                                                distances.to(at::kFloat).contiguous(), lipschitz.to(at::kFloat),
                                                epsilon, classes);
    return {bottom.to(dtype), i_star, j_out};
  }
  return forward_impl(logits.contiguous(), distances.contiguous(), lipschitz.contiguous(), epsilon, classes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& distances,
                                                             const at::Tensor& lipschitz, double epsilon,
                                                             const at::Tensor& i_star, const at::Tensor& classes,
                                                             int64_t C) {
  const int64_t B = grad.size(0);
  at::Tensor grad_f = at::zeros({B, C}, distances.options());
  at::Tensor grad_d = at::zeros({C, C}, distances.options());
  at::Tensor grad_k = at::empty({}, distances.options());
  // the current stream (c10::cuda::getCurrentCUDAStream is at::cuda::getCurrentCUDAStream)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "bottom_logit_backward_cuda", [&] {
    check_launch(bottom_logit_backward(grad.const_data_ptr<scalar_t>(), distances.const_data_ptr<scalar_t>(),
                                       lipschitz.const_data_ptr<scalar_t>(), epsilon, i_star.const_data_ptr<int64_t>(),
                                       classes.const_data_ptr<int64_t>(), grad_f.mutable_data_ptr<scalar_t>(),
                                       grad_d.mutable_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(), B, C,
                                       stream),
                 "bottom_logit_backward");
  });
  return {grad_f, grad_d, grad_k};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bottom_logit_backward_cuda(
    const at::Tensor& grad_bottom, const at::Tensor& distances, const at::Tensor& lipschitz, double epsilon,
    const at::Tensor& i_star, const at::Tensor& classes, int64_t num_classes) {
  const int64_t C = num_classes;
  const auto dtype = distances.scalar_type();
  const at::Device device = kernel_device(grad_bottom, at::kCUDA, "bottom_logit_backward", "grad");
  check_margin_operands(distances, lipschitz, C, dtype, device, "bottom_logit_backward");
  check_margin_backward(grad_bottom, i_star, classes, dtype, device);
  // grad_D[j, i*] += g eps K by atomicAdd: rows sharing a cell are summed in a run-dependent order
  at::globalContext().alertNotDeterministic("gloro_fast::bottom_logit_backward (CUDA)");
  const c10::cuda::CUDAGuard guard(grad_bottom.device());
  if (is_reduced(dtype)) {
    // atomics into float32, cast back once
    auto [gf, gd, gk] = backward_impl(grad_bottom.to(at::kFloat).contiguous(), distances.to(at::kFloat).contiguous(),
                                      lipschitz.to(at::kFloat), epsilon, i_star.contiguous(), classes.contiguous(), C);
    return {gf.to(dtype), gd.to(dtype), gk.to(dtype)};
  }
  // contiguous(): the incoming gradient is often an expanded, stride-0 tensor (.sum() backward)
  return backward_impl(grad_bottom.contiguous(), distances.contiguous(), lipschitz.contiguous(), epsilon,
                       i_star.contiguous(), classes.contiguous(), C);
}

}  // namespace
}  // namespace cuda
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CUDA, m) {
  m.impl("bottom_logit", &gloro_fast::cuda::bottom_logit_cuda);
  m.impl("bottom_logit_backward", &gloro_fast::cuda::bottom_logit_backward_cuda);
}
