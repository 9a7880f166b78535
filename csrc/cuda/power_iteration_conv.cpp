// CUDA binding of gloro_fast::power_iteration_conv and power_iteration_conv_backward.
//
// The driver is the device-generic one of csrc/cpu/power_iteration_conv.cpp (gloro_fast::pi_conv:
// cuDNN convolutions, float32 never in TF32, crop/pad/residual as on CPU); only the
// normalise/norm epilogues differ: here they are the fused kernels of power_iteration_conv.cu,
// launched on the current stream. The backward (the weight gradient as one convolution) is
// device-generic as it is. float/double natively; bfloat16/float16 epilogues run in float32.
// The epilogues sum squares with double atomicAdd (run-to-run low bits): the forward reports
// itself to torch.use_deterministic_algorithms.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../power_iteration_conv.h"
#include "utils.h"

namespace gloro_fast {
namespace cuda {
// Defined in power_iteration_conv.cu.
void power_iteration_conv_normalize_launch(const float* x, const float* add, const float* old, float* out,
                                           int64_t blocks, int64_t per, double* acc, cudaStream_t stream);
void power_iteration_conv_normalize_launch(const double* x, const double* add, const double* old, double* out,
                                           int64_t blocks, int64_t per, double* acc, cudaStream_t stream);
void power_iteration_conv_norm_launch(const float* x, const float* add, float* sigma, int64_t blocks, int64_t per,
                                      double* acc, unsigned* count, cudaStream_t stream);
void power_iteration_conv_norm_launch(const double* x, const double* add, double* sigma, int64_t blocks,
                                      int64_t per, double* acc, unsigned* count, cudaStream_t stream);
}  // namespace cuda

namespace {

using at::Tensor;

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

Tensor normalize_cuda(const Tensor& x_in, const Tensor& add_in, const Tensor& old_in, int64_t blocks) {
  const at::ScalarType ct = compute_type(x_in.scalar_type());
  const Tensor x = x_in.to(ct).contiguous();
  const Tensor add = add_in.defined() ? add_in.to(ct).contiguous() : add_in;
  const Tensor old = old_in.to(ct).contiguous();
  Tensor out = at::empty(x.sizes(), x.options());
  Tensor acc = at::zeros({blocks}, x.options().dtype(at::kDouble));
  const int64_t per = blocks > 0 ? x.numel() / blocks : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (ct == at::kDouble) {
    cuda::power_iteration_conv_normalize_launch(x.data_ptr<double>(), ptr_or_null<double>(add), old.data_ptr<double>(),
                                                out.data_ptr<double>(), blocks, per, acc.data_ptr<double>(), stream);
  } else {
    cuda::power_iteration_conv_normalize_launch(x.data_ptr<float>(), ptr_or_null<float>(add), old.data_ptr<float>(),
                                                out.data_ptr<float>(), blocks, per, acc.data_ptr<double>(), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.to(x_in.scalar_type());
}

Tensor norm_cuda(const Tensor& x_in, const Tensor& add_in, int64_t blocks) {
  const at::ScalarType ct = compute_type(x_in.scalar_type());
  const Tensor x = x_in.to(ct).contiguous();
  const Tensor add = add_in.defined() ? add_in.to(ct).contiguous() : add_in;
  Tensor sigma = at::empty({blocks}, x.options());
  // blocks doubles of sums, then blocks counters (zero bits): one zeroed allocation
  Tensor acc = at::zeros({2 * blocks}, x.options().dtype(at::kDouble));
  double* accp = acc.data_ptr<double>();
  auto* count = reinterpret_cast<unsigned*>(accp + blocks);
  const int64_t per = blocks > 0 ? x.numel() / blocks : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (ct == at::kDouble) {
    cuda::power_iteration_conv_norm_launch(x.data_ptr<double>(), ptr_or_null<double>(add), sigma.data_ptr<double>(),
                                           blocks, per, accp, count, stream);
  } else {
    cuda::power_iteration_conv_norm_launch(x.data_ptr<float>(), ptr_or_null<float>(add), sigma.data_ptr<float>(),
                                           blocks, per, accp, count, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sigma.to(x_in.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> power_iteration_conv_cuda(const Tensor& weight, const Tensor& iterate, int64_t n_iter,
                                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                                     at::IntArrayRef dilation, int64_t groups, bool residual) {
  TORCH_CHECK(weight.is_cuda() && iterate.device() == weight.device(),
              "power_iteration_conv (CUDA kernel): weight and iterate must be on one CUDA device");
  at::globalContext().alertNotDeterministic("gloro_fast::power_iteration_conv (CUDA)");
  const c10::cuda::CUDAGuard guard(weight.device());
  return pi_conv::forward(weight, iterate, n_iter, stride, padding, dilation, groups, residual, &normalize_cuda,
                          &norm_cuda);
}

Tensor power_iteration_conv_backward_cuda(const Tensor& grad_sigma, const Tensor& weight, const Tensor& iterate,
                                          const Tensor& sigma, const Tensor& image, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                          bool residual) {
  TORCH_CHECK(weight.is_cuda(), "power_iteration_conv_backward (CUDA kernel): weight must be on CUDA");
  const c10::cuda::CUDAGuard guard(weight.device());
  return pi_conv::backward(grad_sigma.to(weight.device()), weight, iterate, sigma, image, stride, padding, dilation,
                           groups, residual);
}

}  // namespace
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CUDA, m) {
  m.impl("power_iteration_conv", &gloro_fast::power_iteration_conv_cuda);
  m.impl("power_iteration_conv_backward", &gloro_fast::power_iteration_conv_backward_cuda);
}
