// CUDA kernels of gloro_fast::power_iteration_linear (+ backward), on raw pointers (no torch
// headers); the launchers below are called by csrc/cuda/power_iteration_linear.cpp.
//
// All layers of a call share every launch: a device table holds each layer's pointers, sizes
// and offsets, and a block finds its layer by binary search over the table's block prefixes.
// One power iteration over ALL layers is 3 launches:
//   matvec     v = W u: one warp per row, warp-shuffle dot products; per-layer ||v||^2 by a
//              block reduction + one double atomicAdd per block (used for sigma at the end)
//   matvec_t   x = W^T v: blocks of 32 columns x 8 row slices (coalesced rows), shared-memory
//              reduction over the slices; per-layer ||x||^2 likewise
//   normalize  u = x / ||x||, keeping u where ||x|| = 0
// then the images y_l = W_l u_l (the last matvec writes them to the caller's buffer) and
// sigma_l = ||y_l|| (finalize). Both accumulators are zeroed by one memset
// before the loop, then each by the kernel that runs before its producer (stream order), so no
// memsets inside the loop; where that kernel has no blocks (every layer m = 0, or n = 0) its
// producer adds only zeros to the still-zero accumulator.
// Backward: grad_W_l = (g_l / sigma_l) y_l u_l^T (0 where sigma_l = 0) from the forward's images:
// one outer-product launch, W is not read.
//
// The layer table reaches the device through the parameters of fill_table_kernel (<= 3 KB a
// launch), never a copy from host memory: a launch is captured by value in a CUDA graph, while a
// cudaMemcpyAsync from pageable memory is refused during capture (and may block the host).
// The per-layer sums of squares are float atomics (summation order varies from run to run): the
// binding reports the op to torch.use_deterministic_algorithms.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common.cuh"

namespace gloro_fast {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;    // matvec: 8 warps, one row each
constexpr int kColsPerBlock = 32;   // matvec_t: 32 columns ...
constexpr int kSlices = 8;          // ... x 8 row slices
constexpr int kThreads = 256;
constexpr size_t kTableChunk = 3072;  // bytes of the table per fill launch (kernel parameters <= 4 KB)

struct TableChunk {
  unsigned char bytes[kTableChunk];
};

// dst[0, n) = chunk.bytes[0, n): the table travels in the launch's parameters.
__global__ void fill_table_kernel(TableChunk chunk, unsigned n, unsigned char* dst) {
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) dst[i] = chunk.bytes[i];
}

// Copy the host table into device memory on `stream` by kernel launches (graph-capturable).
void upload_table(const void* host, size_t bytes, void* device, cudaStream_t stream) {
  const auto* src = static_cast<const unsigned char*>(host);
  auto* dst = static_cast<unsigned char*>(device);
  for (size_t off = 0; off < bytes; off += kTableChunk) {
    const size_t n = bytes - off < kTableChunk ? bytes - off : kTableChunk;
    TableChunk chunk;
    for (size_t i = 0; i < n; ++i) chunk.bytes[i] = src[off + i];
    fill_table_kernel<<<1, kThreads, 0, stream>>>(chunk, static_cast<unsigned>(n), dst + off);
  }
}

template <typename T>
struct Layer {
  const T* w;             // (m, n) row-major, contiguous
  T* u;                   // (n,) iterate, updated in place
  T* sigma;               // forward: output scalar
  const T* grad_sigma;    // backward: incoming gradient (scalar)
  const T* sigma_in;      // backward: sigma (scalar)
  T* grad;                // backward: (m, n) output
  int64_t m, n;
  int64_t v_off, x_off;   // offsets of the layer in the v (rows) and x (columns) buffers
  int64_t e_off;          // offset in the element space (backward outer product)
  int64_t row_block0;     // first matvec block
  int64_t col_block0;     // first matvec_t block
};

