// CPU kernels of gloro_fast::power_iteration_conv and gloro_fast::power_iteration_conv_backward,
// and the device-generic driver that the CUDA binding (csrc/cuda/power_iteration_conv.cpp) reuses.
//
// Operator A: the zero-padded, strided, dilated, grouped 2-d convolution on the iterate's H x W
// (or I + conv with residual). padding = (top, bottom, left, right); asymmetric padding is an
// explicit zero pad before the convolution, and in the adjoint a crop after the transposed one.
// The convolutions are the library's (oneDNN / cuDNN, through convolution_ieee below); around them:
//   forward:  n_iter times  v = A u (residual added in place), x = A^T v, then the fused epilogue
//             u = (x [+ v]) / ||x [+ v]|| (keeping u where the norm is 0); then the image
//             y = A u (+ u) and sigma = ||y|| by the fused norm epilogue; y is returned.
//   backward: grad_W = (g / sigma) * d||A u||/dW with gy = the forward's image y scaled per block
//             by g/sigma (0 where sigma = 0): the weight gradient is itself ONE convolution
//             (conv_weight_grad below); y is not computed again.
// float32 on CUDA never uses TF32: cuDNN is called with allow_tf32 = false whatever
// torch.backends.cudnn.allow_tf32 says (True by default), which would cost ~1e-4 relative on sigma.
// Batching: the iterate may hold N layers of one configuration, (N, C_in, H, W), with the
// weight (N * C_out, C_in / groups, kh, kw) holding their kernels end to end on the output axis.
// The N layers then run as ONE grouped convolution (groups * N) on the channel-stacked iterate
// (1, N * C_in, H, W), with per-layer normalisation; sigma has shape (N,) (N = 1 for one layer).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../power_iteration_conv.h"

