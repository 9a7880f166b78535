// CUDA epilogues of gloro_fast::power_iteration_conv, on raw pointers (no torch headers); the
// convolutions themselves are cuDNN's (at::convolution in csrc/cuda/power_iteration_conv.cpp).
//
// Data: `blocks` layers of `per` contiguous elements each (N stacked layers of one batched call).
//   normalize: out = y / ||y|| per layer with y = x (+ add, the residual), or old where ||y|| = 0:
//              pass 1 writes y and adds the per-layer sum of squares (block reduction, one double
//              atomicAdd per block); pass 2 scales. 2 launches, grid (chunks, layers).
//   norm:      sigma = ||x (+ add)|| per layer in ONE launch: the last block of a layer to finish
//              (threadfence + counter) takes the square root and resets its accumulator and counter.
// Accumulators: `acc` (blocks doubles) and `count` (blocks unsigned) must be zero on entry; both
// are left zero on exit (norm) or must be re-zeroed by the caller (normalize leaves acc filled).
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace gloro_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // elements per thread per block pass
constexpr int64_t kChunk = int64_t{kThreads} * kPerThread;

// grid (chunks, blocks): y = x + add into out, acc[layer] += sum y^2 over the chunk.
template <typename T>
__global__ void sum_squares_kernel(const T* __restrict__ x, const T* __restrict__ add, T* __restrict__ out,
                                   double* acc, unsigned* count, T* sigma, int64_t per) {
  const int64_t layer = blockIdx.y;
  const int64_t begin = blockIdx.x * kChunk;
  const int64_t end = begin + kChunk < per ? begin + kChunk : per;
  const int64_t base = layer * per;
  double s = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    T y = x[base + i];
    if (add != nullptr) y += add[base + i];
    if (out != nullptr) out[base + i] = y;
    s += static_cast<double>(y) * static_cast<double>(y);
  }
  const double total = block_sum(s);
  if (threadIdx.x == 0) {
    atomicAdd(acc + layer, total);
    if (sigma != nullptr) {  // norm: the layer's last block finishes it
      __threadfence();
      const unsigned done = atomicAdd(count + layer, 1u);
      if (done == gridDim.x - 1) {
        const double sq = atomicAdd(acc + layer, 0.0);  // coherent read of the final sum
        sigma[layer] = static_cast<T>(sqrt(sq));
        acc[layer] = 0.0;
        count[layer] = 0u;
      }
    }
  }
}

// grid (chunks, blocks): out = out / ||.|| (the norm from acc), or old where it is 0.
template <typename T>
__global__ void scale_kernel(T* __restrict__ out, const T* __restrict__ old, const double* acc, int64_t per) {
  const int64_t layer = blockIdx.y;
  const int64_t begin = blockIdx.x * kChunk;
  const int64_t end = begin + kChunk < per ? begin + kChunk : per;
  const int64_t base = layer * per;
  const T norm = static_cast<T>(sqrt(acc[layer]));
  // norm - norm == 0: finite (inf - inf and NaN - NaN are NaN); else keep the iterate
  if (norm > T(0) && norm - norm == T(0)) {
    const T denom = norm > tiny<T>() ? norm : tiny<T>();
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) out[base + i] = out[base + i] / denom;
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) out[base + i] = old[base + i];
  }
}

dim3 grid_for(int64_t blocks, int64_t per) {
  const int64_t chunks = (per + kChunk - 1) / kChunk;
  return dim3(static_cast<unsigned>(chunks > 0 ? chunks : 1), static_cast<unsigned>(blocks));
}

template <typename T>
void normalize_impl(const T* x, const T* add, const T* old, T* out, int64_t blocks, int64_t per, double* acc,
                    cudaStream_t stream) {
  if (blocks == 0) return;
  const dim3 grid = grid_for(blocks, per);
  sum_squares_kernel<T><<<grid, kThreads, 0, stream>>>(x, add, out, acc, nullptr, nullptr, per);
  scale_kernel<T><<<grid, kThreads, 0, stream>>>(out, old, acc, per);
}

template <typename T>
void norm_impl(const T* x, const T* add, T* sigma, int64_t blocks, int64_t per, double* acc, unsigned* count,
               cudaStream_t stream) {
  if (blocks == 0) return;
  sum_squares_kernel<T><<<grid_for(blocks, per), kThreads, 0, stream>>>(x, add, nullptr, acc, count, sigma, per);
}

}  // namespace

// ---- launchers (declared again in csrc/cuda/power_iteration_conv.cpp) ----
// x, add (nullable), old, out: `blocks` x `per` contiguous; acc: `blocks` zeroed doubles.
void power_iteration_conv_normalize_launch(const float* x, const float* add, const float* old, float* out,
                                           int64_t blocks, int64_t per, double* acc, cudaStream_t stream) {
  normalize_impl<float>(x, add, old, out, blocks, per, acc, stream);
}
void power_iteration_conv_normalize_launch(const double* x, const double* add, const double* old, double* out,
                                           int64_t blocks, int64_t per, double* acc, cudaStream_t stream) {
  normalize_impl<double>(x, add, old, out, blocks, per, acc, stream);
}

// sigma: `blocks` outputs; acc, count: `blocks` zeroed accumulators (left zeroed).
void power_iteration_conv_norm_launch(const float* x, const float* add, float* sigma, int64_t blocks, int64_t per,
                                      double* acc, unsigned* count, cudaStream_t stream) {
  norm_impl<float>(x, add, sigma, blocks, per, acc, count, stream);
}
void power_iteration_conv_norm_launch(const double* x, const double* add, double* sigma, int64_t blocks,
                                      int64_t per, double* acc, unsigned* count, cudaStream_t stream) {
  norm_impl<double>(x, add, sigma, blocks, per, acc, count, stream);
}

}  // namespace cuda
}  // namespace gloro_fast
