// CPU kernels of gloro_fast::minmax_norm and gloro_fast::minmax_norm_backward.
//
// x (N, C, S) contiguous (S: the product of the spatial sizes, 1 for vectors), a = channels
// [0, C/2), b = channels [C/2, C):
//   out = [min(a, b), max(a, b)] (NaN propagates, as torch.minimum/maximum), and
//   sumsq[n] = sum of x[n]^2 in float64 (squares of float32/16 values are exact in float64;
//   the order of the sum is any: the caller's norm bound holds for every order).
// One pass: each pair is read once for min, max and both squares (torch.minimum and
// torch.maximum read it twice, and a norm reads the output once more). Parallel over samples.
// Backward: grad_x routes grad_out through the same permutation (on a tie, a <= b: a gets
// the min's gradient) and adds 2 x grad_sumsq[n].
// float32/float64 natively; bfloat16/float16 are read as such, compared in float32.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../utils.h"

namespace gloro_fast {
namespace {

// grain in samples: about 64 K elements per task
inline int64_t sample_grain(int64_t per_sample) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, per_sample)); }

// Blocks of kBlock pairs: the min/max loop (float selects only) and the sum of squares
// (float64) each vectorise on their own; the second re-reads the block from L1.
constexpr int64_t kBlock = 256;

template <typename scalar_t>
inline __attribute__((always_inline)) void minmax_block(const scalar_t* a, const scalar_t* b, scalar_t* lo, scalar_t* hi, int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const acc_t av = static_cast<acc_t>(a[i]);
    const acc_t bv = static_cast<acc_t>(b[i]);
    const acc_t either = av + bv;  // NaN when either is: NaN propagates, as torch.minimum
    const bool nan = (av != av) || (bv != bv);
    const bool b_less = bv < av;
    lo[i] = static_cast<scalar_t>(nan ? either : (b_less ? bv : av));
    hi[i] = static_cast<scalar_t>(nan ? either : (b_less ? av : bv));
  }
}

template <typename scalar_t>
inline __attribute__((always_inline)) double squares_block(const scalar_t* a, int64_t len) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) {
    const double v = static_cast<double>(static_cast<at::opmath_type<scalar_t>>(a[i]));
    s += v * v;
  }
  return s;
}

// One block: MinMax of len pairs and the squares of both halves. The extension is built for
// the baseline x86-64 ISA (SSE2); on a CPU with AVX2 and FMA the same code compiled for them
// runs instead (twice the vector width; 1.2-2.3x the unfused pair instead of 1.1-1.9x on a
// 2-core Xeon, benchmarks/bench_minmax_norm.py), chosen once at load time.
template <typename scalar_t>
double block_pass(const scalar_t* a, const scalar_t* b, scalar_t* lo, scalar_t* hi, int64_t len) {
  minmax_block(a, b, lo, hi, len);
  return squares_block(a, len) + squares_block(b, len);
}

#if defined(__GNUC__) && defined(__x86_64__)
template <typename scalar_t>
__attribute__((target("avx2,fma"))) double block_pass_avx2(const scalar_t* a, const scalar_t* b, scalar_t* lo,
                                                           scalar_t* hi, int64_t len) {
  minmax_block(a, b, lo, hi, len);
  return squares_block(a, len) + squares_block(b, len);
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif

template <typename scalar_t>
inline double block(const scalar_t* a, const scalar_t* b, scalar_t* lo, scalar_t* hi, int64_t len) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (kHasAvx2) return block_pass_avx2(a, b, lo, hi, len);
#endif
  return block_pass(a, b, lo, hi, len);
}

