// CPU kernel of gloro_fast::norm_basis: the allowance's per-sample basis from the recorded
// norm rows, one pass per sample.
//
// For k rows r_i (B,) float64 (gloro_fast/ops/norm_basis.py):
//   N[b, i] = r_i[b]                                        kinds[i] = 0 (a bound)
//   N[b, i] = up(up'(sqrt(r_i[b]) * factor_i) + offset_i)   kinds[i] = 1 (a sum of squares)
//   N[b, i] = up(up'(r_i[b] * factor_i) + offset_i)         kinds[i] = 2 (a computed norm)
//   N[b, k] = 1
// with up'(x) = x (1 + 2^-50) + 2^-1022 and up(x) = up'(x), NaN -> +inf: the reference's
// float64 operations in its order, each rounded to nearest (the file is compiled without
// contracting a*b + c into a fused multiply-add). The square root is std::sqrt, correctly
// rounded, where the reference's torch.sqrt is faithful (MKL's vectorised one: sqrt(2) one
// ulp low, and on a few thousand values it wakes MKL's threads, ~60 us with sleeping
// OpenMP workers): the two agree to a few ulps, and both are upper bounds (docs/soundness.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "rounding.h"

namespace gloro_fast {
namespace {

using rounding::kInf;
using rounding::up_inner;

at::Tensor norm_basis_cpu(at::TensorList rows, at::ArrayRef<double> factors, at::ArrayRef<double> offsets,
                          at::IntArrayRef kinds) {
  const int64_t k = static_cast<int64_t>(rows.size());
  TORCH_CHECK(k >= 1, "norm_basis: rows must hold at least one tensor");
  TORCH_CHECK(static_cast<int64_t>(factors.size()) == k && static_cast<int64_t>(offsets.size()) == k &&
                  static_cast<int64_t>(kinds.size()) == k,
              "norm_basis: factors, offsets and kinds must each have one entry per row");
  const int64_t B = rows[0].size(0);
  std::vector<at::Tensor> held;
  std::vector<const double*> src;
  held.reserve(k);
  src.reserve(k);
  for (int64_t i = 0; i < k; ++i) {
    const at::Tensor& r = rows[i];
    TORCH_CHECK(r.dim() == 1 && r.size(0) == B && r.scalar_type() == at::kDouble && r.device().is_cpu(),
                "norm_basis: rows must be float64 CPU tensors of one shape (B,)");
    held.push_back(r.contiguous());
    src.push_back(held.back().const_data_ptr<double>());
  }
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(kinds[i] >= 0 && kinds[i] <= 2, "norm_basis: kinds must be 0, 1 or 2, got ", kinds[i]);
  }
  const std::vector<int64_t> kind(kinds.begin(), kinds.end());
  at::Tensor basis = at::empty({B, k + 1}, rows[0].options());
  double* out = basis.data_ptr<double>();
  const std::vector<double> factor(factors.begin(), factors.end()), offset(offsets.begin(), offsets.end());
  // a few flops per value: one thread up to ~64 K of them, where waking others costs more
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (k + 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double* row = out + b * (k + 1);
      for (int64_t i = 0; i < k; ++i) {
        if (kind[i] == 0) {
          row[i] = src[i][b];
        } else {
          const double v = kind[i] == 1 ? std::sqrt(src[i][b]) : src[i][b];
          const double t = up_inner(up_inner(v * factor[i]) + offset[i]);
          row[i] = std::isnan(t) ? kInf : t;
        }
      }
      row[k] = 1.0;
    }
  });
  return basis;
}

}  // namespace
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CPU, m) { m.impl("norm_basis", &gloro_fast::norm_basis_cpu); }
