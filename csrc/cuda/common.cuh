// Small helpers shared by the .cu files of axpo (host side).
#pragma once
#include <cuda_runtime.h>
#include <c10/util/Exception.h>

namespace axpo {

// Raises (TORCH_CHECK) if the last kernel launch failed; `what` names the op and kernel.
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "axpo: launch of ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace axpo