namespace gloro_fast {
namespace pi_conv {

using at::Tensor;

struct Geometry {
  int64_t blocks, c_in, c_out;  // c_in, c_out per layer
  std::vector<int64_t> stride, dilation, conv_pad, out_pad;
  int64_t top, bottom, left, right, height, width;
  bool symmetric;
  int64_t groups;  // total: per-layer groups * blocks
};

Geometry check_and_geometry(const char* op, const Tensor& weight, const Tensor& iterate, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool residual) {
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D, got ", weight.sizes());
  TORCH_CHECK(iterate.dim() == 4, op, ": iterate must be 4-D (N, C_in, H, W), got ", iterate.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()) && iterate.scalar_type() == weight.scalar_type(), op,
              ": weight and iterate must share one floating dtype, got ", weight.scalar_type(), " and ",
              iterate.scalar_type());
  TORCH_CHECK(weight.device() == iterate.device(), op, ": weight and iterate must be on one device");
  TORCH_CHECK(stride.size() == 2 && dilation.size() == 2 && padding.size() == 4, op,
              ": stride and dilation must have 2 entries and padding 4 (top, bottom, left, right)");
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  Geometry g;
  g.blocks = iterate.size(0);
  TORCH_CHECK(g.blocks >= 1, op, ": iterate must hold at least one layer");
  g.c_in = iterate.size(1);
  TORCH_CHECK(weight.size(1) * groups == g.c_in, op, ": weight ", weight.sizes(), " with groups=", groups,
              " does not match the ", g.c_in, " input channels of iterate ", iterate.sizes());
  TORCH_CHECK(weight.size(0) % (g.blocks * groups) == 0, op, ": the ", weight.size(0),
              " output channels of weight must be a multiple of (layers ", g.blocks, ") x (groups ", groups, ")");
  g.c_out = weight.size(0) / g.blocks;
  g.groups = groups * g.blocks;
  for (int a = 0; a < 2; ++a) {
    TORCH_CHECK(stride[a] >= 1 && dilation[a] >= 1, op, ": stride and dilation must be >= 1");
  }
  for (int a = 0; a < 4; ++a) TORCH_CHECK(padding[a] >= 0, op, ": padding must be >= 0");
  g.stride = {stride[0], stride[1]};
  g.dilation = {dilation[0], dilation[1]};
  g.top = padding[0];
  g.bottom = padding[1];
  g.left = padding[2];
  g.right = padding[3];
  g.height = iterate.size(2);
  g.width = iterate.size(3);
  g.symmetric = g.top == g.bottom && g.left == g.right;
  g.conv_pad = g.symmetric ? std::vector<int64_t>{g.top, g.left} : std::vector<int64_t>{0, 0};
  const int64_t target[2] = {g.symmetric ? g.height : g.height + g.top + g.bottom,
                             g.symmetric ? g.width : g.width + g.left + g.right};
  const int64_t padded[2] = {g.height + g.top + g.bottom, g.width + g.left + g.right};
  g.out_pad.resize(2);
  int64_t out_hw[2];
  for (int a = 0; a < 2; ++a) {
    const int64_t k = weight.size(2 + a);
    const int64_t span = g.dilation[a] * (k - 1) + 1;
    TORCH_CHECK(padded[a] >= span, op, ": padded input ", (a ? "width " : "height "), padded[a],
                " is smaller than the dilated kernel of weight ", weight.sizes());
    out_hw[a] = (padded[a] - span) / g.stride[a] + 1;
    // conv_transpose output size before output_padding, then what restores the target
    const int64_t base = (out_hw[a] - 1) * g.stride[a] - 2 * g.conv_pad[a] + span;
    g.out_pad[a] = target[a] - base;
  }
  if (residual) {
    TORCH_CHECK(g.c_out == g.c_in && out_hw[0] == g.height && out_hw[1] == g.width, op,
                ": residual needs a convolution whose output shape equals its input shape (", g.c_in, ", ",
                g.height, ", ", g.width, "), got (", g.c_out, ", ", out_hw[0], ", ", out_hw[1], ")");
  }
  return g;
}

// at::convolution without bias, never in TF32: float32 CUDA tensors go to cuDNN with
// allow_tf32 = false (benchmark / deterministic as at::convolution would pass them); other dtypes
// and devices, or a disabled cuDNN, take at::convolution (no cuDNN TF32 there).
Tensor convolution_ieee(const Tensor& input, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding, int64_t groups) {
  auto& ctx = at::globalContext();
  if (input.is_cuda() && input.scalar_type() == at::kFloat && ctx.userEnabledCuDNN() &&
      at::detail::getCUDAHooks().compiledWithCuDNN()) {
    const bool benchmark = ctx.benchmarkCuDNN();
    const bool deterministic = ctx.deterministicCuDNN() || ctx.deterministicAlgorithms();
    const Tensor x = input.contiguous(), w = weight.contiguous();
    if (transposed) {
      return at::cudnn_convolution_transpose(x, w, padding, output_padding, stride, dilation, groups, benchmark,
                                             deterministic, /*allow_tf32=*/false);
    }
    return at::cudnn_convolution(x, w, padding, stride, dilation, groups, benchmark, deterministic,
                                 /*allow_tf32=*/false);
  }
  return at::convolution(input, weight, std::nullopt, stride, padding, dilation, transposed, output_padding, groups);
}

// A u on the channel-stacked iterate (1, N*C_in, H, W), without the residual.
Tensor apply(const Tensor& u, const Tensor& weight, const Geometry& g) {
  const Tensor input = g.symmetric ? u : at::constant_pad_nd(u, {g.left, g.right, g.top, g.bottom}, 0);
  return convolution_ieee(input, weight, g.stride, g.conv_pad, g.dilation, /*transposed=*/false, {0, 0}, g.groups);
}

// A^T v without the residual: the transposed convolution, cropped for asymmetric padding.
Tensor apply_adjoint(const Tensor& v, const Tensor& weight, const Geometry& g) {
  Tensor out = convolution_ieee(v, weight, g.stride, g.conv_pad, g.dilation, /*transposed=*/true, g.out_pad, g.groups);
  if (!g.symmetric) out = out.narrow(2, g.top, g.height).narrow(3, g.left, g.width).contiguous();
  return out;
}

// d<gy, conv(padded, K)>/dK for the unpadded convolution of `padded` (1, G*C_in, Hp, Wp) with kernels
// of shape (C_out_total, C_in, kh, kw), as ONE convolution: the input channels as the batch
// (C_in, G, Hp, Wp), gy as the kernels (C_out_total, 1, H', W'), stride = the dilation and
// dilation = the stride, so out[c, o, a, b] = sum_{y,x} gy[o, y, x] padded[g(o) C_in + c, a dil + y s,
// b dil + x s] = dK[o, c, a, b] (cropped to kh x kw). Unlike at::convolution_backward, this takes
// convolution_ieee's precision.
Tensor conv_weight_grad(const Tensor& padded, const Tensor& gy, at::IntArrayRef weight_sizes, const Geometry& g) {
  const int64_t c_in = weight_sizes[1], kh = weight_sizes[2], kw = weight_sizes[3];
  const Tensor x = padded.reshape({g.groups, c_in, padded.size(2), padded.size(3)}).transpose(0, 1);
  const Tensor k = gy.reshape({weight_sizes[0], 1, gy.size(2), gy.size(3)});
  const Tensor out = convolution_ieee(x, k, /*stride=*/g.dilation, /*padding=*/{0, 0}, /*dilation=*/g.stride,
                                      /*transposed=*/false, {0, 0}, g.groups);
  return out.narrow(2, 0, kh).narrow(3, 0, kw).transpose(0, 1).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& weight_in, const Tensor& iterate, int64_t n_iter,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, bool residual, NormalizeFn normalize, NormFn norm) {
  const Geometry g = check_and_geometry("power_iteration_conv", weight_in, iterate, stride, padding, dilation,
                                        groups, residual);
  TORCH_CHECK(n_iter >= 0, "power_iteration_conv: n_iter must be >= 0, got ", n_iter);
  const Tensor weight = weight_in.contiguous();
  const int64_t N = g.blocks;
  // fresh, contiguous (never an alias of the input)
  Tensor u = iterate.reshape({1, N * g.c_in, g.height, g.width}).clone(at::MemoryFormat::Contiguous);
  for (int64_t it = 0; it < n_iter; ++it) {
    Tensor v = apply(u, weight, g).contiguous();
    if (residual) v.add_(u);
    Tensor x = apply_adjoint(v, weight, g).contiguous();
    u = normalize(x, residual ? v : Tensor(), u, N);
  }
  Tensor y = apply(u, weight, g).contiguous();
  if (residual) y.add_(u);
  Tensor sigma = norm(y, Tensor(), N);
  return {u.view({N, g.c_in, g.height, g.width}), sigma, y.view({N, -1, y.size(2), y.size(3)})};
}

Tensor backward(const Tensor& grad_sigma, const Tensor& weight_in, const Tensor& iterate, const Tensor& sigma,
                const Tensor& image, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                bool residual) {
  const Geometry g = check_and_geometry("power_iteration_conv_backward", weight_in, iterate, stride, padding,
                                        dilation, groups, residual);
  const int64_t N = g.blocks;
  TORCH_CHECK(grad_sigma.numel() == N && sigma.numel() == N, "power_iteration_conv_backward: grad_sigma and ",
              "sigma must hold one value per layer (", N, "), got ", grad_sigma.sizes(), " and ", sigma.sizes());
  const Tensor weight = weight_in.contiguous();
  const Tensor u = iterate.reshape({1, N * g.c_in, g.height, g.width}).contiguous();
  const Tensor padded = at::constant_pad_nd(u, {g.left, g.right, g.top, g.bottom}, 0);
  TORCH_CHECK(image.dim() == 4 && image.size(0) == N && image.size(1) * N == weight.size(0) &&
                  image.scalar_type() == weight.scalar_type() && image.device() == weight.device(),
              "power_iteration_conv_backward: image must be the forward's (N, C_out, H', W') image of the ",
              "weight's dtype and device, got ", image.scalar_type(), " ", image.sizes(), " on ", image.device());
  const Tensor y = image.reshape({1, N * image.size(1), image.size(2), image.size(3)});
  // per-layer g / sigma (0 where sigma = 0), on the tensors' device (no host sync)
  const Tensor s = sigma.reshape({N}).to(y.scalar_type());
  const Tensor gs = grad_sigma.reshape({N}).to(y.scalar_type());
  const Tensor scale = at::where(s > 0, gs / s, at::zeros_like(s));
  const Tensor grad_out = (y.reshape({N, -1}) * scale.unsqueeze(1)).reshape(y.sizes());
  return conv_weight_grad(padded, grad_out, weight.sizes(), g);
}

}  // namespace pi_conv

