// CPU kernels of gloro_fast::power_iteration_linear and gloro_fast::power_iteration_linear_backward.
//
// One call handles every dense layer l (W_l: m_l x n_l, unit iterate u_l: n_l). The rows of all
// layers are laid end to end (row offsets), and so are their columns (column offsets), so that
// each elementary step is ONE at::parallel_for region over all layers together:
//   1. v = W u      parallel over all rows of all layers (dot products, contiguous rows)
//   2. x = W^T v    parallel over all columns of all layers (row-wise axpy on column blocks)
//   3. u = x/||x||  per layer (norm in double), keeping the old u where ||x|| is 0 or not finite
// repeated n_iter times, then y_l = W_l u_l and sigma_l = ||y_l|| (one more step 1 + per-layer
// norms); y_l is returned too (the image, in the accumulation dtype).
// Backward: grad_W_l = g_l y_l u_l^T / sigma_l (0 where sigma_l = 0) from the forward's image:
// an outer product per layer writing the gradient, W is not read.
// float32/float64 natively; bfloat16/float16 are read as such and accumulate in float32
// (at::opmath_type). Layers of different dtypes in one call are processed per dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../utils.h"

namespace gloro_fast {
namespace {

using at::Tensor;

// Work per task of a parallel region, in multiply-adds.
constexpr int64_t kGrainWork = int64_t{1} << 15;

template <typename acc_t, typename scalar_t>
inline acc_t dot(const scalar_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += static_cast<acc_t>(a[j]) * b[j];
  return s;
}

template <typename acc_t>
inline double sum_squares(const acc_t* x, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(x[j]) * static_cast<double>(x[j]);
  return s;
}

// All layers of one dtype, laid end to end.
template <typename scalar_t>
struct Stack {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<Tensor> w;                 // contiguous weights (kept alive)
  std::vector<const scalar_t*> wp;       // their data
  std::vector<int64_t> m, n, row_off, col_off;
  int64_t rows = 0, cols = 0;

  explicit Stack(const std::vector<Tensor>& weights) {
    const size_t L = weights.size();
    row_off.assign(L + 1, 0);
    col_off.assign(L + 1, 0);
    for (size_t l = 0; l < L; ++l) {
      w.push_back(weights[l].contiguous());
      wp.push_back(w.back().data_ptr<scalar_t>());
      m.push_back(w.back().size(0));
      n.push_back(w.back().size(1));
      row_off[l + 1] = row_off[l] + m[l];
      col_off[l + 1] = col_off[l] + n[l];
    }
    rows = row_off[L];
    cols = col_off[L];
  }
  int64_t size() const { return static_cast<int64_t>(m.size()); }

  // The layer holding global index g of an offset table (skipping empty layers).
  static int64_t layer_of(const std::vector<int64_t>& off, int64_t g) {
    return static_cast<int64_t>(std::upper_bound(off.begin(), off.end(), g) - off.begin()) - 1;
  }

  // v[r] = W_l[i] . u_l for every row r = row_off[l] + i of every layer: one region. Rows go
  // four at a time (four independent accumulators, one load of u for four rows).
  void matvec(const acc_t* u, acc_t* v) const {
    if (rows == 0) return;
    const int64_t avg_n = std::max<int64_t>(1, cols / std::max<int64_t>(size(), 1));
    const int64_t grain = std::max<int64_t>(4, kGrainWork / avg_n);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      int64_t l = layer_of(row_off, begin);
      int64_t r = begin;
      while (r < end) {
        while (r >= row_off[l + 1]) ++l;
        const int64_t stop = std::min(end, row_off[l + 1]);
        const int64_t nl = n[l];
        const acc_t* ul = u + col_off[l];
        for (; r + 4 <= stop; r += 4) {
          const scalar_t* w0 = wp[l] + (r - row_off[l]) * nl;
          const scalar_t* w1 = w0 + nl;
          const scalar_t* w2 = w1 + nl;
          const scalar_t* w3 = w2 + nl;
          acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
          for (int64_t j = 0; j < nl; ++j) {
            const acc_t x = ul[j];
            s0 += static_cast<acc_t>(w0[j]) * x;
            s1 += static_cast<acc_t>(w1[j]) * x;
            s2 += static_cast<acc_t>(w2[j]) * x;
            s3 += static_cast<acc_t>(w3[j]) * x;
          }
          v[r] = s0;
          v[r + 1] = s1;
          v[r + 2] = s2;
          v[r + 3] = s3;
        }
        for (; r < stop; ++r) v[r] = dot<acc_t>(wp[l] + (r - row_off[l]) * nl, ul, nl);
      }
    });
  }

