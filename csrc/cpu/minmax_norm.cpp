// CPU kernels of gloro_fast::minmax_norm and gloro_fast::minmax_norm_backward.
//
// x (N, C, ...) with channel halves a = channels [0, C/2), b = channels [C/2, C):
//   out = [min(a, b), max(a, b)] (NaN propagates, as torch.minimum/maximum), and
//   sumsq[n] = sum of x[n]^2 in float64 (squares of float32/16 values are exact in float64;
//   the order of the sum is any: the caller's norm bound holds for every order).
// Two layouts, without a copy: contiguous (N, C, S), one row of C*S elements per sample whose
// first half is a; and channels_last (N, H, W, C) in memory (4-D x), H*W rows of C elements
// per sample, each with a in its first half (torch.compile's Inductor hands convolution
// outputs over in this layout). out has x's layout (the op's layout rule, ops/minmax_norm.py:
// channels_last when x is channels_last-contiguous and not contiguous, else contiguous;
// contiguous_out asks for a contiguous out whatever x's layout). Other strides are copied to
// contiguous first.
// One pass: each pair is read once for min, max and both squares (torch.minimum and
// torch.maximum read it twice, and a norm reads the output once more). Parallel over samples.
// minmax_norm_ runs the same pass with out = x (MinMax written over x, for an activation the
// certifying pass owns: no fresh output, whose page faults cost as much as the pass itself
// on a 12.8 MB activation); the squares of each block are summed before its MinMax is
// written, in both ops, so their sums agree bit for bit.
// Backward: grad_x routes grad_out through the same permutation (on a tie, a <= b: a gets
// the min's gradient) and adds 2 x grad_sumsq[n]; grad_x has x's layout.
// float32/float64 natively; bfloat16/float16 are read as such, compared in float32.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

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

// One sample: `rows` rows of 2*half elements, a the first half of each row, b the second.
// One long row (contiguous layout) goes in blocks of kBlock pairs; short rows (channels_last)
// in groups of about 2*kBlock elements, MinMax row by row, then the squares of the group's
// contiguous range. The extension is built for the baseline x86-64 ISA (SSE2); on a CPU with
// AVX2 and FMA the same code compiled for them runs instead (twice the vector width; 1.2-2.3x
// the unfused pair instead of 1.1-1.9x on a 2-core Xeon, benchmarks/bench_minmax_norm.py),
// chosen once at load time.
template <typename scalar_t>
inline __attribute__((always_inline)) double sample_body(const scalar_t* x, scalar_t* out, int64_t rows, int64_t half) {
  const int64_t row_len = 2 * half;
  double s = 0.0;
  if (rows == 1) {
    for (int64_t i = 0; i < half; i += kBlock) {
      const int64_t len = std::min(kBlock, half - i);
      s += squares_block(x + i, len) + squares_block(x + half + i, len);
      minmax_block(x + i, x + half + i, out + i, out + half + i, len);
    }
    return s;
  }
  const int64_t group = std::max<int64_t>(1, 2 * kBlock / std::max<int64_t>(1, row_len));
  for (int64_t r = 0; r < rows; r += group) {
    const int64_t g = std::min(group, rows - r);
    s += squares_block(x + r * row_len, g * row_len);
    for (int64_t k = r; k < r + g; ++k) {
      const scalar_t* a = x + k * row_len;
      scalar_t* lo = out + k * row_len;
      minmax_block(a, a + half, lo, lo + half, half);
    }
  }
  return s;
}

// One channels_last sample (rows = H*W pixel rows of 2*half channels) written in the
// contiguous (C, H, W) order, out[c * rows + p]: the layout a flatten needs next, without
// the copy a channels_last output would cost there (2C2F B=1024: 6.4 MB read and written
// again). Channel by channel: the reads stride by a pixel row, the writes are contiguous,
// and a sample (6-16 KB for the paper models) stays in L1. The same selects as minmax_block.
template <typename scalar_t>
inline __attribute__((always_inline)) double sample_body_to_contiguous(const scalar_t* x, scalar_t* out, int64_t rows,
                                                                      int64_t half) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_len = 2 * half;
  for (int64_t c = 0; c < half; ++c) {
    scalar_t* lo = out + c * rows;
    scalar_t* hi = out + (half + c) * rows;
#pragma omp simd
    for (int64_t p = 0; p < rows; ++p) {
      const acc_t av = static_cast<acc_t>(x[p * row_len + c]);
      const acc_t bv = static_cast<acc_t>(x[p * row_len + half + c]);
      const acc_t either = av + bv;
      const bool nan = (av != av) || (bv != bv);
      const bool b_less = bv < av;
      lo[p] = static_cast<scalar_t>(nan ? either : (b_less ? bv : av));
      hi[p] = static_cast<scalar_t>(nan ? either : (b_less ? av : bv));
    }
  }
  return squares_block(x, rows * row_len);
}

template <typename scalar_t>
double sample_pass(const scalar_t* x, scalar_t* out, int64_t rows, int64_t half) {
  return sample_body(x, out, rows, half);
}

template <typename scalar_t>
double sample_pass_to_contiguous(const scalar_t* x, scalar_t* out, int64_t rows, int64_t half) {
  return sample_body_to_contiguous(x, out, rows, half);
}

