// The device-generic driver of power_iteration_conv (csrc/cpu/power_iteration_conv.cpp): library
// convolutions (oneDNN / cuDNN, never TF32) with the normalise / norm epilogues passed in, so that
// the CPU kernel and the CUDA binding (csrc/cuda/power_iteration_conv.cpp) differ only in those.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace gloro_fast {
namespace pi_conv {

// Epilogues, given the (N, per) blocks of x (contiguous) and of add (undefined: none):
//   NormalizeFn: out_b = y_b / ||y_b|| with y = x + add, or old_b where ||y_b|| = 0 (new tensor)
//   NormFn:      sigma_b = ||x_b + add_b||, a tensor (N,) of x's dtype
using NormalizeFn = at::Tensor (*)(const at::Tensor& x, const at::Tensor& add, const at::Tensor& old, int64_t blocks);
using NormFn = at::Tensor (*)(const at::Tensor& x, const at::Tensor& add, int64_t blocks);

// (u (N, C_in, H, W), sigma (N,), image (N, C_out, H', W')) for the N layers of one configuration
// stacked on axis 0; image_l = A_l u_l (+ u_l with residual), sigma_l = ||image_l||.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& weight, const at::Tensor& iterate, int64_t n_iter,
                                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                           int64_t groups, bool residual, NormalizeFn normalize, NormFn norm);

// d(sum_l g_l sigma_l)/d weight, from the forward's image (not recomputed).
at::Tensor backward(const at::Tensor& grad_sigma, const at::Tensor& weight, const at::Tensor& iterate,
                    const at::Tensor& sigma, const at::Tensor& image, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups, bool residual);

}  // namespace pi_conv
}  // namespace gloro_fast