// Index of the last layer whose field `start` is <= key (layers sorted by start).
template <typename T, int64_t Layer<T>::*start>
__device__ int find_layer(const Layer<T>* table, int L, int64_t key) {
  int lo = 0, hi = L - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].*start <= key) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// v = W u for every row of every layer; vsq[l] += ||v_l||^2; zeroes xsq (consumed by matvec_t).
template <typename T>
__global__ void matvec_kernel(const Layer<T>* table, int L, T* v, double* vsq, double* xsq) {
  const int64_t block = blockIdx.x;
  const int l = find_layer<T, &Layer<T>::row_block0>(table, L, block);
  const Layer<T> ly = table[l];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (xsq != nullptr && blockIdx.x == 0) {
    for (int k = threadIdx.x; k < L; k += blockDim.x) xsq[k] = 0.0;
  }
  const int64_t i = (block - ly.row_block0) * kRowsPerBlock + warp;
  double sq = 0;
  if (i < ly.m) {
    const T* row = ly.w + i * ly.n;
    T s = 0;
    for (int64_t j = lane; j < ly.n; j += kWarp) s += row[j] * ly.u[j];
    s = warp_sum(s);
    if (lane == 0) {
      v[ly.v_off + i] = s;
      sq = static_cast<double>(s) * static_cast<double>(s);
    }
  }
  const double total = block_sum(sq);
  if (threadIdx.x == 0 && vsq != nullptr) atomicAdd(vsq + l, total);
}

// x = W^T v for every column of every layer; xsq[l] += ||x_l||^2; zeroes vsq (next matvec's).
template <typename T>
__global__ void matvec_t_kernel(const Layer<T>* table, int L, const T* v, T* x, double* xsq, double* vsq) {
  __shared__ T partial[kSlices][kColsPerBlock];
  const int64_t block = blockIdx.x;
  const int l = find_layer<T, &Layer<T>::col_block0>(table, L, block);
  const Layer<T> ly = table[l];
  const int tx = threadIdx.x, ty = threadIdx.y;
  if (blockIdx.x == 0) {
    for (int k = ty * blockDim.x + tx; k < L; k += kThreads) vsq[k] = 0.0;
  }
  const int64_t j = (block - ly.col_block0) * kColsPerBlock + tx;
  T s = 0;
  if (j < ly.n) {
    const T* vl = v + ly.v_off;
    for (int64_t i = ty; i < ly.m; i += kSlices) s += ly.w[i * ly.n + j] * vl[i];
  }
  partial[ty][tx] = s;
  __syncthreads();
  double sq = 0;
  if (ty == 0 && j < ly.n) {
    T total = 0;
    for (int k = 0; k < kSlices; ++k) total += partial[k][tx];
    x[ly.x_off + j] = total;
    sq = static_cast<double>(total) * static_cast<double>(total);
  }
  const double total = block_sum(sq);
  if (tx == 0 && ty == 0) atomicAdd(xsq + l, total);
}

// u = x / ||x|| per layer (old u kept where ||x|| = 0), flat over all columns.
template <typename T>
__global__ void normalize_kernel(const Layer<T>* table, int L, int64_t cols, const T* x, const double* xsq) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int l = find_layer<T, &Layer<T>::x_off>(table, L, c);
    const T norm = static_cast<T>(sqrt(xsq[l]));
    // norm - norm == 0: finite (inf - inf and NaN - NaN are NaN); else keep the iterate
    if (norm > T(0) && norm - norm == T(0)) {
      const T denom = norm > tiny<T>() ? norm : tiny<T>();
      table[l].u[c - table[l].x_off] = x[c] / denom;
    }
  }
}

template <typename T>
__global__ void sigma_kernel(const Layer<T>* table, int L, const double* vsq) {
  for (int l = blockIdx.x * blockDim.x + threadIdx.x; l < L; l += gridDim.x * blockDim.x) {
    *table[l].sigma = static_cast<T>(sqrt(vsq[l]));
  }
}