#if defined(__GNUC__) && defined(__x86_64__)
template <typename scalar_t>
__attribute__((target("avx2,fma"))) double sample_pass_avx2(const scalar_t* x, scalar_t* out, int64_t rows,
                                                            int64_t half) {
  return sample_body(x, out, rows, half);
}
template <typename scalar_t>
__attribute__((target("avx2,fma"))) double sample_pass_to_contiguous_avx2(const scalar_t* x, scalar_t* out,
                                                                          int64_t rows, int64_t half) {
  return sample_body_to_contiguous(x, out, rows, half);
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif

template <typename scalar_t>
inline double sample(const scalar_t* x, scalar_t* out, int64_t rows, int64_t half, bool to_contiguous) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (kHasAvx2) {
    return to_contiguous ? sample_pass_to_contiguous_avx2(x, out, rows, half) : sample_pass_avx2(x, out, rows, half);
  }
#endif
  return to_contiguous ? sample_pass_to_contiguous(x, out, rows, half) : sample_pass(x, out, rows, half);
}

// x and out: N samples of rows * 2 * half elements each (see sample_body); to_contiguous:
// x channels_last and out contiguous (see sample_body_to_contiguous)
template <typename scalar_t>
void minmax_norm_kernel(const scalar_t* x, scalar_t* out, double* sumsq, int64_t N, int64_t rows, int64_t half,
                        bool to_contiguous) {
  const int64_t per_sample = rows * 2 * half;
  at::parallel_for(0, N, sample_grain(per_sample), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      sumsq[n] = sample(x + n * per_sample, out + n * per_sample, rows, half, to_contiguous);
    }
  });
}

template <typename scalar_t>
void minmax_norm_backward_kernel(const scalar_t* grad_out, const double* grad_sumsq, const scalar_t* x,
                                 scalar_t* grad_x, int64_t N, int64_t rows, int64_t half) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per_sample = rows * 2 * half;
  at::parallel_for(0, N, sample_grain(per_sample), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const acc_t scale = static_cast<acc_t>(2.0 * grad_sumsq[n]);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = n * per_sample + r * 2 * half;
        const scalar_t* a = x + row;
        const scalar_t* b = a + half;
        const scalar_t* g_lo = grad_out + row;
        const scalar_t* g_hi = g_lo + half;
        scalar_t* ga = grad_x + row;
        scalar_t* gb = ga + half;
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
    }
  });
}

// The op's layout rule: channels_last when x is 4-D, channels_last-contiguous and not contiguous.
inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// (rows, half) of one sample of x in `format` (N > 0)
inline std::pair<int64_t, int64_t> row_shape(const at::Tensor& x, at::MemoryFormat format) {
  if (format == at::MemoryFormat::ChannelsLast) return {x.size(2) * x.size(3), x.size(1) / 2};
  return {1, x.numel() / x.size(0) / 2};
}

void check_minmax_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (N, C, ...), got ", x.sizes());
  TORCH_CHECK(x.size(1) % 2 == 0, op, ": x must have an even channel count, got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
}

// The pass of both ops over x (already in `format`) into out: the per-sample sums.
at::Tensor minmax_pass(const at::Tensor& x, const at::Tensor& out, at::MemoryFormat format, bool to_contiguous) {
  const int64_t N = x.size(0);
  at::Tensor sumsq = at::empty({N}, x.options().dtype(at::kDouble));
  if (N == 0 || x.numel() == 0) return sumsq.zero_();
  const auto [rows, half] = row_shape(x, format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "minmax_norm", [&] {
    minmax_norm_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                 sumsq.mutable_data_ptr<double>(), N, rows, half, to_contiguous);
  });
  return sumsq;
}

std::tuple<at::Tensor, at::Tensor> minmax_norm_cpu(const at::Tensor& x_in, bool contiguous_out) {
  check_minmax_input(x_in, "minmax_norm");
  kernel_device(x_in, at::kCPU, "minmax_norm", "x");
  const at::MemoryFormat format = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format);
  // out in x's layout, or contiguous when asked (the same for a contiguous x)
  at::Tensor out = at::empty_like(x, contiguous_out ? at::MemoryFormat::Contiguous : format);
  at::Tensor sumsq = minmax_pass(x, out, format, contiguous_out && format == at::MemoryFormat::ChannelsLast);
  return {out, sumsq};
}

// minmax_norm_: x overwritten by MinMax(x), sumsq returned. The same pass with out = x: each
// block's squares are summed before its pairs are overwritten (sample_body reads them in that
// order for either call, so the sums are the functional op's bit for bit), and every element
// is read before it is written. x must be contiguous in its own layout (the op checks it).
at::Tensor minmax_norm_inplace_cpu(const at::Tensor& x) {
  check_minmax_input(x, "minmax_norm_");
  kernel_device(x, at::kCPU, "minmax_norm_", "x");
  const at::MemoryFormat format = layout_of(x);
  TORCH_CHECK(x.is_contiguous(format), "minmax_norm_: x must be contiguous or channels_last, got strides ",
              x.strides());
  return minmax_pass(x, x, format, false);
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
  // grad_out in x's layout: incoming gradients are often expanded, stride-0 tensors
  const at::MemoryFormat format = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format);
  const at::Tensor grad_out = grad_out_in.contiguous(format);
  const at::Tensor grad_sumsq = grad_sumsq_in.contiguous();
  const int64_t N = x.size(0);
  at::Tensor grad_x = at::empty_like(x, format);
  if (N == 0 || x.numel() == 0) return grad_x;
  const auto [rows, half] = row_shape(x, format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "minmax_norm_backward", [&] {
    minmax_norm_backward_kernel<scalar_t>(grad_out.const_data_ptr<scalar_t>(), grad_sumsq.const_data_ptr<double>(),
                                          x.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), N, rows,
                                          half);
  });
  return grad_x;
}

}  // namespace
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CPU, m) {
  m.impl("minmax_norm", &gloro_fast::minmax_norm_cpu);
  m.impl("minmax_norm_backward", &gloro_fast::minmax_norm_backward_cpu);
  m.impl("minmax_norm_", &gloro_fast::minmax_norm_inplace_cpu);
}
