// CUDA kernels of gloro_fast::bottom_logit / bottom_logit_backward (no torch headers: raw
// pointers, launched by the extern functions at the bottom; csrc/cuda/bottom_logit.cpp binds them).
//
//   forward  : one block per row b: j = classes[b] or the block argmax of f_b (lowest index on
//              ties), then a block arg-max of f_bi + c D_ji over i != j (lowest i on ties),
//              c = eps * K read on the device (no host sync). Warp shuffles + shared memory.
//   backward : grad_f[b, i*_b] = g_b and grad_D[j_b, i*_b] += g_b c (atomicAdd: rows may share
//              a cell) in one grid-stride pass; grad_K = eps sum_b g_b D[j_b, i*_b] by a single
//              block reduction (deterministic).
// Class indices are validated in Python; a kernel seeing one out of range writes NaN and i* = -1.
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "common.cuh"

namespace gloro_fast {
namespace cuda {
namespace {

constexpr int64_t kNoIndex = INT64_MAX;

template <typename T>
struct ArgMax {
  T value;
  int64_t index;
};

// b beats a: larger value, or equal value and lower index
template <typename T>
__device__ __forceinline__ ArgMax<T> better(ArgMax<T> a, ArgMax<T> b) {
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

template <typename T>
__device__ __forceinline__ ArgMax<T> warp_argmax(ArgMax<T> a) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    ArgMax<T> other;
    other.value = __shfl_down_sync(0xffffffffu, a.value, offset);
    other.index = __shfl_down_sync(0xffffffffu, static_cast<long long>(a.index), offset);
    a = better(a, other);
  }
  return a;
}

// Arg-max over the block (blockDim.x a multiple of 32), returned to every thread.
template <typename T>
__device__ ArgMax<T> block_argmax(ArgMax<T> a) {
  __shared__ T values[kWarp];
  __shared__ int64_t indices[kWarp];
  __shared__ ArgMax<T> result;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  a = warp_argmax(a);
  if (lane == 0) {
    values[warp] = a.value;
    indices[warp] = a.index;
  }
  __syncthreads();
  if (warp == 0) {
    const int n_warps = (blockDim.x + kWarp - 1) / kWarp;
    ArgMax<T> b{static_cast<T>(-CUDART_INF), kNoIndex};
    if (lane < n_warps) b = ArgMax<T>{values[lane], indices[lane]};
    b = warp_argmax(b);
    if (lane == 0) result = b;
  }
  __syncthreads();
  const ArgMax<T> out = result;
  __syncthreads();  // the shared buffers may be reused by the next call
  return out;
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ logits, const T* __restrict__ dist,
                               const T* __restrict__ lipschitz, T eps, const int64_t* __restrict__ classes,
                               T* __restrict__ bottom, int64_t* __restrict__ i_star, int64_t* __restrict__ j_out,
                               int64_t C) {
  const int64_t b = blockIdx.x;
  const T* row = logits + b * C;
  int64_t j;
  if (classes != nullptr) {
    j = classes[b];
  } else {
    ArgMax<T> a{static_cast<T>(-CUDART_INF), kNoIndex};
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) a = better(a, ArgMax<T>{row[i], i});
    j = block_argmax(a).index;
  }
  if (j < 0 || j >= C) {  // uniform over the block
    if (threadIdx.x == 0) {
      bottom[b] = static_cast<T>(CUDART_NAN);
      i_star[b] = -1;
      j_out[b] = j;
    }
    return;
  }
  const T c = eps * lipschitz[0];
  const T* drow = dist + j * C;
  ArgMax<T> a{static_cast<T>(-CUDART_INF), kNoIndex};
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
    if (i != j) a = better(a, ArgMax<T>{row[i] + c * drow[i], i});
  }
  a = block_argmax(a);
  if (threadIdx.x == 0) {
    bottom[b] = a.value;
    i_star[b] = a.index;
    j_out[b] = j;
  }
}