  // x[c] = (W_l^T v_l)[j] for every column c = col_off[l] + j: one region over all columns; each
  // task owns a block of columns and sweeps the rows of its layer (contiguous axpys).
  void matvec_t(const acc_t* v, acc_t* x) const {
    if (cols == 0) return;
    const int64_t avg_m = std::max<int64_t>(1, rows / std::max<int64_t>(size(), 1));
    const int64_t grain = std::max<int64_t>(16, kGrainWork / avg_m);
    at::parallel_for(0, cols, grain, [&](int64_t begin, int64_t end) {
      int64_t l = layer_of(col_off, begin);
      int64_t c = begin;
      while (c < end) {
        while (c >= col_off[l + 1]) ++l;
        const int64_t j0 = c - col_off[l];
        const int64_t j1 = std::min(end, col_off[l + 1]) - col_off[l];
        const int64_t nl = n[l];
        acc_t* xo = x + col_off[l];
        std::fill(xo + j0, xo + j1, acc_t(0));
        const acc_t* vl = v + row_off[l];
        const int64_t ml = m[l];
        const scalar_t* wl = wp[l];
        int64_t i = 0;
        for (; i + 4 <= ml; i += 4) {  // four rows per sweep of x: a quarter of the x traffic
          const acc_t a0 = vl[i], a1 = vl[i + 1], a2 = vl[i + 2], a3 = vl[i + 3];
          const scalar_t* w0 = wl + i * nl;
          const scalar_t* w1 = w0 + nl;
          const scalar_t* w2 = w1 + nl;
          const scalar_t* w3 = w2 + nl;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            xo[j] += a0 * static_cast<acc_t>(w0[j]) + a1 * static_cast<acc_t>(w1[j]) +
                     a2 * static_cast<acc_t>(w2[j]) + a3 * static_cast<acc_t>(w3[j]);
          }
        }
        for (; i < ml; ++i) {
          const acc_t a = vl[i];
          const scalar_t* wr = wl + i * nl;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) xo[j] += a * static_cast<acc_t>(wr[j]);
        }
        c = col_off[l] + j1;
      }
    });
  }

  // u_l = x_l / ||x_l|| (keeping u_l where ||x_l|| is 0 or not finite: an overflow or a NaN
  // must not turn the iterate into zeros or NaN for good), all layers.
  void normalize(const acc_t* x, acc_t* u) const {
    const int64_t L = size();
    at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
      for (int64_t l = begin; l < end; ++l) {
        const int64_t nl = n[l];
        const acc_t* xl = x + col_off[l];
        acc_t* ul = u + col_off[l];
        const acc_t norm = static_cast<acc_t>(std::sqrt(sum_squares(xl, nl)));
        if (!(norm > acc_t(0) && std::isfinite(norm))) continue;
        const acc_t denom = std::max(norm, std::numeric_limits<acc_t>::min());
#pragma omp simd
        for (int64_t j = 0; j < nl; ++j) ul[j] = xl[j] / denom;
      }
    });
  }
};

