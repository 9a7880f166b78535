// CPU kernel of gloro_fast::sound_decision: the sound test of a batch, one pass per sample.
//
// Per sample b (docs/soundness.md, "Evaluation"; gloro_fast/sound/decision.py):
//   values_k = up(fl(N_b . M[:, k]) * factor)   the forms, summed left to right over the basis
//   s1 = values_0, s0 = values_1; eps_max = min over the limits k >= 4 of the room
//        (cap - values_k) / safe_slopes_k, rounded down (inf without a slope; -inf when the
//        limit already exceeds cap; -inf for a non-finite basis)
//   j = argmax f_b (NaN counts as the largest, lowest index on ties: torch's argmax)
//   s1(eps) = up(s1 + up(eps * slopes_0)), s0(eps) likewise with slopes_1
//   f_bot = up_signed(max_{i != j} up_signed(f_bi + up(D_ji s1(eps))) + s0(eps))
//   ok = every f_bi finite and eps <= eps_max and f_bot not NaN
//   certified = ok and f_bj > f_bot; f_bot = +inf where not ok
// with up(x) = x (1 + 2^-50) + 2^-1022 (NaN -> +inf) and up_signed(x) = x + (|x| 2^-50 +
// 2^-1022). These are the reference's float64 operations in its order, each one rounded to
// nearest, so the results are its bits: the file is compiled without contracting a*b + c
// into a fused multiply-add (the reference rounds the product first), and NaN propagates
// through max and min as in torch.amax / torch.amin.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "rounding.h"

namespace gloro_fast {
namespace {

using rounding::kDown;
using rounding::kInf;
using rounding::kNaN;
using rounding::up;
using rounding::up_signed;

// max / min propagating NaN (torch.amax / torch.amin)
inline double nan_max(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? kNaN : (b > a ? b : a); }
inline double nan_min(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? kNaN : (b < a ? b : a); }

template <typename scalar_t>
void decide_rows(const scalar_t* logits, const double* dist, const double* basis, const double* matrix,
                 const double* slopes, const double* safe_slopes, const bool* has_slope, double factor, double cap,
                 double eps, int64_t C, int64_t m, int64_t K, int64_t begin, int64_t end, double* bottom_out,
                 bool* certified_out, int64_t* top_out) {
  for (int64_t b = begin; b < end; ++b) {
    const double* n = basis + b * m;
    // the forms: values_k for k < 4 and the room of each limit
    double s1 = 0.0, s0 = 0.0, eps_max = kInf;
    bool first_limit = true;
    for (int64_t k = 0; k < K; ++k) {
      double acc = n[0] * matrix[k];
      for (int64_t r = 1; r < m; ++r) {
        const double p = n[r] * matrix[r * K + k];
        acc = acc + p;
      }
      const double v = up(acc * factor);
      if (k == 0) s1 = v;
      if (k == 1) s0 = v;
      if (k < 4) continue;
      double room = (cap - v) / safe_slopes[k];
      room = has_slope[k] ? room * kDown : kInf;
      room = (v <= cap) ? room : -kInf;
      eps_max = first_limit ? room : nan_min(eps_max, room);
      first_limit = false;
    }
    bool finite_basis = true;
    for (int64_t r = 0; r < m; ++r) finite_basis = finite_basis && std::isfinite(n[r]);
    if (!finite_basis) eps_max = -kInf;

    // the decision
    const scalar_t* f = logits + b * C;
    int64_t top = 0;
    double best = static_cast<double>(f[0]);
    bool finite = std::isfinite(best);
    for (int64_t i = 1; i < C; ++i) {
      const double fi = static_cast<double>(f[i]);
      finite = finite && std::isfinite(fi);
      if (std::isnan(best)) continue;
      if (std::isnan(fi) || fi > best) {
        best = fi;
        top = i;
      }
    }
    const double s1e = up(s1 + up(eps * slopes[0]));
    const double s0e = up(s0 + up(eps * slopes[1]));
    const double* d = dist + top * C;
    double rival = -kInf;
    for (int64_t i = 0; i < C; ++i) {
      const double fi = static_cast<double>(f[i]);
      double r = up_signed(fi + up(d[i] * s1e));
      if (i == top) r = -kInf;
      rival = (i == 0) ? r : nan_max(rival, r);
    }
    const double bot = up_signed(rival + s0e);
    const double fj = static_cast<double>(f[top]);
    const bool ok = finite && (eps_max >= eps) && !std::isnan(bot);
    certified_out[b] = ok && (fj > bot);
    bottom_out[b] = ok ? bot : kInf;
    top_out[b] = top;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sound_decision_cpu(
    const at::Tensor& logits_in, const at::Tensor& distances_in, const at::Tensor& basis_in,
    const at::Tensor& matrix_in, const at::Tensor& slopes_in, const at::Tensor& safe_slopes_in,
    const at::Tensor& has_slope_in, double factor, double cap, double epsilon) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.size(1) >= 1, "sound_decision: logits must be (B, C), C >= 1, got ",
              logits_in.sizes());
  const int64_t B = logits_in.size(0), C = logits_in.size(1);
  TORCH_CHECK(matrix_in.dim() == 2 && matrix_in.size(1) >= 5 && matrix_in.size(0) >= 1,
              "sound_decision: matrix must be (m, 4 + n), n >= 1, got ", matrix_in.sizes());
  const int64_t m = matrix_in.size(0), K = matrix_in.size(1);
  TORCH_CHECK(distances_in.sizes() == at::IntArrayRef({C, C}) && basis_in.sizes() == at::IntArrayRef({B, m}) &&
                  slopes_in.numel() == K && safe_slopes_in.numel() == K && has_slope_in.numel() == K,
              "sound_decision: distances (C, C), basis (B, m), slopes, safe_slopes and has_slope (4 + n) expected");
  for (const at::Tensor* t : {&distances_in, &basis_in, &matrix_in, &slopes_in, &safe_slopes_in}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->device().is_cpu(),
                "sound_decision: the forms, basis and distances must be float64 CPU tensors");
  }
  TORCH_CHECK(has_slope_in.scalar_type() == at::kBool && logits_in.device().is_cpu() && has_slope_in.device().is_cpu(),
              "sound_decision: logits and has_slope (bool) must be CPU tensors");
  const at::Tensor logits = logits_in.contiguous(), dist = distances_in.contiguous(), basis = basis_in.contiguous(),
                   matrix = matrix_in.contiguous(), slopes = slopes_in.contiguous(),
                   safe = safe_slopes_in.contiguous(), has = has_slope_in.contiguous();
  at::Tensor bottom = at::empty({B}, logits.options().dtype(at::kDouble));
  at::Tensor certified = at::empty({B}, logits.options().dtype(at::kBool));
  at::Tensor top = at::empty({B}, logits.options().dtype(at::kLong));
  // a few hundred flops per sample: one thread up to ~64 K values, where waking others costs more
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (C + m * K));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sound_decision_cpu", [&] {
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      decide_rows<scalar_t>(lp, dist.const_data_ptr<double>(), basis.const_data_ptr<double>(),
                            matrix.const_data_ptr<double>(), slopes.const_data_ptr<double>(),
                            safe.const_data_ptr<double>(), has.const_data_ptr<bool>(), factor, cap, epsilon, C, m, K,
                            begin, end, bottom.data_ptr<double>(), certified.data_ptr<bool>(), top.data_ptr<int64_t>());
    });
  });
  return {bottom, certified, top};
}

}  // namespace
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CPU, m) { m.impl("sound_decision", &gloro_fast::sound_decision_cpu); }