template <typename scalar_t>
void minmax_norm_kernel(const scalar_t* x, scalar_t* out, double* sumsq, int64_t N, int64_t half) {
  at::parallel_for(0, N, sample_grain(2 * half), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* a = x + n * 2 * half;
      const scalar_t* b = a + half;
      scalar_t* lo = out + n * 2 * half;
      scalar_t* hi = lo + half;
      double s = 0.0;
      for (int64_t i = 0; i < half; i += kBlock) {
        const int64_t len = std::min(kBlock, half - i);
        s += block(a + i, b + i, lo + i, hi + i, len);
      }
      sumsq[n] = s;
    }
  });
}

template <typename scalar_t>
void minmax_norm_backward_kernel(const scalar_t* grad_out, const double* grad_sumsq, const scalar_t* x,
                                 scalar_t* grad_x, int64_t N, int64_t half) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, N, sample_grain(2 * half), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* a = x + n * 2 * half;
      const scalar_t* b = a + half;
      const scalar_t* g_lo = grad_out + n * 2 * half;
      const scalar_t* g_hi = g_lo + half;
      scalar_t* ga = grad_x + n * 2 * half;
      scalar_t* gb = ga + half;
      const acc_t scale = static_cast<acc_t>(2.0 * grad_sumsq[n]);
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const acc_t av = static_cast<acc_t>(a[i]);
        const acc_t bv = static_cast<acc_t>(b[i]);
        const bool a_low = av <= bv;
        const acc_t gl = static_cast<acc_t>(g_lo[i]);
        const acc_t gh = static_cast<acc_t>(g_hi[i]);
        ga[i] = static_cast<scalar_t>((a_low ? gl : gh) + scale * av);
        gb[i] = static_cast<scalar_t>((a_low ? gh : gl) + scale * bv);
      }
    }
  });
}

void check_minmax_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (N, C, ...), got ", x.sizes());
  TORCH_CHECK(x.size(1) % 2 == 0, op, ": x must have an even channel count, got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> minmax_norm_cpu(const at::Tensor& x_in) {
  check_minmax_input(x_in, "minmax_norm");
  kernel_device(x_in, at::kCPU, "minmax_norm", "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0);
  const int64_t half = N == 0 ? 0 : x.numel() / N / 2;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor sumsq = at::empty({N}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "minmax_norm", [&] {
    minmax_norm_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                 sumsq.mutable_data_ptr<double>(), N, half);
  });
  return {out, sumsq};
}

at::Tensor minmax_norm_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& grad_sumsq_in,
                                    const at::Tensor& x_in) {
  const char* op = "minmax_norm_backward";
  check_minmax_input(x_in, op);
  const at::Device cpu = kernel_device(x_in, at::kCPU, op, "x");
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes() && grad_out_in.scalar_type() == x_in.scalar_type(), op,
              ": grad_out must have x's shape and dtype, got ", grad_out_in.sizes(), " ", grad_out_in.scalar_type());
  TORCH_CHECK(grad_sumsq_in.dim() == 1 && grad_sumsq_in.size(0) == x_in.size(0) &&
                  grad_sumsq_in.scalar_type() == at::kDouble,
              op, ": grad_sumsq must be float64 of shape (", x_in.size(0), "), got ", grad_sumsq_in.sizes(), " ",
              grad_sumsq_in.scalar_type());
  check_device(grad_out_in, cpu, op, "grad_out");
  check_device(grad_sumsq_in, cpu, op, "grad_sumsq");
  // contiguous(): incoming gradients are often expanded, stride-0 tensors
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor grad_sumsq = grad_sumsq_in.contiguous();
  const int64_t N = x.size(0);
  const int64_t half = N == 0 ? 0 : x.numel() / N / 2;
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "minmax_norm_backward", [&] {
    minmax_norm_backward_kernel<scalar_t>(grad_out.const_data_ptr<scalar_t>(), grad_sumsq.const_data_ptr<double>(),
                                          x.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), N, half);
  });
  return grad_x;
}

}  // namespace
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CPU, m) {
  m.impl("minmax_norm", &gloro_fast::minmax_norm_cpu);
  m.impl("minmax_norm_backward", &gloro_fast::minmax_norm_backward_cpu);
}
