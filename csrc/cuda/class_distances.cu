// CUDA kernels of gloro_fast::class_distances / class_distances_backward (no torch headers:
// raw pointers, launched by the extern functions at the bottom; csrc/cuda/class_distances.cpp
// binds them to the op and does the GEMMs with at::mm).
//
//   gram epilogue : D_ji = sqrt(max(0, G_jj + G_ii - G_ji - G_ij)), 0 on the diagonal, from the
//                   Gram matrix G = V V^T of the centred rows (32x32 tiles, the transposed read
//                   staged through shared memory, so D is exactly symmetric).
//   exact         : one warp per pair (j, i), i > j: sum_k (w_jk - w_ik)^2 by lanes + warp
//                   shuffle reduction, written to [j, i] and [i, j].
//   backward      : S_ji = G_ji / D_ji + G_ij / D_ij (0 where D = 0) and its row sums (one block
//                   per row, block reduction); then grad_W = diag(S 1) V - S V (S V by at::mm).
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace gloro_fast {
namespace cuda {
namespace {

constexpr int kTile = 32;

template <typename T>
__global__ void gram_epilogue_kernel(const T* __restrict__ g, T* __restrict__ out, int64_t C) {
  __shared__ T transposed[kTile][kTile + 1];  // transposed[r][c] = G[i0 + r, j0 + c]
  __shared__ T diag_j[kTile], diag_i[kTile];
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x;
  for (int r = threadIdx.y; r < kTile; r += blockDim.y) {
    const int64_t i = i0 + r, j = j0 + tx;
    transposed[r][tx] = (i < C && j < C) ? g[i * C + j] : T(0);
  }
  if (threadIdx.y == 0) {
    const int64_t j = j0 + tx, i = i0 + tx;
    diag_j[tx] = j < C ? g[j * C + j] : T(0);
    diag_i[tx] = i < C ? g[i * C + i] : T(0);
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kTile; r += blockDim.y) {
    const int64_t j = j0 + r, i = i0 + tx;
    if (j >= C || i >= C) continue;
    T value = T(0);
    if (i != j) {
      const T sq = diag_j[r] + diag_i[tx] - (g[j * C + i] + transposed[tx][r]);
      value = sqrt(sq > T(0) ? sq : T(0));
    }
    out[j * C + i] = value;
  }
}

template <typename T>
__global__ void exact_distances_kernel(const T* __restrict__ w, T* __restrict__ out, int64_t C, int64_t d) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (pair >= C * C) return;  // whole warps leave together
  const int64_t j = pair / C, i = pair % C;
  if (i < j) return;  // the pair (i, j) writes this entry
  if (i == j) {
    if (lane == 0) out[j * C + j] = T(0);
    return;
  }
  const T* wj = w + j * d;
  const T* wi = w + i * d;
  T s = T(0);
  for (int64_t k = lane; k < d; k += kWarp) {
    const T diff = wj[k] - wi[k];
    s += diff * diff;
  }
  s = warp_sum(s);
  if (lane == 0) {
    const T v = sqrt(s);
    out[j * C + i] = v;
    out[i * C + j] = v;
  }
}

template <typename T>
__global__ void backward_sym_kernel(const T* __restrict__ grad, const T* __restrict__ dist, T* __restrict__ sym,
                                    T* __restrict__ rowsum, int64_t C) {
  const int64_t j = blockIdx.x;
  T acc = T(0);
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
    const T dji = dist[j * C + i], dij = dist[i * C + j];
    const T a = dji != T(0) ? grad[j * C + i] / dji : T(0);
    const T b = dij != T(0) ? grad[i * C + j] / dij : T(0);
    sym[j * C + i] = a + b;
    acc += a + b;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) rowsum[j] = acc;
}

template <typename T>
__global__ void backward_rows_kernel(const T* __restrict__ v, const T* __restrict__ sv, const T* __restrict__ rowsum,
                                     T* __restrict__ out, int64_t C, int64_t d) {
  const int64_t n = C * d;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[idx] = rowsum[idx / d] * v[idx] - sv[idx];
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
cudaError_t launch_gram_epilogue(const T* g, T* out, int64_t C, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  const dim3 block(kTile, 8);
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kTile)), static_cast<unsigned>(ceil_div(C, kTile)));
  gram_epilogue_kernel<T><<<grid, block, 0, stream>>>(g, out, C);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_exact(const T* w, T* out, int64_t C, int64_t d, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  constexpr int threads = 256;
  const int64_t blocks = ceil_div(C * C * kWarp, threads);
  exact_distances_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(w, out, C, d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_sym(const T* grad, const T* dist, T* sym, T* rowsum, int64_t C, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  const int threads = C <= 64 ? 64 : C <= 512 ? 128 : 256;
  backward_sym_kernel<T><<<static_cast<unsigned>(C), threads, 0, stream>>>(grad, dist, sym, rowsum, C);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_rows(const T* v, const T* sv, const T* rowsum, T* out, int64_t C, int64_t d,
                                 cudaStream_t stream) {
  const int64_t n = C * d;
  if (n == 0) return cudaSuccess;
  constexpr int threads = 256;
  const int64_t blocks = ceil_div(n, threads) < 65535 ? ceil_div(n, threads) : 65535;
  backward_rows_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(v, sv, rowsum, out, C, d);
  return cudaGetLastError();
}

}  // namespace

// ---- launchers (declared in csrc/cuda/class_distances.cpp) ----
cudaError_t class_distances_gram_epilogue(const float* g, float* out, int64_t C, cudaStream_t s) {
  return launch_gram_epilogue(g, out, C, s);
}
cudaError_t class_distances_gram_epilogue(const double* g, double* out, int64_t C, cudaStream_t s) {
  return launch_gram_epilogue(g, out, C, s);
}
cudaError_t class_distances_exact(const float* w, float* out, int64_t C, int64_t d, cudaStream_t s) {
  return launch_exact(w, out, C, d, s);
}
cudaError_t class_distances_exact(const double* w, double* out, int64_t C, int64_t d, cudaStream_t s) {
  return launch_exact(w, out, C, d, s);
}
cudaError_t class_distances_backward_sym(const float* grad, const float* dist, float* sym, float* rowsum, int64_t C,
                                         cudaStream_t s) {
  return launch_backward_sym(grad, dist, sym, rowsum, C, s);
}
cudaError_t class_distances_backward_sym(const double* grad, const double* dist, double* sym, double* rowsum,
                                         int64_t C, cudaStream_t s) {
  return launch_backward_sym(grad, dist, sym, rowsum, C, s);
}
cudaError_t class_distances_backward_rows(const float* v, const float* sv, const float* rowsum, float* out, int64_t C,
                                          int64_t d, cudaStream_t s) {
  return launch_backward_rows(v, sv, rowsum, out, C, d, s);
}
cudaError_t class_distances_backward_rows(const double* v, const double* sv, const double* rowsum, double* out,
                                          int64_t C, int64_t d, cudaStream_t s) {
  return launch_backward_rows(v, sv, rowsum, out, C, d, s);
}

}  // namespace cuda
}  // namespace gloro_fast
