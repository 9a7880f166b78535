// CUDA bindings of gloro_fast::class_distances / class_distances_backward: the GEMMs by at::mm
// (cuBLAS), the fused epilogues by the kernels of csrc/cuda/class_distances.cu, all on the
// current CUDA stream. float32/float64 natively; bfloat16/float16 computed in float32.
// Gram form (exact=false, C > 25) on the centred rows; exact: direct differences, no C x C x d.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>

#include "utils.h"

namespace gloro_fast {
namespace cuda {
// csrc/cuda/class_distances.cu
cudaError_t class_distances_gram_epilogue(const float* g, float* out, int64_t C, cudaStream_t s);
cudaError_t class_distances_gram_epilogue(const double* g, double* out, int64_t C, cudaStream_t s);
cudaError_t class_distances_exact(const float* w, float* out, int64_t C, int64_t d, cudaStream_t s);
cudaError_t class_distances_exact(const double* w, double* out, int64_t C, int64_t d, cudaStream_t s);
cudaError_t class_distances_backward_sym(const float* grad, const float* dist, float* sym, float* rowsum, int64_t C,
                                         cudaStream_t s);
cudaError_t class_distances_backward_sym(const double* grad, const double* dist, double* sym, double* rowsum,
                                         int64_t C, cudaStream_t s);
cudaError_t class_distances_backward_rows(const float* v, const float* sv, const float* rowsum, float* out, int64_t C,
                                          int64_t d, cudaStream_t s);
cudaError_t class_distances_backward_rows(const double* v, const double* sv, const double* rowsum, double* out,
                                          int64_t C, int64_t d, cudaStream_t s);

namespace {

constexpr int64_t kGramMinClasses = 26;  // as the CPU kernel and torch.cdist

at::Tensor distances_impl(const at::Tensor& weight, bool exact) {
  const int64_t C = weight.size(0), d = weight.size(1);
  at::Tensor out = at::empty({C, C}, weight.options());
  // the current stream (c10::cuda::getCurrentCUDAStream is at::cuda::getCurrentCUDAStream)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (!exact && C >= kGramMinClasses) {
    const at::Tensor centred = weight - weight.mean(0, /*keepdim=*/true);
    const at::Tensor gram = at::mm(centred, centred.t()).contiguous();
    AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "class_distances_cuda_gram", [&] {
      check_launch(class_distances_gram_epilogue(gram.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                 C, stream),
                   "class_distances");
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "class_distances_cuda_exact", [&] {
      check_launch(class_distances_exact(weight.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), C, d,
                                         stream),
                   "class_distances");
    });
  }
  return out;
}

at::Tensor class_distances_cuda(const at::Tensor& weight, bool exact) {
  check_class_weight(weight, "class_distances");
  kernel_device(weight, at::kCUDA, "class_distances", "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto dtype = weight.scalar_type();
  if (is_reduced(dtype)) return distances_impl(weight.to(at::kFloat).contiguous(), exact).to(dtype);
  return distances_impl(weight.contiguous(), exact);
}

at::Tensor distances_backward_impl(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& distances) {
  const int64_t C = weight.size(0), d = weight.size(1);
  // the current stream (c10::cuda::getCurrentCUDAStream is at::cuda::getCurrentCUDAStream)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor sym = at::empty({C, C}, weight.options());
  at::Tensor rowsum = at::empty({C}, weight.options());
  // diag(S 1) W - S W is translation invariant: use the centred rows (less cancellation)
  const at::Tensor centred = (weight - weight.mean(0, /*keepdim=*/true)).contiguous();
  at::Tensor out = at::empty({C, d}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "class_distances_backward_cuda", [&] {
    check_launch(class_distances_backward_sym(grad.const_data_ptr<scalar_t>(), distances.const_data_ptr<scalar_t>(),
                                              sym.mutable_data_ptr<scalar_t>(), rowsum.mutable_data_ptr<scalar_t>(),
                                              C, stream),
                 "class_distances_backward");
    const at::Tensor sv = at::mm(sym, centred).contiguous();
    check_launch(class_distances_backward_rows(centred.const_data_ptr<scalar_t>(), sv.const_data_ptr<scalar_t>(),
                                               rowsum.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), C,
                                               d, stream),
                 "class_distances_backward");
  });
  return out;
}

at::Tensor class_distances_backward_cuda(const at::Tensor& grad, const at::Tensor& weight,
                                         const at::Tensor& distances) {
  check_class_weight(weight, "class_distances_backward");
  check_class_backward(grad, weight, distances,
                       kernel_device(weight, at::kCUDA, "class_distances_backward", "weight"));
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto dtype = weight.scalar_type();
  if (is_reduced(dtype)) {
    return distances_backward_impl(grad.to(at::kFloat).contiguous(), weight.to(at::kFloat).contiguous(),
                                   distances.to(at::kFloat).contiguous())
        .to(dtype);
  }
  // contiguous(): the incoming gradient is often an expanded, stride-0 tensor
  return distances_backward_impl(grad.contiguous(), weight.contiguous(), distances.contiguous());
}

}  // namespace
}  // namespace cuda
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CUDA, m) {
  m.impl("class_distances", &gloro_fast::cuda::class_distances_cuda);
  m.impl("class_distances_backward", &gloro_fast::cuda::class_distances_backward_cuda);
}