// grad_W = (g / sigma) v u^T per layer (0 where sigma = 0), flat over all elements.
template <typename T>
__global__ void outer_kernel(const Layer<T>* table, int L, int64_t elements, const T* v) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < elements;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int l = find_layer<T, &Layer<T>::e_off>(table, L, e);
    const Layer<T>& ly = table[l];
    const int64_t k = e - ly.e_off;
    const int64_t i = k / ly.n, j = k % ly.n;
    const T s = *ly.sigma_in;
    const T coef = s > T(0) ? *ly.grad_sigma / s : T(0);
    ly.grad[k] = coef * v[ly.v_off + i] * ly.u[j];
  }
}

// Workspace layout: [table | vsq (L doubles) | xsq (L doubles) | v (sum m) | x (sum n)], 256-aligned.
size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

struct Plan {
  size_t table_off, vsq_off, xsq_off, v_off, x_off, total;
  int64_t rows, cols, elements, row_blocks, col_blocks;
};

template <typename T>
Plan make_plan(const int64_t* m, const int64_t* n, int64_t L, std::vector<Layer<T>>* table) {
  Plan p{};
  for (int64_t l = 0; l < L; ++l) {
    if (table != nullptr) {
      Layer<T>& ly = (*table)[l];
      ly.m = m[l];
      ly.n = n[l];
      ly.v_off = p.rows;
      ly.x_off = p.cols;
      ly.e_off = p.elements;
      ly.row_block0 = p.row_blocks;
      ly.col_block0 = p.col_blocks;
    }
    p.rows += m[l];
    p.cols += n[l];
    p.elements += m[l] * n[l];
    p.row_blocks += (m[l] + kRowsPerBlock - 1) / kRowsPerBlock;
    p.col_blocks += (n[l] + kColsPerBlock - 1) / kColsPerBlock;
  }
  p.table_off = 0;
  p.vsq_off = align_up(sizeof(Layer<T>) * L);
  p.xsq_off = p.vsq_off + align_up(sizeof(double) * L);
  p.v_off = p.xsq_off + align_up(sizeof(double) * L);
  p.x_off = p.v_off + align_up(sizeof(T) * p.rows);
  p.total = p.x_off + align_up(sizeof(T) * p.cols);
  return p;
}

unsigned flat_blocks(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

template <typename T>
void forward_impl(const T* const* w, T* const* u, T* const* sigma, T* images, const int64_t* m, const int64_t* n,
                  int64_t L, int64_t n_iter, void* workspace, cudaStream_t stream) {
  if (L == 0) return;
  std::vector<Layer<T>> host(L);
  const Plan p = make_plan<T>(m, n, L, &host);
  for (int64_t l = 0; l < L; ++l) {
    host[l].w = w[l];
    host[l].u = u[l];
    host[l].sigma = sigma[l];
    host[l].grad_sigma = nullptr;
    host[l].sigma_in = nullptr;
    host[l].grad = nullptr;
  }
  char* base = static_cast<char*>(workspace);
  auto* table = reinterpret_cast<Layer<T>*>(base + p.table_off);
  auto* vsq = reinterpret_cast<double*>(base + p.vsq_off);
  auto* xsq = reinterpret_cast<double*>(base + p.xsq_off);
  T* v = reinterpret_cast<T*>(base + p.v_off);
  T* x = reinterpret_cast<T*>(base + p.x_off);
  upload_table(host.data(), sizeof(Layer<T>) * L, table, stream);
  // vsq and xsq (and the padding between them): xsq is read by normalize even when no matvec
  // block (which zeroes it in the loop) runs, i.e. when every layer has m = 0
  cudaMemsetAsync(base + p.vsq_off, 0, p.v_off - p.vsq_off, stream);
  const int iL = static_cast<int>(L);
  for (int64_t it = 0; it < n_iter; ++it) {
    if (p.row_blocks > 0) matvec_kernel<T><<<p.row_blocks, kThreads, 0, stream>>>(table, iL, v, vsq, xsq);
    if (p.col_blocks > 0) {
      matvec_t_kernel<T><<<p.col_blocks, dim3(kColsPerBlock, kSlices), 0, stream>>>(table, iL, v, x, xsq, vsq);
    }
    normalize_kernel<T><<<flat_blocks(p.cols), kThreads, 0, stream>>>(table, iL, p.cols, x, xsq);
  }
  if (p.row_blocks > 0) matvec_kernel<T><<<p.row_blocks, kThreads, 0, stream>>>(table, iL, images, vsq, nullptr);
  sigma_kernel<T><<<flat_blocks(L), kThreads, 0, stream>>>(table, iL, vsq);
}

template <typename T>
void backward_impl(const T* const* grad_sigma, const T* images, const T* const* u, const T* const* sigma,
                   T* const* grad_w, const int64_t* m, const int64_t* n, int64_t L, void* workspace,
                   cudaStream_t stream) {
  if (L == 0) return;
  std::vector<Layer<T>> host(L);
  const Plan p = make_plan<T>(m, n, L, &host);
  for (int64_t l = 0; l < L; ++l) {
    host[l].w = nullptr;               // not read: the images replace W u
    host[l].u = const_cast<T*>(u[l]);  // read only here
    host[l].sigma = nullptr;
    host[l].grad_sigma = grad_sigma[l];
    host[l].sigma_in = sigma[l];
    host[l].grad = grad_w[l];
  }
  char* base = static_cast<char*>(workspace);
  auto* table = reinterpret_cast<Layer<T>*>(base + p.table_off);
  upload_table(host.data(), sizeof(Layer<T>) * L, table, stream);
  const int iL = static_cast<int>(L);
  if (p.elements > 0) {
    outer_kernel<T><<<flat_blocks(p.elements), kThreads, 0, stream>>>(table, iL, p.elements, images);
  }
}

}  // namespace

