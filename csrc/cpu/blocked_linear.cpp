// CPU kernels of gloro_fast::blocked_linear and gloro_fast::blocked_linear_backward.
//
// x (*, n), W (out, n), b (out,) or none, k blocks of b' = ceil(n / k) inputs (x and W zero
// padded to k b' columns): the k partial products P (k, N, out) come from one at::bmm on the
// views the reference uses (gloro_fast/ops/blocked_linear.py: same operands, same strides, so
// the same BLAS call and the same bits), then
//   y = tree(P) + b
// where tree pairs the blocks by halving, m -> ceil(m / 2): P[i] + P[i + h] for i < h = m / 2,
// and the odd last block passed on, until one is left. The reference writes that tree as
// torch additions of slices; here it runs in one pass over tiles of P (each block's tile
// read once, the levels in a buffer that stays in L1), the result written into P's first
// block (no new output: a fresh (N, out) tensor costs its page faults, ~140 us at 2C2F
// B = 1024, more than the additions), the bias added last. Every sum is one IEEE addition of
// the same two operands in both, so the bits are the reference's (tested), which the frozen
// model (torch ops) and ONNX Runtime reproduce.
// Rounding chain of a product: b' - 1 additions in its block, ceil(log2 k) in the tree, one
// for the bias: at most b' + k - 1, what the sound allowance assumes (docs/soundness.md).
// Backward: grad_x = g W, grad_W = g^T x, grad_b = sum of g over the leading dimensions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace gloro_fast {
namespace {

// elements of one tile: the tree's first level reads the k blocks' tiles once and writes
// k/2 sums into a buffer of ceil(k/2) tiles, one per task (4 KiB each for float: 32 KiB for
// k = 16, in L1), where the later levels stay; only the result goes back to memory, into
// the first block's tile
constexpr int64_t kTile = 1024;
constexpr int64_t kMaxBufferedBlocks = 64;  // buffered tiles: ceil(k / 2) <= 32 (128 KiB of floats)

template <typename scalar_t>
void tree_sum_in_place(scalar_t* parts, const scalar_t* bias, int64_t blocks, int64_t rows, int64_t out) {
  const int64_t stride = rows * out;  // elements of one block's product
  // ~64 K elements a task: a small product stays on the calling thread
  const int64_t grain = std::max<int64_t>(kTile, (int64_t{1} << 16) / std::max<int64_t>(1, blocks));
  at::parallel_for(0, stride, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> buffer;
    if (blocks > 1 && blocks <= kMaxBufferedBlocks) buffer.resize(static_cast<size_t>((blocks + 1) / 2 * kTile));
    for (int64_t t0 = begin; t0 < end; t0 += kTile) {
      const int64_t len = std::min(kTile, end - t0);
      scalar_t* result = parts + t0;
      if (blocks > 1) {
        // level 1 from the blocks (into the buffer, or in place beyond kMaxBufferedBlocks),
        // the later levels within it
        const bool buffered = !buffer.empty();
        auto slot = [&](int64_t i) { return buffered ? buffer.data() + i * kTile : parts + i * stride + t0; };
        int64_t m = blocks;
        bool first = true;
        while (m > 1) {
          const int64_t h = m / 2;
          for (int64_t i = 0; i < h; ++i) {
            scalar_t* dst = slot(i);
            const scalar_t* lhs = first ? parts + i * stride + t0 : slot(i);
            const scalar_t* rhs = first ? parts + (i + h) * stride + t0 : slot(i + h);
#pragma omp simd
            for (int64_t e = 0; e < len; ++e) dst[e] = lhs[e] + rhs[e];
          }
          if (m % 2 == 1) {  // the odd entry moves up to position h
            const scalar_t* src = first ? parts + (2 * h) * stride + t0 : slot(2 * h);
            std::copy(src, src + len, slot(h));
          }
          m = h + m % 2;
          first = false;
        }
        if (buffered) std::copy(buffer.data(), buffer.data() + len, result);
      }
      if (bias != nullptr) {
        // element e of the tile is output column (t0 + e) mod out
        int64_t col = t0 % out;
        for (int64_t e = 0; e < len;) {
          const int64_t run = std::min(len - e, out - col);
          scalar_t* dst = result + e;
          const scalar_t* bb = bias + col;
#pragma omp simd
          for (int64_t j = 0; j < run; ++j) dst[j] = dst[j] + bb[j];
          e += run;
          col = 0;
        }
      }
    }
  });
}

at::Tensor blocked_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              int64_t blocks) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "blocked_linear (CPU kernel): x and weight must be CPU tensors");
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1),
              "blocked_linear: x (*, n) and weight (out, n) must share n");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "blocked_linear: x and weight must share a dtype");
  const int64_t n = weight.size(1);
  const int64_t out = weight.size(0);
  TORCH_CHECK(blocks >= 1 && blocks <= std::max<int64_t>(1, n), "blocked_linear: blocks must lie in [1, n]");
  const int64_t b = (n + blocks - 1) / blocks;
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor h = x.reshape({-1, n});
  at::Tensor w = weight;
  if (blocks * b != n) {  // zero padding: exact zero products
    h = at::constant_pad_nd(h, {0, blocks * b - n});
    w = at::constant_pad_nd(w, {0, blocks * b - n});
  }
  const int64_t rows = h.size(0);
  at::Tensor parts = at::bmm(h.view({-1, blocks, b}).transpose(0, 1), w.view({out, blocks, b}).permute({1, 2, 0}));
  TORCH_INTERNAL_ASSERT(parts.is_contiguous());
  at::Tensor bias_c;
  if (bias.has_value()) {
    const at::Tensor& bv = *bias;
    TORCH_CHECK(bv.dim() == 1 && bv.size(0) == out && bv.scalar_type() == x.scalar_type() && bv.device().is_cpu(),
                "blocked_linear: bias must have shape (out,) and x's dtype and device");
    bias_c = bv.contiguous();
  }
  if (rows * out > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "blocked_linear_cpu", [&] {
      tree_sum_in_place<scalar_t>(parts.data_ptr<scalar_t>(), bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
                                  blocks, rows, out);
    });
  }
  lead.push_back(out);
  return parts.select(0, 0).view(lead);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blocked_linear_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                           const at::Tensor& weight, bool has_bias) {
  const at::Tensor g = grad.reshape({-1, weight.size(0)});
  const at::Tensor h = x.reshape({-1, weight.size(1)});
  at::Tensor grad_x = at::mm(g, weight).reshape(x.sizes());
  at::Tensor grad_w = at::mm(g.t(), h);
  at::Tensor grad_b = has_bias ? g.sum(0) : at::empty({0}, weight.options());
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CPU, m) {
  m.impl("blocked_linear", &gloro_fast::blocked_linear_cpu);
  m.impl("blocked_linear_backward", &gloro_fast::blocked_linear_backward_cpu);
}
