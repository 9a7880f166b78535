// CPU kernels of gloro_fast::class_distances and gloro_fast::class_distances_backward.
//
// D (C, C), D_ji = ||w_j - w_i||_2 for W (C, d).
//   Gram mode (exact=false, C > 25, like torch.cdist's "use_mm_if_necessary"): G = V V^T with
//     V = W - mean row (D is translation invariant), only its lower block triangle (G is
//     symmetric: k row blocks, block a times blocks 0..a, one GEMM each, (k+1)/2k of the full
//     product's flops, 5/8 for C = 1000), then one fused parallel epilogue:
//     D_ji = sqrt(max(0, G_jj + G_ii - 2 G_max(i,j),min(i,j))), zero diagonal (symmetric by
//     construction). For C <= 25 the direct form is used (cheap, exact).
//   exact mode: direct differences sum_k (w_jk - w_ik)^2, parallel over pairs of rows
//     (row p with row C-1-p, so every task does about the same work), no C x C x d temporaries.
// Backward: M = G/D (0 where D == 0), S = M + M^T, grad_W = diag(S 1) W - S W (S W by at::mm),
//   evaluated on the centred rows V (the expression is translation invariant). Its rounding
//   error on a pair is ~ ulp * ||v|| / D_ji relative, so near-duplicate rows (D_ji << ||v||)
//   get a less accurate gradient than direct differences would give.
// float32/float64 natively; bfloat16/float16 compute in float32 (at::opmath_type) and cast back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../utils.h"

namespace gloro_fast {
namespace {

constexpr int64_t kGramMinClasses = 26;  // torch.cdist uses the GEMM form above 25 rows
constexpr int64_t kTile = 64;
// G's row blocks: at least 2^17 / d rows each, and at least 128 (narrower GEMMs run below BLAS's
// best rate: measured on 2 cores, C = 1000: d = 2048 gains most with 7 blocks, d = 512 with 3)
constexpr int64_t kGramBlockElements = int64_t{1} << 17;
constexpr int64_t kGramMinBlockRows = 128;

template <typename scalar_t>
inline scalar_t squared_distance(const scalar_t* a, const scalar_t* b, int64_t d) {
  scalar_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < d; ++k) {
    const scalar_t diff = a[k] - b[k];
    s += diff * diff;
  }
  return s;
}

// Exact distances of a contiguous (C, d) float/double matrix into out (C, C).
template <typename scalar_t>
void exact_distances(const scalar_t* w, scalar_t* out, int64_t C, int64_t d) {
  const int64_t half = (C + 1) / 2;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, C * d));
  at::parallel_for(0, half, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t rows[2] = {p, C - 1 - p};
      const int n_rows = rows[0] == rows[1] ? 1 : 2;
      for (int r = 0; r < n_rows; ++r) {
        const int64_t j = rows[r];
        const scalar_t* wj = w + j * d;
        out[j * C + j] = scalar_t(0);
        // row j owns the pairs (j, i) with i > j: written at [j, i] and [i, j], never twice
        for (int64_t i = j + 1; i < C; ++i) {
          const scalar_t v = std::sqrt(squared_distance(wj, w + i * d, d));
          out[j * C + i] = v;
          out[i * C + j] = v;
        }
      }
    }
  });
}

// Fused Gram epilogue: out_ji = sqrt(max(0, G_jj + G_ii - 2 G_ji)), 0 on the diagonal, G_ji read
// from the lower triangle (i <= j: row j; i > j: row i, transposed). Tiled so that the
// transposed reads stay in cache.
template <typename scalar_t>
void gram_epilogue(const scalar_t* g, scalar_t* out, int64_t C) {
  const int64_t n_tiles = (C + kTile - 1) / kTile;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tj = begin; tj < end; ++tj) {
      const int64_t j0 = tj * kTile, j1 = std::min(C, j0 + kTile);
      for (int64_t i0 = 0; i0 < C; i0 += kTile) {
        const int64_t i1 = std::min(C, i0 + kTile);
        for (int64_t j = j0; j < j1; ++j) {
          const scalar_t njj = g[j * C + j];
          const scalar_t* gj = g + j * C;
          scalar_t* oj = out + j * C;
          const int64_t split = std::min(std::max(i0, j), i1);  // i < split: below the diagonal
          for (int64_t i = i0; i < split; ++i) {
            const scalar_t sq = njj + g[i * C + i] - scalar_t(2) * gj[i];
            oj[i] = std::sqrt(std::max(sq, scalar_t(0)));
          }
          for (int64_t i = split; i < i1; ++i) {
            const scalar_t sq = njj + g[i * C + i] - scalar_t(2) * g[i * C + j];
            oj[i] = std::sqrt(std::max(sq, scalar_t(0)));
          }
          if (j >= i0 && j < i1) oj[j] = scalar_t(0);
        }
      }
    }
  });
}

