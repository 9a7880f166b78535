// Host-side helpers of the CUDA bindings (csrc/cuda/*.cpp), on top of csrc/utils.h.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "../utils.h"

namespace gloro_fast {
namespace cuda {

// A launcher's cudaError_t (from cudaGetLastError) as a RuntimeError naming the op.
inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace gloro_fast
