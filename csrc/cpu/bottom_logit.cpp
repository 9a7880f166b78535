// CPU kernels of gloro_fast::bottom_logit and gloro_fast::bottom_logit_backward.
//
// Forward, one parallel pass over the rows b of f (B, C), c = eps * K:
//   j_b = classes[b] if given, else argmax_i f_bi (lowest index on ties),
//   f_bot_b = max_{i != j_b} (f_bi + c D[j_b, i]),  i*_b = the lowest maximising i.
// Only index j is masked (DESIGN.md). Returns (f_bot (B,), i_star (B,) int64, j (B,) int64).
// Backward: grad_f[b, i*_b] = g_b; grad_D[j_b, i*_b] += g_b c (serial scatter, B work);
//   grad_K = eps * sum_b g_b D[j_b, i*_b].
// float32/float64; bfloat16/float16 accumulate in float32 (at::opmath_type).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <atomic>
#include <type_traits>
#include <vector>

#include "../utils.h"

namespace gloro_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bottom_logit_cpu(const at::Tensor& logits_in,
                                                                 const at::Tensor& distances_in,
                                                                 const at::Tensor& lipschitz,
                                                                 double epsilon,
                                                                 const std::optional<at::Tensor>& classes_in) {
  TORCH_CHECK(logits_in.dim() == 2, "bottom_logit: logits must be 2-D (B, C), got ", logits_in.sizes());
  const at::Device cpu = kernel_device(logits_in, at::kCPU, "bottom_logit", "logits");
  const int64_t B = logits_in.size(0), C = logits_in.size(1);
  check_margin_operands(distances_in, lipschitz, C, logits_in.scalar_type(), cpu, "bottom_logit");
  TORCH_CHECK(std::isfinite(epsilon) && epsilon >= 0, "bottom_logit: epsilon must be finite and >= 0");
  const bool has_classes = classes_in.has_value() && classes_in->defined();
  at::Tensor classes;
  if (has_classes) {
    check_classes(*classes_in, B, cpu);
    classes = classes_in->to(at::kLong).contiguous();
  }
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor distances = distances_in.contiguous();
  at::Tensor bottom = at::empty({B}, logits.options());
  at::Tensor i_star = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor j_out = at::empty({B}, logits.options().dtype(at::kLong));
  if (B == 0) return {bottom, i_star, j_out};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "bottom_logit_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t c = static_cast<opmath_t>(epsilon) * static_cast<opmath_t>(lipschitz.item<scalar_t>());
    const scalar_t* f = logits.const_data_ptr<scalar_t>();
    const scalar_t* dist = distances.const_data_ptr<scalar_t>();
    const int64_t* cls = has_classes ? classes.const_data_ptr<int64_t>() : nullptr;
    scalar_t* bot = bottom.mutable_data_ptr<scalar_t>();
    int64_t* star = i_star.mutable_data_ptr<int64_t>();
    int64_t* jp = j_out.mutable_data_ptr<int64_t>();
    // bad class indices are reported after the parallel region (no throwing inside it)
    std::atomic<int64_t> bad{-1};
    const int64_t grain = std::max<int64_t>(1, 32768 / C);
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = f + b * C;
        int64_t j;
        if (cls != nullptr) {
          j = cls[b];
          if (j < 0 || j >= C) {
            bad.store(b);
            bot[b] = scalar_t(0);
            star[b] = -1;
            jp[b] = j;
            continue;
          }
        } else {
          j = 0;
          opmath_t best = static_cast<opmath_t>(row[0]);
          for (int64_t i = 1; i < C; ++i) {
            const opmath_t v = static_cast<opmath_t>(row[i]);
            if (v > best) {
              best = v;
              j = i;
            }
          }
        }
        const scalar_t* drow = dist + j * C;
        opmath_t best = -std::numeric_limits<opmath_t>::infinity();
        int64_t best_i = -1;
        for (int64_t i = 0; i < C; ++i) {
          if (i == j) continue;
          const opmath_t v = static_cast<opmath_t>(row[i]) + c * static_cast<opmath_t>(drow[i]);
          if (v > best || best_i < 0) {
            best = v;
            best_i = i;
          }
        }
        bot[b] = static_cast<scalar_t>(best);
        star[b] = best_i;
        jp[b] = j;
      }
    });
    const int64_t b_bad = bad.load();
    TORCH_CHECK(b_bad < 0, "bottom_logit: classes[", b_bad, "] = ", b_bad >= 0 ? cls[b_bad] : 0,
                " is out of range [0, ", C, ")");
  });
  return {bottom, i_star, j_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bottom_logit_backward_cpu(
    const at::Tensor& grad_bottom_in, const at::Tensor& distances_in, const at::Tensor& lipschitz, double epsilon,
    const at::Tensor& i_star_in, const at::Tensor& classes_in, int64_t num_classes) {
  const int64_t C = num_classes;
  const auto dtype = distances_in.scalar_type();
  const at::Device cpu = kernel_device(grad_bottom_in, at::kCPU, "bottom_logit_backward", "grad");
  check_margin_operands(distances_in, lipschitz, C, dtype, cpu, "bottom_logit_backward");
  check_margin_backward(grad_bottom_in, i_star_in, classes_in, dtype, cpu);
  const int64_t B = grad_bottom_in.size(0);
  // contiguous(): the incoming gradient is often an expanded, stride-0 tensor (.sum() backward)
  const at::Tensor grad = grad_bottom_in.contiguous();
  const at::Tensor distances = distances_in.contiguous();
  const at::Tensor i_star = i_star_in.contiguous();
  const at::Tensor classes = classes_in.contiguous();
  at::Tensor grad_f = at::zeros({B, C}, distances.options());
  at::Tensor grad_d = at::zeros({C, C}, distances.options());
  at::Tensor grad_k = at::empty({}, distances.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bottom_logit_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t eps = static_cast<opmath_t>(epsilon);
    const opmath_t c = eps * static_cast<opmath_t>(lipschitz.item<scalar_t>());
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* dist = distances.const_data_ptr<scalar_t>();
    const int64_t* star = i_star.const_data_ptr<int64_t>();
    const int64_t* cls = classes.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(star[b] >= 0 && star[b] < C && cls[b] >= 0 && cls[b] < C,
                  "bottom_logit_backward: index out of range at row ", b);
    }
    scalar_t* gf = grad_f.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) gf[b * C + star[b]] = g[b];
    });
    // serial scatter into grad_D (B work; rows may share (j, i*)), accumulated in opmath
    scalar_t* gd = grad_d.mutable_data_ptr<scalar_t>();
    opmath_t gk = 0;
    if (std::is_same<opmath_t, scalar_t>::value) {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t idx = cls[b] * C + star[b];
        const opmath_t gb = static_cast<opmath_t>(g[b]);
        gd[idx] = static_cast<scalar_t>(static_cast<opmath_t>(gd[idx]) + gb * c);
        gk += gb * static_cast<opmath_t>(dist[idx]);
      }
    } else {
      std::vector<opmath_t> acc(static_cast<size_t>(C * C), opmath_t(0));
      for (int64_t b = 0; b < B; ++b) {
        const int64_t idx = cls[b] * C + star[b];
        const opmath_t gb = static_cast<opmath_t>(g[b]);
        acc[idx] += gb * c;
        gk += gb * static_cast<opmath_t>(dist[idx]);
      }
      for (int64_t k = 0; k < C * C; ++k) gd[k] = static_cast<scalar_t>(acc[k]);
    }
    grad_k.fill_(static_cast<double>(eps * gk));
  });
  return {grad_f, grad_d, grad_k};
}

}  // namespace
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CPU, m) {
  m.impl("bottom_logit", &gloro_fast::bottom_logit_cpu);
  m.impl("bottom_logit_backward", &gloro_fast::bottom_logit_backward_cpu);
}