// The lower block triangle of G = V V^T (V (C, d) contiguous): row block a (k blocks of
// min_rows or more rows) against the rows 0..end of block a, one GEMM into that slice of G (BLAS
// writes it in place: leading dimension C); entries above the block diagonal are not set.
at::Tensor gram_lower(const at::Tensor& v) {
  const int64_t C = v.size(0);
  at::Tensor g = at::empty({C, C}, v.options());
  const int64_t min_rows = std::max<int64_t>(kGramMinBlockRows, kGramBlockElements / std::max<int64_t>(1, v.size(1)));
  const int64_t k = std::max<int64_t>(1, C / min_rows);
  const int64_t rows = (C + k - 1) / k;
  for (int64_t a0 = 0; a0 < C; a0 += rows) {
    const int64_t a1 = std::min(C, a0 + rows);
    at::Tensor slice = g.narrow(0, a0, a1 - a0).narrow(1, 0, a1);
    at::mm_out(slice, v.narrow(0, a0, a1 - a0), v.narrow(0, 0, a1).t());
  }
  return g;
}

// weight: contiguous float/double (C, d).
at::Tensor distances_impl(const at::Tensor& weight, bool exact) {
  const int64_t C = weight.size(0), d = weight.size(1);
  at::Tensor out = at::empty({C, C}, weight.options());
  const bool gram = !exact && C >= kGramMinClasses;
  at::Tensor gram_matrix;
  if (gram) {
    // D is translation invariant: centring the rows first shrinks ||w||^2 and with it the
    // cancellation in G_jj + G_ii - 2 G_ji (rows far from the origin lose nothing)
    const at::Tensor centred = weight - weight.mean(0, /*keepdim=*/true);
    gram_matrix = gram_lower(centred.contiguous());
  }
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "class_distances_cpu", [&] {
    if (gram) {
      gram_epilogue<scalar_t>(gram_matrix.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), C);
    } else {
      exact_distances<scalar_t>(weight.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), C, d);
    }
  });
  return out;
}

at::Tensor class_distances_cpu(const at::Tensor& weight, bool exact) {
  check_class_weight(weight, "class_distances");
  kernel_device(weight, at::kCPU, "class_distances", "weight");
  const auto dtype = weight.scalar_type();
  if (is_reduced(dtype)) {  // accumulate in float32 (at::opmath_type of bf16/half)
    return distances_impl(weight.to(at::kFloat).contiguous(), exact).to(dtype);
  }
  return distances_impl(weight.contiguous(), exact);
}

// out_j = r_j w_j - sw_j for every row j (the grad_W epilogue).
template <typename scalar_t>
void scale_rows_minus(const scalar_t* w, const scalar_t* sw, const scalar_t* r, scalar_t* out, int64_t C,
                      int64_t d) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / d);
  at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const scalar_t rj = r[j];
      const scalar_t* wj = w + j * d;
      const scalar_t* sj = sw + j * d;
      scalar_t* oj = out + j * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) oj[k] = rj * wj[k] - sj[k];
    }
  });
}

// grad, weight, distances: contiguous float/double.
at::Tensor distances_backward_impl(const at::Tensor& grad, const at::Tensor& weight,
                                   const at::Tensor& distances) {
  const int64_t C = weight.size(0), d = weight.size(1);
  at::Tensor sym = at::empty({C, C}, weight.options());
  at::Tensor rowsum = at::empty({C}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "class_distances_backward_cpu_s", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* dist = distances.const_data_ptr<scalar_t>();
    scalar_t* s = sym.mutable_data_ptr<scalar_t>();
    scalar_t* rs = rowsum.mutable_data_ptr<scalar_t>();
    const int64_t n_tiles = (C + kTile - 1) / kTile;
    // S_ji = G_ji / D_ji + G_ij / D_ij (each term 0 where its D is 0); rowsum_j = sum_i S_ji.
    at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tj = begin; tj < end; ++tj) {
        const int64_t j0 = tj * kTile, j1 = std::min(C, j0 + kTile);
        for (int64_t j = j0; j < j1; ++j) rs[j] = scalar_t(0);
        for (int64_t i0 = 0; i0 < C; i0 += kTile) {
          const int64_t i1 = std::min(C, i0 + kTile);
          for (int64_t j = j0; j < j1; ++j) {
            scalar_t acc = 0;
            for (int64_t i = i0; i < i1; ++i) {
              const scalar_t dji = dist[j * C + i], dij = dist[i * C + j];
              const scalar_t a = dji != scalar_t(0) ? g[j * C + i] / dji : scalar_t(0);
              const scalar_t b = dij != scalar_t(0) ? g[i * C + j] / dij : scalar_t(0);
              s[j * C + i] = a + b;
              acc += a + b;
            }
            rs[j] += acc;
          }
        }
      }
    });
  });
  // diag(S 1) W - S W is invariant under W -> W - 1 mu^T: use centred rows, whose smaller
  // norms keep the cancellation between the two terms small
  const at::Tensor centred = (weight - weight.mean(0, /*keepdim=*/true)).contiguous();
  at::Tensor sw = at::mm(sym, centred).contiguous();
  at::Tensor out = at::empty({C, d}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "class_distances_backward_cpu_w", [&] {
    scale_rows_minus<scalar_t>(centred.const_data_ptr<scalar_t>(), sw.const_data_ptr<scalar_t>(),
                               rowsum.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), C, d);
  });
  return out;
}

at::Tensor class_distances_backward_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                        const at::Tensor& distances) {
  check_class_weight(weight, "class_distances_backward");
  check_class_backward(grad, weight, distances,
                       kernel_device(weight, at::kCPU, "class_distances_backward", "weight"));
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
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CPU, m) {
  m.impl("class_distances", &gloro_fast::class_distances_cpu);
  m.impl("class_distances_backward", &gloro_fast::class_distances_backward_cpu);
}