template <typename T>
__global__ void backward_scatter_kernel(const T* __restrict__ grad, const T* __restrict__ lipschitz, T eps,
                                        const int64_t* __restrict__ i_star, const int64_t* __restrict__ classes,
                                        T* __restrict__ grad_f, T* __restrict__ grad_d, int64_t B, int64_t C) {
  const T c = eps * lipschitz[0];
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = i_star[b], j = classes[b];
    if (i < 0 || i >= C || j < 0 || j >= C) continue;
    const T g = grad[b];
    grad_f[b * C + i] = g;
    atomicAdd(grad_d + j * C + i, g * c);
  }
}

template <typename T>
__global__ void backward_lipschitz_kernel(const T* __restrict__ grad, const T* __restrict__ dist, T eps,
                                          const int64_t* __restrict__ i_star, const int64_t* __restrict__ classes,
                                          T* __restrict__ grad_k, int64_t B, int64_t C) {
  T acc = T(0);
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const int64_t i = i_star[b], j = classes[b];
    if (i >= 0 && i < C && j >= 0 && j < C) acc += grad[b] * dist[j * C + i];
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) grad_k[0] = eps * acc;
}

int threads_for(int64_t C) { return C <= 64 ? 32 : C <= 512 ? 128 : 256; }

template <typename T>
cudaError_t launch_forward(const T* logits, const T* dist, const T* lipschitz, double eps, const int64_t* classes,
                           T* bottom, int64_t* i_star, int64_t* j_out, int64_t B, int64_t C, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  forward_kernel<T><<<static_cast<unsigned>(B), threads_for(C), 0, stream>>>(
      logits, dist, lipschitz, static_cast<T>(eps), classes, bottom, i_star, j_out, C);
  return cudaGetLastError();
}

// grad_f and grad_d must be zero-filled by the caller.
template <typename T>
cudaError_t launch_backward(const T* grad, const T* dist, const T* lipschitz, double eps, const int64_t* i_star,
                            const int64_t* classes, T* grad_f, T* grad_d, T* grad_k, int64_t B, int64_t C,
                            cudaStream_t stream) {
  if (B > 0) {
    constexpr int threads = 256;
    const int64_t blocks = (B + threads - 1) / threads < 65535 ? (B + threads - 1) / threads : 65535;
    backward_scatter_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        grad, lipschitz, static_cast<T>(eps), i_star, classes, grad_f, grad_d, B, C);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  backward_lipschitz_kernel<T><<<1, 256, 0, stream>>>(grad, dist, static_cast<T>(eps), i_star, classes, grad_k, B, C);
  return cudaGetLastError();
}

}  // namespace

// ---- launchers (declared in csrc/cuda/bottom_logit.cpp) ----
cudaError_t bottom_logit_forward(const float* logits, const float* dist, const float* lipschitz, double eps,
                                 const int64_t* classes, float* bottom, int64_t* i_star, int64_t* j_out, int64_t B,
                                 int64_t C, cudaStream_t s) {
  return launch_forward(logits, dist, lipschitz, eps, classes, bottom, i_star, j_out, B, C, s);
}
cudaError_t bottom_logit_forward(const double* logits, const double* dist, const double* lipschitz, double eps,
                                 const int64_t* classes, double* bottom, int64_t* i_star, int64_t* j_out, int64_t B,
                                 int64_t C, cudaStream_t s) {
  return launch_forward(logits, dist, lipschitz, eps, classes, bottom, i_star, j_out, B, C, s);
}
cudaError_t bottom_logit_backward(const float* grad, const float* dist, const float* lipschitz, double eps,
                                  const int64_t* i_star, const int64_t* classes, float* grad_f, float* grad_d,
                                  float* grad_k, int64_t B, int64_t C, cudaStream_t s) {
  return launch_backward(grad, dist, lipschitz, eps, i_star, classes, grad_f, grad_d, grad_k, B, C, s);
}
cudaError_t bottom_logit_backward(const double* grad, const double* dist, const double* lipschitz, double eps,
                                  const int64_t* i_star, const int64_t* classes, double* grad_f, double* grad_d,
                                  double* grad_k, int64_t B, int64_t C, cudaStream_t s) {
  return launch_backward(grad, dist, lipschitz, eps, i_star, classes, grad_f, grad_d, grad_k, B, C, s);
}

}  // namespace cuda
}  // namespace gloro_fast