namespace {

using at::Tensor;

// CPU epilogues: one pass for the per-block sums of squares (double), one for the scaling.
template <typename scalar_t>
Tensor normalize_cpu_impl(const Tensor& x, const Tensor& add, const Tensor& old, int64_t blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per = x.numel() / blocks;
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const Tensor a = add.defined() ? add.contiguous() : add;
  const Tensor o = old.contiguous();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* ap = a.defined() ? a.data_ptr<scalar_t>() : nullptr;
  const scalar_t* op = o.data_ptr<scalar_t>();
  scalar_t* yp = out.data_ptr<scalar_t>();
  const int64_t grain = int64_t{1} << 14;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * per;
    // y = x + add, stored in out, and its squared norm
    const double sq = at::parallel_reduce(
        off, off + per, grain, 0.0,
        [&](int64_t begin, int64_t end, double acc) {
          double s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t i = begin; i < end; ++i) {
            const acc_t y = static_cast<acc_t>(xp[i]) + (ap ? static_cast<acc_t>(ap[i]) : acc_t(0));
            yp[i] = static_cast<scalar_t>(y);
            s += static_cast<double>(y) * static_cast<double>(y);
          }
          return acc + s;
        },
        std::plus<double>());
    const acc_t norm = static_cast<acc_t>(std::sqrt(sq));
    if (norm > acc_t(0) && std::isfinite(norm)) {  // else keep the iterate (zero, overflow, NaN)
      const acc_t denom = std::max(norm, std::numeric_limits<acc_t>::min());
      at::parallel_for(off, off + per, grain, [&](int64_t begin, int64_t end) {
#pragma omp simd
        for (int64_t i = begin; i < end; ++i) yp[i] = static_cast<scalar_t>(static_cast<acc_t>(yp[i]) / denom);
      });
    } else {
      std::copy(op + off, op + off + per, yp + off);
    }
  }
  return out;
}