// ---- launchers (declared again in csrc/cuda/power_iteration_linear.cpp) ----

// Bytes of device workspace the launchers below need for these layer sizes.
size_t power_iteration_linear_workspace_bytes(const int64_t* m, const int64_t* n, int64_t L, size_t elem_size) {
  if (elem_size == sizeof(double)) return make_plan<double>(m, n, L, nullptr).total;
  return make_plan<float>(m, n, L, nullptr).total;
}

// w[l]: (m[l], n[l]) contiguous; u[l]: (n[l],) iterate in, updated in place; sigma[l]: one scalar out;
// images: (sum m) out, the layers' W u end to end.
void power_iteration_linear_launch(const float* const* w, float* const* u, float* const* sigma, float* images,
                                   const int64_t* m, const int64_t* n, int64_t L, int64_t n_iter, void* workspace,
                                   cudaStream_t stream) {
  forward_impl<float>(w, u, sigma, images, m, n, L, n_iter, workspace, stream);
}
void power_iteration_linear_launch(const double* const* w, double* const* u, double* const* sigma, double* images,
                                   const int64_t* m, const int64_t* n, int64_t L, int64_t n_iter, void* workspace,
                                   cudaStream_t stream) {
  forward_impl<double>(w, u, sigma, images, m, n, L, n_iter, workspace, stream);
}

// grad_w[l] (m[l], n[l]) contiguous out; images: (sum m) the forward's W u end to end;
// grad_sigma[l], sigma[l]: device scalars.
void power_iteration_linear_backward_launch(const float* const* grad_sigma, const float* images,
                                            const float* const* u, const float* const* sigma, float* const* grad_w,
                                            const int64_t* m, const int64_t* n, int64_t L, void* workspace,
                                            cudaStream_t stream) {
  backward_impl<float>(grad_sigma, images, u, sigma, grad_w, m, n, L, workspace, stream);
}
void power_iteration_linear_backward_launch(const double* const* grad_sigma, const double* images,
                                            const double* const* u, const double* const* sigma,
                                            double* const* grad_w, const int64_t* m, const int64_t* n, int64_t L,
                                            void* workspace, cudaStream_t stream) {
  backward_impl<double>(grad_sigma, images, u, sigma, grad_w, m, n, L, workspace, stream);
}

}  // namespace cuda
}  // namespace gloro_fast