template <typename scalar_t>
void forward_group(at::TensorList weights, at::TensorList iterates, const std::vector<size_t>& idx,
                   int64_t n_iter, std::vector<Tensor>& u_out, std::vector<Tensor>& s_out,
                   std::vector<Tensor>& y_out) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<Tensor> ws;
  for (size_t l : idx) ws.push_back(weights[l]);
  const Stack<scalar_t> st(ws);
  const int64_t L = st.size();
  const auto acc_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // u: all iterates end to end (accumulation dtype); v: W u; x: W^T v
  Tensor u_buf = at::empty({st.cols}, acc_opts);
  Tensor v_buf = at::empty({st.rows}, acc_opts);
  Tensor x_buf = at::empty({st.cols}, acc_opts);
  for (int64_t k = 0; k < L; ++k) {
    u_buf.narrow(0, st.col_off[k], st.n[k]).copy_(iterates[idx[k]]);
  }
  acc_t* u = u_buf.data_ptr<acc_t>();
  acc_t* v = v_buf.data_ptr<acc_t>();
  acc_t* x = x_buf.data_ptr<acc_t>();
  for (int64_t it = 0; it < n_iter; ++it) {
    st.matvec(u, v);
    st.matvec_t(v, x);
    st.normalize(x, u);
  }
  st.matvec(u, v);
  const auto out_opts = at::TensorOptions().dtype(weights[idx[0]].scalar_type());
  for (int64_t k = 0; k < L; ++k) {
    const double sq = sum_squares(v + st.row_off[k], st.m[k]);
    s_out[idx[k]] = at::scalar_tensor(static_cast<acc_t>(std::sqrt(sq)), out_opts);
    u_out[idx[k]] = u_buf.narrow(0, st.col_off[k], st.n[k]).to(out_opts.dtype(), /*non_blocking=*/false,
                                                                 /*copy=*/true);
    y_out[idx[k]] = v_buf.narrow(0, st.row_off[k], st.m[k]).clone();  // outputs never alias each other
  }
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> power_iteration_linear_cpu(
    at::TensorList weights, at::TensorList iterates, int64_t n_iter) {
  check_layers("power_iteration_linear", weights, iterates, at::Device(at::kCPU));
  TORCH_CHECK(n_iter >= 0, "power_iteration_linear: n_iter must be >= 0, got ", n_iter);
  std::vector<Tensor> u_out(weights.size()), s_out(weights.size()), y_out(weights.size());
  for (const auto& [dtype, idx] : by_dtype(weights)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "power_iteration_linear", [&] {
      forward_group<scalar_t>(weights, iterates, idx, n_iter, u_out, s_out, y_out);
    });
  }
  return {u_out, s_out, y_out};
}

// One layer: grad = (g / sigma) y u^T (0 where sigma = 0) by ATen's outer product (vectorised for
// the CPU it runs on: this extension is built for baseline x86-64, and the write of the gradient
// is all the work), in the accumulation dtype, then cast to the weight's dtype where it differs.
Tensor layer_grad(const Tensor& grad_sigma, const Tensor& weight, const Tensor& iterate, const Tensor& sigma,
                  const Tensor& image) {
  const double g = grad_sigma.item<double>();
  const double s = sigma.item<double>();
  const double coef = s > 0 ? g / s : 0.0;
  Tensor grad = at::outer(image * coef, iterate.to(image.scalar_type()));
  return grad.scalar_type() == weight.scalar_type() ? grad : grad.to(weight.scalar_type());
}

std::vector<Tensor> power_iteration_linear_backward_cpu(at::TensorList grad_sigmas, at::TensorList weights,
                                                        at::TensorList iterates, at::TensorList sigmas,
                                                        at::TensorList images) {
  check_layers("power_iteration_linear_backward", weights, iterates, at::Device(at::kCPU));
  check_layer_scalars(grad_sigmas, sigmas, weights.size());
  check_layer_images("power_iteration_linear_backward", images, weights, at::Device(at::kCPU));
  std::vector<Tensor> grads(weights.size());
  for (size_t l = 0; l < weights.size(); ++l) {
    grads[l] = layer_grad(grad_sigmas[l], weights[l], iterates[l], sigmas[l], images[l]);
  }
  return grads;
}

}  // namespace
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CPU, m) {
  m.impl("power_iteration_linear", &gloro_fast::power_iteration_linear_cpu);
  m.impl("power_iteration_linear_backward", &gloro_fast::power_iteration_linear_backward_cpu);
}
