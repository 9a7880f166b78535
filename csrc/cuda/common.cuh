// Device helpers shared by the CUDA kernels of csrc/cuda/*.cu (no torch headers, like the
// kernels themselves): warp and block sums, and the smallest normal number of a type.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>

namespace gloro_fast {
namespace cuda {

constexpr int kWarp = 32;

// Sum over the 32 lanes of a warp (every lane must take part); the result is in lane 0.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a 1-D or 2-D block of whole warps (at most 1024 threads); the result is in thread 0.
// Each warp is summed first, then the warp sums by warp 0, always in the same order: the result
// does not depend on scheduling. One call per kernel: the shared buffer is not re-armed.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[kWarp];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int n_warps = (blockDim.x * blockDim.y + kWarp - 1) / kWarp;
  v = warp_sum(v);
  if (tid % kWarp == 0) partial[tid / kWarp] = v;
  __syncthreads();
  v = tid < n_warps ? partial[tid] : T(0);
  if (tid < kWarp) v = warp_sum(v);
  return v;
}

// The smallest normal number: a norm below it is divided by it instead (no overflow to inf).
template <typename T>
__device__ T tiny();
template <>
__device__ __forceinline__ float tiny<float>() { return FLT_MIN; }
template <>
__device__ __forceinline__ double tiny<double>() { return DBL_MIN; }

}  // namespace cuda
}  // namespace gloro_fast