template <typename scalar_t>
Tensor norm_cpu_impl(const Tensor& x, const Tensor& add, int64_t blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per = x.numel() / blocks;
  const Tensor a = add.defined() ? add.contiguous() : add;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* ap = a.defined() ? a.data_ptr<scalar_t>() : nullptr;
  Tensor out = at::empty({blocks}, x.options());
  scalar_t* sp = out.data_ptr<scalar_t>();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * per;
    const double sq = at::parallel_reduce(
        off, off + per, int64_t{1} << 14, 0.0,
        [&](int64_t begin, int64_t end, double acc) {
          double s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t i = begin; i < end; ++i) {
            const acc_t y = static_cast<acc_t>(xp[i]) + (ap ? static_cast<acc_t>(ap[i]) : acc_t(0));
            s += static_cast<double>(y) * static_cast<double>(y);
          }
          return acc + s;
        },
        std::plus<double>());
    sp[b] = static_cast<scalar_t>(static_cast<acc_t>(std::sqrt(sq)));
  }
  return out;
}

Tensor normalize_cpu(const Tensor& x, const Tensor& add, const Tensor& old, int64_t blocks) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "power_iteration_conv_normalize",
                                  [&] { out = normalize_cpu_impl<scalar_t>(x, add, old, blocks); });
  return out;
}

Tensor norm_cpu(const Tensor& x, const Tensor& add, int64_t blocks) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "power_iteration_conv_norm",
                                  [&] { out = norm_cpu_impl<scalar_t>(x, add, blocks); });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> power_iteration_conv_cpu(const Tensor& weight, const Tensor& iterate, int64_t n_iter,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, int64_t groups, bool residual) {
  TORCH_CHECK(weight.device().is_cpu() && iterate.device().is_cpu(),
              "power_iteration_conv (CPU kernel): weight and iterate must be on CPU");
  return pi_conv::forward(weight, iterate, n_iter, stride, padding, dilation, groups, residual, &normalize_cpu,
                          &norm_cpu);
}

Tensor power_iteration_conv_backward_cpu(const Tensor& grad_sigma, const Tensor& weight, const Tensor& iterate,
                                         const Tensor& sigma, const Tensor& image, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                         bool residual) {
  TORCH_CHECK(weight.device().is_cpu(), "power_iteration_conv_backward (CPU kernel): weight must be on CPU");
  return pi_conv::backward(grad_sigma, weight, iterate, sigma, image, stride, padding, dilation, groups, residual);
}

}  // namespace
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CPU, m) {
  m.impl("power_iteration_conv", &gloro_fast::power_iteration_conv_cpu);
  m.impl("power_iteration_conv_backward", &gloro_fast::power_iteration_conv_backward_cpu);
}
