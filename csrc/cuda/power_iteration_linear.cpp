// CUDA binding of gloro_fast::power_iteration_linear and power_iteration_linear_backward: checks,
// dtype groups, workspace allocation (caching allocator), then the launchers of
// csrc/cuda/power_iteration_linear.cu on the current stream. float/double run natively;
// bfloat16/float16 layers are converted to float32 and their results cast back. No host
// synchronisation and no host-to-device copy: a call can be captured in a CUDA graph. The forward
// reports itself to torch.use_deterministic_algorithms (float atomics); the backward has none.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "utils.h"

namespace gloro_fast {
namespace cuda {
// Defined in power_iteration_linear.cu.
size_t power_iteration_linear_workspace_bytes(const int64_t* m, const int64_t* n, int64_t L, size_t elem_size);
void power_iteration_linear_launch(const float* const* w, float* const* u, float* const* sigma, float* images,
                                   const int64_t* m, const int64_t* n, int64_t L, int64_t n_iter, void* workspace,
                                   cudaStream_t stream);
void power_iteration_linear_launch(const double* const* w, double* const* u, double* const* sigma, double* images,
                                   const int64_t* m, const int64_t* n, int64_t L, int64_t n_iter, void* workspace,
                                   cudaStream_t stream);
void power_iteration_linear_backward_launch(const float* const* grad_sigma, const float* images,
                                            const float* const* u, const float* const* sigma, float* const* grad_w,
                                            const int64_t* m, const int64_t* n, int64_t L, void* workspace,
                                            cudaStream_t stream);
void power_iteration_linear_backward_launch(const double* const* grad_sigma, const double* images,
                                            const double* const* u, const double* const* sigma,
                                            double* const* grad_w, const int64_t* m, const int64_t* n, int64_t L,
                                            void* workspace, cudaStream_t stream);
}  // namespace cuda

namespace {

using at::Tensor;

Tensor as_compute(const Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

template <typename T>
void forward_group(at::TensorList weights, at::TensorList iterates, const std::vector<size_t>& idx, int64_t n_iter,
                   std::vector<Tensor>& u_out, std::vector<Tensor>& s_out, std::vector<Tensor>& y_out) {
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t L = static_cast<int64_t>(idx.size());
  std::vector<Tensor> w(L), u(L), s(L);
  std::vector<const T*> wp(L);
  std::vector<T*> up(L), sp(L);
  std::vector<int64_t> m(L), n(L);
  for (int64_t k = 0; k < L; ++k) {
    const size_t l = idx[k];
    w[k] = as_compute(weights[l], ct);
    u[k] = at::empty({weights[l].size(1)}, w[k].options()).copy_(iterates[l]);  // fresh: updated in place
    s[k] = at::empty({}, w[k].options());
    wp[k] = w[k].data_ptr<T>();
    up[k] = u[k].data_ptr<T>();
    sp[k] = s[k].data_ptr<T>();
    m[k] = w[k].size(0);
    n[k] = w[k].size(1);
  }
  const size_t bytes = cuda::power_iteration_linear_workspace_bytes(m.data(), n.data(), L, sizeof(T));
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, w[0].options().dtype(at::kByte));
  int64_t rows = 0;
  for (int64_t k = 0; k < L; ++k) rows += m[k];
  Tensor images = at::empty({rows}, w[0].options());  // the layers' W u end to end (compute dtype)
  cuda::power_iteration_linear_launch(wp.data(), up.data(), sp.data(), images.data_ptr<T>(), m.data(), n.data(), L,
                                      n_iter, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int64_t row = 0;
  for (int64_t k = 0; k < L; ++k) {
    const at::ScalarType out_type = weights[idx[k]].scalar_type();
    u_out[idx[k]] = u[k].to(out_type);
    s_out[idx[k]] = s[k].to(out_type);
    y_out[idx[k]] = images.narrow(0, row, m[k]).clone();  // outputs never alias each other
    row += m[k];
  }
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> power_iteration_linear_cuda(
    at::TensorList weights, at::TensorList iterates, int64_t n_iter) {
  const char* op = "power_iteration_linear";
  std::vector<Tensor> u_out(weights.size()), s_out(weights.size()), y_out(weights.size());
  // no layers: only the lengths to check, and nothing to launch
  const at::Device device = weights.empty() ? at::Device(at::kCUDA) : kernel_device(weights[0], at::kCUDA, op, "weights[0]");
  check_layers(op, weights, iterates, device);
  if (weights.empty()) return {u_out, s_out, y_out};
  TORCH_CHECK(n_iter >= 0, "power_iteration_linear: n_iter must be >= 0, got ", n_iter);
  // per-layer sums of squares by double atomicAdd: the low bits of u and sigma vary from run to run
  at::globalContext().alertNotDeterministic("gloro_fast::power_iteration_linear (CUDA)");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  for (const auto& [dtype, idx] : by_dtype(weights)) {
    if (compute_type(dtype) == at::kDouble) {
      forward_group<double>(weights, iterates, idx, n_iter, u_out, s_out, y_out);
    } else {
      forward_group<float>(weights, iterates, idx, n_iter, u_out, s_out, y_out);
    }
  }
  return {u_out, s_out, y_out};
}

template <typename T>
void backward_group(at::TensorList grad_sigmas, at::TensorList weights, at::TensorList iterates,
                    at::TensorList sigmas, at::TensorList images, const std::vector<size_t>& idx,
                    std::vector<Tensor>& grads) {
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t L = static_cast<int64_t>(idx.size());
  std::vector<Tensor> g(L), u(L), s(L), y(L), out(L);
  std::vector<const T*> gp(L), upt(L), sp(L);
  std::vector<T*> op(L);
  std::vector<int64_t> m(L), n(L);
  for (int64_t k = 0; k < L; ++k) {
    const size_t l = idx[k];
    // an incoming gradient may be an expanded (stride-0) view: materialise it
    g[k] = as_compute(grad_sigmas[l].reshape({}), ct);
    u[k] = as_compute(iterates[l], ct);
    s[k] = as_compute(sigmas[l].reshape({}), ct);
    y[k] = as_compute(images[l], ct);
    out[k] = at::empty({weights[l].size(0), weights[l].size(1)}, u[k].options());
    gp[k] = g[k].data_ptr<T>();
    upt[k] = u[k].data_ptr<T>();
    sp[k] = s[k].data_ptr<T>();
    op[k] = out[k].data_ptr<T>();
    m[k] = weights[l].size(0);
    n[k] = weights[l].size(1);
  }
  const Tensor flat_images = at::cat(y);  // the kernel reads the images end to end
  const size_t bytes = cuda::power_iteration_linear_workspace_bytes(m.data(), n.data(), L, sizeof(T));
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, u[0].options().dtype(at::kByte));
  cuda::power_iteration_linear_backward_launch(gp.data(), flat_images.data_ptr<T>(), upt.data(), sp.data(), op.data(),
                                               m.data(), n.data(), L, workspace.data_ptr(),
                                               c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t k = 0; k < L; ++k) grads[idx[k]] = out[k].to(weights[idx[k]].scalar_type());
}

std::vector<Tensor> power_iteration_linear_backward_cuda(at::TensorList grad_sigmas, at::TensorList weights,
                                                         at::TensorList iterates, at::TensorList sigmas,
                                                         at::TensorList images) {
  const char* op = "power_iteration_linear_backward";
  const at::Device device = weights.empty() ? at::Device(at::kCUDA) : kernel_device(weights[0], at::kCUDA, op, "weights[0]");
  check_layers(op, weights, iterates, device);
  check_layer_scalars(grad_sigmas, sigmas, weights.size());
  check_layer_images(op, images, weights, device);
  std::vector<Tensor> grads(weights.size());
  if (weights.empty()) return grads;
  for (size_t l = 0; l < weights.size(); ++l) {  // the kernels read them on the device
    check_device(grad_sigmas[l], device, op, "every grad_sigma");
    check_device(sigmas[l], device, op, "every sigma");
  }
  const c10::cuda::CUDAGuard guard(weights[0].device());
  for (const auto& [dtype, idx] : by_dtype(weights)) {
    if (compute_type(dtype) == at::kDouble) {
      backward_group<double>(grad_sigmas, weights, iterates, sigmas, images, idx, grads);
    } else {
      backward_group<float>(grad_sigmas, weights, iterates, sigmas, images, idx, grads);
    }
  }
  return grads;
}

}  // namespace
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CUDA, m) {
  m.impl("power_iteration_linear", &gloro_fast::power_iteration_linear_cuda);
  m.impl("power_iteration_linear_backward", &gloro_fast::power_iteration_linear_backward_cuda);
}
